//! Streaming: the source's changes, cut into target transactions by the
//! [`Batcher`], each applied with its checkpoint and then acknowledged to
//! the source; the source's position sampled for lag meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::batcher::{Batcher, Chunk};
use super::snapshot::TableCopier;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Change, TableSchema};
use crate::observe::{Observer, Phase, LAG_INTERVAL};
use crate::position::Position;
use crate::retry::Retry;
use crate::sink::Sink;
use crate::source::{Batch, Source};

/// How often positions with nothing to apply (keepalives of an idle
/// source) move the checkpoint, at most.
pub const IDLE_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How streaming ended.
pub struct Streamed {
    /// Changes applied.
    pub applied: u64,
    /// The last durable position.
    pub last: Position,
    /// The stop marker that ended it, if one did.
    pub stopped_by: Option<crate::model::Marker>,
}

/// What streaming needs of the pipeline.
pub struct Streamer {
    pub config: Arc<Config>,
    pub source: Arc<dyn Source>,
    pub sink: Arc<dyn Sink>,
    pub observer: Arc<Observer>,
    pub retry: Retry,
    /// Copies tables that appear or must be copied again while streaming.
    pub copier: TableCopier,
}

impl Streamer {
    /// Streams after `checkpoint` until cancelled, the source ends, or a
    /// stop marker (`cutover`) is reached.
    pub async fn run(
        &self,
        tables: Vec<Arc<TableSchema>>,
        checkpoint: Position,
        skip: HashMap<String, Position>,
        cancel: CancellationToken,
    ) -> Result<Streamed> {
        let cfg = &self.config.pipeline;
        // Every table streamed, for the indexes and foreign keys of a table
        // copied while streaming.
        let mut known = tables.clone();
        let (tx, mut rx) = mpsc::channel::<Batch>(cfg.queue_size);
        let reader_cancel = cancel.child_token();
        // On any return (an apply that failed included) the reader stops and
        // its replication connection closes.
        let _reader_guard = reader_cancel.clone().drop_guard();
        let reader_stop = reader_cancel.clone();
        let source = self.source.clone();
        let max = cfg.batch_rows;
        let reader = tokio::spawn(
            async move {
                source
                    .stream(tables, checkpoint, max, tx, reader_cancel)
                    .await
            }
            .instrument(tracing::info_span!("stream")),
        );
        info!(after = %checkpoint, "streaming changes");
        self.observer.set_phase(Phase::CatchUp);
        let _lag = self.watch_lag(checkpoint, &cancel);
        let delay = Duration::from_millis(cfg.batch_delay_ms);
        let mut batcher = Batcher::new(checkpoint, cfg.batch_rows, IDLE_CHECKPOINT_EVERY, skip);
        let mut applied = 0u64;
        let mut last = checkpoint;
        let mut summary = Summary::default();
        let mut stopped_by = None;
        let mut open = true;
        while open {
            // Idle: the first change waits up to batch_delay_ms for company.
            // Behind (changes queued while the last batch was applied): what
            // is queued goes in at once.
            let mut idle = false;
            if batcher.waiting() == 0 {
                idle = rx.is_empty();
                let due = batcher.due();
                tokio::select! {
                    b = rx.recv() => match b {
                        Some(b) => batcher.push(b),
                        None => open = false,
                    },
                    _ = sleep_until(due), if due.is_some() => {}
                    _ = cancel.cancelled() => open = false,
                }
            }
            let mut full = false;
            while open {
                if batcher.is_full() {
                    full = true;
                    break;
                }
                match rx.try_recv() {
                    Ok(b) => batcher.push(b),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let deadline = tokio::time::Instant::now() + delay;
            while idle && open && batcher.waiting() > 0 && !batcher.is_full() {
                tokio::select! {
                    b = rx.recv() => match b {
                        Some(b) => batcher.push(b),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = cancel.cancelled() => open = false,
                }
            }
            // On the way out, what was received is applied and recorded.
            while let Some(chunk) = batcher.next(Instant::now(), !open) {
                if let Some(marker) = &chunk.copy {
                    let at = match self.copy(marker, &mut known, &cancel).await {
                        Ok(at) => at,
                        // Stopped as asked in the middle of a copy: the
                        // table is copied again on the next start, and
                        // nothing after it was applied.
                        Err(e) if e.kind() == ErrorKind::Interrupted && cancel.is_cancelled() => {
                            info!("{}", e.report());
                            open = false;
                            break;
                        }
                        Err(e) => return Err(e),
                    };
                    batcher.copied(&marker.table.name, at);
                    continue;
                }
                if let Some(marker) = chunk.marker.clone() {
                    last = self.apply(&chunk, false).await?;
                    batcher.applied(last);
                    self.retry
                        .run("recording a cutover marker", || {
                            self.sink.mark(&marker, last, applied)
                        })
                        .await?;
                    info!(marker = %marker.id, checkpoint = %last, stop = marker.stop, "cutover marker reached the target");
                    if marker.stop {
                        stopped_by = Some(marker);
                        open = false;
                        break;
                    }
                    continue;
                }
                let backlog = chunk.more || full;
                last = self.apply(&chunk, backlog).await?;
                batcher.applied(last);
                applied += chunk.changes.len() as u64;
                if !chunk.changes.is_empty() {
                    summary.add(&chunk.changes, last);
                }
            }
        }
        summary.flush(last);
        if let Some(marker) = &stopped_by {
            reader_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
            info!(checkpoint = %last, changes = applied, cutover = %marker.id, "streaming stopped: the cutover ended forward replication here");
        } else {
            reader_cancel_and_wait(reader, &cancel).await?;
            info!(checkpoint = %last, changes = applied, "streaming stopped");
        }
        Ok(Streamed {
            applied,
            last,
            stopped_by,
        })
    }

    /// Applies one chunk with its checkpoint (the target follows the schema
    /// changes it holds), then acknowledges it to the source.
    async fn apply(&self, chunk: &Chunk, backlog: bool) -> Result<Position> {
        let started = Instant::now();
        let changes: &[Change] = &chunk.changes;
        let durable = self
            .retry
            .run("applying changes", || async {
                let r = self.sink.apply(changes, chunk.upto).await;
                if r.is_err() {
                    metrics::gauge!(crate::metric::CONNECTION_UP, "side" => "target").set(0.0);
                }
                r
            })
            .await?;
        let last = durable.position();
        self.observer.applied(
            changes,
            last,
            chunk.committed_at,
            started.elapsed(),
            backlog,
        );
        tracing::debug!(changes = changes.len(), checkpoint = %last, "batch applied");
        if let Err(e) = self.source.ack(durable).await {
            warn!(error = %e.report(), "could not acknowledge the applied position to the source; retried with the next batch");
        }
        Ok(last)
    }

    /// Copies a table while streaming, at a snapshot of its own (its
    /// changes at or below that position are then dropped from the stream):
    /// a table created in the source, or one whose rows changed without row
    /// changes in the stream. The stream waits meanwhile; the source's
    /// reader goes on filling its bounded queue.
    async fn copy(
        &self,
        marker: &Change,
        known: &mut Vec<Arc<TableSchema>>,
        cancel: &CancellationToken,
    ) -> Result<Position> {
        let table = marker.table.clone();
        if let crate::model::Op::Ddl(crate::model::Ddl::Copy { reason }) = &marker.op {
            info!(table = %table.name, reason = %reason, "copying the table while streaming");
        }
        let report = self.copier.copy(table.clone(), cancel).await;
        // The next copy reads the source as it is then.
        self.source.release_snapshot().await;
        let report = report?;
        known.retain(|t| t.name != table.name);
        known.push(table);
        self.retry
            .run("building indexes and foreign keys", || {
                self.sink.after_snapshot(known)
            })
            .await?;
        info!(table = %report.table, rows = report.rows, position = %report.position, "table copied while streaming");
        Ok(report.at)
    }

    /// Samples the source's position against the applied one, until the
    /// returned guard is dropped.
    fn watch_lag(
        &self,
        checkpoint: Position,
        cancel: &CancellationToken,
    ) -> tokio_util::sync::DropGuard {
        let stop = cancel.child_token();
        let source = self.source.clone();
        let observer = self.observer.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let applied = observer.checkpoint().unwrap_or(checkpoint);
                match source.lag(applied).await {
                    Ok(lag) => observer.source_lag(&lag),
                    Err(e) => {
                        observer.source_unreachable();
                        tracing::debug!(error = %e.report(), "cannot read the source's position");
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(LAG_INTERVAL) => {}
                }
            }
        });
        stop.drop_guard()
    }
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn reader_cancel_and_wait(
    reader: tokio::task::JoinHandle<Result<()>>,
    cancel: &CancellationToken,
) -> Result<()> {
    if cancel.is_cancelled() {
        // The reader sees the same token; give it a moment to finish cleanly.
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        return Ok(());
    }
    match reader.await {
        Ok(r) => r,
        Err(e) => Err(Error::definite(format!("the change reader failed: {e}"))),
    }
}

/// Applied-change counts, logged at once after a quiet spell and then at most
/// every two seconds.
#[derive(Default)]
struct Summary {
    last_flush: Option<Instant>,
    changes: u64,
    batches: u64,
    per_table: std::collections::BTreeMap<String, u64>,
}

impl Summary {
    fn add(&mut self, changes: &[Change], at: Position) {
        self.batches += 1;
        self.changes += changes.len() as u64;
        for c in changes {
            *self.per_table.entry(c.table.name.clone()).or_default() += 1;
        }
        if self
            .last_flush
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            self.flush(at);
        }
    }

    fn flush(&mut self, at: Position) {
        if self.batches == 0 {
            return;
        }
        let tables: Vec<String> = self
            .per_table
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        info!(changes = self.changes, batches = self.batches, tables = %tables.join(","), checkpoint = %at, "applied");
        *self = Summary {
            last_flush: Some(Instant::now()),
            ..Default::default()
        };
    }
}

//! The pipeline: snapshot, then stream, with bounded queues and retries.
//!
//! ```text
//!            install capture (before any position is read)
//!                   │
//!  snapshot:  source.snapshot(T) ──[queue: Vec<Row>]──▶ sink.load(T)       per table, at its Ct
//!                   │                                    sink.finish_table(T, Ct)
//!  stream:    source.stream(after checkpoint) ──[queue: Vec<Change>]──▶ batch (rows, delay)
//!                                                            │  drop changes of T at or below Ct
//!                                                            ▼
//!                                 sink.apply(batch, last position) ── one target transaction,
//!                                                            │         checkpoint included
//!                                 source.ack(Durable) ◀──────┘   (trim the log / flush the slot)
//! ```
//!
//! Every queue is bounded, so a slow sink slows the source and memory stays
//! bounded whatever the size of a table or of the stream.

use std::collections::HashMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::{Config, PipelineConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Change, Position, TableSchema};
use crate::observe::{Observer, Phase};
use crate::sink::{self, Sink, TableStatus};
use crate::source::{self, Batch, Problem, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy what is not copied yet, then stream until cancelled.
    Run,
    /// Copy what is not copied yet, then return.
    SnapshotOnly,
}

/// One table's line in the snapshot report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    pub target: String,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Copied in an earlier run; nothing was done now.
    pub already_copied: bool,
    /// Copied as the source's COPY text, without decoding rows.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pass_through: bool,
    /// Rows set aside in the table's reject file (`pipeline.reject_dir`).
    #[serde(skip_serializing_if = "is_zero")]
    pub rejected: u64,
    /// The snapshot position `Ct`, as text (an LSN for PostgreSQL).
    pub position: String,
    #[serde(skip)]
    pub at: Position,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub changes_applied: u64,
    pub checkpoint: Option<String>,
}

pub struct Pipeline {
    config: Arc<Config>,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    /// The progress bars of tables copied at the same time.
    bars: indicatif::MultiProgress,
    observer: Arc<Observer>,
}

/// The wait before attempt `attempt + 1` of a loop that retries by itself:
/// doubling from 200 ms, at most `max`.
pub fn backoff_delay(attempt: usize, max: Duration) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(30) as u32)).min(max)
}

/// Runs `op` again on transient errors with exponential backoff and jitter.
pub async fn retry<T, F, Fut>(cfg: &PipelineConfig, what: &str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(cfg.retry_max_delay_ms))
        .with_max_times(cfg.retry_attempts)
        .with_jitter();
    op.retry(policy)
        .when(|e: &Error| e.is_transient())
        .notify(|e: &Error, wait: Duration| {
            Observer::retry(what, e);
            if what == "applying changes" {
                metrics::gauge!(crate::observe::names::CONNECTION_UP, "side" => "target").set(0.0);
            }
            warn!(error = %e.report(), retry_in_ms = wait.as_millis() as u64, "{what} failed, retrying")
        })
        .await
}

impl Pipeline {
    pub async fn open(config: Arc<Config>) -> Result<Self> {
        let source: Arc<dyn Source> = Arc::from(source::open(&config).await?);
        let sink: Arc<dyn Sink> = Arc::from(sink::open(&config).await?);
        Ok(Self::new(config, source, sink))
    }

    /// A pipeline over a source and sink opened by the caller (tests keep a
    /// handle on the sink to read the target while the pipeline runs).
    pub fn new(config: Arc<Config>, source: Arc<dyn Source>, sink: Arc<dyn Sink>) -> Self {
        let observer = Observer::new(
            crate::config::redact_url(&config.source.url),
            crate::config::redact_url(&config.target.url),
            config.rejects.clone(),
        );
        Self {
            config,
            source,
            sink,
            bars: indicatif::MultiProgress::new(),
            observer,
        }
    }

    /// The status board this pipeline writes (for the HTTP endpoints).
    pub fn observer(&self) -> Arc<Observer> {
        self.observer.clone()
    }

    /// The selected tables, or every blocking problem at once.
    pub async fn tables(&self) -> Result<Vec<Arc<TableSchema>>> {
        let d = self.source.discover().await?;
        for p in d.problems.iter().filter(|p| !p.blocking) {
            warn!(table = %p.table, column = p.column.as_deref().unwrap_or(""), "{}", p.message);
        }
        let blocking: Vec<&Problem> = d.problems.iter().filter(|p| p.blocking).collect();
        if !blocking.is_empty() {
            let list: Vec<String> = blocking.iter().map(|p| p.to_string()).collect();
            return Err(Error::definite(format!(
                "cannot replicate: {}",
                list.join("; ")
            )));
        }
        if d.tables.is_empty() {
            return Err(Error::config(
                "no source table matches tables.include / tables.exclude; nothing to replicate",
            ));
        }
        Ok(d.tables.into_iter().map(Arc::new).collect())
    }

    pub async fn run(&self, mode: Mode, cancel: CancellationToken) -> Result<Report> {
        let outcome = self.run_inner(mode, cancel).await;
        match &outcome {
            Err(e) if e.kind() != ErrorKind::Interrupted => self.observer.failed(e),
            _ => self.observer.stopped(),
        }
        outcome
    }

    async fn run_inner(&self, mode: Mode, cancel: CancellationToken) -> Result<Report> {
        if let Some(dir) = &self.config.pipeline.reject_dir {
            crate::reject::prepare(dir)?;
        }
        let tables = self.tables().await?;
        let cfg = &self.config.pipeline;
        retry(cfg, "creating the target schema", || {
            self.sink.prepare(&tables)
        })
        .await?;
        // Capture first: a change made after this point is in the log, so
        // every position read later (Ct) has the log behind it.
        let installed = retry(cfg, "installing change capture", || {
            self.source.install(&tables)
        })
        .await?;
        let mut state = retry(cfg, "reading the target state", || self.sink.state()).await?;
        let checkpoint = match state.checkpoint {
            Some(p) => {
                if let Some(origin) = &state.origin {
                    if origin != &installed.origin {
                        return Err(Error::definite(format!(
                            "the target was filled from another change capture ({origin}) than the source has now ({}): \
                             `switchyard uninstall` was run or the source was replaced, so changes may be missing. \
                             Replicate into an empty target (a new namespace or database)",
                            installed.origin
                        )));
                    }
                }
                self.source.verify_resume(p).await?;
                if let Some(t) = state
                    .checkpoint_updated_at
                    .as_deref()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                {
                    self.observer.resumed_from(t.with_timezone(&chrono::Utc));
                }
                info!(checkpoint = %p, "resuming after the target's checkpoint");
                p
            }
            None => {
                let p = retry(cfg, "reading the source position", || {
                    self.source.current_position()
                })
                .await?;
                retry(cfg, "recording the start position", || {
                    self.sink.start(p, &installed.origin)
                })
                .await?;
                info!(position = %p, "no checkpoint in the target: copying from scratch");
                p
            }
        };
        // A table copied earlier is stale if its capture had to be created
        // again, or if it was left out of a run (its changes went unapplied).
        // So is a table dropped and created again under its name.
        let selected: HashMap<&str, &TableSchema> = tables
            .iter()
            .map(|t| (t.name.as_str(), t.as_ref()))
            .collect();
        let recreated = |name: &str, copied: &str| {
            selected.get(name).is_some_and(|t| {
                !t.source_id.is_empty() && !copied.is_empty() && t.source_id != copied
            })
        };
        let stale: Vec<String> = state
            .tables
            .iter()
            .filter(|(name, s)| {
                !selected.contains_key(name.as_str())
                    || installed.recaptured.contains(*name)
                    || recreated(name, &s.source_id)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if recreated(&name, &state.tables[&name].source_id) {
                warn!(table = %name, "this is not the table that was copied (it was dropped and created again): copying it again");
            } else if selected.contains_key(name.as_str()) {
                warn!(table = %name, "change capture of this table was missing (dropped or rebuilt?): copying it again");
            } else {
                info!(table = %name, "table is no longer selected: its copy in the target stops following the source");
            }
            retry(cfg, "forgetting a table's copy state", || {
                self.sink.forget_table(&name)
            })
            .await?;
            state.tables.remove(&name);
        }
        let mut report = Report::default();
        let mut skip: HashMap<String, Position> = HashMap::new();
        let mut to_copy = Vec::new();
        for t in &tables {
            match state.tables.get(&t.name) {
                Some(s) if s.status == TableStatus::Done => {
                    self.observer.table_copied(&t.name, s.rows, None);
                    report.tables.push(TableReport {
                        table: t.name.clone(),
                        target: t.target_name.clone(),
                        rows: s.rows,
                        seconds: 0.0,
                        rows_per_second: 0.0,
                        already_copied: true,
                        pass_through: false,
                        rejected: 0,
                        position: s.position.to_string(),
                        at: s.position,
                    });
                    if s.position > checkpoint {
                        skip.insert(t.name.clone(), s.position);
                    }
                }
                _ => to_copy.push(t.clone()),
            }
        }
        if !to_copy.is_empty() && cancel.is_cancelled() {
            return Err(Error::new(
                ErrorKind::Interrupted,
                "stopped before the snapshot finished",
            ));
        }
        self.observer.set_checkpoint(checkpoint);
        if !to_copy.is_empty() {
            self.observer.set_phase(Phase::Snapshot);
        }
        // Several tables at once; the first failure stops the others.
        let workers = cfg.snapshot_workers.max(1);
        let mut copies =
            futures::stream::iter(to_copy.into_iter().map(|t| self.copy_table(t, &cancel)))
                .buffer_unordered(workers);
        while let Some(r) = copies.next().await {
            let r = r?;
            if r.at > checkpoint {
                skip.insert(r.table.clone(), r.at);
            }
            report.tables.push(r);
        }
        drop(copies);
        retry(cfg, "building indexes and foreign keys", || {
            self.sink.after_snapshot(&tables)
        })
        .await?;
        let order: HashMap<&str, usize> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        report
            .tables
            .sort_by_key(|r| order.get(r.table.as_str()).copied().unwrap_or(usize::MAX));
        log_report(&report);
        if mode == Mode::SnapshotOnly {
            report.checkpoint = Some(checkpoint.to_string());
            return Ok(report);
        }
        let (applied, last) = self.stream(tables, checkpoint, skip, cancel).await?;
        report.changes_applied = applied;
        report.checkpoint = Some(last.to_string());
        Ok(report)
    }

    async fn copy_table(
        &self,
        table: Arc<TableSchema>,
        cancel: &CancellationToken,
    ) -> Result<TableReport> {
        let span = tracing::info_span!("snapshot", table = %table.name);
        let cfg = &self.config.pipeline;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .copy_table_once(table.clone(), cancel)
                .instrument(span.clone())
                .await
            {
                Err(e) if e.is_transient() && attempt < cfg.retry_attempts => {
                    warn!(table = %table.name, error = %e.report(), attempt, "copy failed, copying the table again");
                    tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }

    async fn copy_table_once(
        &self,
        table: Arc<TableSchema>,
        cancel: &CancellationToken,
    ) -> Result<TableReport> {
        let cfg = &self.config.pipeline;
        let started = Instant::now();
        let rejected_before = self.config.rejects.count(&table.name);
        // Empty first: rows deleted in the source while we were down must not survive.
        retry(cfg, "emptying the target table", || {
            self.sink.begin_table(&table)
        })
        .await?;
        let total = self.source.count_rows(&table).await.ok().flatten();
        self.observer.table_copying(&table.name, total);
        let progress = Progress::new(&table.name, total, &self.bars);
        if self.sink.takes_copy_text(&table).await {
            // Same types on both sides: the source's COPY text goes into the
            // target's COPY as it is, without decoding a row.
            let (tx, rx) = mpsc::channel(cfg.queue_size);
            let source = self.source.clone();
            let t = table.clone();
            let reader = tokio::spawn(
                async move { source.snapshot_copy_text(t, tx).await }.in_current_span(),
            );
            let loaded = tokio::select! {
                r = self.sink.load_copy_text(&table, rx) => r,
                _ = cancel.cancelled() => {
                    reader.abort();
                    progress.finish(0, "stopped");
                    return Err(Error::new(ErrorKind::Interrupted, format!(
                        "stopped while copying table {:?}; it is copied again on the next start", table.name)));
                }
            };
            let at = match reader.await {
                Ok(Ok(Some(at))) => at,
                Ok(Ok(None)) => {
                    return Err(Error::definite(format!(
                        "the source has no COPY text for {:?}",
                        table.name
                    )))
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(Error::definite(format!(
                        "snapshot reader of {:?} failed: {e}",
                        table.name
                    )))
                }
            };
            let rows = loaded?;
            self.observer.table_rows(&table.name, rows);
            return self
                .finish_copy(&table, at, rows, started, progress, true, 0)
                .await;
        }
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let source = self.source.clone();
        let t = table.clone();
        let batch_rows = cfg.snapshot_batch_rows;
        let reader =
            tokio::spawn(async move { source.snapshot(t, batch_rows, tx).await }.in_current_span());
        // Batches are loaded `snapshot_workers` at a time (one at a time for
        // counted rows, whose concurrent loads would conflict).
        let loaders = if table.whole_row {
            1
        } else {
            cfg.snapshot_workers.max(1)
        };
        let batches =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let loads = batches
            .map(|batch| {
                let table = &table;
                async move {
                    if table.whole_row {
                        // Counted rows: a load retried after a lost reply could
                        // count twice, so a failure copies the table again.
                        self.sink.load(table, &batch).await
                    } else {
                        retry(cfg, "loading snapshot rows", || {
                            self.sink.load(table, &batch)
                        })
                        .await
                    }
                }
            })
            .buffer_unordered(loaders);
        futures::pin_mut!(loads);
        let mut rows = 0u64;
        loop {
            let loaded = tokio::select! {
                n = loads.next() => n,
                _ = cancel.cancelled() => {
                    reader.abort();
                    progress.finish(rows, "stopped");
                    return Err(Error::new(ErrorKind::Interrupted, format!(
                        "stopped while copying table {:?}; it is copied again on the next start", table.name)));
                }
            };
            let Some(n) = loaded else { break };
            let n = n?;
            rows += n;
            self.observer.table_rows(&table.name, n);
            progress.update(rows);
        }
        let at = match reader.await {
            Ok(r) => r?,
            Err(e) => {
                return Err(Error::definite(format!(
                    "snapshot reader of {:?} failed: {e}",
                    table.name
                )))
            }
        };
        let rejected = self.config.rejects.count(&table.name) - rejected_before;
        self.finish_copy(&table, at, rows, started, progress, false, rejected)
            .await
    }

    /// Records a copied table and its report line.
    async fn finish_copy(
        &self,
        table: &TableSchema,
        at: Position,
        rows: u64,
        started: Instant,
        progress: Progress,
        pass_through: bool,
        rejected: u64,
    ) -> Result<TableReport> {
        let cfg = &self.config.pipeline;
        retry(cfg, "recording the copied table", || {
            self.sink.finish_table(table, at, rows)
        })
        .await?;
        self.observer
            .table_copied(&table.name, rows, Some(started.elapsed().as_secs_f64()));
        let seconds = started.elapsed().as_secs_f64();
        progress.finish(rows, "done");
        Ok(TableReport {
            table: table.name.clone(),
            target: table.target_name.clone(),
            rows,
            seconds,
            rows_per_second: if seconds > 0.0 {
                rows as f64 / seconds
            } else {
                0.0
            },
            already_copied: false,
            pass_through,
            rejected,
            position: at.to_string(),
            at,
        })
    }

    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        checkpoint: Position,
        skip: HashMap<String, Position>,
        cancel: CancellationToken,
    ) -> Result<(u64, Position)> {
        let cfg = &self.config.pipeline;
        // Column counts the target was prepared for; a source may hand over a
        // wider table (a column added while streaming).
        let mut prepared: HashMap<String, usize> = tables
            .iter()
            .map(|t| (t.name.clone(), t.columns.len()))
            .collect();
        let (tx, mut rx) = mpsc::channel::<Batch>(cfg.queue_size);
        let reader_cancel = cancel.child_token();
        // On any return (an apply that failed included) the reader stops and
        // its replication connection closes.
        let _reader_guard = reader_cancel.clone().drop_guard();
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
        // Lag: the source's position against the applied one, at an interval.
        let lag_stop = cancel.child_token();
        let _lag_guard = lag_stop.clone().drop_guard();
        {
            let source = self.source.clone();
            let observer = self.observer.clone();
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
                        _ = lag_stop.cancelled() => return,
                        _ = tokio::time::sleep(crate::observe::LAG_INTERVAL) => {}
                    }
                }
            });
        }
        let delay = Duration::from_millis(cfg.batch_delay_ms);
        let mut applied = 0u64;
        let mut last = checkpoint;
        // Received, not yet applied: the changes, and the position read up to.
        let mut pending: Vec<Change> = Vec::new();
        let mut pending_upto = checkpoint;
        // When the source committed what `pending_upto` covers.
        let mut pending_committed_at = None;
        let mut summary = Summary::default();
        let mut open = true;
        while open {
            // Idle: the first change waits up to batch_delay_ms for company.
            // Behind (changes queued while the last batch was applied): what
            // is queued goes in at once.
            let mut idle = false;
            if pending.is_empty() {
                idle = rx.is_empty();
                tokio::select! {
                    b = rx.recv() => match b {
                        Some(b) => take(b, &mut pending, &mut pending_upto, &mut pending_committed_at),
                        None => open = false,
                    },
                    _ = cancel.cancelled() => open = false,
                }
            }
            while open && pending.len() < cfg.batch_rows {
                match rx.try_recv() {
                    Ok(b) => take(
                        b,
                        &mut pending,
                        &mut pending_upto,
                        &mut pending_committed_at,
                    ),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let deadline = tokio::time::Instant::now() + delay;
            while idle && open && !pending.is_empty() && pending.len() < cfg.batch_rows {
                tokio::select! {
                    b = rx.recv() => match b {
                        Some(b) => take(b, &mut pending, &mut pending_upto, &mut pending_committed_at),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = cancel.cancelled() => open = false,
                }
            }
            while !pending.is_empty() || pending_upto > last {
                let n = cut_point(&pending, cfg.batch_rows);
                let chunk: Vec<Change> = pending.drain(..n).collect();
                let upto = if pending.is_empty() {
                    pending_upto
                } else {
                    chunk.last().map(|c| c.position).unwrap_or(last)
                };
                let apply: Vec<Change> = chunk
                    .into_iter()
                    .filter(|c| skip.get(&c.table.name).is_none_or(|ct| c.position > *ct))
                    .collect();
                let mut wider: Vec<Arc<TableSchema>> = Vec::new();
                for c in &apply {
                    if prepared
                        .get(&c.table.name)
                        .is_some_and(|n| *n != c.table.columns.len())
                        && !wider.iter().any(|t| t.name == c.table.name)
                    {
                        wider.push(c.table.clone());
                    }
                }
                if !wider.is_empty() {
                    retry(cfg, "widening the target schema", || {
                        self.sink.prepare(&wider)
                    })
                    .await?;
                    for t in &wider {
                        info!(table = %t.name, columns = t.columns.len(), "target schema widened");
                        prepared.insert(t.name.clone(), t.columns.len());
                    }
                }
                let started = Instant::now();
                let durable =
                    retry(cfg, "applying changes", || self.sink.apply(&apply, upto)).await?;
                applied += apply.len() as u64;
                last = durable.position();
                let backlog = !pending.is_empty() || !rx.is_empty();
                let committed_at = if pending.is_empty() {
                    pending_committed_at
                } else {
                    None
                };
                self.observer
                    .applied(&apply, last, committed_at, started.elapsed(), backlog);
                tracing::debug!(changes = apply.len(), checkpoint = %last, "batch applied");
                if !apply.is_empty() {
                    summary.add(&apply, last);
                }
                if let Err(e) = self.source.ack(durable).await {
                    warn!(error = %e.report(), "could not acknowledge the applied position to the source; retried with the next batch");
                }
            }
        }
        summary.flush(last);
        reader_cancel_and_wait(reader, &cancel).await?;
        info!(checkpoint = %last, changes = applied, "streaming stopped");
        Ok((applied, last))
    }
}

/// How many of the pending changes go into the next target transaction: all
/// of them if they fit, else up to the last source transaction boundary
/// within `max`; a transaction larger than `max` alone is split (invariant 4).
fn cut_point(pending: &[Change], max: usize) -> usize {
    let max = max.max(1);
    if pending.len() <= max {
        return pending.len();
    }
    (1..=max)
        .rev()
        .find(|&i| pending[i - 1].position.commit != pending[i].position.commit)
        .unwrap_or(max)
}

/// Adds a received batch to what waits to be applied.
fn take(
    batch: Batch,
    pending: &mut Vec<Change>,
    upto: &mut Position,
    committed_at: &mut Option<chrono::DateTime<chrono::Utc>>,
) {
    pending.extend(batch.changes);
    *upto = (*upto).max(batch.upto);
    if batch.committed_at.is_some() {
        *committed_at = batch.committed_at;
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

fn log_report(report: &Report) {
    for t in &report.tables {
        if t.already_copied {
            info!(table = %t.table, rows = t.rows, position = %t.position, "table already copied");
        } else {
            info!(
                table = %t.table, target = %t.target, rows = t.rows,
                seconds = format!("{:.2}", t.seconds), rows_per_second = format!("{:.0}", t.rows_per_second),
                position = %t.position, "table copied"
            );
            if t.rejected > 0 {
                warn!(table = %t.table, rejected = t.rejected, "rows set aside in the reject file (pipeline.reject_dir)");
            }
        }
    }
}

/// A progress bar on a terminal, a log line every few seconds elsewhere.
struct Progress {
    table: String,
    total: Option<u64>,
    bar: Option<indicatif::ProgressBar>,
    last_log: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(table: &str, total: Option<u64>, bars: &indicatif::MultiProgress) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = bars.add(indicatif::ProgressBar::new(total.unwrap_or(0)));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>20} [{bar:30}] {pos}/{len} rows {per_sec} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(table.to_string());
            b
        });
        Self {
            table: table.to_string(),
            total,
            bar,
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn update(&self, rows: u64) {
        if let Some(b) = &self.bar {
            b.set_position(rows);
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            match self.total {
                Some(t) if t > 0 => {
                    info!(table = %self.table, rows, total = t, percent = rows * 100 / t, "copying")
                }
                _ => info!(table = %self.table, rows, "copying"),
            }
        }
    }

    fn finish(&self, rows: u64, msg: &'static str) {
        if let Some(b) = &self.bar {
            b.set_position(rows);
            b.finish_with_message(msg);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, LogicalType, Op, Value};

    fn changes(commits: &[u64]) -> Vec<Change> {
        let table = Arc::new(TableSchema::keyed(
            "t".into(),
            "t".into(),
            vec![Column {
                name: "id".into(),
                source_type: "int".into(),
                logical: LogicalType::Int,
                nullable: false,
            }],
            vec![0],
        ));
        let mut ordinal = 0;
        commits
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                ordinal = if i > 0 && commits[i - 1] == c {
                    ordinal + 1
                } else {
                    1
                };
                Change {
                    table: table.clone(),
                    op: Op::Insert {
                        row: vec![Value::Int(i as i64)],
                    },
                    position: Position::new(c, ordinal),
                }
            })
            .collect()
    }

    #[test]
    fn batches_end_at_transaction_boundaries() {
        // Fits: everything.
        assert_eq!(cut_point(&changes(&[1, 1, 2]), 3), 3);
        // A small transaction is never split across two target transactions.
        assert_eq!(cut_point(&changes(&[1, 2, 2, 2]), 3), 1);
        assert_eq!(cut_point(&changes(&[1, 1, 2, 2, 3]), 4), 4);
        // A transaction larger than the batch is split.
        assert_eq!(cut_point(&changes(&[5, 5, 5, 5, 5]), 2), 2);
        // Sources without transactions (SQLite): every change is a boundary.
        assert_eq!(cut_point(&changes(&[1, 2, 3, 4]), 3), 3);
    }
}

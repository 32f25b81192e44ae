//! The snapshot of one table: emptied in the target, its rows read in the
//! source's consistent snapshot and loaded (several batches at once), or
//! carried as COPY data (binary where it can) where both sides have the same
//! types; then marked copied at its snapshot position `Ct` (changes of it at
//! or below `Ct` are in the copy).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::model::TableSchema;
use crate::observe::Observer;
use crate::pg::CopyFormat;
use crate::position::Position;
use crate::reject::Rejects;
use crate::retry::Retry;
use crate::sink::{Sink, TableState};
use crate::source::Source;

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
    /// Copied as the source's COPY data, without decoding rows.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pass_through: bool,
    /// The format of that COPY data: `text` or `binary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_format: Option<&'static str>,
    /// Rows set aside in the table's reject file (`pipeline.reject_dir`).
    #[serde(skip_serializing_if = "is_zero")]
    pub rejected: u64,
    /// Columns whose type a rule chose: `meta: TEXT → json ([tables.types] "missions.meta")`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conversions: Vec<String>,
    /// The snapshot position `Ct`, as text (an LSN for PostgreSQL).
    pub position: String,
    #[serde(skip)]
    pub at: Position,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TableReport {
    /// The line of a table copied by an earlier run.
    pub fn copied_earlier(t: &TableSchema, s: &TableState) -> Self {
        TableReport {
            table: t.name.clone(),
            target: t.target_name.clone(),
            rows: s.rows,
            seconds: 0.0,
            rows_per_second: 0.0,
            already_copied: true,
            pass_through: false,
            copy_format: None,
            rejected: 0,
            conversions: conversions(t),
            position: s.position.to_string(),
            at: s.position,
        }
    }
}

/// What copying a table needs of the pipeline.
pub struct TableCopier {
    pub config: Arc<Config>,
    pub source: Arc<dyn Source>,
    pub sink: Arc<dyn Sink>,
    pub observer: Arc<Observer>,
    pub rejects: Arc<Rejects>,
    /// The progress bars of tables copied at the same time.
    pub bars: indicatif::MultiProgress,
    pub retry: Retry,
}

impl TableCopier {
    /// Copies one table (emptied first), again from the start after a
    /// transient failure; its report line.
    pub async fn copy(
        &self,
        table: Arc<TableSchema>,
        cancel: &CancellationToken,
    ) -> Result<TableReport> {
        let span = tracing::info_span!("snapshot", table = %table.name);
        let mut backoff = self.retry.backoff();
        loop {
            match self
                .copy_once(table.clone(), cancel)
                .instrument(span.clone())
                .await
            {
                Err(e) if e.is_transient() => {
                    let Some(wait) = backoff.next() else {
                        return Err(e);
                    };
                    crate::retry::counted("copying a table", &e);
                    warn!(table = %table.name, error = %e.report(), retry_in_ms = wait.as_millis() as u64, "copy failed, copying the table again");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn copy_once(
        &self,
        table: Arc<TableSchema>,
        cancel: &CancellationToken,
    ) -> Result<TableReport> {
        let cfg = &self.config.pipeline;
        let started = Instant::now();
        let rejected_before = self.rejects.count(&table.name);
        // Empty first: rows deleted in the source while we were down must not survive.
        self.retry
            .run("emptying the target table", || {
                self.sink.begin_table(&table)
            })
            .await?;
        let total = self.source.count_rows(&table).await.ok().flatten();
        self.observer.table_copying(&table.name, total);
        let progress = Progress::new(&table.name, total, &self.bars);
        // The source's binary form is asked only of tables the target takes
        // as COPY data at all (it costs a source connection).
        let mut copy = self.sink.takes_copy(&table, None).await?;
        if copy.is_some() {
            if let Some(binary) = self.source.binary_form(&table).await? {
                copy = self.sink.takes_copy(&table, Some(&binary)).await?.or(copy);
            }
        }
        if let Some(format) = copy {
            return self
                .copy_as_is(table, format, started, progress, cancel)
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
                        self.retry
                            .run("loading snapshot rows", || self.sink.load(table, &batch))
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
                    return Err(stopped(&table, &progress, rows));
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
        let rejected = self.rejects.count(&table.name) - rejected_before;
        self.finish_copy(&table, at, rows, started, progress, None, rejected)
            .await
    }

    /// Copies a table whose target takes the source's COPY data as it is
    /// (same types on both sides): no row is decoded. Each part of the table
    /// the source reads at once loads in a COPY of its own.
    async fn copy_as_is(
        &self,
        table: Arc<TableSchema>,
        format: CopyFormat,
        started: Instant,
        progress: Progress,
        cancel: &CancellationToken,
    ) -> Result<TableReport> {
        // Parts are announced as their reading starts (the source bounds how
        // many read at once), and every announced part is loaded at once, so
        // that none waits on a loader that is not running.
        let (tx, rx) = mpsc::channel(16);
        let source = self.source.clone();
        let t = table.clone();
        let reader = tokio::spawn(
            async move { source.snapshot_copy(t, format, tx).await }.in_current_span(),
        );
        let parts =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
        // Boxed, not pinned on the stack: dropped below while the reader runs.
        let mut loads = Box::pin(
            parts
                .map(|chunks| self.sink.load_copy(&table, format, chunks))
                .buffer_unordered(usize::MAX),
        );
        let mut rows = 0u64;
        let mut failed = None;
        loop {
            let loaded = tokio::select! {
                n = loads.next() => n,
                _ = cancel.cancelled() => {
                    reader.abort();
                    return Err(stopped(&table, &progress, rows));
                }
            };
            match loaded {
                None => break,
                Some(Ok(n)) => {
                    rows += n;
                    self.observer.table_rows(&table.name, n);
                    progress.update(rows);
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // A failed load stops the reading of the others: their loads and
        // channels are dropped here, so the reader's parts fail at their next
        // send instead of waiting for loaders that are no longer polled.
        drop(loads);
        let read = match reader.await {
            Ok(r) => r,
            Err(e) => Err(Error::definite(format!(
                "snapshot reader of {:?} failed: {e}",
                table.name
            ))),
        };
        // The reader's own failure first; a reader stopped because a load
        // failed says less than the load's error.
        let at = match (read, failed) {
            (Ok(Some(at)), None) => at,
            (Ok(None), None) => {
                return Err(Error::definite(format!(
                    "the source has no COPY data for {:?}",
                    table.name
                )))
            }
            (Err(e), Some(f)) if e.kind() == ErrorKind::Interrupted => return Err(f),
            (Err(e), _) => return Err(e),
            (Ok(_), Some(f)) => return Err(f),
        };
        self.finish_copy(&table, at, rows, started, progress, Some(format), 0)
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
        pass_through: Option<CopyFormat>,
        rejected: u64,
    ) -> Result<TableReport> {
        self.retry
            .run("recording the copied table", || {
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
            pass_through: pass_through.is_some(),
            copy_format: pass_through.map(|f| match f {
                CopyFormat::Text => "text",
                CopyFormat::Binary => "binary",
            }),
            rejected,
            conversions: conversions(table),
            position: at.to_string(),
            at,
        })
    }
}

/// A copy stopped by the daemon's stop: its progress line, and the error.
fn stopped(table: &TableSchema, progress: &Progress, rows: u64) -> Error {
    progress.finish(rows, "stopped");
    Error::new(
        ErrorKind::Interrupted,
        format!(
            "stopped while copying table {:?}; it is copied again on the next start",
            table.name
        ),
    )
}

/// The table's columns whose type a rule chose, for the report.
fn conversions(t: &TableSchema) -> Vec<String> {
    t.conversions
        .iter()
        .map(|k| {
            let c = &t.columns[k.column];
            format!(
                "{}: {} → {} ({})",
                c.name,
                if c.source_type.is_empty() {
                    "(no type)"
                } else {
                    &c.source_type
                },
                k.postgres_type
                    .clone()
                    .unwrap_or_else(|| c.logical.to_string()),
                k.reason
            )
        })
        .collect()
}

/// Logs each table's line of the report.
pub fn log_report(tables: &[TableReport]) {
    for t in tables {
        if t.already_copied {
            info!(table = %t.table, rows = t.rows, position = %t.position, "table already copied");
        } else {
            info!(
                table = %t.table, target = %t.target, rows = t.rows,
                seconds = format!("{:.2}", t.seconds), rows_per_second = format!("{:.0}", t.rows_per_second),
                position = %t.position, copy = t.copy_format.unwrap_or("rows"), "table copied"
            );
            for c in &t.conversions {
                info!(table = %t.table, "cast {c}");
            }
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

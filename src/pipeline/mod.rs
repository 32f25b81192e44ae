//! The pipeline: snapshot, then stream, with bounded queues and retries.
//!
//! ```text
//!            install capture (before any position is read)
//!                   │
//!  snapshot:  source.snapshot(T) ──[queue: Vec<Row>]──▶ sink.load(T)       per table, at its Ct
//!             (snapshot.rs)                              sink.finish_table(T, Ct)
//!  stream:    source.stream(after checkpoint) ──[queue: Batch]──▶ Batcher (batcher.rs)
//!             (stream.rs)                          cut at transaction boundaries,
//!                                                  changes of T at or below Ct dropped
//!                                                            ▼
//!                                 sink.apply(chunk, its position) ── one target transaction,
//!                                                            │         checkpoint included
//!                                 source.ack(Durable) ◀──────┘   (trim the log / flush the slot)
//! ```
//!
//! A position means, at each stage: in a `Batch`, what the source has read
//! up to; in a chunk, the checkpoint its transaction records; in a
//! `Durable`, what the target has committed (the only thing a source is
//! told). Every queue is bounded, so a slow sink slows the source and memory
//! stays bounded whatever the size of a table or of the stream.

pub mod batcher;
pub mod snapshot;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::snapshot::{log_report, TableCopier, TableReport};
use self::stream::Streamer;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::model::TableSchema;
use crate::observe::{Observer, Phase};
use crate::position::Position;
use crate::reject::Rejects;
use crate::retry::Retry;
use crate::sink::{Sink, SinkState, TableStatus};
use crate::source::{Installed, Problem, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy what is not copied yet, then stream until cancelled.
    Run,
    /// Copy what is not copied yet, then return.
    SnapshotOnly,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub changes_applied: u64,
    pub checkpoint: Option<String>,
    /// The cutover whose stop marker ended the stream.
    pub stopped_by: Option<String>,
    /// Source tables never copied (SQLite's virtual and shadow tables), with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

pub struct Pipeline {
    config: Arc<Config>,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    rejects: Arc<Rejects>,
    /// The progress bars of tables copied at the same time.
    bars: indicatif::MultiProgress,
    observer: Arc<Observer>,
    retry: Retry,
    /// Held while this pipeline owns an embedded target (see
    /// [`crate::lockfile`]).
    lock: Option<crate::lockfile::DaemonLock>,
    /// What discovery left out, for the report.
    left_out: std::sync::Mutex<Vec<String>>,
}

/// What the target holds when the copy starts: the checkpoint to stream
/// after, and its state (the tables copied earlier).
struct Start {
    checkpoint: Position,
    state: SinkState,
}

impl Pipeline {
    /// A pipeline over a source and sink opened by the caller (see
    /// [`crate::connect`]); rows that do not fit go to `rejects`.
    pub fn new(
        config: Arc<Config>,
        source: Arc<dyn Source>,
        sink: Arc<dyn Sink>,
        rejects: Arc<Rejects>,
    ) -> Self {
        let observer = Observer::new(
            crate::redact::redact_url(&config.source.url),
            crate::redact::redact_url(&config.target.url),
            rejects.clone(),
            config.tenant.clone(),
        );
        let retry = Retry::new(
            config.pipeline.retry_attempts,
            Duration::from_millis(config.pipeline.retry_max_delay_ms),
        );
        Self {
            config,
            source,
            sink,
            rejects,
            bars: indicatif::MultiProgress::new(),
            observer,
            retry,
            lock: None,
            left_out: Default::default(),
        }
    }

    /// Holds `lock` as long as the pipeline lives.
    pub fn holding(mut self, lock: Option<crate::lockfile::DaemonLock>) -> Self {
        self.lock = lock;
        self
    }

    pub fn source(&self) -> Arc<dyn Source> {
        self.source.clone()
    }

    pub fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    /// The status board this pipeline writes (for the HTTP endpoints).
    pub fn observer(&self) -> Arc<Observer> {
        self.observer.clone()
    }

    /// The selected tables, or every blocking problem at once.
    pub async fn tables(&self) -> Result<Vec<Arc<TableSchema>>> {
        let mut d = self.source.discover().await?;
        d.refuse_shared_targets();
        d.refuse_nothing_selected();
        for p in d.problems.iter().filter(|p| !p.blocking) {
            warn!(table = %p.table, column = p.column.as_deref().unwrap_or(""), "{}", p.message);
        }
        for l in &d.left_out {
            info!("left out: {l}");
        }
        if let Ok(mut left_out) = self.left_out.lock() {
            *left_out = d.left_out.clone();
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
        self.refuse_after_cutover().await?;
        let phase = Instant::now();
        let tables = self.baseline(self.tables().await?).await?;
        let dump = self.schema_before_load(&tables).await?;
        self.retry
            .run("creating the target schema", || self.sink.prepare(&tables))
            .await?;
        info!(
            seconds = phase.elapsed().as_secs_f64(),
            "tables found and the target's schema made"
        );
        let phase = Instant::now();
        // Capture first: a change made after this point is in the log, so
        // every position read later (Ct) has the log behind it.
        let installed = self
            .retry
            .run("installing change capture", || self.source.install(&tables))
            .await?;
        let Start {
            checkpoint,
            mut state,
        } = self.start(&installed).await?;
        self.forget_stale(&tables, &installed, &mut state).await?;
        info!(
            seconds = phase.elapsed().as_secs_f64(),
            "change capture installed"
        );
        let phase = Instant::now();
        let mut report = Report {
            left_out: self.left_out.lock().map(|l| l.clone()).unwrap_or_default(),
            ..Report::default()
        };
        let mut skip: HashMap<String, Position> = HashMap::new();
        let mut to_copy = Vec::new();
        for t in &tables {
            match state.tables.get(&t.name) {
                Some(s) if s.status == TableStatus::Done => {
                    self.observer.table_copied(&t.name, s.rows, None);
                    report.tables.push(TableReport::copied_earlier(t, s));
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
        let copier = TableCopier {
            config: self.config.clone(),
            source: self.source.clone(),
            sink: self.sink.clone(),
            observer: self.observer.clone(),
            rejects: self.rejects.clone(),
            bars: self.bars.clone(),
            retry: self.retry,
        };
        let workers = self.config.pipeline.snapshot_workers.max(1);
        let mut copies =
            futures::stream::iter(to_copy.into_iter().map(|t| copier.copy(t, &cancel)))
                .buffer_unordered(workers);
        while let Some(r) = copies.next().await {
            let r = r?;
            if r.at > checkpoint {
                skip.insert(r.table.clone(), r.at);
            }
            report.tables.push(r);
        }
        drop(copies);
        if !report.tables.is_empty() {
            info!(seconds = phase.elapsed().as_secs_f64(), "tables copied");
        }
        let phase = Instant::now();
        if let Some(d) = &dump {
            for line in self
                .sink
                .restore_schema(d, crate::schema::dump::Section::PostData)
                .await?
            {
                info!("{line}");
            }
        }
        self.retry
            .run("building indexes and foreign keys", || {
                self.sink.after_snapshot(&tables)
            })
            .await?;
        info!(
            seconds = phase.elapsed().as_secs_f64(),
            "keys, indexes and constraints built"
        );
        let order: HashMap<&str, usize> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        report
            .tables
            .sort_by_key(|r| order.get(r.table.as_str()).copied().unwrap_or(usize::MAX));
        log_report(&report.tables);
        if mode == Mode::SnapshotOnly {
            report.checkpoint = Some(checkpoint.to_string());
            return Ok(report);
        }
        let streamer = Streamer {
            config: self.config.clone(),
            source: self.source.clone(),
            sink: self.sink.clone(),
            observer: self.observer.clone(),
            retry: self.retry,
            copier,
        };
        let streamed = streamer.run(tables, checkpoint, skip, cancel).await?;
        report.changes_applied = streamed.applied;
        report.checkpoint = Some(streamed.last.to_string());
        report.stopped_by = streamed.stopped_by.map(|m| m.id);
        Ok(report)
    }

    /// A PostgreSQL target of a PostgreSQL source takes the source's schema
    /// as `pg_dump` takes it: its pre-data part now, before the tables are
    /// prepared and loaded; the dump is kept for the post-data part.
    async fn schema_before_load(
        &self,
        tables: &[Arc<TableSchema>],
    ) -> Result<Option<crate::schema::dump::SchemaDump>> {
        if !self.sink.wants_schema_dump().await? {
            return Ok(None);
        }
        // The target's own preparation (its state schema: a commit to wait
        // for on a durable server) while pg_dump runs on the source.
        let (dumped, ready) = tokio::join!(
            self.source
                .schema_dump(tables, self.config.target.keep_owners),
            self.sink.ready_for_schema()
        );
        let Some(dump) = dumped? else {
            return Ok(None);
        };
        ready?;
        for why in &dump.left_out {
            info!("schema: left out {why}");
        }
        for line in self
            .sink
            .restore_schema(&dump, crate::schema::dump::Section::PreData)
            .await?
        {
            info!("{line}");
        }
        Ok(Some(dump))
    }

    /// A target that a cutover switched to takes the application's writes:
    /// replicating into it again would overwrite them.
    async fn refuse_after_cutover(&self) -> Result<()> {
        let record = self
            .retry
            .run("reading the target state", || self.sink.cutover_record())
            .await?;
        let Some(r) = record.filter(|r| r["status"] == "switched") else {
            return Ok(());
        };
        Err(Error::definite(format!(
            "cutover {} switched the application to this target at {}: forward replication into it has ended. \
             The reverse replica is `switchyard run --reverse`; to replicate into this target again, start over \
             with an empty target",
            r["id"].as_str().unwrap_or("?"),
            r["finished_at"].as_str().unwrap_or("?")
        )))
    }

    /// The tables as the stream starts from them: a table copied earlier in
    /// the shape the target holds (schema changes made since reach the
    /// target in stream order, from there), the others as the source has
    /// them now.
    async fn baseline(&self, discovered: Vec<Arc<TableSchema>>) -> Result<Vec<Arc<TableSchema>>> {
        let held = self
            .retry
            .run("reading the target state", || self.sink.state())
            .await?
            .unwrap_or_default();
        // By the source's identity where it has one: a table renamed while
        // switchyard was stopped is the table the target holds under its
        // old name, and the stream renames it where the rename happened.
        let held_shape = |t: &TableSchema| {
            held.tables.values().find_map(|s| {
                let shape = s.shape.as_ref().filter(|_| s.status == TableStatus::Done)?;
                let same = if t.source_id.is_empty() || shape.source_id.is_empty() {
                    shape.name == t.name
                } else {
                    shape.source_id == t.source_id
                };
                same.then(|| shape.clone())
            })
        };
        let mut tables: Vec<Arc<TableSchema>> = discovered
            .into_iter()
            .map(|t| match held_shape(&t) {
                Some(shape) => Arc::new(shape),
                None => t,
            })
            .collect();
        // A table the target holds that the source no longer shows (dropped,
        // or changed beyond replicating, while switchyard was stopped) is
        // streamed from its shape too: the stream meets its drop (or the
        // change) where it happened.
        let filter = self.config.table_filter()?;
        for s in held.tables.values() {
            let Some(shape) = s.shape.as_ref().filter(|_| s.status == TableStatus::Done) else {
                continue;
            };
            let known = tables.iter().any(|t| {
                t.name == shape.name
                    || (!shape.source_id.is_empty() && t.source_id == shape.source_id)
            });
            if !known && filter.matches(&shape.name) {
                tables.push(Arc::new(shape.clone()));
            }
        }
        Ok(tables)
    }

    /// The target's checkpoint to resume after (refused where the source
    /// cannot deliver every change after it), or the source's position
    /// recorded as the start of a first copy.
    async fn start(&self, installed: &Installed) -> Result<Start> {
        let state = self
            .retry
            .run("reading the target state", || self.sink.state())
            .await?
            .unwrap_or_default();
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
                let p = self
                    .retry
                    .run("reading the source position", || {
                        self.source.current_position()
                    })
                    .await?;
                self.retry
                    .run("recording the start position", || {
                        self.sink.start(p, &installed.origin)
                    })
                    .await?;
                info!(position = %p, "no checkpoint in the target: copying from scratch");
                p
            }
        };
        Ok(Start { checkpoint, state })
    }

    /// Forgets the copy of a table that is stale: its capture had to be
    /// created again, it was left out of a run (its changes went
    /// unapplied), or it was dropped and created again under its name.
    async fn forget_stale(
        &self,
        tables: &[Arc<TableSchema>],
        installed: &Installed,
        state: &mut SinkState,
    ) -> Result<()> {
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
            self.retry
                .run("forgetting a table's copy state", || {
                    self.sink.forget_table(&name)
                })
                .await?;
            state.tables.remove(&name);
        }
        Ok(())
    }
}

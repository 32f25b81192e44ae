//! PostgreSQL source: a snapshot in the replication slot's exported snapshot,
//! then logical replication (pgoutput) from the slot.
//!
//! ```text
//!  discover: the catalog (catalog.rs)                     reads only
//!  install:  publication + slot, snapshot exported (slot.rs) → consistent point CP
//!  snapshot: BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT '…'; COPY … TO STDOUT
//!            (snapshot.rs) → rows as of CP; Ct = (CP − 1, whole)
//!  stream:   START_REPLICATION from the checkpoint (stream.rs)
//!            a change's position = (its transaction's commit LSN, its ordinal in it)
//!  ack:      standby status update, flush = the LSN after the durable checkpoint
//! ```
//!
//! Values travel in PostgreSQL's text format, the same in COPY and in pgoutput,
//! with fixed session settings (ISO dates in UTC, hex bytea, exact floats), so
//! one decoder (values.rs) serves both.

pub mod catalog;
pub mod ddl;
pub mod dump;
pub mod fence;
pub mod pgoutput;
pub mod replication;
pub mod slot;
pub mod snapshot;
pub mod stream;
pub mod values;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use self::catalog::{PgTable, Selector};
use self::slot::{flush_lsn, snapshot_position, Capture, Export};
use self::snapshot::{Copier, CopyOut};
use self::stream::Streamer;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Marker, Row, SequenceValue, TableSchema};
use crate::pg::conn::{pg_error, PgEndpoint, Sessions};
use crate::pg::Lsn;
use crate::position::{Durable, Position, PositionKind};
use crate::retry::Retry;
use crate::source::{Batch, Discovery, Fence, FenceMode, Installed, Pending, Source, SourceLag};

pub struct PgSource {
    capture: Capture,
    selector: Arc<Selector>,
    catalog: Arc<Mutex<HashMap<String, PgTable>>>,
    export: Mutex<Option<Export>>,
    copier: Copier,
    /// The LSN up to which the target has made everything durable, for
    /// status updates (see [`flush_lsn`]).
    durable: watch::Sender<u64>,
    retry: Retry,
    heartbeat_interval: Duration,
    slot_warn_bytes: u64,
    /// The last batch handed to the pipeline, and the end of the WAL
    /// received with it: once that batch is applied, so is all WAL before it.
    handed: Arc<Mutex<(Position, u64)>>,
}

impl PgSource {
    pub async fn open(url: &str, config: &Config) -> Result<Self> {
        let ep = PgEndpoint::parse(url, config.source.password.clone(), "source.url")?;
        // Fail early, with the server's own words, when it cannot be reached.
        let client = ep.session().await.map_err(|e| match e.kind() {
            ErrorKind::Transient => Error::connect(e.to_string()),
            _ => e,
        })?;
        let mut capture = Capture {
            ep: ep.clone(),
            slot: config.source.slot.clone(),
            publication: config.source.publication.clone(),
            create_publication: config.source.create_publication,
            ddl_capture: false,
            sessions: Sessions::new(ep.clone()),
        };
        capture.ddl_capture = capture.may_capture_ddl(&client).await?;
        // The catalog is read next, on this connection.
        capture.sessions.keep(client);
        let sessions = capture.sessions.clone();
        let workers = config.pipeline.snapshot_workers.max(1);
        // Each range of a split table takes a reader on the source and a
        // loader on the target: where a server runs on this machine, they
        // share its cores, so half as many ranges (two workers: none).
        let target_local = match config.target_kind() {
            Ok(crate::config::TargetKind::Postgres { url }) => {
                PgEndpoint::parse(&url, None, "target.url").is_ok_and(|t| t.is_local())
            }
            _ => false,
        };
        let split_parts = match config.pipeline.snapshot_split_parts {
            Some(n) => n.max(1),
            None if ep.is_local() || target_local => (workers / 2).max(1),
            None => workers,
        };
        Ok(Self {
            capture,
            selector: Arc::new(Selector {
                filter: config.table_filter()?,
                renames: config.tables.rename.clone(),
                publication: config.source.publication.clone(),
                create_publication: config.source.create_publication,
                unmapped_as_text: config.source.unmapped_as_text,
                // A PostgreSQL target reads every type's text form as that type.
                target_is_postgres: matches!(
                    config.target_kind(),
                    Ok(crate::config::TargetKind::Postgres { .. })
                ),
                follow_renames: config.schema_changes.rename_table
                    == crate::config::OnRename::Follow,
                links: config.target.links,
            }),
            catalog: Arc::new(Mutex::new(HashMap::new())),
            export: Mutex::new(None),
            copier: Copier {
                sessions,
                ep,
                slots: Arc::new(tokio::sync::Semaphore::new(workers)),
                split_parts,
                split_bytes: config.pipeline.snapshot_split_mb.saturating_mul(1 << 20),
            },
            durable: watch::channel(0).0,
            retry: Retry::new(
                config.pipeline.retry_attempts,
                Duration::from_millis(config.pipeline.retry_max_delay_ms),
            ),
            heartbeat_interval: Duration::from_millis(config.source.heartbeat_interval_ms),
            slot_warn_bytes: config.source.slot_warn_mb.saturating_mul(1 << 20),
            handed: Arc::new(Mutex::new((Position::ZERO, 0))),
        })
    }

    pub fn endpoint(&self) -> &PgEndpoint {
        &self.capture.ep
    }

    /// A table's catalog entry and the exported snapshot to read it in (a
    /// temporary one when the slot's is gone), with its consistent point.
    async fn snapshot_of(&self, table: &TableSchema) -> Result<(PgTable, String, Lsn)> {
        let pg = self
            .catalog
            .lock()
            .await
            .get(&table.name)
            .cloned()
            .ok_or_else(|| {
                Error::definite(format!("table {:?} is not in the catalog", table.name))
            })?;
        let mut export = self.export.lock().await;
        if export.is_none() {
            *export = Some(self.capture.temporary_export().await?);
        }
        let e = export.as_ref().expect("set above");
        Ok((pg, e.snapshot.clone(), e.consistent_point))
    }

    /// Copies a whole table in the exported snapshot; the snapshot position.
    async fn copy_table(&self, table: &Arc<TableSchema>, out: CopyOut) -> Result<Position> {
        let (pg, snapshot, cp) = self.snapshot_of(table).await?;
        if let Err(e) = self.copier.copy(table, &pg, &snapshot, out).await {
            let m = e.to_string();
            if m.contains(snapshot::REWRITTEN) || m.contains(snapshot::SNAPSHOT_GONE) {
                // The copy is tried again (a transient error) in a snapshot
                // taken now; tables being copied keep the one they imported.
                let mut export = self.export.lock().await;
                if export.as_ref().is_some_and(|x| x.snapshot == snapshot) {
                    *export = None;
                }
            }
            return Err(e);
        }
        Ok(snapshot_position(cp))
    }
}

#[async_trait]
impl Source for PgSource {
    async fn discover(&self) -> Result<Discovery> {
        let c = self.capture.client().await?;
        let published = self.capture.publication_exists(&c).await?;
        let selection = self.selector.selection(published);
        let (mut d, catalog) = catalog::discover(&c, &self.capture.ep, &selection).await?;
        if !self.capture.ddl_capture {
            d.problems.push(crate::source::Problem {
                table: "(source)".into(),
                column: None,
                message: "the role is no superuser, so switchyard cannot install its DDL event triggers: columns changed while streaming are followed from the catalog when the table's next change arrives; tables created, partitions attached, detached or truncated, and defaults changed while streaming are not followed".into(),
                blocking: false,
            });
        }
        if published && !(self.capture.create_publication && self.capture.ddl_capture) {
            // Tables the publication leaves out are not replicated (unless
            // the stream adds the ones created to switchyard's publication).
            for t in catalog::unpublished(&c, &self.capture.ep, &selection).await? {
                d.problems.push(crate::source::Problem {
                    table: t.clone(),
                    column: None,
                    message: format!(
                        "matches tables.include but is not in publication {:?}, so it is not replicated; add it (ALTER PUBLICATION {} ADD TABLE …)",
                        self.capture.publication,
                        crate::pg::quote_ident(&self.capture.publication)
                    ),
                    blocking: false,
                });
            }
        }
        *self.catalog.lock().await = catalog;
        Ok(d)
    }

    async fn install(&self, tables: &[Arc<TableSchema>]) -> Result<Installed> {
        let catalog = self.catalog.lock().await.clone();
        let qualified: Vec<String> = tables
            .iter()
            .filter_map(|t| catalog.get(&t.name))
            .map(PgTable::qualified)
            .collect();
        let (origin, export) = self.capture.install(&qualified).await?;
        if self.capture.ddl_capture {
            let c = self.capture.client().await?;
            let roots: Vec<u32> = catalog
                .values()
                .filter(|pg| !pg.only)
                .map(|pg| pg.oid)
                .collect();
            let mut partitions = Vec::new();
            for p in catalog::partitions_of(&c, &self.capture.ep, &roots)
                .await?
                .into_keys()
            {
                let row = c
                    .query_one("SELECT $1::oid::regclass::text", &[&p])
                    .await
                    .map_err(self.capture.pg("naming a partition"))?;
                partitions.push(row.get::<_, String>(0));
            }
            self.capture.install_ddl_capture(&c, &partitions).await?;
        }
        let mut recaptured = Vec::new();
        if let Some(export) = export {
            // Everything copied before this slot existed is stale.
            recaptured = tables.iter().map(|t| t.name.clone()).collect();
            *self.export.lock().await = Some(export);
        }
        Ok(Installed { origin, recaptured })
    }

    async fn verify_resume(&self, checkpoint: Position) -> Result<()> {
        self.capture.verify_resume(checkpoint).await
    }

    async fn uninstall(&self) -> Result<()> {
        self.capture.uninstall().await
    }

    async fn count_rows(&self, table: &TableSchema) -> Result<Option<u64>> {
        let Some(t) = self.catalog.lock().await.get(&table.name).cloned() else {
            return Ok(None);
        };
        let c = self.capture.client().await?;
        catalog::estimated_rows(&c, &self.capture.ep, &t).await
    }

    async fn current_position(&self) -> Result<Position> {
        if let Some(e) = self.export.lock().await.as_ref() {
            return Ok(snapshot_position(e.consistent_point));
        }
        self.capture.confirmed_position().await
    }

    async fn snapshot(
        &self,
        table: Arc<TableSchema>,
        batch_rows: usize,
        rows: mpsc::Sender<Vec<Row>>,
    ) -> Result<Position> {
        self.copy_table(&table, CopyOut::Rows(rows, batch_rows))
            .await
    }

    async fn binary_form(&self, table: &TableSchema) -> Result<Option<crate::pg::BinaryForm>> {
        let Some(pg) = self.catalog.lock().await.get(&table.name).cloned() else {
            return Ok(None);
        };
        let c = self.capture.client().await?;
        let columns: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
        crate::pg::binary_form(&*c, &pg.qualified(), &columns)
            .await
            .map_err(|e| {
                pg_error(
                    &self.capture.ep,
                    &format!("reading the column types of {}", table.name),
                    e,
                )
            })
    }

    async fn snapshot_copy(
        &self,
        table: Arc<TableSchema>,
        format: crate::pg::CopyFormat,
        parts: mpsc::Sender<mpsc::Receiver<bytes::Bytes>>,
    ) -> Result<Option<Position>> {
        Ok(Some(
            self.copy_table(&table, CopyOut::Copy(format, parts))
                .await?,
        ))
    }

    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()> {
        // The copy is done: release the exported snapshot (and a temporary slot).
        self.release_snapshot().await;
        let streamer = Streamer {
            capture: self.capture.clone(),
            durable: self.durable.subscribe(),
            handed: self.handed.clone(),
            catalog: self.catalog.clone(),
            retry: self.retry,
            heartbeat_interval: self.heartbeat_interval,
            selector: self.selector.clone(),
        };
        streamer
            .run(tables, after, max_batch, changes, cancel)
            .await
    }

    async fn release_snapshot(&self) {
        *self.export.lock().await = None;
    }

    async fn lag(&self, applied: Position) -> Result<SourceLag> {
        let c = self.capture.client().await?;
        let (head, retained) = self.capture.wal(&c).await?;
        let slot_warning = retained
            .filter(|r| self.slot_warn_bytes > 0 && *r > self.slot_warn_bytes)
            .map(|r| {
                let m = format!(
                    "replication slot {:?} holds back {} MiB of WAL, more than source.slot_warn_mb = {}; the server's disk fills while switchyard is behind or stopped",
                    self.capture.slot,
                    r >> 20,
                    self.slot_warn_bytes >> 20
                );
                warn!("{m}");
                m
            });
        let (handed, end) = *self.handed.lock().await;
        let applied_end = if applied >= handed {
            flush_lsn(applied).max(end)
        } else {
            flush_lsn(applied)
        };
        Ok(SourceLag {
            head: head.to_string(),
            bytes: u64::from(head).saturating_sub(applied_end),
            slot_retained_bytes: retained,
            slot_warning,
        })
    }

    async fn ack(&self, durable: Durable) -> Result<()> {
        let flush = flush_lsn(durable.position());
        self.durable.send_if_modified(|v| {
            if flush > *v {
                *v = flush;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    fn position_kind(&self) -> PositionKind {
        PositionKind::Lsn
    }

    async fn pending(
        &self,
        tables: &[Arc<TableSchema>],
        after: Position,
        upto: Position,
    ) -> Result<Pending> {
        let catalog = self.catalog.lock().await;
        let oids: HashSet<u32> = tables
            .iter()
            .filter_map(|t| catalog.get(&t.name).map(|pg| pg.oid))
            .collect();
        drop(catalog);
        self.capture.pending(&oids, after, upto).await
    }

    async fn capture_installed(&self) -> Result<bool> {
        let c = self.capture.client().await?;
        Ok(self.capture.slot_state(&c).await?.is_some())
    }

    async fn schema_dump(
        &self,
        tables: &[Arc<TableSchema>],
        owners: bool,
    ) -> Result<Option<crate::schema::dump::SchemaDump>> {
        let pairs: Vec<(String, PgTable)> = self
            .pg_tables(tables)
            .await?
            .into_iter()
            .zip(tables)
            .map(|(pg, t)| (t.name.clone(), pg))
            .collect();
        let c = self.capture.client().await?;
        dump::dump(&c, &self.capture.ep, &pairs, &self.selector.filter, owners)
            .await
            .map(Some)
    }

    async fn mark(&self, marker: &Marker) -> Result<()> {
        let c = self.capture.client().await?;
        fence::mark(&c, &self.capture.ep, marker).await
    }

    async fn stream_in_use(&self) -> Result<bool> {
        let c = self.capture.client().await?;
        fence::slot_active(&c, &self.capture.ep, &self.capture.slot).await
    }

    async fn cutover_problems(
        &self,
        mode: FenceMode,
        roles: Option<&[String]>,
        tables: &[Arc<TableSchema>],
        reverse: bool,
    ) -> Result<Vec<String>> {
        let c = self.capture.client().await?;
        let roles = match fence::roles(&c, &self.capture.ep, roles).await {
            Ok(r) => r,
            Err(e) => return Ok(vec![e.to_string()]),
        };
        let pg = self.pg_tables(tables).await?;
        fence::problems(&c, &self.capture.ep, mode, &roles, &pg, reverse).await
    }

    async fn plan_fence(
        &self,
        mode: FenceMode,
        roles: Option<&[String]>,
        tables: &[Arc<TableSchema>],
    ) -> Result<Fence> {
        let c = self.capture.client().await?;
        let roles = fence::roles(&c, &self.capture.ep, roles).await?;
        let pg = self.pg_tables(tables).await?;
        fence::plan(&c, &self.capture.ep, mode, roles, &pg).await
    }

    async fn apply_fence(&self, f: &Fence) -> Result<Vec<String>> {
        let c = self.capture.client().await?;
        fence::apply(&c, &self.capture.ep, f).await
    }

    async fn lift_fence(&self, f: &Fence) -> Result<()> {
        let c = self.capture.client().await?;
        fence::lift(&c, &self.capture.ep, f).await
    }

    async fn sequences(&self, tables: &[Arc<TableSchema>]) -> Result<Vec<SequenceValue>> {
        let c = self.capture.client().await?;
        let by_oid = self
            .pg_tables(tables)
            .await?
            .into_iter()
            .zip(tables)
            .map(|(pg, t)| (pg.oid, t.name.clone()))
            .collect();
        let filter = &self.selector.filter;
        fence::sequences(&c, &self.capture.ep, &by_oid, |name| filter.matches(name)).await
    }

    async fn exact_count(&self, table: &TableSchema) -> Result<u64> {
        let t = self.pg_table(&table.name).await?;
        let c = self.capture.client().await?;
        fence::count(&c, &self.capture.ep, &t).await
    }

    async fn end_replication(&self) -> Result<Vec<String>> {
        let c = self.capture.client().await?;
        fence::drop_slot(&c, &self.capture.ep, &self.capture.slot).await
    }
}

impl PgSource {
    /// The catalog entry of a discovered table.
    async fn pg_table(&self, name: &str) -> Result<PgTable> {
        self.catalog.lock().await.get(name).cloned().ok_or_else(|| {
            Error::definite(format!(
                "table {name:?} is not in the source's catalog (discover the tables first)"
            ))
        })
    }

    async fn pg_tables(&self, tables: &[Arc<TableSchema>]) -> Result<Vec<PgTable>> {
        let mut out = Vec::with_capacity(tables.len());
        for t in tables {
            out.push(self.pg_table(&t.name).await?);
        }
        Ok(out)
    }
}

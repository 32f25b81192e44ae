//! The change stream: logical replication from the slot, pgoutput messages
//! turned into changes with their positions, handed to the pipeline in
//! batches; heartbeats so that an idle source still moves the slot.
//!
//! ```text
//!  START_REPLICATION SLOT … LOGICAL after (proto_version '2', publication_names …)
//!  Begin(final LSN L) → Insert/Update/Delete/Truncate (ordinal n) → Commit
//!     each change's position = (L, n); the commit's = (L, whole)
//!  keepalive(wal_end), no transaction open → the checkpoint may move to wal_end
//!  status update: flush = the LSN after the target's durable checkpoint
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::catalog::{self, display_name, PgTable};
use super::ddl;
use super::pgoutput::{
    self, DecodeCtx, LogicalMessage, OldTuple, RelationBody, ReplicationMessage, TupleData,
    TupleValue,
};
use super::replication::ReplicationConn;
use super::slot::{flush_lsn, snapshot_position, Capture};
use super::values;
use crate::error::{Error, Result};
use crate::model::{Change, ColumnDefault, Ddl, Op, Row, TableSchema, Value};
use crate::pg::conn::pg_error;
use crate::pg::Lsn;
use crate::position::Position;
use crate::retry::Retry;
use crate::source::Batch;

/// How often a status update goes to the server when nothing else happens.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// The prefix of switchyard's heartbeat messages in the WAL.
pub const HEARTBEAT_PREFIX: &str = "switchyard_heartbeat";
/// The prefix of the markers `cutover` writes into the WAL (JSON of a
/// [`crate::model::Marker`]).
pub const MARKER_PREFIX: &str = "switchyard_marker";

/// What the stream needs of the source.
pub struct Streamer {
    pub capture: Capture,
    /// The LSN up to which the target has made everything durable (see
    /// [`flush_lsn`]), for status updates.
    pub durable: watch::Receiver<u64>,
    /// The last batch handed to the pipeline, and the end of the WAL
    /// received with it: once that batch is applied, so is all WAL before it.
    pub handed: Arc<Mutex<(Position, u64)>>,
    /// The catalog entries of the replicated tables (column types follow
    /// columns added while streaming).
    pub catalog: Arc<Mutex<HashMap<String, PgTable>>>,
    pub retry: Retry,
    pub heartbeat_interval: Duration,
    /// Which tables are replicated, and how (new tables while streaming).
    pub selector: Arc<catalog::Selector>,
}

impl Streamer {
    /// Sends the changes after `after`, in order, until `cancel` fires;
    /// reconnects after a lost connection.
    pub async fn run(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let catalog = self.catalog.lock().await.clone();
        let tracked: HashMap<u32, Tracked> = tables
            .iter()
            .filter_map(|t| {
                // By name, or for a table renamed since the target copied it
                // (it starts from the shape the target holds) by its OID.
                let by_oid = || {
                    catalog
                        .values()
                        .find(|pg| pg.oid.to_string() == t.source_id)
                };
                let gone;
                let pg = match catalog.get(&t.name).or_else(by_oid) {
                    Some(pg) => pg,
                    // Not in the catalog now (dropped while switchyard was
                    // stopped): followed by its OID until its drop is met.
                    None => {
                        let oid: u32 = t.source_id.parse().ok()?;
                        gone = PgTable {
                            oid,
                            only: true,
                            schema: String::new(),
                            name: String::new(),
                            types: t.read_as.clone(),
                        };
                        &gone
                    }
                };
                Some(pg).map(|pg| {
                    let mut table = (**t).clone();
                    if table.read_as.len() != table.columns.len() {
                        table.read_as = pg.types.clone();
                    }
                    // The schema and name the shape says (a rename ahead in the
                    // stream is met there).
                    let (schema, name) = if table.name == display_name(&pg.schema, &pg.name) {
                        (pg.schema.clone(), pg.name.clone())
                    } else {
                        match table.name.split_once('.') {
                            Some((s, n)) => (s.to_string(), n.to_string()),
                            None => ("public".to_string(), table.name.clone()),
                        }
                    };
                    (
                        pg.oid,
                        Tracked {
                            schema,
                            name,
                            table: Arc::new(table),
                        },
                    )
                })
            })
            .collect();
        let roots: Vec<u32> = catalog
            .values()
            .filter(|pg| !pg.only && tracked.contains_key(&pg.oid))
            .map(|pg| pg.oid)
            .collect();
        // The partitions each root had at the shape the stream starts from
        // (the target's), not the catalog's now: an ATTACH or DETACH
        // committed meanwhile is met in the stream, and followed there.
        // (Retried: the source may be restarting as streaming starts.)
        let partitions = self
            .retry
            .run("reading the source's partitions", || async {
                let c = self.capture.client().await?;
                let mut map = catalog::partitions_of(&c, &self.capture.ep, &roots).await?;
                for root in &roots {
                    let Some(t) = tracked.get(root) else {
                        continue;
                    };
                    if t.table.partitions.is_empty() {
                        continue;
                    }
                    let names: Vec<String> =
                        t.table.partitions.iter().map(|p| p.name.clone()).collect();
                    map.retain(|_, r| r != root);
                    map.extend(
                        catalog::partitions_named(&c, &self.capture.ep, *root, &names).await?,
                    );
                }
                Ok(map)
            })
            .await?;
        let mut state = StreamState {
            held: None,
            relations: HashMap::new(),
            tracked_sent: tracked.clone(),
            tracked,
            partitions_sent: partitions.clone(),
            partitions,
            rewrites: HashMap::new(),
            after,
            commit: None,
            ordinal: 0,
            pending: Vec::new(),
            sent_upto: after,
            advance: after,
            progressed: false,
            last_commit: None,
            heartbeat_seen: false,
            markers: Vec::new(),
            last_end: Lsn::from(flush_lsn(after)),
        };
        // Heartbeats: a small transaction in the source's WAL at an interval,
        // so the slot advances and lag in seconds is measured when idle.
        let _heartbeat = (self.heartbeat_interval > Duration::ZERO).then(|| {
            let ep = self.capture.ep.clone();
            let every = self.heartbeat_interval;
            let stop = cancel.child_token();
            let guard = stop.clone().drop_guard();
            tokio::spawn(async move {
                let mut warned = false;
                let mut client: Option<tokio_postgres::Client> = None;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let sent = async {
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            client = Some(ep.connect().await?);
                        }
                        let c = client.as_ref().expect("connected above");
                        c.execute("SELECT pg_logical_emit_message(true, $1, now()::text)", &[&HEARTBEAT_PREFIX])
                            .await
                            .map_err(|e| pg_error(&ep, "writing a heartbeat", e))
                    }
                    .await;
                    match sent {
                        Ok(_) => warned = false,
                        Err(e) if !warned => {
                            warn!(error = %e.report(), "cannot write a heartbeat to the source; lag in seconds is measured only when the source writes");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
            });
            guard
        });
        let mut backoff = self.retry.backoff();
        loop {
            match self
                .stream_once(&mut state, max_batch, &changes, &cancel)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    if std::mem::take(&mut state.progressed) {
                        backoff = self.retry.backoff();
                    }
                    let Some(wait) = backoff.next() else {
                        return Err(e);
                    };
                    crate::retry::counted("streaming changes", &e);
                    warn!(error = %e.report(), retry_in_ms = wait.as_millis() as u64,
                        "replication connection lost; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    state.restart();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One replication connection: from the last position sent to the
    /// pipeline, until cancelled or the connection fails.
    async fn stream_once(
        &self,
        state: &mut StreamState,
        max_batch: usize,
        changes: &mpsc::Sender<Batch>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let conn = ReplicationConn::connect(&self.capture.ep).await?;
        let start = Lsn::from(state.after.commit);
        let mut stream = conn.start_replication(&self.capture.slot, start, &self.capture.publication).await.map_err(|e| {
            if e.to_string().contains("does not exist") {
                Error::definite(format!(
                    "{e}. The replication slot was dropped while switchyard used it, so changes after the checkpoint are lost; \
                     start switchyard again: it creates the slot anew and copies every table again"
                ))
            } else {
                e
            }
        })?;
        info!(slot = %self.capture.slot, from = %start, "logical replication started");
        let mut durable_rx = self.durable.clone();
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received = start;
        loop {
            let ready: Option<Batch> = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                permit = changes.reserve(), if state.held.is_some() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    let (batch, end) = state.held.take().expect("guarded by the branch");
                    let handed = (batch.upto, end);
                    permit.send(batch);
                    *self.handed.lock().await = handed;
                    None
                }
                _ = tick.tick() => {
                    let flush = Lsn::from(*durable_rx.borrow());
                    stream.send_status(received, flush, false).await?;
                    None
                }
                changed = durable_rx.changed() => {
                    if changed.is_err() { return Ok(()); }
                    let flush = Lsn::from(*durable_rx.borrow_and_update());
                    stream.send_status(received, flush, false).await?;
                    None
                }
                msg = stream.next() => {
                    let Some(msg) = msg? else {
                        return Err(Error::transient("the server ended the replication stream"));
                    };
                    match msg {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            received = received.max(wal_end);
                            let m = LogicalMessage::decode(data, DecodeCtx::TOP_LEVEL)
                                .map_err(|e| Error::definite(format!("undecodable pgoutput message: {e}")))?;
                            state.progressed = true;
                            match m {
                                LogicalMessage::Relation(r) => {
                                    self.on_relation(state, r).await?;
                                    None
                                }
                                LogicalMessage::Message(m) if m.prefix == ddl::PREFIX => {
                                    let event: ddl::Event = serde_json::from_slice(&m.content).map_err(|e| {
                                        Error::definite(format!("unreadable DDL message from the source's event trigger: {e}"))
                                    })?;
                                    self.on_ddl(state, event).await?;
                                    None
                                }
                                m => state.on_message(m, max_batch)?,
                            }
                        }
                        ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, server_time } => {
                            received = received.max(wal_end);
                            if reply_requested {
                                let flush = Lsn::from(*durable_rx.borrow());
                                stream.send_status(received, flush, false).await?;
                            }
                            // Idle: everything before the server's position was sent,
                            // so the checkpoint (and then the slot) may move up to it.
                            state.heartbeat(wal_end, pg_time(server_time))
                        }
                    }
                }
            };
            if let Some(batch) = ready {
                let end = u64::from(state.last_end);
                let batch = match state.held.take() {
                    Some((mut h, _)) => {
                        h.merge(batch);
                        h
                    }
                    None => batch,
                };
                let handed = (batch.upto, end);
                match changes.try_send(batch) {
                    Ok(()) => *self.handed.lock().await = handed,
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    // Full: read on and hand the gathered transactions over
                    // at once when there is room, up to a batch's size.
                    Err(mpsc::error::TrySendError::Full(batch))
                        if batch.changes.len() < max_batch =>
                    {
                        state.held = Some((batch, end));
                    }
                    // A full batch waits for room; the server still hears
                    // from us meanwhile (wal_sender_timeout).
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        state.held = Some((batch, end));
                        loop {
                            tokio::select! {
                                _ = cancel.cancelled() => return Ok(()),
                                permit = changes.reserve() => {
                                    let Ok(permit) = permit else { return Ok(()) };
                                    let (batch, _) = state.held.take().expect("held above");
                                    permit.send(batch);
                                    *self.handed.lock().await = handed;
                                    break;
                                }
                                _ = tick.tick() => {
                                    let flush = Lsn::from(*durable_rx.borrow());
                                    stream.send_status(received, flush, false).await?;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A Relation message: which table an OID is, and the shape its next
    /// changes are decoded with. It agrees with the tracked shape, which the
    /// DDL messages keep up to date; where they did not (no event trigger:
    /// the role is no superuser), the change is followed from the catalog.
    async fn on_relation(&self, state: &mut StreamState, r: RelationBody) -> Result<()> {
        let Some(tracked) = state.tracked.get(&r.oid).cloned() else {
            // Not replicated, unless it stands in for a replicated table of
            // the same name that was dropped and created again.
            if let Some(t) = state
                .tracked
                .values()
                .find(|t| t.schema == r.namespace && t.name == r.name)
            {
                return Err(Error::definite(format!(
                    "table {:?} was dropped and created again while streaming (a new table under the same name); \
                     its changes are not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                    t.table.name
                )));
            }
            state.relations.insert(r.oid, None);
            return Ok(());
        };
        let table = tracked.table.clone();
        let now: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
        let then: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        let renamed = (tracked.schema.as_str(), tracked.name.as_str())
            != (r.namespace.as_str(), r.name.as_str());
        if now == then && !renamed {
            state.relations.insert(r.oid, Some(table));
            return Ok(());
        }
        // No DDL message told of this change: read the catalog as it is now
        // and take the Relation's columns from it by name.
        let c = self.capture.client().await?;
        let (described, _) =
            catalog::describe_oid(&c, &self.capture.ep, &self.selector.selection(true), r.oid)
                .await?;
        let cannot = |why: String| {
            Error::definite(format!(
                "table {:?} changed ({why}) and switchyard has no record of the DDL (its event trigger needs a superuser to be installed); \
                 the change is not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                table.name
            ))
        };
        let Some((now_shape, _)) = described else {
            return Err(cannot("the table is gone".into()));
        };
        let mut shape = (*table).clone();
        shape.columns.clear();
        shape.column_ids.clear();
        shape.read_as.clear();
        for col in &r.columns {
            let Some(i) = now_shape.columns.iter().position(|c| c.name == col.name) else {
                return Err(cannot(format!(
                    "column {:?} is not in the catalog now",
                    col.name
                )));
            };
            shape.columns.push(now_shape.columns[i].clone());
            shape
                .column_ids
                .push(now_shape.column_ids.get(i).copied().unwrap_or_default());
            shape
                .read_as
                .push(now_shape.read_as.get(i).copied().unwrap_or_default());
        }
        let ids = shape.column_ids.clone();
        let key: Vec<usize> = table
            .key
            .iter()
            .filter_map(|&k| table.column_ids.get(k))
            .filter_map(|id| ids.iter().position(|i| i == id))
            .collect();
        if key.len() != table.key.len() {
            return Err(cannot("its key changed".into()));
        }
        shape.key = key;
        shape.column_defaults = now_shape
            .column_defaults
            .iter()
            .filter_map(|d| {
                let id = now_shape.column_ids.get(d.column)?;
                let at = ids.iter().position(|i| i == id)?;
                Some(ColumnDefault {
                    column: at,
                    ..d.clone()
                })
            })
            .collect();
        shape.name = display_name(&r.namespace, &r.name);
        if renamed {
            shape.target_name = self.selector.target_name(&shape.name, &table);
        }
        let shape = Arc::new(shape);
        info!(table = %table.name, columns = ?now, "table changed without a DDL record; following its columns from the catalog");
        state.tracked.insert(
            r.oid,
            Tracked {
                schema: r.namespace.clone(),
                name: r.name.clone(),
                table: shape.clone(),
            },
        );
        state.relations.insert(r.oid, Some(shape.clone()));
        if renamed && self.renamed(state, r.oid, &table, &shape).await? {
            return Ok(());
        }
        state.push_ddl(shape, Ddl::Alter);
        Ok(())
    }

    /// A DDL message: the target follows the replicated tables' changes,
    /// copies tables that appeared, and copies again what changed its rows
    /// without row changes in the stream.
    async fn on_ddl(&self, state: &mut StreamState, event: ddl::Event) -> Result<()> {
        match event {
            ddl::Event::Rewrite {
                oid,
                reason,
                computed,
            } => {
                *state.rewrites.entry(oid).or_default() |=
                    reason | if computed { COMPUTED } else { 0 };
            }
            ddl::Event::Ddl { tables } => {
                for def in tables {
                    self.on_definition(state, def).await?;
                }
            }
            ddl::Event::Drop { tables } => {
                for d in tables {
                    if let Some(t) = state.tracked.remove(&d.oid) {
                        info!(table = %t.table.name, "table dropped in the source");
                        self.catalog.lock().await.remove(&t.table.name);
                        state.push_ddl(t.table.clone(), Ddl::Drop);
                    } else if let Some(root) = state.partitions.remove(&d.oid) {
                        self.copy_again(
                            state,
                            root,
                            format!("partition {} was dropped", display_name(&d.schema, &d.name)),
                        )
                        .await?;
                    }
                }
            }
            ddl::Event::Truncate { oid } => {
                if let Some(&root) = state.partitions.get(&oid) {
                    self.copy_again(state, root, "one of its partitions was truncated".into())
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// A table as it is after a DDL.
    async fn on_definition(&self, state: &mut StreamState, def: ddl::Definition) -> Result<()> {
        if let Some(tracked) = state.tracked.get(&def.oid).cloned() {
            let prev = tracked.table.clone();
            let sel = self.selector.selection(true);
            let mut shape = catalog::definition_shape(&def, &prev, &sel).map_err(|why| {
                Error::definite(format!(
                    "table {:?} changed in a way switchyard cannot follow: {why}; the change is not acknowledged. \
                     Undo the change, or exclude the table",
                    prev.name
                ))
            })?;
            if shape.name != prev.name && !self.selector.follow_renames {
                shape.target_name = prev.target_name.clone();
            }
            let rewrite = state.rewrites.get(&def.oid).copied().unwrap_or(0);
            let known: BTreeSet<u32> = state
                .partitions
                .iter()
                .filter(|(_, r)| **r == def.oid)
                .map(|(p, _)| *p)
                .collect();
            let now: BTreeSet<u32> = def.partitions.iter().copied().collect();
            if def.kind == "p" && known != now {
                // Attached or detached: rows came or went without row changes.
                let c = self.capture.client().await?;
                for p in now.difference(&known) {
                    self.watch_partition(&c, *p).await?;
                }
                state.partitions.retain(|_, r| *r != def.oid);
                for p in catalog::partitions_of(&c, &self.capture.ep, &[def.oid])
                    .await?
                    .into_keys()
                {
                    state.partitions.insert(p, def.oid);
                }
                // The shape the stream carries on names the partitions the
                // table is copied again with.
                shape.partitions = catalog::partition_bounds(&c, &self.capture.ep, def.oid).await?;
            }
            let shape = Arc::new(shape);
            let why = copy_reason(
                &prev,
                &shape,
                rewrite,
                known != now,
                self.selector.target_is_postgres,
            );
            state.tracked.insert(
                def.oid,
                Tracked {
                    schema: def.schema.clone(),
                    name: def.name.clone(),
                    table: shape.clone(),
                },
            );
            if shape.name != prev.name && self.renamed(state, def.oid, &prev, &shape).await? {
                return Ok(());
            }
            match why {
                Some(reason) => self.copy_again(state, def.oid, reason).await?,
                None if !shape.same_shape(&prev) => {
                    info!(table = %shape.name, "table changed in the source; the target follows");
                    state.push_ddl(shape, Ddl::Alter);
                }
                None => {}
            }
            return Ok(());
        }
        if def.ispartition {
            // A partition created under a replicated partitioned table: its
            // rows are published through the root; its TRUNCATE is watched.
            let root = def
                .parent
                .and_then(|p| state.partitions.get(&p).copied().or(Some(p)))
                .filter(|r| state.tracked.contains_key(r));
            if let Some(root) = root {
                let c = self.capture.client().await?;
                self.watch_partition(&c, def.oid).await?;
                state.partitions.insert(def.oid, root);
                // A partitioned target table gets the partition too.
                if let Some(t) = state.tracked.get(&root).cloned() {
                    let partitions = catalog::partition_bounds(&c, &self.capture.ep, root).await?;
                    if partitions != t.table.partitions {
                        let shape = Arc::new(TableSchema {
                            partitions,
                            ..(*t.table).clone()
                        });
                        info!(table = %shape.name, partition = %def.name, "partition created in the source");
                        state.tracked.insert(
                            root,
                            Tracked {
                                table: shape.clone(),
                                ..t
                            },
                        );
                        state.relations.insert(root, Some(shape.clone()));
                        state.push_ddl(shape, Ddl::Alter);
                    }
                }
            }
            return Ok(());
        }
        self.adopt(state, def.oid).await
    }

    /// A table created while streaming: replicated from now on (added to
    /// switchyard's publication) and copied at a snapshot of its own, if
    /// `tables.include` selects it.
    async fn adopt(&self, state: &mut StreamState, oid: u32) -> Result<()> {
        let c = self.capture.client().await?;
        let sel = self.selector.selection(true);
        let (described, problems) = catalog::describe_oid(&c, &self.capture.ep, &sel, oid).await?;
        let Some((table, pg)) = described else {
            for p in problems.iter().filter(|p| sel.filter.matches(&p.table)) {
                warn!(table = %p.table, "a table created in the source cannot be replicated: {}", p.message);
            }
            return Ok(());
        };
        if !sel.filter.matches(&table.name) {
            return Ok(());
        }
        if self.capture.create_publication {
            let added = c
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    crate::pg::quote_ident(&self.capture.publication),
                    pg.qualified()
                ))
                .await;
            if let Err(e) = added {
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                    return Err(pg_error(
                        &self.capture.ep,
                        "adding a new table to the publication",
                        e,
                    ));
                }
            }
        } else if !self.capture.publishes(&c, oid).await? {
            warn!(table = %table.name, publication = %self.capture.publication,
                "a table created in the source matches tables.include but is not in the publication: it is not replicated; add it (ALTER PUBLICATION … ADD TABLE …)");
            return Ok(());
        }
        info!(table = %table.name, "table created in the source: copying it, then following it");
        if !pg.only {
            for (p, _) in catalog::partitions_of(&c, &self.capture.ep, &[oid]).await? {
                self.watch_partition(&c, p).await?;
                state.partitions.insert(p, oid);
            }
        }
        let table = Arc::new(table);
        self.catalog
            .lock()
            .await
            .insert(table.name.clone(), pg.clone());
        state.tracked.insert(
            oid,
            Tracked {
                schema: pg.schema,
                name: pg.name,
                table: table.clone(),
            },
        );
        state.push_ddl(
            table,
            Ddl::Copy {
                reason: "it was created in the source".into(),
            },
        );
        Ok(())
    }

    /// Asks the pipeline to copy a replicated table again, in the shape the
    /// catalog gives it now (the copy reads the table as it is now).
    async fn copy_again(&self, state: &mut StreamState, oid: u32, reason: String) -> Result<()> {
        let Some(t) = state.tracked.get(&oid).cloned() else {
            return Ok(());
        };
        let c = self.capture.client().await?;
        let (described, problems) =
            catalog::describe_oid(&c, &self.capture.ep, &self.selector.selection(true), oid)
                .await?;
        let Some((mut now, pg)) = described else {
            return Err(Error::definite(format!(
                "table {:?} must be copied again ({reason}) but cannot be replicated now: {}; the change is not acknowledged",
                t.table.name,
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        };
        // Under the name the stream knows it by: a rename still ahead in
        // the stream follows.
        now.name = t.table.name.clone();
        now.target_name = t.table.target_name.clone();
        self.catalog.lock().await.insert(now.name.clone(), pg);
        info!(table = %t.table.name, reason = %reason, "the table is copied again");
        state.push_ddl(Arc::new(now), Ddl::Copy { reason });
        Ok(())
    }

    /// A partition's TRUNCATE becomes a DDL message (pgoutput does not send
    /// it when partitions are published through their root).
    async fn watch_partition(&self, c: &tokio_postgres::Client, oid: u32) -> Result<()> {
        if !self.capture.ddl_capture {
            return Ok(());
        }
        let row = c
            .query_one("SELECT $1::oid::regclass::text", &[&oid])
            .await
            .map_err(|e| pg_error(&self.capture.ep, "naming a partition", e))?;
        let name: String = row.get(0);
        c.batch_execute(&ddl::truncate_trigger_sql(&name))
            .await
            .map_err(|e| pg_error(&self.capture.ep, "watching a partition's TRUNCATE", e))
    }

    /// The catalog entry of a renamed table under its new name.
    /// A table renamed in the source (`state.tracked` already holds it
    /// under its new name): a PostgreSQL target renames its copy; a
    /// SurrealDB target, which has no rename, gets a copy under the new
    /// name and a drop of the old one (after `[schema_changes]`). True when
    /// the table is copied again.
    async fn renamed(
        &self,
        state: &mut StreamState,
        oid: u32,
        prev: &Arc<TableSchema>,
        now: &Arc<TableSchema>,
    ) -> Result<bool> {
        info!(table = %prev.name, now = %now.name, "table renamed in the source");
        self.renamed_in_catalog(&prev.name, &now.name).await;
        if self.selector.target_is_postgres || now.target_name == prev.target_name {
            state.push_ddl(
                now.clone(),
                Ddl::Rename {
                    from: prev.name.clone(),
                },
            );
            return Ok(false);
        }
        self.copy_again(state, oid, format!("it was renamed from {:?}", prev.name))
            .await?;
        state.push_ddl(prev.clone(), Ddl::Drop);
        Ok(true)
    }

    async fn renamed_in_catalog(&self, from: &str, to: &str) {
        let mut catalog = self.catalog.lock().await;
        if let Some(mut pg) = catalog.remove(from) {
            if let Some((schema, name)) = to.split_once('.') {
                pg.schema = schema.to_string();
                pg.name = name.to_string();
            } else {
                pg.name = to.to_string();
            }
            catalog.insert(to.to_string(), pg);
        }
    }
}

/// Why a table that changed must be copied again rather than followed in
/// place, if it must: a column added with a volatile default (the rewrite
/// gave existing rows values no row change carries), partitions attached
/// or detached, a key that changed, or a column whose new type the target
/// cannot take in place without changing values.
fn copy_reason(
    prev: &TableSchema,
    now: &TableSchema,
    rewrite: i32,
    partitions_changed: bool,
    target_is_postgres: bool,
) -> Option<String> {
    use crate::schema::diff::{diff, AlterStep};
    if partitions_changed {
        return Some("partitions were attached or detached".into());
    }
    if prev.whole_row != now.whole_row
        || prev.key_names() != now.key_names()
            && prev
                .key
                .iter()
                .map(|&k| prev.column_ids.get(k))
                .collect::<Vec<_>>()
                != now
                    .key
                    .iter()
                    .map(|&k| now.column_ids.get(k))
                    .collect::<Vec<_>>()
    {
        return Some("its key changed".into());
    }
    // AT_REWRITE_COLUMN_REWRITE with USING: values computed in the source,
    // which a cast in the target would not reproduce.
    if rewrite & 4 != 0 && rewrite & COMPUTED != 0 {
        return Some("a column's type changed with a USING expression: its values were computed in the source".into());
    }
    for step in diff(prev, now) {
        match step {
            AlterStep::Add { column } if rewrite & 2 != 0 => {
                return Some(format!(
                    "column {:?} was added with a volatile default: the table was rewritten and existing rows got values no row change carries",
                    now.columns[column].name
                ))
            }
            AlterStep::Add { column }
                if !target_is_postgres
                    && now
                        .column_defaults
                        .iter()
                        .any(|d| d.column == column && d.existing.is_some()) =>
            {
                return Some(format!(
                    "column {:?} was added with a default that existing rows hold",
                    now.columns[column].name
                ))
            }
            AlterStep::Type { column, from } => {
                let to = &now.columns[column];
                let in_place = if target_is_postgres {
                    crate::schema::postgres::holds(&from, &to.source_type)
                } else {
                    let before = prev.columns.iter().find(|c| c.source_type == from);
                    before.is_some_and(|b| b.logical == to.logical)
                        && numeric_scale(&from) == numeric_scale(&to.source_type)
                };
                if !in_place {
                    return Some(format!(
                        "column {:?} changed its type from {from} to {}, which the target cannot take in place without changing values",
                        to.name, to.source_type
                    ));
                }
            }
            _ => {}
        }
    }
    None
}

/// A rewrite bit of switchyard's own (PostgreSQL's `AT_REWRITE_*` bits are
/// below it): the statement computed values with `USING`.
const COMPUTED: i32 = 1 << 16;

/// The scale of `numeric(p,s)`, if declared.
fn numeric_scale(declared: &str) -> Option<u32> {
    let inner = declared.split_once('(')?.1.split_once(')')?.0;
    inner.split(',').nth(1)?.trim().parse().ok()
}

/// A replicated table: its shape at the stream's position.
#[derive(Clone)]
struct Tracked {
    schema: String,
    name: String,
    table: Arc<TableSchema>,
}

struct StreamState {
    /// Transactions the pipeline has had no room for yet, gathered into one
    /// batch (with the WAL end it covers) while the stream is read on. Kept
    /// across reconnects: `sent_upto` already covers them.
    held: Option<(Batch, u64)>,
    /// The shape each relation's changes are decoded with (from its last
    /// Relation message); `None` for a relation that is not replicated.
    relations: HashMap<u32, Option<Arc<TableSchema>>>,
    /// The replicated tables by OID, with their shape at this point of the
    /// stream (DDL messages keep it up to date).
    tracked: HashMap<u32, Tracked>,
    /// `tracked` as of the last batch handed to the pipeline: a reconnect
    /// reads the stream again from there.
    tracked_sent: HashMap<u32, Tracked>,
    /// The partitions (at any level) of replicated partitioned tables,
    /// each with its root; as of the last batch handed over.
    partitions: HashMap<u32, u32>,
    partitions_sent: HashMap<u32, u32>,
    /// Table rewrites announced in the open transaction (OID → reason bits).
    rewrites: HashMap<u32, i32>,
    after: Position,
    /// The commit LSN of the transaction being received.
    commit: Option<Lsn>,
    ordinal: u64,
    pending: Vec<Change>,
    /// The position of the last batch sent to the pipeline.
    sent_upto: Position,
    /// Transactions without replicated changes received since: the next
    /// batch may move the checkpoint past them.
    advance: Position,
    /// Something arrived since the last (re)connect.
    progressed: bool,
    /// The commit time of the last transaction received.
    last_commit: Option<chrono::DateTime<chrono::Utc>>,
    /// The open transaction carries switchyard's heartbeat message.
    heartbeat_seen: bool,
    /// Markers of the open transaction and of those not handed over yet.
    markers: Vec<(Position, crate::model::Marker)>,
    /// The end of the WAL received so far (a commit's end, an idle keepalive's position).
    last_end: Lsn,
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as a date-time.
fn pg_time(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(micros.checked_add(pgoutput::PG_EPOCH_OFFSET_MICROS)?)
}

impl StreamState {
    /// After a lost connection: start again after what the pipeline has.
    fn restart(&mut self) {
        self.after = self.sent_upto;
        self.commit = None;
        self.ordinal = 0;
        self.pending.clear();
        self.markers.clear();
        self.relations.clear();
        self.rewrites.clear();
        self.tracked = self.tracked_sent.clone();
        self.partitions = self.partitions_sent.clone();
    }

    /// A batch that moves the checkpoint to the server's position when no
    /// transaction is open and nothing is pending.
    fn heartbeat(
        &mut self,
        wal_end: Lsn,
        server_time: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Option<Batch> {
        // Every transaction whose commit record starts before `wal_end` was sent.
        let upto = snapshot_position(wal_end);
        if self.commit.is_some() || !self.pending.is_empty() || upto <= self.sent_upto {
            return None;
        }
        self.sent_upto = upto;
        self.last_end = self.last_end.max(wal_end);
        // Everything committed before the server sent this is sent.
        Some(Batch {
            changes: Vec::new(),
            upto,
            committed_at: server_time,
            markers: Vec::new(),
        })
    }

    fn take(&mut self, upto: Position) -> Batch {
        self.sent_upto = self.sent_upto.max(upto).max(self.advance);
        self.tracked_sent = self.tracked.clone();
        self.partitions_sent = self.partitions.clone();
        Batch {
            changes: std::mem::take(&mut self.pending),
            upto: self.sent_upto,
            committed_at: self.last_commit,
            markers: std::mem::take(&mut self.markers),
        }
    }

    fn table(&self, oid: u32) -> Result<Option<Arc<TableSchema>>> {
        match self.relations.get(&oid) {
            Some(t) => Ok(t.clone()),
            None => Err(Error::definite(format!(
                "pgoutput sent a change of relation {oid} before describing it"
            ))),
        }
    }

    /// Numbers a change message of the transaction: every one pgoutput sends
    /// counts, replicated or not, so that a position inside a transaction
    /// means the same whatever `tables.include` selects.
    fn count(&mut self) {
        self.ordinal += 1;
    }

    /// A change of a table's definition, where it happened in the open
    /// transaction. Never dropped as "applied before a restart": whether
    /// the target has it is its state (the shape it holds), not a position.
    fn push_ddl(&mut self, table: Arc<TableSchema>, ddl: Ddl) {
        let commit = self.commit.map(u64::from).unwrap_or(0);
        self.pending.push(Change {
            table,
            op: Op::Ddl(ddl),
            position: Position::new(commit, self.ordinal),
        });
    }

    fn push(&mut self, table: Arc<TableSchema>, op: Op) {
        let commit = self.commit.map(u64::from).unwrap_or(0);
        let position = Position::new(commit, self.ordinal);
        if position <= self.after {
            return; // applied before the restart
        }
        self.pending.push(Change {
            table,
            op,
            position,
        });
    }

    fn on_message(&mut self, m: LogicalMessage, max_batch: usize) -> Result<Option<Batch>> {
        match m {
            LogicalMessage::Begin(b) => {
                self.commit = Some(b.final_lsn);
                self.ordinal = 0;
            }
            LogicalMessage::Commit(c) => {
                self.commit = None;
                self.rewrites.clear();
                self.last_end = self.last_end.max(c.end_lsn);
                self.last_commit = pg_time(c.timestamp.0);
                // The whole transaction is behind this position.
                let upto = Position::new(u64::from(c.commit_lsn), Position::WHOLE);
                if upto <= self.after {
                    return Ok(None);
                }
                if self.pending.is_empty() && self.markers.is_empty() {
                    if std::mem::take(&mut self.heartbeat_seen) {
                        // Our heartbeat: the target records how far it is.
                        return Ok(Some(self.take(upto)));
                    }
                    // Nothing of ours in it: moves the checkpoint with the next batch.
                    self.advance = self.advance.max(upto);
                    return Ok(None);
                }
                self.heartbeat_seen = false;
                return Ok(Some(self.take(upto)));
            }
            LogicalMessage::Relation(_) => {} // handled by PgSource::on_relation
            LogicalMessage::Insert(i) => {
                self.count();
                if let Some(t) = self.table(i.oid)? {
                    let row = tuple_row(&t, &t.read_as, &i.new)?;
                    self.push(t, Op::Insert { row });
                }
            }
            LogicalMessage::Update(u) => {
                self.count();
                if let Some(t) = self.table(u.oid)? {
                    let types = t.read_as.clone();
                    let mut row = tuple_row(&t, &types, &u.new)?;
                    if t.whole_row {
                        let old = whole_old_row(&t, &types, u.old.as_ref())?;
                        // Unchanged TOAST values: the old image has them.
                        for (v, o) in row.iter_mut().zip(&old) {
                            if v.is_unchanged() {
                                *v = o.clone();
                            }
                        }
                        // By digest, which is the identity (0.0 and -0.0 differ there).
                        let digest = |r: &Row| {
                            t.row_digest(r)
                                .map_err(|m| Error::definite(format!("table {:?}: {m}", t.name)))
                        };
                        let old_key = (digest(&old)? != digest(&row)?).then_some(old);
                        self.push(t, Op::Update { old_key, row });
                        return self.flush_if_full(max_batch);
                    }
                    let old_key = match &u.old {
                        Some(old) => {
                            let k = old_key(&t, &types, old)?;
                            (k != t.key_of(&row)).then_some(k)
                        }
                        None => None,
                    };
                    self.push(t, Op::Update { old_key, row });
                }
            }
            LogicalMessage::Delete(d) => {
                self.count();
                if let Some(t) = self.table(d.oid)? {
                    let types = t.read_as.clone();
                    let key = if t.whole_row {
                        whole_old_row(&t, &types, Some(&d.old))?
                    } else {
                        old_key(&t, &types, &d.old)?
                    };
                    self.push(t, Op::Delete { key });
                }
            }
            LogicalMessage::Truncate(tr) => {
                for oid in tr.oids.clone() {
                    self.count();
                    if let Some(t) = self.table(oid)? {
                        self.push(t, Op::Truncate);
                    }
                }
            }
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop(_)
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => {
                return Err(Error::definite(
                    "pgoutput sent a streamed in-progress transaction, which switchyard does not request",
                ));
            }
            LogicalMessage::Message(m) => {
                if m.prefix == HEARTBEAT_PREFIX {
                    self.heartbeat_seen = true;
                }
                if m.prefix == MARKER_PREFIX {
                    self.count();
                    let marker: crate::model::Marker =
                        serde_json::from_slice(&m.content).map_err(|e| {
                            Error::definite(format!("unreadable cutover marker in the WAL: {e}"))
                        })?;
                    let commit = self.commit.map(u64::from).unwrap_or(0);
                    let position = Position::new(commit, self.ordinal);
                    if position > self.after {
                        self.markers.push((position, marker));
                    }
                }
            }
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => {}
        }
        self.flush_if_full(max_batch)
    }

    /// Hands off part of a large transaction once `max_batch` changes wait.
    fn flush_if_full(&mut self, max_batch: usize) -> Result<Option<Batch>> {
        if self.pending.len() >= max_batch {
            debug!(
                changes = self.pending.len(),
                "sending part of a large transaction"
            );
            let upto = self
                .pending
                .last()
                .map(|c| c.position)
                .unwrap_or(self.sent_upto);
            return Ok(Some(self.take(upto)));
        }
        Ok(None)
    }
}

/// The old row image of a table identified by its whole row (`REPLICA
/// IDENTITY FULL`): every column, NULLs included.
fn whole_old_row(table: &TableSchema, types: &[u32], old: Option<&OldTuple>) -> Result<Row> {
    let old = match old {
        Some(OldTuple::Full(t)) => t,
        _ => {
            return Err(Error::definite(format!(
                "table {:?} has no key and pgoutput sent no whole old row; its REPLICA IDENTITY must stay FULL (ALTER TABLE … REPLICA IDENTITY FULL), then copy the table again",
                table.name
            )))
        }
    };
    let row = tuple_row(table, types, old)?;
    if let Some(i) = row.iter().position(Value::is_unchanged) {
        return Err(Error::definite(format!(
            "table {:?}: the old row image has no value for column {:?}",
            table.name, table.columns[i].name
        )));
    }
    Ok(row)
}

fn tuple_row(table: &TableSchema, types: &[u32], tuple: &TupleData) -> Result<Row> {
    if tuple.0.len() != table.columns.len() {
        return Err(Error::definite(format!(
            "table {:?}: pgoutput sent {} columns, expected {}",
            table.name,
            tuple.0.len(),
            table.columns.len()
        )));
    }
    let mut fields: Vec<Option<String>> = Vec::with_capacity(tuple.0.len());
    let mut unchanged = Vec::new();
    for (i, v) in tuple.0.iter().enumerate() {
        fields.push(match v {
            TupleValue::Null => None,
            TupleValue::Text(b) => Some(String::from_utf8(b.to_vec()).map_err(|_| {
                Error::definite(format!(
                    "table {:?}, column {:?}: value is not UTF-8",
                    table.name, table.columns[i].name
                ))
            })?),
            TupleValue::Unchanged => {
                unchanged.push(i);
                None
            }
            TupleValue::Binary(_) => {
                return Err(Error::definite(
                    "pgoutput sent a binary value, which switchyard does not request",
                ))
            }
        });
    }
    let mut row = values::decode_row(table, types, fields)?;
    for i in unchanged {
        if table.key.contains(&i) && !table.whole_row {
            return Err(Error::definite(format!(
                "table {:?}: key column {:?} arrived as an unchanged TOAST value; the key cannot be matched",
                table.name, table.columns[i].name
            )));
        }
        row[i] = Value::Unchanged;
    }
    Ok(row)
}

fn old_key(table: &TableSchema, types: &[u32], old: &OldTuple) -> Result<Vec<Value>> {
    let tuple = old.tuple();
    let mut key = Vec::with_capacity(table.key.len());
    for &k in &table.key {
        let v = tuple.0.get(k).ok_or_else(|| {
            Error::definite(format!(
                "table {:?}: the old row image lacks key column {}",
                table.name, table.columns[k].name
            ))
        })?;
        let text = match v {
            TupleValue::Text(b) => String::from_utf8_lossy(b).into_owned(),
            _ => {
                return Err(Error::definite(format!(
                    "table {:?}: the old row image has no value for key column {:?}; check the table's REPLICA IDENTITY",
                    table.name, table.columns[k].name
                )))
            }
        };
        key.push(
            values::decode(&table.columns[k], types[k], &text).map_err(|m| {
                Error::definite(format!(
                    "table {:?}, column {:?}: {m}",
                    table.name, table.columns[k].name
                ))
            })?,
        );
    }
    Ok(key)
}

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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::catalog::{self, display_name, PgTable};
use super::pgoutput::{
    self, DecodeCtx, LogicalMessage, OldTuple, RelationBody, ReplicationMessage, TupleData,
    TupleValue,
};
use super::replication::ReplicationConn;
use super::slot::{flush_lsn, snapshot_position, Capture};
use super::values;
use crate::error::{Error, Result};
use crate::model::{Change, Op, Row, TableSchema, Value};
use crate::pg::conn::pg_error;
use crate::pg::Lsn;
use crate::position::Position;
use crate::retry::Retry;
use crate::source::Batch;

/// How often a status update goes to the server when nothing else happens.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// The prefix of switchyard's heartbeat messages in the WAL.
pub const HEARTBEAT_PREFIX: &str = "switchyard_heartbeat";

/// A replicated table and its column type OIDs.
type Replicated = (Arc<TableSchema>, Vec<u32>);

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
        let by_name: HashMap<u32, (String, String, Replicated)> = tables
            .iter()
            .filter_map(|t| {
                catalog.get(&t.name).map(|pg| {
                    (
                        pg.oid,
                        (
                            pg.schema.clone(),
                            pg.name.clone(),
                            (t.clone(), pg.types.clone()),
                        ),
                    )
                })
            })
            .collect();
        let mut state = StreamState {
            held: None,
            relations: HashMap::new(),
            by_name,
            after,
            commit: None,
            ordinal: 0,
            pending: Vec::new(),
            sent_upto: after,
            advance: after,
            progressed: false,
            last_commit: None,
            heartbeat_seen: false,
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

    /// A Relation message: which table an OID is, and whether its columns
    /// still are the ones replicated. Columns added at the end are followed
    /// (the changes carry the wider table; the pipeline widens the target);
    /// any other change stops the stream without acknowledging it.
    async fn on_relation(&self, state: &mut StreamState, r: RelationBody) -> Result<()> {
        let Some((schema, name, (table, types))) = state.by_name.get(&r.oid).cloned() else {
            // Not replicated, unless it stands in for a replicated table of
            // the same name that was dropped and created again.
            if let Some((_, _, (t, _))) = state
                .by_name
                .values()
                .find(|(s, n, _)| *s == r.namespace && *n == r.name)
            {
                return Err(Error::definite(format!(
                    "table {:?} was dropped and created again while streaming (a new table under the same name); \
                     its changes are not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                    t.name
                )));
            }
            state.relations.insert(r.oid, None);
            return Ok(());
        };
        if (schema.as_str(), name.as_str()) != (r.namespace.as_str(), r.name.as_str()) {
            return Err(Error::definite(format!(
                "table {:?} was renamed to {:?} while streaming; its changes are not acknowledged. \
                 Rename it back, or replicate it under its new name (the publication follows the table; copy it again: run once with the new name in tables.exclude, then without)",
                table.name,
                display_name(&r.namespace, &r.name)
            )));
        }
        let now: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
        let then: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        if now == then {
            state.relations.insert(r.oid, Some((table, types)));
            return Ok(());
        }
        if now.len() <= then.len() || now[..then.len()] != then[..] {
            return Err(Error::definite(format!(
                "table {:?} changed its columns in a way switchyard cannot follow (then {then:?}, now {now:?}); \
                 the change is not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                table.name
            )));
        }
        let client = self.capture.client().await?;
        let mut wider = (*table).clone();
        let mut types = types.clone();
        let mut added = Vec::new();
        for c in &r.columns[then.len()..] {
            let a = catalog::added_column(
                &client,
                &self.capture.ep,
                r.oid,
                &c.name,
                c.type_oid,
                c.type_modifier,
            )
            .await?;
            if a.has_missing_default && table.whole_row {
                return Err(Error::definite(format!(
                    "table {:?} has no key and gained column {:?} with a default: the rows it identifies by their whole value changed in the source but not in the target; \
                     the change is not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                    table.name, c.name
                )));
            }
            if a.has_missing_default {
                warn!(table = %table.name, column = %c.name,
                    "column added with a default: rows that existed before hold it in the source but not in the target; copy the table again to carry it");
            }
            wider.columns.push(a.column);
            if wider.whole_row {
                wider.key.push(wider.columns.len() - 1);
            }
            types.push(a.read_as);
            added.push(c.name.clone());
        }
        info!(table = %table.name, added = ?added, "table gained columns; replicating them from now on");
        if let Some(pg) = self.catalog.lock().await.get_mut(&table.name) {
            pg.types = types.clone();
        }
        let wider = Arc::new(wider);
        state
            .by_name
            .insert(r.oid, (schema, name, (wider.clone(), types.clone())));
        state.relations.insert(r.oid, Some((wider, types)));
        Ok(())
    }
}

struct StreamState {
    /// Transactions the pipeline has had no room for yet, gathered into one
    /// batch (with the WAL end it covers) while the stream is read on. Kept
    /// across reconnects: `sent_upto` already covers them.
    held: Option<(Batch, u64)>,
    relations: HashMap<u32, Option<Replicated>>,
    /// The replicated tables by OID, with the schema and name they had when
    /// discovered.
    by_name: HashMap<u32, (String, String, Replicated)>,
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
        self.relations.clear();
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
        })
    }

    fn take(&mut self, upto: Position) -> Batch {
        self.sent_upto = self.sent_upto.max(upto).max(self.advance);
        Batch {
            changes: std::mem::take(&mut self.pending),
            upto: self.sent_upto,
            committed_at: self.last_commit,
        }
    }

    fn table(&self, oid: u32) -> Result<Option<Replicated>> {
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
                self.last_end = self.last_end.max(c.end_lsn);
                self.last_commit = pg_time(c.timestamp.0);
                // The whole transaction is behind this position.
                let upto = Position::new(u64::from(c.commit_lsn), Position::WHOLE);
                if upto <= self.after {
                    return Ok(None);
                }
                if self.pending.is_empty() {
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
                if let Some((t, types)) = self.table(i.oid)? {
                    let row = tuple_row(&t, &types, &i.new)?;
                    self.push(t, Op::Insert { row });
                }
            }
            LogicalMessage::Update(u) => {
                self.count();
                if let Some((t, types)) = self.table(u.oid)? {
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
                if let Some((t, types)) = self.table(d.oid)? {
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
                    if let Some((t, _)) = self.table(oid)? {
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

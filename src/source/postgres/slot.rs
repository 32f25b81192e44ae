//! The change capture switchyard installs in a PostgreSQL source: the
//! publication and the logical replication slot, the snapshot a new slot
//! exports, and what the slot says about positions.
//!
//! ```text
//!  install:  publication (created for the selected tables, or existing)
//!            slot: CREATE_REPLICATION_SLOT … (SNAPSHOT 'export') → consistent point CP
//!  a table copied in that snapshot is at Ct = (CP − 1, whole): a transaction
//!  is in the copy exactly when its commit record starts before CP
//!  ack:      flush = the commit LSN after the target's durable checkpoint
//! ```

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::Client;
use tracing::info;

use super::pgoutput::{DecodeCtx, LogicalMessage};
use super::replication::ReplicationConn;
use crate::error::{Error, Result};
use crate::pg::conn::{pg_error, PgEndpoint, Session, Sessions};
use crate::pg::{quote_ident, Lsn};
use crate::position::Position;
use crate::source::Pending;

/// The flush LSN to confirm for a durable position: after a whole commit
/// `(L, whole)` everything before L + 1 is handled; inside the transaction at
/// L, only what is before L (so the server sends that transaction again and
/// the stream skips what was applied).
pub fn flush_lsn(p: Position) -> u64 {
    if p.ordinal == Position::WHOLE {
        p.commit + 1
    } else {
        p.commit
    }
}

/// The snapshot position for a consistent point: every transaction whose
/// commit record starts before `cp` is in the copy.
pub fn snapshot_position(cp: Lsn) -> Position {
    Position::new(u64::from(cp).saturating_sub(1), Position::WHOLE)
}

/// An exported snapshot, alive while its connection stays idle.
pub struct Export {
    _conn: ReplicationConn,
    pub snapshot: String,
    pub consistent_point: Lsn,
}

/// What `pg_replication_slots` says of our slot.
pub struct SlotState {
    pub plugin: String,
    pub confirmed_flush: Option<Lsn>,
    /// A walsender streams from it now (a running daemon).
    pub active: bool,
}

/// The publication and the slot of one source.
#[derive(Clone)]
pub struct Capture {
    pub ep: PgEndpoint,
    pub slot: String,
    pub publication: String,
    /// The publication is switchyard's own (created and dropped by it).
    pub create_publication: bool,
    /// DDL reaches the stream as messages from event triggers (installed
    /// where the role is a superuser).
    pub ddl_capture: bool,
    /// Sessions for the catalog, the publication and the slot's state,
    /// reused from one question to the next.
    pub sessions: Sessions,
}

impl Capture {
    pub fn pg(&self, what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
        let what = what.to_string();
        move |e| pg_error(&self.ep, &what, e)
    }

    /// A connection with our session settings, idle since an earlier
    /// question or new.
    pub async fn client(&self) -> Result<Session> {
        self.sessions.take().await
    }

    /// Whether the publication publishes the table (directly, through a
    /// schema or for all tables).
    pub async fn publishes(&self, c: &Client, oid: u32) -> Result<bool> {
        let row = c
            .query_opt(
                "SELECT 1 FROM pg_publication_tables pt
                   JOIN pg_namespace n ON n.nspname = pt.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                  WHERE pt.pubname = $1 AND c.oid = $2",
                &[&self.publication, &oid],
            )
            .await
            .map_err(self.pg("reading the publication's tables"))?;
        Ok(row.is_some())
    }

    /// Whether the role may install the DDL event triggers (a superuser).
    pub async fn may_capture_ddl(&self, c: &Client) -> Result<bool> {
        let row = c
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(self.pg("reading the role"))?;
        Ok(row.get(0))
    }

    /// Installs the event triggers that write DDL into the WAL, and the
    /// TRUNCATE triggers of the partitions of `roots` (qualified names).
    pub async fn install_ddl_capture(&self, c: &Client, partitions: &[String]) -> Result<()> {
        c.batch_execute(&super::ddl::install_sql())
            .await
            .map_err(self.pg("installing the DDL event triggers"))?;
        for p in partitions {
            c.batch_execute(&super::ddl::truncate_trigger_sql(p))
                .await
                .map_err(self.pg("watching a partition's TRUNCATE"))?;
        }
        Ok(())
    }

    pub async fn publication_exists(&self, c: &Client) -> Result<bool> {
        let row = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(self.pg("reading pg_publication"))?;
        Ok(row.is_some())
    }

    /// The slot, if it exists. Slot names are per cluster: one of another
    /// database is an error, not ours; so is a slot the server invalidated.
    pub async fn slot_state(&self, c: &Client) -> Result<Option<SlotState>> {
        let row = c
            .query_opt(
                "SELECT plugin::text, confirmed_flush_lsn, database::text, slot_type, wal_status, active
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(self.pg("reading pg_replication_slots"))?;
        let Some(r) = row else { return Ok(None) };
        let database: Option<String> = r.get(2);
        if database.as_deref() != Some(self.ep.dbname.as_str()) {
            return Err(Error::definite(format!(
                "replication slot {:?} already exists for {} (slot names are shared by the whole server); \
                 set another source.slot, or drop that slot if nothing uses it (SELECT pg_drop_replication_slot('{}'))",
                self.slot,
                match database {
                    Some(d) => format!("database {d:?}"),
                    None => format!("{} replication", r.get::<_, String>(3)),
                },
                self.slot
            )));
        }
        if r.get::<_, Option<String>>(4).as_deref() == Some("lost") {
            return Err(Error::definite(format!(
                "replication slot {:?} was invalidated by the server (wal_status = lost: it held back more WAL than max_slot_wal_keep_size allows); \
                 changes after the target's checkpoint are gone. Drop the slot (SELECT pg_drop_replication_slot('{}')) and replicate into an empty target",
                self.slot, self.slot
            )));
        }
        Ok(Some(SlotState {
            plugin: r.get::<_, Option<String>>(0).unwrap_or_default(),
            confirmed_flush: r.get(1),
            active: r.get(5),
        }))
    }

    /// Creates the publication (for `tables`, qualified names) when it is
    /// missing, and the slot when it is missing: then with the snapshot it
    /// exports. Returns the capture's origin and that export.
    pub async fn install(&self, tables: &[String]) -> Result<(String, Option<Export>)> {
        let c = self.client().await?;
        if !self.publication_exists(&c).await? {
            c.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quote_ident(&self.publication),
                tables.join(", ")
            ))
            .await
            .map_err(self.pg("creating the publication"))?;
            info!(publication = %self.publication, tables = tables.len(), "publication created");
        }
        let mut rconn = ReplicationConn::connect(&self.ep).await?;
        let system = rconn.identify_system().await?;
        let origin = format!(
            "postgres:{}:{}:{}",
            system.system_id, self.ep.dbname, self.slot
        );
        match self.slot_state(&c).await? {
            Some(s) if s.plugin != "pgoutput" => Err(Error::definite(format!(
                "replication slot {:?} exists but uses the output plugin {:?}, not pgoutput; choose another source.slot",
                self.slot, s.plugin
            ))),
            Some(_) => Ok((origin, None)),
            None => {
                let created = rconn.create_slot(&self.slot, false).await?;
                let snapshot = created
                    .snapshot
                    .ok_or_else(|| Error::definite("the new slot exported no snapshot"))?;
                info!(slot = %self.slot, consistent_point = %created.consistent_point, "replication slot created");
                Ok((
                    origin,
                    Some(Export {
                        _conn: rconn,
                        snapshot,
                        consistent_point: created.consistent_point,
                    }),
                ))
            }
        }
    }

    /// A new exported snapshot on a temporary slot, for tables copied after
    /// the main slot already exists (a restart in the middle of the
    /// snapshot, a table added later, verify).
    pub async fn temporary_export(&self) -> Result<Export> {
        let mut conn = ReplicationConn::connect(&self.ep).await?;
        // Unique per process and per export (several sources in one process,
        // verify beside the daemon), within the 63 characters of a name.
        static EXPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = EXPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base: String = self.slot.chars().take(40).collect();
        let name = format!("{base}_copy_{}_{n}", std::process::id());
        let created = conn.create_slot(&name, true).await?;
        let snapshot = created
            .snapshot
            .ok_or_else(|| Error::definite("the temporary slot exported no snapshot"))?;
        info!(consistent_point = %created.consistent_point, "new snapshot for the tables still to copy");
        Ok(Export {
            _conn: conn,
            snapshot,
            consistent_point: created.consistent_point,
        })
    }

    /// Refuses to stream after `checkpoint` when the slot is gone or has
    /// confirmed more than the target holds.
    pub async fn verify_resume(&self, checkpoint: Position) -> Result<()> {
        let c = self.client().await?;
        match self.slot_state(&c).await? {
            None => Err(Error::definite(format!(
                "replication slot {:?} does not exist any more; changes after the checkpoint {} are gone. Start again to copy every table anew",
                self.slot,
                Lsn::from(checkpoint.commit)
            ))),
            // The slot never confirms more than the target holds; if it
            // has, the target lost changes (restored from a backup, or its
            // last commits did not reach the disk), and the server would
            // silently start after them.
            Some(SlotState {
                confirmed_flush: Some(l),
                ..
            }) if u64::from(l) > flush_lsn(checkpoint) => Err(Error::definite(format!(
                "the target's checkpoint {} is behind what replication slot {:?} confirmed ({l}): the changes in between are not in the target and the server no longer sends them. \
                 The target lost writes (restored from a backup?); start over with an empty target to copy every table anew",
                Lsn::from(checkpoint.commit),
                self.slot
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Drops the slot (after a stopped daemon's walsender has gone) and the
    /// publication where switchyard created it.
    pub async fn uninstall(&self) -> Result<()> {
        let c = self.client().await?;
        if self.slot_state(&c).await?.is_some() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let active: Option<i32> = c
                    .query_opt(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.slot],
                    )
                    .await
                    .map_err(self.pg("reading pg_replication_slots"))?
                    .and_then(|r| r.get(0));
                if active.is_none() || std::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                .await
                .map_err(
                    self.pg("dropping the replication slot (stop the running switchyard first)"),
                )?;
            info!(slot = %self.slot, "replication slot dropped");
        }
        if self.ddl_capture {
            // Other switchyards of this database (other slots) keep theirs.
            let others: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND plugin = 'pgoutput'",
                    &[],
                )
                .await
                .map_err(self.pg("reading pg_replication_slots"))?
                .get(0);
            if others == 0 {
                c.batch_execute(super::ddl::UNINSTALL_SQL)
                    .await
                    .map_err(self.pg("removing the DDL event triggers"))?;
                info!("DDL event triggers removed");
            }
        }
        if self.create_publication && self.publication_exists(&c).await? {
            c.batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&self.publication)
            ))
            .await
            .map_err(self.pg("dropping the publication"))?;
            info!(publication = %self.publication, "publication dropped");
        }
        Ok(())
    }

    /// The position the slot has confirmed, as a snapshot position.
    pub async fn confirmed_position(&self) -> Result<Position> {
        let c = self.client().await?;
        let flushed = self
            .slot_state(&c)
            .await?
            .and_then(|s| s.confirmed_flush)
            .unwrap_or(Lsn::from(0));
        Ok(snapshot_position(flushed))
    }

    /// The changes of the relations `oids` committed after `after` and at or
    /// before `upto`, peeked from the slot without consuming anything: the
    /// slot must be idle (no daemon streams from it).
    pub async fn pending(
        &self,
        oids: &HashSet<u32>,
        after: Position,
        upto: Position,
    ) -> Result<Pending> {
        let c = self.client().await?;
        match self.slot_state(&c).await? {
            None => return Ok(Pending::Waiting(0)),
            Some(s) if s.active => return Ok(Pending::BeingRead),
            Some(_) => {}
        }
        let rows = match c
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2, NULL,
                        'proto_version', '1', 'publication_names', $3)",
                &[
                    &self.slot,
                    &Lsn::from(flush_lsn(upto)),
                    &quote_ident(&self.publication),
                ],
            )
            .await
        {
            Ok(rows) => rows,
            // A daemon took the slot between the two statements.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                return Ok(Pending::BeingRead)
            }
            Err(e) => return Err(pg_error(&self.ep, "peeking at the replication slot", e)),
        };
        let mut commit = 0u64;
        let mut ordinal = 0u64;
        let mut n = 0u64;
        let mut count = |oid: u32, commit: u64, ordinal: u64| {
            let p = Position::new(commit, ordinal);
            if oids.contains(&oid) && p > after && p <= upto {
                n += 1;
            }
        };
        for r in rows {
            let data: Vec<u8> = r.get(0);
            let m = LogicalMessage::decode(bytes::Bytes::from(data), DecodeCtx::TOP_LEVEL)
                .map_err(|e| Error::definite(format!("undecodable pgoutput message: {e}")))?;
            match m {
                LogicalMessage::Begin(b) => {
                    commit = u64::from(b.final_lsn);
                    ordinal = 0;
                }
                LogicalMessage::Insert(i) => {
                    ordinal += 1;
                    count(i.oid, commit, ordinal);
                }
                LogicalMessage::Update(u) => {
                    ordinal += 1;
                    count(u.oid, commit, ordinal);
                }
                LogicalMessage::Delete(d) => {
                    ordinal += 1;
                    count(d.oid, commit, ordinal);
                }
                LogicalMessage::Truncate(t) => {
                    for oid in t.oids {
                        ordinal += 1;
                        count(oid, commit, ordinal);
                    }
                }
                _ => {}
            }
        }
        Ok(Pending::Waiting(n))
    }

    /// The server's WAL position and the WAL the slot holds back.
    pub async fn wal(&self, c: &Client) -> Result<(Lsn, Option<u64>)> {
        let row = c
            .query_one(
                "SELECT pg_current_wal_lsn(),
                        (SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&self.slot],
            )
            .await
            .map_err(self.pg("reading the server's WAL position"))?;
        Ok((
            row.get(0),
            row.get::<_, Option<i64>>(1).map(|r| r.max(0) as u64),
        ))
    }
}

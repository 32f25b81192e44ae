//! Sources: a consistent snapshot per table, then a stream of changes.
//!
//! ```text
//!  install capture ──▶ snapshot(table) ──rows──▶ sink.load       (position Ct per table)
//!                      stream(after P) ──changes (each with its position)──▶ pipeline
//!                      ack(Durable)    ◀── only what the target committed (trim / flush)
//! ```

pub mod postgres;
pub mod sqlite;
#[cfg(feature = "surrealdb")]
pub mod surreal;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::model::{Change, Marker, Row, SequenceValue, TableSchema};
use crate::position::{Durable, Position, PositionKind};

/// How a command opens the source: a read-only command (`check`, `status`,
/// `verify`) changes nothing in it, not even a SQLite journal mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Something `check` reports about a table or column.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub table: String,
    pub column: Option<String>,
    pub message: String,
    /// A blocking problem stops `run`; the others are notes.
    pub blocking: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.column {
            Some(c) => write!(
                f,
                "table {:?}, column {:?}: {}",
                self.table, c, self.message
            ),
            None => write!(f, "table {:?}: {}", self.table, self.message),
        }
    }
}

/// What the source found: the tables it can replicate and the problems.
#[derive(Debug, Default)]
pub struct Discovery {
    pub tables: Vec<TableSchema>,
    pub problems: Vec<Problem>,
    /// Source tables that are never copied (SQLite's virtual tables and
    /// their shadow tables), each with why.
    pub left_out: Vec<String>,
}

impl Discovery {
    /// Two source tables that would land in one target table (`audit.log`
    /// and `public.audit_log` both become `audit_log`) are refused, with
    /// both names and the fix; neither is replicated.
    pub fn refuse_shared_targets(&mut self) {
        let mut by_target: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for t in &self.tables {
            by_target.entry(&t.target_name).or_default().push(&t.name);
        }
        let shared: Vec<(String, Vec<String>)> = by_target
            .into_iter()
            .filter(|(_, sources)| sources.len() > 1)
            .map(|(t, s)| (t.to_string(), s.iter().map(|n| n.to_string()).collect()))
            .collect();
        for (target, sources) in &shared {
            self.problems.push(Problem {
                table: sources.join(", "),
                column: None,
                message: format!(
                    "tables {} would all land in target table {target:?}; give them target names of their own in [tables.rename] (for example {:?} = {:?}), or exclude all but one",
                    sources
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(" and "),
                    sources[0],
                    sources[0].replace('.', "__")
                ),
                blocking: true,
            });
        }
        self.tables
            .retain(|t| !shared.iter().any(|(target, _)| *target == t.target_name));
    }

    /// No table selected and nothing else said why: a blocking problem
    /// (a pattern that matches nothing replicates nothing, silently).
    pub fn refuse_nothing_selected(&mut self) {
        if self.tables.is_empty() && !self.problems.iter().any(|p| p.blocking) {
            self.problems.push(Problem {
                table: "(source)".into(),
                column: None,
                message: "tables.include and tables.exclude select none of the source's tables: nothing would be replicated; \
                          patterns match table names as `table` or `schema.table` (`public.*`, `sales.*`, `orders`), globs as in a shell"
                    .into(),
                blocking: true,
            });
        }
    }
}

/// What [`Source::check_conversions`] found for one column.
#[derive(Debug, Clone, Default)]
pub struct ConversionCheck {
    pub column: usize,
    /// Rows read.
    pub rows: u64,
    /// Values that do not convert.
    pub failed: u64,
    /// The keys of the first ten rows whose value does not convert.
    pub keys: Vec<String>,
    /// Why the first one does not.
    pub example: Option<String>,
}

/// Changes in source order, and the position the stream has read up to: at
/// or after the last change's, so that positions with nothing to replicate
/// (other tables, an idle server's WAL) still move the checkpoint on.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    pub upto: Position,
    /// When the source committed what `upto` covers (PostgreSQL: the last
    /// transaction's commit time, or the server's clock on an idle keepalive;
    /// SQLite: when the change log was read), for lag in seconds.
    pub committed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Markers met in the stream (see [`crate::model::Marker`]), each at
    /// its position among the changes.
    pub markers: Vec<(Position, Marker)>,
}

impl Batch {
    /// Appends a later batch: its changes after these, its position and
    /// commit time as the newest.
    pub fn merge(&mut self, later: Batch) {
        self.changes.extend(later.changes);
        self.markers.extend(later.markers);
        self.upto = self.upto.max(later.upto);
        if later.committed_at.is_some() {
            self.committed_at = later.committed_at;
        }
    }
}

/// Where the source is, against what the target has applied.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceLag {
    /// The source's newest position (a PostgreSQL LSN, a SQLite sequence).
    pub head: String,
    /// PostgreSQL: WAL bytes after the applied position; SQLite: change-log
    /// rows not applied yet.
    pub bytes: u64,
    /// PostgreSQL: WAL the slot holds back, in bytes.
    pub slot_retained_bytes: Option<u64>,
    /// PostgreSQL: set when that passes `source.slot_warn_mb`.
    #[serde(default)]
    pub slot_warning: Option<String>,
}

/// Changes of the replicated tables between two positions that the target
/// has not applied (see [`Source::pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// This many changes wait, and nothing reads them now.
    Waiting(u64),
    /// This many changes wait; whether a running daemon reads them the
    /// source cannot tell (SQLite's change log).
    Unknown(u64),
    /// A consumer (a running daemon) reads the change stream now; how many
    /// wait is not known without disturbing it.
    BeingRead,
}

impl Pending {
    /// `n` changes counted in a change log that no reader reports on: none
    /// wait, or this many wait and a daemon may be reading them.
    pub fn counted(n: u64) -> Self {
        if n == 0 {
            Pending::Waiting(0)
        } else {
            Pending::Unknown(n)
        }
    }
}

/// How `cutover` stops the application's writes to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMode {
    /// The operator stopped the writers; switchyard checks that none write.
    None,
    /// `default_transaction_read_only` for the fenced roles and the
    /// database, their sessions ended (SQLite: triggers that refuse writes).
    ReadOnly,
    /// INSERT, UPDATE, DELETE and TRUNCATE revoked from the fenced roles on
    /// the replicated tables, their sessions ended.
    Revoke,
}

impl std::str::FromStr for FenceMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "read-only" => Ok(Self::ReadOnly),
            "revoke" => Ok(Self::Revoke),
            other => Err(format!(
                "unknown fence {other:?}: none, read-only or revoke"
            )),
        }
    }
}

impl std::fmt::Display for FenceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::ReadOnly => "read-only",
            Self::Revoke => "revoke",
        })
    }
}

/// A fence as planned, before anything is changed: what it changes and
/// what was there, so that it can be undone exactly (recorded in the
/// target before it is applied).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Fence {
    pub mode: FenceMode,
    /// The application roles it applies to (PostgreSQL).
    pub roles: Vec<String>,
    /// What the source changes and what it held before (its own format).
    pub plan: serde_json::Value,
    /// In words, one line per change.
    pub summary: Vec<String>,
}

/// What `install` found and did.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    /// Identifies this capture installation (its positions mean nothing to
    /// another one); the target records it with its first checkpoint.
    pub origin: String,
    /// Tables whose capture was (re)created now: changes made to them before
    /// this point were never captured, so a copy taken earlier is stale.
    pub recaptured: Vec<String>,
}

#[async_trait]
pub trait Source: Send + Sync {
    /// Introspects the selected tables; writes nothing.
    async fn discover(&self) -> Result<Discovery>;

    /// Installs change capture for `tables` (idempotent). Must run before any
    /// snapshot position is read, so that no change falls between the two.
    async fn install(&self, tables: &[Arc<TableSchema>]) -> Result<Installed>;

    /// Refuses to stream after `checkpoint` when the source cannot deliver
    /// every change after it (restored from a backup, log trimmed by someone
    /// else): streaming on would silently lose changes.
    async fn verify_resume(&self, checkpoint: Position) -> Result<()>;

    /// Removes everything switchyard installed in the source.
    async fn uninstall(&self) -> Result<()>;

    /// The number of rows in `table`, for progress (None if unknown).
    async fn count_rows(&self, table: &TableSchema) -> Result<Option<u64>>;

    /// The newest position the stream has reached now.
    async fn current_position(&self) -> Result<Position>;

    /// Sends every row of `table` in batches and returns the position `Ct`
    /// read in the same read transaction: changes of this table at or below
    /// `Ct` are in the rows, later ones will come from the stream.
    async fn snapshot(
        &self,
        table: Arc<TableSchema>,
        batch_rows: usize,
        rows: mpsc::Sender<Vec<Row>>,
    ) -> Result<Position>;

    /// Sends the changes after `after`, in order, until `cancel` fires.
    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()>;

    /// The target has durably applied everything up to this position.
    async fn ack(&self, durable: Durable) -> Result<()>;

    /// Where this table's rows can be read as binary COPY (every column of
    /// a built-in type): what that form depends on, for the target to
    /// compare with its own. `None` where the source has no such format.
    async fn binary_form(&self, table: &TableSchema) -> Result<Option<crate::pg::BinaryForm>> {
        let _ = table;
        Ok(None)
    }

    /// The table's rows as PostgreSQL COPY data in `format`, read in the
    /// same consistent snapshot as [`Source::snapshot`] would, for a target
    /// that takes them as they are. A large table is read in parts at once:
    /// each part is a channel of chunks of whole rows, sent to `parts` when
    /// its reading starts. `None` where the source has no COPY format.
    async fn snapshot_copy(
        &self,
        table: Arc<TableSchema>,
        format: crate::pg::CopyFormat,
        parts: mpsc::Sender<mpsc::Receiver<bytes::Bytes>>,
    ) -> Result<Option<Position>> {
        let _ = (table, format, parts);
        Ok(None)
    }

    /// After [`Source::snapshot`] returned `at`: a position at or after
    /// every change its rows can hold. The same where the rows are read in
    /// one transaction; later for a source read in pages (SurrealDB), whose
    /// rows may hold changes made while they were read.
    async fn settled_position(&self, at: Position) -> Result<Position> {
        Ok(at)
    }

    /// Releases what `snapshot` holds between tables (PostgreSQL: the
    /// exported snapshot), so that the next `snapshot` reads the source as it
    /// is then.
    async fn release_snapshot(&self) {}

    /// For each column of `table` whose type a rule chose (its
    /// `conversions`), whether the source's current values convert: read
    /// by `check` before anything is loaded. Sources without such rules
    /// have nothing to check.
    async fn check_conversions(&self, _table: &TableSchema) -> Result<Vec<ConversionCheck>> {
        Ok(Vec::new())
    }

    /// How far the source is ahead of `applied`. Reads only.
    async fn lag(&self, applied: Position) -> Result<SourceLag>;

    /// How this source's positions are shown to users.
    fn position_kind(&self) -> PositionKind;

    /// The changes of `tables` after `after` and at or before `upto` that
    /// wait in the change stream, read without consuming them (for verify
    /// with no daemon running). Reads only.
    async fn pending(
        &self,
        tables: &[Arc<TableSchema>],
        after: Position,
        upto: Position,
    ) -> Result<Pending>;

    /// Whether change capture is installed in the source (a read-only
    /// command says "not installed" instead of failing on what is missing).
    async fn capture_installed(&self) -> Result<bool>;

    /// The schema of `tables` and what they depend on, as the source's own
    /// dump tool takes it (PostgreSQL: `pg_dump`), for a target that
    /// restores it; `None` where the source has none. `owners`: with owners
    /// and grants.
    async fn schema_dump(
        &self,
        tables: &[Arc<TableSchema>],
        owners: bool,
    ) -> Result<Option<crate::schema::dump::SchemaDump>> {
        let _ = (tables, owners);
        Ok(None)
    }

    /// Cutover: writes `marker` into the change stream after every change
    /// committed so far.
    async fn mark(&self, marker: &Marker) -> Result<()> {
        let _ = marker;
        Err(crate::error::Error::config(
            "this source cannot be cut over",
        ))
    }

    /// Cutover: another process (a running daemon) reads the change stream.
    async fn stream_in_use(&self) -> Result<bool> {
        Ok(false)
    }

    /// Cutover preflight: what the source side stands in the way of a
    /// fence of `mode` on `roles` (all application roles when `None`) and,
    /// with `reverse`, of a reverse replica into it. Reads only.
    async fn cutover_problems(
        &self,
        mode: FenceMode,
        roles: Option<&[String]>,
        tables: &[Arc<TableSchema>],
        reverse: bool,
    ) -> Result<Vec<String>> {
        let _ = (mode, roles, tables, reverse);
        Ok(vec!["this source cannot be cut over".into()])
    }

    /// Plans a fence (reads only): what it will change and what is there.
    async fn plan_fence(
        &self,
        mode: FenceMode,
        roles: Option<&[String]>,
        tables: &[Arc<TableSchema>],
    ) -> Result<Fence> {
        let _ = (mode, roles, tables);
        Err(crate::error::Error::config("this source cannot be fenced"))
    }

    /// Applies a planned fence; what it did beyond the plan (sessions
    /// ended). Idempotent.
    async fn apply_fence(&self, fence: &Fence) -> Result<Vec<String>> {
        let _ = fence;
        Err(crate::error::Error::config("this source cannot be fenced"))
    }

    /// Undoes a fence (idempotent: parts not applied are left alone).
    async fn lift_fence(&self, fence: &Fence) -> Result<()> {
        let _ = fence;
        Ok(())
    }

    /// Cutover: the source's sequences, read after the fence.
    async fn sequences(&self, tables: &[Arc<TableSchema>]) -> Result<Vec<SequenceValue>> {
        let _ = tables;
        Ok(Vec::new())
    }

    /// Cutover: the exact number of rows of `table`.
    async fn exact_count(&self, table: &TableSchema) -> Result<u64> {
        let _ = table;
        Err(crate::error::Error::config("this source cannot count rows"))
    }

    /// After a cutover switched: releases what forward replication holds in
    /// the source (PostgreSQL: the slot, which would keep WAL forever); what
    /// was done.
    async fn end_replication(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

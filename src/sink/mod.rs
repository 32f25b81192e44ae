//! Sinks: create the target schema, load snapshot rows, apply changes.
//!
//! A sink's `apply` commits the changes together with the checkpoint in one
//! target transaction and only then returns a [`Durable`]: the one value a
//! source accepts in `ack`, so nothing can be acknowledged that the target
//! has not committed (invariant 2).

pub mod discard;
pub mod postgres;
#[cfg(feature = "surrealdb")]
pub mod surreal;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::model::{Change, Marker, Row, SequenceValue, TableSchema};
use crate::position::{Durable, Position};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableStatus {
    /// Being copied: on restart it is emptied and copied again.
    Copying,
    /// Copied at `position`; stream changes at or below it are skipped.
    Done,
}

#[derive(Debug, Clone)]
pub struct TableState {
    pub status: TableStatus,
    pub position: Position,
    pub rows: u64,
    /// The source's identity of the table that was copied (see
    /// [`crate::model::TableSchema::source_id`]); empty if it has none.
    pub source_id: String,
    /// The shape the table has in the target (recorded by targets that
    /// follow schema changes), where recorded.
    pub shape: Option<TableSchema>,
}

/// What the target remembers of the replication.
#[derive(Debug, Clone, Default)]
pub struct SinkState {
    /// The position of the last applied change; none before the first run.
    pub checkpoint: Option<Position>,
    /// The source capture installation the checkpoint belongs to.
    pub origin: Option<String>,
    /// When the checkpoint last moved (RFC 3339), if the target records it.
    pub checkpoint_updated_at: Option<String>,
    /// Per source table name.
    pub tables: BTreeMap<String, TableState>,
    /// The last marker the stream met (see [`Marker`]), where recorded.
    pub marker: Option<MarkerState>,
}

/// A marker as the target recorded it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MarkerState {
    pub id: String,
    /// Changes the stream that met it had applied before it (counted from
    /// that stream's start).
    pub applied: u64,
    /// The checkpoint it was recorded with.
    pub position: Position,
}

#[async_trait]
pub trait Sink: Send + Sync {
    /// Creates what is missing of the target schema and the state records
    /// (the first write a run makes; opening a sink writes nothing).
    async fn prepare(&self, tables: &[Arc<TableSchema>]) -> Result<()>;

    /// What the target remembers; `None` for a target switchyard never
    /// replicated into (no state records: nothing is created to read them).
    async fn state(&self) -> Result<Option<SinkState>>;

    /// What `check` says of the target's durability (a PostgreSQL server
    /// with `fsync = off`, the settings switchyard's own sessions use).
    async fn durability_notes(&self) -> Result<Vec<(String, bool)>> {
        Ok(Vec::new())
    }

    /// Records the position the first snapshot starts from (no checkpoint yet)
    /// and the source capture installation it belongs to.
    async fn start(&self, position: Position, origin: &str) -> Result<()>;

    /// Drops the table's copy state, so that it is copied again if it is
    /// selected again (its copy stops following the source meanwhile).
    async fn forget_table(&self, name: &str) -> Result<()>;

    /// Empties the table in the target and marks it as being copied.
    async fn begin_table(&self, table: &TableSchema) -> Result<()>;

    /// Inserts snapshot rows (committed on return); the number stored. Rows
    /// whose values the target refuses go to the reject files where
    /// `pipeline.reject_dir` is set, and are not counted.
    async fn load(&self, table: &TableSchema, rows: &[Row]) -> Result<u64>;

    /// Marks the table as copied at `position` with `rows` rows.
    async fn finish_table(&self, table: &TableSchema, position: Position, rows: u64) -> Result<()>;

    /// Applies `changes` in order and moves the checkpoint to `checkpoint`, in
    /// one target transaction. Refuses a checkpoint older than the stored one.
    async fn apply(&self, changes: &[Change], checkpoint: Position) -> Result<Durable>;

    /// After the tables are copied: what the target builds once the bulk load
    /// is in (a PostgreSQL target: secondary indexes and foreign keys).
    async fn after_snapshot(&self, tables: &[Arc<TableSchema>]) -> Result<()> {
        let _ = tables;
        Ok(())
    }

    /// Whether [`Sink::load_copy`] takes this table's source COPY data as it
    /// is (every column of the same type on both sides), and in which
    /// format: binary where `binary`, the source's [`crate::pg::BinaryForm`]
    /// of the table, is the target's too.
    async fn takes_copy(
        &self,
        table: &TableSchema,
        binary: Option<&crate::pg::BinaryForm>,
    ) -> Result<Option<crate::pg::CopyFormat>> {
        let _ = (table, binary);
        Ok(None)
    }

    /// Loads one part of a table's COPY data in `format`, its chunks as they
    /// arrive, in a COPY of its own (the parts of a table load at once);
    /// the number of rows loaded.
    async fn load_copy(
        &self,
        table: &TableSchema,
        format: crate::pg::CopyFormat,
        chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> Result<u64> {
        let _ = (table, format, chunks);
        Err(Error::config("this target does not take COPY data"))
    }

    /// Whether the target takes the source's schema as `pg_dump` takes it
    /// (a PostgreSQL target that creates its tables, from a PostgreSQL
    /// source) instead of making its own tables, and has not taken all of
    /// it yet.
    async fn wants_schema_dump(&self) -> Result<bool> {
        Ok(false)
    }

    /// Readies the target for [`Sink::restore_schema`] (a PostgreSQL
    /// target's state schema) while the source's schema is being dumped.
    async fn ready_for_schema(&self) -> Result<()> {
        Ok(())
    }

    /// Restores one part of the source's schema (see
    /// [`crate::schema::dump`]); what was done.
    async fn restore_schema(
        &self,
        dump: &crate::schema::dump::SchemaDump,
        section: crate::schema::dump::Section,
    ) -> Result<Vec<String>> {
        let _ = (dump, section);
        Err(Error::config("this target does not take a pg_dump schema"))
    }

    /// Records a marker met in the stream once everything before it is
    /// applied (the checkpoint is at `at`); `applied`: the changes this
    /// stream applied before it.
    async fn mark(&self, marker: &Marker, at: Position, applied: u64) -> Result<()> {
        let _ = (marker, at, applied);
        Err(Error::config("this target does not record cutover markers"))
    }

    /// The newest cutover record (see `crate::cutover`), if any.
    async fn cutover_record(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }

    /// Stores a cutover record (replacing the one with the same id).
    async fn save_cutover_record(&self, id: &str, record: &serde_json::Value) -> Result<()> {
        let _ = (id, record);
        Err(Error::config("this target cannot record a cutover"))
    }

    /// The rows the target holds of `table` (identical rows counted each).
    async fn count(&self, table: &TableSchema) -> Result<u64> {
        let _ = table;
        Err(Error::config("this target cannot count rows"))
    }

    /// Cutover: sets the target's sequences to the source's values (read
    /// after the source was fenced); for a source without sequences, moves
    /// identity columns past their largest value. What was done, one line
    /// per sequence.
    async fn set_sequences(
        &self,
        tables: &[Arc<TableSchema>],
        sequences: &[SequenceValue],
    ) -> Result<Vec<String>> {
        let _ = (tables, sequences);
        Ok(Vec::new())
    }

    /// Cutover: what keeps the target from taking the application's
    /// traffic (keys, indexes or constraints not built).
    async fn cutover_problems(&self, tables: &[Arc<TableSchema>]) -> Result<Vec<String>> {
        let _ = tables;
        Ok(Vec::new())
    }

    /// A reverse replica: the target already holds `tables` as the source
    /// has them at `at` (identical at a cutover), so they are marked copied
    /// there and streaming starts after `at`, with capture `origin`.
    async fn adopt(&self, tables: &[Arc<TableSchema>], at: Position, origin: &str) -> Result<()> {
        let _ = (tables, at, origin);
        Err(Error::config("this target cannot take a reverse replica"))
    }

    /// Verify: the records source rows become in this target, each as its
    /// key and a canonical encoding (one per row, also for identical rows).
    async fn expected_records(&self, table: &TableSchema, rows: &[Row]) -> Result<Vec<Record>> {
        let _ = (table, rows);
        Err(Error::config("this target cannot be verified"))
    }

    /// Verify: the table's records in the target in key order, `limit`
    /// stored records after the cursor of the previous page, encoded as
    /// [`Sink::expected_records`] does.
    async fn records(
        &self,
        table: &TableSchema,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page> {
        let _ = (table, after, limit);
        Err(Error::config("this target cannot be verified"))
    }
}

/// One record as verify compares it: its key and its canonical encoding.
pub type Record = (String, String);

/// A page of target records (see [`Sink::records`]).
pub struct Page {
    pub records: Vec<Record>,
    /// Stored records read (a record counting several identical rows is one).
    pub stored: usize,
    /// Where the next page starts (the sink's own key of the last record).
    pub next: Option<Cursor>,
}

/// A sink's position in a table's key order, opaque to verify.
pub struct Cursor(pub Box<dyn std::any::Any + Send + Sync>);

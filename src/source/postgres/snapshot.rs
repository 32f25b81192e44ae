//! The snapshot: a table's rows read in the slot's exported snapshot with
//! `COPY (SELECT …) TO STDOUT`, as decoded rows or as the COPY data itself
//! (text or binary), a large table in block ranges read at once in the same
//! snapshot.

use std::sync::Arc;

use futures::{pin_mut, TryStreamExt};
use tokio::sync::mpsc;

use super::catalog::PgTable;
use super::values;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Row, TableSchema};
use crate::pg::conn::{pg_error, PgEndpoint, Sessions};
use crate::pg::{quote_ident, quote_literal, CopyFormat};

/// How a copy names a table that TRUNCATE or a rewrite changed after its
/// snapshot (the source then takes a new snapshot for it).
pub const REWRITTEN: &str = "was truncated or rewritten after the snapshot was taken";

/// How a copy says that the exported snapshot it was to read in is gone.
pub const SNAPSHOT_GONE: &str = "the exported snapshot is no longer available";

/// Where a COPY part goes: decoded rows in batches, or the COPY data itself
/// in `CopyFormat`, each part in a channel of its own (sent to the second
/// field when the part's reading starts).
#[derive(Clone)]
pub enum CopyOut {
    Rows(mpsc::Sender<Vec<Row>>, usize),
    Copy(CopyFormat, mpsc::Sender<mpsc::Receiver<bytes::Bytes>>),
}

/// Chunks of COPY data (of about 1 MiB) a part holds for its loader at most.
const PART_QUEUE: usize = 4;

/// A part of a table's heap, in blocks: `[from, to)`, `to` open for the last.
type BlockRange = Option<(u32, Option<u32>)>;

/// Copies tables, several COPY readers at once at most.
pub struct Copier {
    pub ep: PgEndpoint,
    /// Sessions for the questions before a copy (each part's COPY has a
    /// connection of its own).
    pub sessions: Sessions,
    /// COPY readers running at once, over all tables (`snapshot_workers`).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Ranges a large table is read in at once.
    pub split_parts: usize,
    /// Tables at least this large (bytes of heap) are read in ranges.
    pub split_bytes: u64,
}

impl Copier {
    fn pg(&self, what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
        let what = what.to_string();
        move |e| pg_error(&self.ep, &what, e)
    }

    /// Copies a whole table in the exported `snapshot`, in block ranges at
    /// once where it is large.
    pub async fn copy(
        &self,
        table: &Arc<TableSchema>,
        pg: &PgTable,
        snapshot: &str,
        out: CopyOut,
    ) -> Result<()> {
        let ranges = self.ranges(pg).await?;
        if ranges.len() > 1 {
            tracing::info!(table = %table.name, parts = ranges.len(), "copying the table in block ranges at once");
        }
        let parts = ranges
            .into_iter()
            .map(|r| self.copy_part(table, pg, snapshot, r, out.clone()));
        futures::future::try_join_all(parts).await?;
        Ok(())
    }

    /// The parts a table is copied in: the whole table, or for a table of at
    /// least `split_bytes`, `split_parts` ranges of its blocks (TID range
    /// scans, PostgreSQL 14 and later), read at once in the same snapshot.
    async fn ranges(&self, pg: &PgTable) -> Result<Vec<BlockRange>> {
        if self.split_parts < 2 || self.split_bytes == 0 {
            return Ok(vec![None]);
        }
        let c = self.sessions.take().await?;
        let row = c
            .query_one(
                "SELECT pg_relation_size($1::oid), current_setting('block_size')::int8, current_setting('server_version_num')::int4",
                &[&pg.oid],
            )
            .await
            .map_err(self.pg("reading the table's size"))?;
        let (bytes, block, version): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
        if version < 140000 || (bytes as u64) < self.split_bytes || block <= 0 {
            return Ok(vec![None]);
        }
        let blocks = (bytes / block) as u32;
        let step = blocks.div_ceil(self.split_parts as u32).max(1);
        let mut out = Vec::new();
        let mut from = 0u32;
        while from < blocks {
            let to = from.saturating_add(step);
            out.push(Some((from, (to < blocks).then_some(to))));
            from = to;
        }
        Ok(out)
    }

    /// Holds off TRUNCATE and table rewrites until the copy ends (an ACCESS
    /// SHARE lock, as pg_dump takes), and refuses a table that one of them
    /// changed after the snapshot was taken: TRUNCATE is not MVCC-safe, so
    /// an older snapshot reads such a table as empty, and the changes the
    /// stream brings for its rows would then miss them.
    async fn still_as_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        table: &TableSchema,
        pg: &PgTable,
    ) -> Result<()> {
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS SHARE MODE",
            pg.qualified()
        ))
        .await
        .map_err(self.pg(&format!("locking {} for its copy", table.name)))?;
        // pg_class read in the snapshot holds the file the snapshot saw;
        // pg_relation_filenode() the file the table has now. (A plain
        // table is no partition tree of its own: named besides it.)
        let row = tx
            .query_one(
                "SELECT coalesce(bool_and(c.relfilenode = pg_relation_filenode(c.oid)), true)
                   FROM (SELECT $1::oid AS relid UNION SELECT relid FROM pg_partition_tree($1::oid)) p
                   JOIN pg_class c ON c.oid = p.relid
                  WHERE c.relkind IN ('r', 'm')",
                &[&pg.oid],
            )
            .await
            .map_err(self.pg(&format!("checking {} against the snapshot", table.name)))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        Err(Error::transient(format!(
            "table {:?} {REWRITTEN}; copying it again in a new snapshot",
            table.name
        )))
    }

    /// Copies one part of a table in the exported snapshot into `rows`.
    async fn copy_part(
        &self,
        table: &Arc<TableSchema>,
        pg: &PgTable,
        snapshot: &str,
        range: BlockRange,
        out: CopyOut,
    ) -> Result<()> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Interrupted, "snapshot stopped"))?;
        let mut c = self.ep.session().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(self.pg("starting the snapshot transaction"))?;
        tx.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) {
                // The connection that exported it ended (cut, or the export
                // dropped for a table copied again): a new one is taken.
                return Error::transient(format!(
                    "table {:?}: {SNAPSHOT_GONE}; copying it in a new snapshot",
                    table.name
                ));
            }
            pg_error(&self.ep, "importing the exported snapshot", e)
        })?;
        self.still_as_in(&tx, table, pg).await?;
        let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let filter = match range {
            None => String::new(),
            Some((from, Some(to))) => {
                format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
            }
            Some((from, None)) => format!(" WHERE ctid >= '({from},0)'::tid"),
        };
        let only = if pg.only { "ONLY " } else { "" };
        let option = match &out {
            CopyOut::Copy(format, _) => format.option(),
            CopyOut::Rows(..) => "",
        };
        let sql = format!(
            "COPY (SELECT {} FROM {only}{}{filter}) TO STDOUT{option}",
            cols.join(", "),
            pg.qualified()
        );
        let stream = tx
            .copy_out(sql.as_str())
            .await
            .map_err(self.pg(&format!("copying {}", table.name)))?;
        pin_mut!(stream);
        let (rows, batch_rows) = match out {
            CopyOut::Rows(rows, n) => (rows, n),
            CopyOut::Copy(_, parts) => {
                let (text, part) = mpsc::channel(PART_QUEUE);
                if parts.send(part).await.is_err() {
                    return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                }
                // Whole rows (one per CopyData message) gathered into 1 MiB chunks.
                let mut buf = bytes::BytesMut::with_capacity(1 << 20);
                while let Some(chunk) = stream
                    .try_next()
                    .await
                    .map_err(self.pg(&format!("copying {}", table.name)))?
                {
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= 1 << 20 && text.send(buf.split().freeze()).await.is_err() {
                        return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                    }
                }
                if !buf.is_empty() && text.send(buf.freeze()).await.is_err() {
                    return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                }
                tx.commit()
                    .await
                    .map_err(self.pg("ending the snapshot transaction"))?;
                return Ok(());
            }
        };
        let mut parser = values::CopyTextParser::new(table.columns.len());
        let mut batch = Vec::with_capacity(batch_rows);
        let ctx = |e: String| Error::definite(format!("table {:?}: {e}", table.name));
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(self.pg(&format!("copying {}", table.name)))?
        {
            for fields in parser.feed(&chunk).map_err(ctx)? {
                batch.push(values::decode_row(table, &pg.types, fields)?);
                if batch.len() >= batch_rows {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
                    if rows.send(full).await.is_err() {
                        return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                    }
                }
            }
        }
        parser.finish().map_err(ctx)?;
        if !batch.is_empty() && rows.send(batch).await.is_err() {
            return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
        }
        tx.commit()
            .await
            .map_err(self.pg("ending the snapshot transaction"))?;
        Ok(())
    }
}

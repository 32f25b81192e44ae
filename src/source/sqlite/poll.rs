//! Reading the change log: the entries after a position, in one read
//! transaction, turned into changes (values read back as the log stored
//! them, with their storage classes).

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::sqlite::SqliteRow;
use sqlx::{Connection, Row as _, SqliteConnection};

use super::capture::{log_table, quote, trimmed_upto, CHANGES};
use super::convert::{convert_row, read_raw, set_aside, Misfit};
use crate::error::{Error, Result};
use crate::model::{Change, Op, TableSchema};
use crate::position::Position;
use crate::reject::Rejects;

pub struct Polled {
    pub changes: Vec<Change>,
    /// Log entries read (including those of tables not replicated).
    pub seen: usize,
    /// The last sequence number read.
    pub end: Option<i64>,
}

/// Reads up to `limit` log entries after `after` in one read transaction.
pub async fn poll(
    conn: &mut SqliteConnection,
    tables: &HashMap<i64, Arc<TableSchema>>,
    after: i64,
    limit: usize,
    rejects: &Rejects,
) -> Result<Polled> {
    let mut tx = conn.begin().await?;
    let trimmed = trimmed_upto(&mut tx).await?;
    if trimmed > after {
        return Err(Error::definite(format!(
            "the change log was trimmed up to {trimmed} while this switchyard had read only up to {after}: \
             another switchyard with another target consumes this source. Give each target its own copy of the source"
        )));
    }
    let heads: Vec<(i64, i64, String)> = sqlx::query_as(&format!(
        "SELECT seq, table_id, op FROM {CHANGES} WHERE seq > ? ORDER BY seq LIMIT ?"
    ))
    .bind(after)
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await?;
    let Some(end) = heads.last().map(|h| h.0) else {
        tx.commit().await?;
        return Ok(Polled {
            changes: Vec::new(),
            seen: 0,
            end: None,
        });
    };
    let mut bodies: HashMap<i64, SqliteRow> = HashMap::new();
    let ids: std::collections::BTreeSet<i64> = heads
        .iter()
        .map(|h| h.1)
        .filter(|id| tables.contains_key(id))
        .collect();
    for id in ids {
        let t = &tables[&id];
        let cols: Vec<String> = (0..t.key.len())
            .map(|i| format!("o{i}"))
            .chain((0..t.columns.len()).map(|i| format!("n{i}")))
            .collect();
        let rows = sqlx::query(&format!(
            "SELECT seq, h IS NOT NULL, {} FROM {} WHERE seq > ? AND seq <= ?",
            cols.join(", "),
            quote(&log_table(id))
        ))
        .bind(after)
        .bind(end)
        .fetch_all(&mut *tx)
        .await?;
        for r in rows {
            bodies.insert(r.get::<i64, _>(0), r);
        }
    }
    tx.commit().await?;
    let mut changes = Vec::with_capacity(heads.len());
    for (seq, id, op) in &heads {
        let Some(table) = tables.get(id) else {
            continue;
        };
        let body = bodies.get(seq).ok_or_else(|| {
            Error::definite(format!(
                "change log entry {seq} of table {:?} has no values row; the log was changed outside switchyard",
                table.name
            ))
        })?;
        let here: bool = body.get(1);
        let nk = table.key.len();
        let nc = table.columns.len();
        // Columns: seq, here, o0..o(nk-1), n0..n(nc-1).
        let read = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| read_raw(body, i))
                .collect::<Result<Vec<_>>>()
        };
        let position = Position::new(*seq as u64, 0);
        let ctx = |e: Error| e.context(format!("change log entry {seq}"));
        let aside = |m: Misfit| set_aside(rejects, table, m, "stream", position).map_err(ctx);
        let all: Vec<usize> = (0..nc).collect();
        let op = match (op.as_str(), here) {
            // Inserted, then deleted before our trigger read it back.
            ("I", false) => continue,
            // A row set aside: its old version (INSERT OR REPLACE logs no
            // delete) leaves the target, which holds no rejected row.
            ("I", true) => match convert_row(table, read(2 + nk, nc)?, &all) {
                Ok(row) => Op::Insert { row },
                Err(m) => {
                    let key = m.key_values.clone();
                    aside(m)?;
                    match key {
                        Some(key) => Op::Delete { key },
                        None => continue,
                    }
                }
            },
            ("U", false) | ("D", _) => match convert_row(table, read(2, nk)?, &table.key) {
                Ok(key) => Op::Delete { key },
                // A key that does not convert never reached the target.
                Err(m) if !rejects.enabled() => return Err(ctx(m.error(table))),
                Err(_) => continue,
            },
            ("U", true) => {
                let old = convert_row(table, read(2, nk)?, &table.key);
                let row = convert_row(table, read(2 + nk, nc)?, &all);
                match (old, row) {
                    (Ok(old), Ok(row)) => {
                        let old_key = if table.key_of(&row) == old {
                            None
                        } else {
                            Some(old)
                        };
                        Op::Update { old_key, row }
                    }
                    // The new version is set aside: the old one leaves the
                    // target, which holds no row the source no longer has.
                    (Ok(old), Err(m)) => {
                        aside(m)?;
                        Op::Delete { key: old }
                    }
                    // The old key never reached the target; the row fits now.
                    (Err(m), Ok(row)) => {
                        if !rejects.enabled() {
                            return Err(ctx(m.error(table)));
                        }
                        Op::Update { old_key: None, row }
                    }
                    (Err(_), Err(m)) => {
                        let key = m.key_values.clone();
                        aside(m)?;
                        match key {
                            Some(key) => Op::Delete { key },
                            None => continue,
                        }
                    }
                }
            }
            (other, _) => {
                return Err(Error::definite(format!(
                    "change log entry {seq}: unknown operation {other:?}"
                )))
            }
        };
        changes.push(Change {
            table: table.clone(),
            op,
            position,
        });
    }
    Ok(Polled {
        changes,
        seen: heads.len(),
        end: Some(end),
    })
}

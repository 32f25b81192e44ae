//! Reading the change log: the entries after a position and the rows they
//! name, in one read transaction, turned into changes. The log holds each
//! change's operation and key; the row's values are read from the table in
//! the same transaction (with their storage classes), so they are the row as
//! it is at that point, and a row changed again later is carried by its later
//! entry too.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::{Connection, Row as _, SqliteConnection};

use super::capture::{log_table, quote, trimmed_upto, CHANGES, MARKS, MARK_TABLE};
use super::convert::{convert_row, read_raw, set_aside, Misfit, Raw};
use crate::error::{Error, Result};
use crate::model::{Change, Marker, Op, TableSchema};
use crate::position::Position;
use crate::reject::Rejects;

/// Keys per query when the rows of a batch are read back.
const KEYS_PER_QUERY: usize = 400;

pub struct Polled {
    pub changes: Vec<Change>,
    /// Log entries read (including those of tables not replicated).
    pub seen: usize,
    /// The last sequence number read.
    pub end: Option<i64>,
    /// The schema changed since `schema` (its version now): nothing was
    /// read; the tables are described again first.
    pub schema_changed: Option<i64>,
    /// Markers `cutover` wrote into the log, at their positions.
    pub markers: Vec<(Position, Marker)>,
}

/// One log entry of a replicated table.
struct Entry {
    seq: i64,
    op: String,
    old: Vec<Raw>,
    new: Vec<Raw>,
}

/// Reads up to `limit` log entries after `after` in one read transaction,
/// unless the schema is no longer at version `schema`.
pub async fn poll(
    conn: &mut SqliteConnection,
    tables: &HashMap<i64, Arc<TableSchema>>,
    after: i64,
    limit: usize,
    rejects: &Rejects,
    schema: Option<i64>,
) -> Result<Polled> {
    let mut tx = conn.begin().await?;
    let version: i64 = sqlx::query_scalar("PRAGMA schema_version")
        .fetch_one(&mut *tx)
        .await?;
    if schema != Some(version) {
        tx.commit().await?;
        return Ok(Polled {
            changes: Vec::new(),
            seen: 0,
            end: None,
            schema_changed: Some(version),
            markers: Vec::new(),
        });
    }
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
            schema_changed: None,
            markers: Vec::new(),
        });
    };
    // The entries' keys, per table.
    let mut entries: HashMap<i64, Entry> = HashMap::new();
    let mut images: HashMap<i64, HashMap<String, Vec<Raw>>> = HashMap::new();
    let ids: std::collections::BTreeSet<i64> = heads
        .iter()
        .map(|h| h.1)
        .filter(|id| tables.contains_key(id))
        .collect();
    for id in ids {
        let t = &tables[&id];
        let nk = t.key.len();
        let cols: Vec<String> = (0..nk)
            .map(|i| format!("o{i}"))
            .chain((0..nk).map(|i| format!("k{i}")))
            .collect();
        let rows = sqlx::query(&format!(
            "SELECT seq, {} FROM {} WHERE seq > ? AND seq <= ?",
            cols.join(", "),
            quote(&log_table(id))
        ))
        .bind(after)
        .bind(end)
        .fetch_all(&mut *tx)
        .await?;
        let mut wanted: Vec<Vec<Raw>> = Vec::new();
        for r in rows {
            let seq: i64 = r.get(0);
            let read = |from: usize| {
                (from..from + nk)
                    .map(|i| read_raw(&r, i))
                    .collect::<Result<Vec<_>>>()
            };
            let entry = Entry {
                seq,
                op: String::new(),
                old: read(1)?,
                new: read(1 + nk)?,
            };
            if entry.new.iter().any(|v| *v != Raw::Null) {
                wanted.push(entry.new.clone());
            }
            entries.insert(seq, entry);
        }
        images.insert(id, read_rows(&mut tx, t, wanted).await?);
    }
    let mut markers = Vec::new();
    if heads.iter().any(|h| h.1 == MARK_TABLE) {
        let marks: Vec<(i64, String)> = sqlx::query_as(&format!(
            "SELECT seq, marker FROM {MARKS} WHERE seq > ? AND seq <= ? ORDER BY seq"
        ))
        .bind(after)
        .bind(end)
        .fetch_all(&mut *tx)
        .await?;
        for (seq, text) in marks {
            let marker: Marker = serde_json::from_str(&text).map_err(|e| {
                Error::definite(format!("unreadable cutover marker {seq} in {MARKS}: {e}"))
            })?;
            markers.push((Position::new(seq as u64, 0), marker));
        }
    }
    tx.commit().await?;
    let mut changes = Vec::with_capacity(heads.len());
    for (seq, id, op) in &heads {
        let Some(table) = tables.get(id) else {
            continue;
        };
        let mut entry = entries.remove(seq).ok_or_else(|| {
            Error::definite(format!(
                "change log entry {seq} of table {:?} has no key row; the log was changed outside switchyard",
                table.name
            ))
        })?;
        entry.op = op.clone();
        let position = Position::new(*seq as u64, 0);
        let image = images
            .get(id)
            .and_then(|m| m.get(&key_of(&entry.new)))
            .cloned();
        if let Some(op) = change_of(table, &entry, image, rejects, position)? {
            changes.push(Change {
                table: table.clone(),
                op,
                position,
            });
        }
    }
    Ok(Polled {
        changes,
        seen: heads.len(),
        end: Some(end),
        schema_changed: None,
        markers,
    })
}

/// A key's raw values as a map key.
fn key_of(raws: &[Raw]) -> String {
    format!("{raws:?}")
}

/// The rows of `table` with the given keys, as stored, by key.
async fn read_rows(
    conn: &mut SqliteConnection,
    table: &TableSchema,
    keys: Vec<Vec<Raw>>,
) -> Result<HashMap<String, Vec<Raw>>> {
    let mut out = HashMap::new();
    let nc = table.columns.len();
    let cols: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let key_cols: Vec<String> = table
        .key
        .iter()
        .map(|&i| quote(&table.columns[i].name))
        .collect();
    for part in keys.chunks(KEYS_PER_QUERY) {
        let one = format!("({})", vec!["?"; key_cols.len()].join(", "));
        let sql = format!(
            "SELECT {}, {} FROM {} WHERE ({}) IN (VALUES {})",
            cols.join(", "),
            key_cols.join(", "),
            quote(&table.name),
            key_cols.join(", "),
            vec![one; part.len()].join(", ")
        );
        let mut q = sqlx::query(&sql);
        for key in part {
            for v in key {
                q = bind_raw(q, v);
            }
        }
        let rows: Vec<SqliteRow> = q.fetch_all(&mut *conn).await?;
        for r in rows {
            let raws = (0..nc)
                .map(|i| read_raw(&r, i))
                .collect::<Result<Vec<_>>>()?;
            let key = (nc..nc + key_cols.len())
                .map(|i| read_raw(&r, i))
                .collect::<Result<Vec<_>>>()?;
            out.insert(key_of(&key), raws);
        }
    }
    Ok(out)
}

fn bind_raw<'q>(
    q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    v: &Raw,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    match v {
        Raw::Null => q.bind(None::<i64>),
        Raw::Integer(i) => q.bind(*i),
        Raw::Real(x) => q.bind(*x),
        Raw::Text(s) => q.bind(s.clone()),
        Raw::Blob(b) => q.bind(b.clone()),
    }
}

/// The change one log entry stands for, with the row as read now; `None`
/// where the entry has nothing to apply (a row inserted and gone since: its
/// later entries say so).
fn change_of(
    table: &Arc<TableSchema>,
    entry: &Entry,
    image: Option<Vec<Raw>>,
    rejects: &Rejects,
    position: Position,
) -> Result<Option<Op>> {
    let seq = entry.seq;
    let ctx = |e: Error| e.context(format!("change log entry {seq}"));
    let aside = |m: Misfit| set_aside(rejects, table, m, "stream", position).map_err(ctx);
    let all: Vec<usize> = (0..table.columns.len()).collect();
    let key = |raws: &[Raw]| convert_row(table, raws.to_vec(), &table.key);
    Ok(Some(match (entry.op.as_str(), image) {
        // Inserted, then gone before this poll read it back.
        ("I", None) => return Ok(None),
        // A row set aside: its old version (INSERT OR REPLACE logs no
        // delete) leaves the target, which holds no rejected row.
        ("I", Some(raws)) => match convert_row(table, raws, &all) {
            Ok(row) => Op::Insert { row },
            Err(m) => {
                let key = m.key_values.clone();
                aside(m)?;
                match key {
                    Some(key) => Op::Delete { key },
                    None => return Ok(None),
                }
            }
        },
        ("U", None) | ("D", _) => match key(&entry.old) {
            Ok(key) => Op::Delete { key },
            // A key that does not convert never reached the target.
            Err(m) if !rejects.enabled() => return Err(ctx(m.error(table))),
            Err(_) => return Ok(None),
        },
        ("U", Some(raws)) => {
            let old = key(&entry.old);
            let row = convert_row(table, raws, &all);
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
                        None => return Ok(None),
                    }
                }
            }
        }
        (other, _) => {
            return Err(Error::definite(format!(
                "change log entry {seq}: unknown operation {other:?}"
            )))
        }
    }))
}

//! What the SQLite catalog says about the tables to replicate: columns and
//! their declared types, keys (declared or configured), unique indexes,
//! defaults a PostgreSQL target can keep. Reads only.

use std::collections::BTreeMap;

use sqlx::sqlite::SqlitePool;
use sqlx::Row as _;

use super::capture::{quote, PREFIX};
use super::convert::logical_type;
use crate::config::TableFilter;
use crate::error::Result;
use crate::model::{Column, LogicalType, TableSchema};
use crate::source::{Discovery, Problem};

/// What discovery needs to know of the config.
pub struct Selection<'a> {
    pub filter: &'a TableFilter,
    pub renames: &'a BTreeMap<String, String>,
    pub keys: &'a BTreeMap<String, Vec<String>>,
}

/// The selected tables, their keys and columns, and what stands in the way.
pub async fn discover(pool: &SqlitePool, sel: &Selection<'_>) -> Result<Discovery> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    let mut d = Discovery::default();
    let mut found = std::collections::BTreeSet::new();
    for name in names {
        if name.starts_with(PREFIX) || !sel.filter.matches(&name) {
            continue;
        }
        found.insert(name.clone());
        let cols = sqlx::query(
            "SELECT name, type, \"notnull\", pk, hidden FROM pragma_table_xinfo(?) ORDER BY cid",
        )
        .bind(&name)
        .fetch_all(pool)
        .await?;
        let mut columns = Vec::new();
        let mut pk: Vec<(i64, usize)> = Vec::new();
        for c in &cols {
            if c.get::<i64, _>(4) == 1 {
                continue; // hidden column of a virtual table
            }
            let cname: String = c.get(0);
            let declared: String = c.get::<Option<String>, _>(1).unwrap_or_default();
            let (logical, note) = logical_type(&declared);
            if let Some(note) = note {
                d.problems.push(Problem {
                    table: name.clone(),
                    column: Some(cname.clone()),
                    message: note,
                    blocking: false,
                });
            }
            let pkpos: i64 = c.get(3);
            if pkpos > 0 {
                pk.push((pkpos, columns.len()));
            }
            columns.push(Column {
                name: cname,
                source_type: declared,
                logical,
                nullable: c.get::<i64, _>(2) == 0,
            });
        }
        pk.sort();
        let has_pk = !pk.is_empty();
        let mut key: Vec<usize> = pk.into_iter().map(|(_, i)| i).collect();
        if key.is_empty() {
            match sel.keys.get(&name) {
                Some(names) => {
                    for k in names {
                        match columns.iter().position(|c| &c.name == k) {
                            Some(i) => key.push(i),
                            None => d.problems.push(Problem {
                                table: name.clone(),
                                column: Some(k.clone()),
                                message: format!("tables.keys names column {k:?}, which the table does not have"),
                                blocking: true,
                            }),
                        }
                    }
                }
                None => d.problems.push(Problem {
                    table: name.clone(),
                    column: None,
                    message: format!(
                        "no primary key, and rowids can change on VACUUM; declare a PRIMARY KEY, name the key columns in the config ([tables.keys] {:?} = [\"col\"]), or exclude the table",
                        name
                    ),
                    blocking: true,
                }),
            }
        }
        if key.is_empty() {
            continue;
        }
        if !has_pk && !unique_over(pool, &name, &columns, &key).await? {
            let names: Vec<&str> = key.iter().map(|&i| columns[i].name.as_str()).collect();
            d.problems.push(Problem {
                table: name.clone(),
                column: None,
                message: format!(
                    "tables.keys names {names:?}, but no UNIQUE index makes them unique: rows sharing a key would collapse into one target record; \
                     create one (CREATE UNIQUE INDEX ... ON {} ({})) or name other columns",
                    quote(&name),
                    names.iter().map(|n| quote(n)).collect::<Vec<_>>().join(", ")
                ),
                blocking: true,
            });
            continue;
        }
        for &k in &key {
            columns[k].nullable = false;
        }
        let uniques = other_unique_indexes(pool, &name, &columns, &key).await?;
        if !uniques.is_empty() {
            d.problems.push(Problem {
                table: name.clone(),
                column: None,
                message: format!(
                    "has UNIQUE constraints besides the key ({}): a row that INSERT OR REPLACE removes for one of them fires no DELETE trigger unless the application sets PRAGMA recursive_triggers = ON",
                    uniques.join(", ")
                ),
                blocking: false,
            });
        }
        let target_name = sel
            .renames
            .get(&name)
            .cloned()
            .unwrap_or_else(|| name.clone());
        let column_defaults = column_defaults(pool, &name, &columns, &key).await?;
        d.tables.push(TableSchema {
            column_defaults,
            ..TableSchema::keyed(name, target_name, columns, key)
        });
    }
    for t in sel.keys.keys().chain(sel.renames.keys()) {
        if !found.contains(t) {
            d.problems.push(Problem {
                table: t.clone(),
                column: None,
                message: "named in [tables] but not found among the selected source tables".into(),
                blocking: true,
            });
        }
    }
    Ok(d)
}

/// The unique indexes of `table` other than the primary key and other than
/// one over exactly the key's columns (a key named in `tables.keys`).
async fn other_unique_indexes(
    pool: &SqlitePool,
    table: &str,
    columns: &[Column],
    key: &[usize],
) -> Result<Vec<String>> {
    let key: std::collections::BTreeSet<&str> =
        key.iter().map(|&i| columns[i].name.as_str()).collect();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1 AND origin <> 'pk'",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for index in indexes {
        let cols: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM pragma_index_info(?)")
            .bind(&index)
            .fetch_all(pool)
            .await?;
        let cols: std::collections::BTreeSet<&str> =
            cols.iter().map(|c| c.as_deref().unwrap_or("")).collect();
        if cols != key {
            out.push(index);
        }
    }
    Ok(out)
}

/// Whether a UNIQUE index (or constraint) of `table` makes `key` unique.
async fn unique_over(
    pool: &SqlitePool,
    table: &str,
    columns: &[Column],
    key: &[usize],
) -> Result<bool> {
    let want: std::collections::BTreeSet<&str> =
        key.iter().map(|&i| columns[i].name.as_str()).collect();
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1")
            .bind(table)
            .fetch_all(pool)
            .await?;
    for index in indexes {
        let cols: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM pragma_index_info(?)")
            .bind(&index)
            .fetch_all(pool)
            .await?;
        let got: std::collections::BTreeSet<&str> =
            cols.iter().map(|c| c.as_deref().unwrap_or("")).collect();
        // An index over some of the key columns makes the whole key unique.
        if !got.is_empty() && got.is_subset(&want) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `INTEGER PRIMARY KEY AUTOINCREMENT` as an identity, and defaults a
/// PostgreSQL target can keep: `datetime('now')` / `CURRENT_TIMESTAMP`
/// as `now()`, numbers and quoted literals as they are.
async fn column_defaults(
    pool: &SqlitePool,
    table: &str,
    columns: &[crate::model::Column],
    key: &[usize],
) -> Result<Vec<crate::model::ColumnDefault>> {
    let sql: Option<String> =
        sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind(table)
            .fetch_optional(pool)
            .await?
            .flatten();
    let autoincrement = sql.is_some_and(|s| s.to_ascii_uppercase().contains("AUTOINCREMENT"));
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT name, dflt_value FROM pragma_table_info(?)")
            .bind(table)
            .fetch_all(pool)
            .await?;
    let mut out = Vec::new();
    for (name, dflt) in rows {
        let Some(column) = columns.iter().position(|c| c.name == name) else {
            continue;
        };
        let identity =
            autoincrement && key == [column] && columns[column].logical == LogicalType::Int;
        let default = dflt.and_then(|d| {
            // `(expr)` as SQLite keeps a parenthesised default.
            let mut t = d.trim().to_string();
            while t.starts_with('(') && t.ends_with(')') {
                t = t[1..t.len() - 1].trim().to_string();
            }
            let lower = t.to_ascii_lowercase();
            let logical = columns[column].logical;
            if lower == "datetime('now')"
                || lower == "current_timestamp"
                || lower == "datetime(\"now\")"
            {
                Some("now()".to_string())
            } else if logical == LogicalType::Bool {
                match lower.as_str() {
                    "1" | "true" => Some("true".to_string()),
                    "0" | "false" => Some("false".to_string()),
                    _ => None,
                }
            } else if t.parse::<f64>().is_ok() {
                Some(t)
            } else if t.len() >= 2
                && t.starts_with('\'')
                && t.ends_with('\'')
                && !t[1..t.len() - 1].contains('\'')
            {
                Some(t)
            } else {
                None
            }
        });
        if identity || default.is_some() {
            out.push(crate::model::ColumnDefault {
                column,
                identity,
                default,
                existing: None,
            });
        }
    }
    Ok(out)
}

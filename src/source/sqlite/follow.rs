//! Following the application's schema changes while polling. SQLite bumps
//! `PRAGMA schema_version` on every DDL; the poller then describes the
//! replicated tables again, before it reads any further log entry:
//!
//! ```text
//!  columns added, dropped, renamed   → Alter (the target follows in place)
//!  table renamed (triggers follow it) → Rename (or, for a target that cannot
//!                                       rename tables, Copy + Drop)
//!  table rebuilt (triggers gone)      → capture again, Copy
//!  table dropped                      → Drop
//!  table created, include selects it  → capture, Copy
//! ```
//!
//! The triggers name only key columns, so no DDL of the application fails
//! because of them, and a change logged before a DDL but read after it is
//! read with the table's new columns.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use sqlx::Executor;
use tracing::{info, warn};

use super::capture::{
    capture_ddl, captured_table, drop_capture_ddl, quote, registry, write_tx, REGISTRY,
};
use super::catalog::{self, Selection};
use crate::error::Result;
use crate::model::{Change, ColumnDefault, Ddl, Op, TableSchema};
use crate::position::Position;

/// How schema changes are followed (from the config).
pub struct Policy {
    /// A table renamed in the source is renamed in the target.
    pub follow_renames: bool,
    /// The target renames tables and fills added columns in place (a
    /// PostgreSQL target); else such changes are copies.
    pub target_is_postgres: bool,
}

/// Describes the replicated tables (`tracked`, by capture id) and the tables
/// `include` selects again, captures the new ones, and returns the changes
/// of definition in stream order (at position `at`).
pub async fn reconcile(
    pool: &SqlitePool,
    sel: &Selection<'_>,
    policy: &Policy,
    tracked: &mut HashMap<i64, Arc<TableSchema>>,
    at: Position,
) -> Result<Vec<Change>> {
    // One view of the catalog and of where the capture triggers are: the
    // application's DDL may commit between the reads (a table dropped after
    // it was listed would look rebuilt), so they are read again until the
    // schema did not move across them.
    let mut conn = pool.acquire().await?;
    let ids: Vec<i64> = tracked.keys().copied().collect();
    let mut attempts = 0;
    let (described, captured) = loop {
        let before = schema_version(&mut conn).await?;
        let described = catalog::discover(pool, sel).await?;
        let mut captured = HashMap::new();
        for &id in &ids {
            captured.insert(id, captured_table(&mut conn, id).await?);
        }
        attempts += 1;
        if schema_version(&mut conn).await? == before || attempts == VIEW_ATTEMPTS {
            break (described, captured);
        }
    };
    for p in described.problems.iter().filter(|p| p.blocking) {
        warn!(table = %p.table, "a table changed or created in the source cannot be replicated: {}", p.message);
    }
    let mut current: HashMap<String, TableSchema> = described
        .tables
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut out = Vec::new();
    let mut mark = |table: Arc<TableSchema>, ddl: Ddl| {
        out.push(Change {
            table,
            op: Op::Ddl(ddl),
            position: at,
        })
    };
    for id in ids {
        let old = tracked[&id].clone();
        match captured.get(&id).cloned().flatten() {
            Some(on) => {
                let Some(mut now) = current.remove(&on) else {
                    // Renamed out of `include`, or no longer replicable: no
                    // longer followed (its copy stays, as for a drop).
                    warn!(table = %old.name, now = %on, "table no longer selected or replicable after a schema change: it is no longer followed");
                    forget(pool, id).await?;
                    tracked.remove(&id);
                    mark(old, Ddl::Drop);
                    continue;
                };
                let renamed = on != old.name;
                now.source_id = id.to_string();
                now.target_name = if renamed && policy.follow_renames {
                    sel.renames.get(&on).cloned().unwrap_or_else(|| on.clone())
                } else {
                    old.target_name.clone()
                };
                added_defaults(&old, &mut now);
                let now = Arc::new(now);
                if renamed {
                    info!(table = %old.name, now = %on, "table renamed in the source");
                    sqlx::query(&format!(
                        "UPDATE {} SET name = ? WHERE id = ?",
                        quote(REGISTRY)
                    ))
                    .bind(&on)
                    .bind(id)
                    .execute(pool)
                    .await?;
                }
                if old.key_names() != now.key_names() {
                    mark(
                        now.clone(),
                        Ddl::Copy {
                            reason: "its key changed".into(),
                        },
                    );
                } else if renamed
                    && !policy.target_is_postgres
                    && now.target_name != old.target_name
                {
                    mark(
                        now.clone(),
                        Ddl::Copy {
                            reason: format!("it was renamed from {:?}", old.name),
                        },
                    );
                    mark(old.clone(), Ddl::Drop);
                } else if !policy.target_is_postgres && filled_in_place(&old, &now) {
                    mark(
                        now.clone(),
                        Ddl::Copy {
                            reason: "a column was added with a default that existing rows hold"
                                .into(),
                        },
                    );
                } else {
                    if renamed {
                        mark(
                            now.clone(),
                            Ddl::Rename {
                                from: old.name.clone(),
                            },
                        );
                    }
                    if !now.same_shape(&old) {
                        info!(table = %now.name, "table changed in the source; the target follows");
                        mark(now.clone(), Ddl::Alter);
                    }
                }
                tracked.insert(id, now);
            }
            None => match current.remove(&old.name) {
                // Rebuilt (created anew and the old one dropped, as migration
                // tools do): captured again and copied.
                Some(now) => {
                    let now = Arc::new(TableSchema {
                        target_name: old.target_name.clone(),
                        source_id: id.to_string(),
                        ..now
                    });
                    if !recapture(pool, &now, id).await? {
                        // Dropped since the view was read.
                        info!(table = %old.name, "table dropped in the source");
                        forget(pool, id).await?;
                        tracked.remove(&id);
                        mark(old, Ddl::Drop);
                        continue;
                    }
                    info!(table = %old.name, "table rebuilt in the source: capturing it again and copying it");
                    mark(
                        now.clone(),
                        Ddl::Copy {
                            reason: "it was rebuilt (dropped and created again)".into(),
                        },
                    );
                    tracked.insert(id, now);
                }
                None => {
                    info!(table = %old.name, "table dropped in the source");
                    forget(pool, id).await?;
                    tracked.remove(&id);
                    mark(old, Ddl::Drop);
                }
            },
        }
    }
    // Tables `include` selects that nothing captures yet.
    let known = registry(pool).await?;
    for (name, t) in current {
        if known.contains_key(&name) {
            continue;
        }
        info!(table = %name, "table created in the source: capturing it, copying it, then following it");
        let id = register(pool, &t).await?;
        let t = Arc::new(TableSchema {
            source_id: id.to_string(),
            ..t
        });
        if !recapture(pool, &t, id).await? {
            // Dropped again since the view was read: nothing to follow.
            forget(pool, id).await?;
            continue;
        }
        mark(
            t.clone(),
            Ddl::Copy {
                reason: "it was created in the source".into(),
            },
        );
        tracked.insert(id, t);
    }
    Ok(out)
}

/// Columns added with a default: rows that existed hold it (SQLite reads
/// the default for them), which the target's column gets too.
fn added_defaults(old: &TableSchema, now: &mut TableSchema) {
    let fills: Vec<(usize, String)> = now
        .column_defaults
        .iter()
        .filter(|d| {
            !old.columns
                .iter()
                .any(|c| c.name == now.columns[d.column].name)
        })
        .filter_map(|d| Some((d.column, constant(d.default.as_deref()?)?)))
        .collect();
    for (column, value) in fills {
        if let Some(d) = now.column_defaults.iter_mut().find(|d| d.column == column) {
            *d = ColumnDefault {
                existing: Some(value),
                ..d.clone()
            };
        }
    }
}

/// Whether a column was added whose existing rows hold a default.
fn filled_in_place(old: &TableSchema, now: &TableSchema) -> bool {
    now.column_defaults.iter().any(|d| {
        d.existing.is_some()
            && !old
                .columns
                .iter()
                .any(|c| c.name == now.columns[d.column].name)
    })
}

/// A constant default as the value it gives (`'x'` → `x`, `1`, `true`).
fn constant(default: &str) -> Option<String> {
    let d = default.trim();
    if let Some(inner) = d.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Some(inner.replace("''", "'"));
    }
    (d.parse::<f64>().is_ok() || d == "true" || d == "false").then(|| d.to_string())
}

/// Registers a table for capture; its id.
async fn register(pool: &SqlitePool, t: &TableSchema) -> Result<i64> {
    let cols: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    sqlx::query(&format!(
        "INSERT INTO {} (name, columns, key) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
        quote(REGISTRY)
    ))
    .bind(&t.name)
    .bind(serde_json::to_string(&cols).unwrap_or_default())
    .bind(serde_json::to_string(&t.key_names()).unwrap_or_default())
    .execute(pool)
    .await?;
    Ok(sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE name = ?",
        quote(REGISTRY)
    ))
    .bind(&t.name)
    .fetch_one(pool)
    .await?)
}

/// (Re)installs a table's capture under its id.
/// False when the table no longer exists (the application dropped it
/// after the catalog was read): nothing is installed then.
async fn recapture(pool: &SqlitePool, t: &TableSchema, id: i64) -> Result<bool> {
    let statements: Vec<String> = drop_capture_ddl(id)
        .into_iter()
        .chain(capture_ddl(t, id))
        .collect();
    let name = t.name.clone();
    write_tx(pool, move |conn| {
        Box::pin(async move {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?")
                    .bind(&name)
                    .fetch_optional(&mut *conn)
                    .await?;
            if exists.is_none() {
                return Ok(false);
            }
            for s in statements {
                conn.execute(s.as_str()).await?;
            }
            Ok(true)
        })
    })
    .await
}

/// Reads of the catalog tried before the view is taken as it is (a schema
/// that keeps moving is described again at the next poll).
const VIEW_ATTEMPTS: u32 = 20;

async fn schema_version(conn: &mut sqlx::SqliteConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("PRAGMA schema_version")
        .fetch_one(&mut *conn)
        .await?)
}

/// Drops a table's capture and its registry row.
async fn forget(pool: &SqlitePool, id: i64) -> Result<()> {
    let mut statements = drop_capture_ddl(id);
    statements.push(format!("DELETE FROM {} WHERE id = {id}", quote(REGISTRY)));
    write_tx(pool, move |conn| {
        Box::pin(async move {
            for s in statements {
                conn.execute(s.as_str()).await?;
            }
            Ok(())
        })
    })
    .await
}

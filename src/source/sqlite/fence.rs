//! What a cutover does in a SQLite source: a marker in the change log, and
//! a fence of `BEFORE` triggers that refuse the application's writes to the
//! replicated tables with a message that says why (SQLite has no roles: the
//! `read-only` and `revoke` fences are both these triggers).
//!
//! ```text
//!  marker  _switchyard_changes (seq, table_id 0, op 'M') + _switchyard_marks (seq, marker)
//!  fence   CREATE TRIGGER _switchyard_fence_<op>_<n> BEFORE <op> ON t
//!              BEGIN SELECT RAISE(ABORT, '…'); END          (each table, each op)
//! ```

use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqlitePool;
use sqlx::Executor;

use super::capture::{quote, write_tx, CHANGES, MARKS, MARK_TABLE};
use crate::error::{Error, Result};
use crate::model::{Marker, TableSchema};
use crate::source::{Fence, FenceMode};

/// The message a fenced write fails with.
pub const REFUSAL: &str =
    "switchyard cutover: this database no longer takes writes; the application moved to the new primary";

/// The fence's triggers, per table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    /// (table, trigger names)
    pub triggers: Vec<(String, Vec<String>)>,
}

/// Writes `marker` at the end of the change log.
pub async fn mark(pool: &SqlitePool, marker: &Marker) -> Result<()> {
    let text = serde_json::to_string(marker)
        .map_err(|e| Error::definite("cannot encode a marker").with_source(e))?;
    write_tx(pool, move |conn| {
        Box::pin(async move {
            conn.execute(
                format!("CREATE TABLE IF NOT EXISTS {MARKS} (seq INTEGER PRIMARY KEY, marker TEXT NOT NULL)")
                    .as_str(),
            )
            .await?;
            let seq: i64 = sqlx::query_scalar(&format!(
                "INSERT INTO {CHANGES} (table_id, op) VALUES (?, 'M') RETURNING seq"
            ))
            .bind(MARK_TABLE)
            .fetch_one(&mut *conn)
            .await?;
            sqlx::query(&format!("INSERT INTO {MARKS} (seq, marker) VALUES (?, ?)"))
                .bind(seq)
                .bind(&text)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
    })
    .await
}

/// Plans the fence's triggers.
pub fn plan(mode: FenceMode, tables: &[std::sync::Arc<TableSchema>]) -> Fence {
    let mut p = Plan::default();
    let mut summary = Vec::new();
    if mode == FenceMode::None {
        summary.push("no fence: the operator has stopped the application's writers; cutover checks that nothing is written".into());
    } else {
        for (n, t) in tables.iter().enumerate() {
            let names = ["insert", "update", "delete"]
                .iter()
                .map(|op| format!("_switchyard_fence_{op}_{n}"))
                .collect();
            summary.push(format!(
                "triggers refuse INSERT, UPDATE and DELETE on {:?}",
                t.name
            ));
            p.triggers.push((t.name.clone(), names));
        }
    }
    Fence {
        mode,
        roles: Vec::new(),
        plan: serde_json::to_value(p).unwrap_or_default(),
        summary,
    }
}

fn plan_of(fence: &Fence) -> Result<Plan> {
    serde_json::from_value(fence.plan.clone())
        .map_err(|e| Error::definite("unreadable fence plan").with_source(e))
}

/// Creates the fence's triggers (in one write transaction: a writer in
/// the middle of a transaction finishes it first).
pub async fn apply(pool: &SqlitePool, fence: &Fence) -> Result<()> {
    if fence.mode == FenceMode::None {
        return Ok(());
    }
    let plan = plan_of(fence)?;
    let mut sql = String::new();
    for (table, names) in &plan.triggers {
        for (op, name) in ["INSERT", "UPDATE", "DELETE"].iter().zip(names) {
            sql.push_str(&format!(
                "CREATE TRIGGER IF NOT EXISTS {} BEFORE {op} ON {} BEGIN SELECT RAISE(ABORT, '{}'); END;\n",
                quote(name),
                quote(table),
                REFUSAL.replace('\'', "''")
            ));
        }
    }
    write_tx(pool, move |conn| {
        Box::pin(async move {
            conn.execute(sql.as_str()).await?;
            Ok(())
        })
    })
    .await
}

/// Drops the fence's triggers.
pub async fn lift(pool: &SqlitePool, fence: &Fence) -> Result<()> {
    let plan = plan_of(fence)?;
    let sql: String = plan
        .triggers
        .iter()
        .flat_map(|(_, names)| names)
        .map(|n| format!("DROP TRIGGER IF EXISTS {};\n", quote(n)))
        .collect();
    if sql.is_empty() {
        return Ok(());
    }
    write_tx(pool, move |conn| {
        Box::pin(async move {
            conn.execute(sql.as_str()).await?;
            Ok(())
        })
    })
    .await
}

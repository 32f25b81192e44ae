//! The change capture switchyard installs in a SQLite source: a change log
//! (`_switchyard_changes`: sequence number, table, operation) fed by
//! triggers on each replicated table, the values in a log table per table,
//! a registry of what was installed, and a few settings (`_switchyard_meta`:
//! the installation's origin, how far the log was trimmed, the journal mode
//! before switchyard switched it to WAL).
//!
//! ```text
//!  app writes T ──AFTER trigger──▶ _switchyard_changes(seq, table_id, op)
//!                                  _switchyard_log_<id>(seq, h, o0.., n0..)
//!  seq: the log's rowid, never reused: a trim keeps the newest entry
//! ```

use std::collections::HashMap;

use sqlx::sqlite::SqlitePool;
use sqlx::{Executor, Row as _, SqliteConnection};

use crate::error::{Error, Result};
use crate::model::TableSchema;
use crate::position::Position;

pub const CHANGES: &str = "_switchyard_changes";
pub const REGISTRY: &str = "_switchyard_tables";
/// One row per setting; `origin` identifies this capture installation.
pub const META: &str = "_switchyard_meta";
/// Markers `cutover` writes into the log (their entry has table id
/// [`MARK_TABLE`] and operation `M`).
pub const MARKS: &str = "_switchyard_marks";
/// The table id of a marker's log entry (no table has it).
pub const MARK_TABLE: i64 = 0;
/// Prefix of every object switchyard creates in the source.
pub const PREFIX: &str = "_switchyard_";

/// Quotes an SQLite identifier.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The DDL of switchyard's own tables. The log's sequence numbers are its
/// rowids: without AUTOINCREMENT (no `sqlite_sequence` is left behind in
/// the application's database), kept from reuse by never trimming the
/// newest entry.
pub fn log_ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {CHANGES} (seq INTEGER PRIMARY KEY, table_id INTEGER NOT NULL, op TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS {REGISTRY} (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, columns TEXT NOT NULL, key TEXT NOT NULL, installed_at TEXT NOT NULL DEFAULT (datetime('now')));
         CREATE TABLE IF NOT EXISTS {META} (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS {MARKS} (seq INTEGER PRIMARY KEY, marker TEXT NOT NULL);
         INSERT INTO {META} (key, value) VALUES ('origin', lower(hex(randomblob(16)))) ON CONFLICT (key) DO NOTHING;
         INSERT INTO {META} (key, value) VALUES ('trimmed', '0') ON CONFLICT (key) DO NOTHING;"
    )
}

/// Whether a table of that name exists.
pub async fn table_exists(conn: &mut SqliteConnection, name: &str) -> Result<bool> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(found.is_some())
}

/// The highest sequence number the log has handed out: its newest entry
/// (kept by trims), what was trimmed, and for a log made by an earlier
/// switchyard with AUTOINCREMENT, `sqlite_sequence`.
pub async fn high_water(conn: &mut SqliteConnection) -> Result<Position> {
    if !table_exists(conn, CHANGES).await? {
        return Ok(Position::ZERO);
    }
    let mut parts = vec![format!("SELECT max(seq) FROM {CHANGES}")];
    if table_exists(conn, META).await? {
        parts.push(format!(
            "SELECT CAST(value AS INTEGER) FROM {META} WHERE key = 'trimmed'"
        ));
    }
    if table_exists(conn, "sqlite_sequence").await? {
        parts.push(format!(
            "SELECT seq FROM sqlite_sequence WHERE name = '{CHANGES}'"
        ));
    }
    let seq: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT max(m) FROM ({})",
        parts
            .iter()
            .map(|p| format!("SELECT ({p}) AS m"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    ))
    .fetch_one(&mut *conn)
    .await?;
    Ok(Position::new(seq.unwrap_or(0).max(0) as u64, 0))
}

/// A setting of `_switchyard_meta`, if the table and the key exist.
pub async fn meta(conn: &mut SqliteConnection, key: &str) -> Result<Option<String>> {
    if !table_exists(conn, META).await? {
        return Ok(None);
    }
    Ok(
        sqlx::query_scalar(&format!("SELECT value FROM {META} WHERE key = ?"))
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Deletes log entries the target has committed (`seq <= upto`), all but
/// the newest, which keeps the sequence from being reused.
pub async fn trim(conn: &mut SqliteConnection, ids: &[i64], upto: i64) -> Result<()> {
    sqlx::query(&format!(
        "DELETE FROM {CHANGES} WHERE seq <= ? AND seq < (SELECT max(seq) FROM {CHANGES})"
    ))
    .bind(upto)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "UPDATE {META} SET value = CAST(max(CAST(value AS INTEGER), ?) AS TEXT) WHERE key = 'trimmed'"
    ))
    .bind(upto)
    .execute(&mut *conn)
    .await?;
    if table_exists(conn, MARKS).await? {
        sqlx::query(&format!("DELETE FROM {MARKS} WHERE seq <= ?"))
            .bind(upto)
            .execute(&mut *conn)
            .await?;
    }
    for id in ids {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE seq <= ?",
            quote(&log_table(*id))
        ))
        .bind(upto)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Log entries of the tables `ids` after `after` and at or before `upto`.
pub async fn count_between(
    conn: &mut SqliteConnection,
    ids: &[i64],
    after: i64,
    upto: i64,
) -> Result<u64> {
    if ids.is_empty() || !table_exists(conn, CHANGES).await? {
        return Ok(0);
    }
    let list = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {CHANGES} WHERE seq > ? AND seq <= ? AND table_id IN ({list})"
    ))
    .bind(after)
    .bind(upto)
    .fetch_one(&mut *conn)
    .await?;
    Ok(n.max(0) as u64)
}

/// The replicated tables capture was installed for: name → (id, columns).
pub async fn registry(pool: &SqlitePool) -> Result<HashMap<String, (i64, Vec<String>)>> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind(REGISTRY)
            .fetch_optional(pool)
            .await?;
    if exists.is_none() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT id, name, columns FROM {}",
        quote(REGISTRY)
    ))
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        let cols: Vec<String> = serde_json::from_str(&r.get::<String, _>(2)).map_err(|e| {
            Error::definite(format!("{REGISTRY}: unreadable column list")).with_source(e)
        })?;
        out.insert(r.get::<String, _>(1), (r.get::<i64, _>(0), cols));
    }
    Ok(out)
}

/// Runs `f` inside `BEGIN IMMEDIATE … COMMIT` (a write transaction that
/// waits for the application's lock instead of failing on upgrade).
pub async fn write_tx<T, F>(pool: &SqlitePool, statements: F) -> Result<T>
where
    T: Send,
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> futures::future::BoxFuture<'c, Result<T>>,
{
    let mut conn = pool.acquire().await?;
    conn.execute("BEGIN IMMEDIATE").await?;
    match statements(&mut conn).await {
        Ok(out) => match conn.execute("COMMIT").await {
            Ok(_) => Ok(out),
            Err(e) => {
                // A failed COMMIT (SQLITE_BUSY) leaves the transaction open;
                // the connection goes back to the pool, so close it here.
                let _ = conn.execute("ROLLBACK").await;
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = conn.execute("ROLLBACK").await;
            Err(e)
        }
    }
}

pub fn log_table(id: i64) -> String {
    format!("{PREFIX}log_{id}")
}

pub fn trigger_names(id: i64) -> [String; 3] {
    [
        format!("{PREFIX}{id}_insert"),
        format!("{PREFIX}{id}_update"),
        format!("{PREFIX}{id}_delete"),
    ]
}

/// The DDL of the log table and the three triggers of one table.
///
/// The triggers log the operation and the row's key, nothing else: the
/// values are read from the table when the log is polled (in the same read
/// transaction), so that no trigger names a column other than the key. The
/// application's `ALTER TABLE … DROP COLUMN` then works while switchyard
/// captures the table (SQLite refuses to drop a column a trigger names),
/// and a column added later is read without touching the triggers. Reading
/// the row at poll time also gives the row as the application's own
/// triggers left it.
pub fn capture_ddl(table: &TableSchema, id: i64) -> Vec<String> {
    let log = quote(&log_table(id));
    let nk = table.key.len();
    let o: Vec<String> = (0..nk).map(|i| format!("o{i}")).collect();
    let k: Vec<String> = (0..nk).map(|i| format!("k{i}")).collect();
    let keys = |side: &str| -> Vec<String> {
        table
            .key
            .iter()
            .map(|&i| format!("{side}.{}", quote(&table.columns[i].name)))
            .collect()
    };
    let t = quote(&table.name);
    let [ti, tu, td] = trigger_names(id);
    let head = |op: &str| format!("INSERT INTO {CHANGES} (table_id, op) VALUES ({id}, '{op}');");
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {log} (seq INTEGER PRIMARY KEY, {}, {})",
            o.join(", "),
            k.join(", ")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER INSERT ON {t} BEGIN {} INSERT INTO {log} (seq, {}) VALUES (last_insert_rowid(), {}); END",
            quote(&ti), head("I"), k.join(", "), keys("NEW").join(", ")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER UPDATE ON {t} BEGIN {} INSERT INTO {log} (seq, {}, {}) VALUES (last_insert_rowid(), {}, {}); END",
            quote(&tu), head("U"), o.join(", "), k.join(", "), keys("OLD").join(", "), keys("NEW").join(", ")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER DELETE ON {t} BEGIN {} INSERT INTO {log} (seq, {}) VALUES (last_insert_rowid(), {}); END",
            quote(&td), head("D"), o.join(", "), keys("OLD").join(", ")
        ),
    ]
}

/// The DDL that drops the capture of one table (its triggers and log).
pub fn drop_capture_ddl(id: i64) -> Vec<String> {
    let mut out: Vec<String> = trigger_names(id)
        .iter()
        .map(|n| format!("DROP TRIGGER IF EXISTS {}", quote(n)))
        .collect();
    out.push(format!("DROP TABLE IF EXISTS {}", quote(&log_table(id))));
    out
}

/// Whether the log tables are of an earlier switchyard (values in the log).
pub async fn earlier_format(conn: &mut SqliteConnection) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master m, pragma_table_info(m.name) p
          WHERE m.type = 'table' AND m.name LIKE '\\_switchyard\\_log\\_%' ESCAPE '\\' AND p.name = 'h'",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(n > 0)
}

/// The table each capture trigger of `id` is on now (a renamed table takes
/// its triggers along), if they exist.
pub async fn captured_table(conn: &mut SqliteConnection, id: i64) -> Result<Option<String>> {
    let [ti, tu, td] = trigger_names(id);
    let on: Vec<String> = sqlx::query_scalar(
        "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?, ?)",
    )
    .bind(ti)
    .bind(tu)
    .bind(td)
    .fetch_all(&mut *conn)
    .await?;
    Ok((on.len() == 3 && on.iter().all(|t| t == &on[0])).then(|| on[0].clone()))
}

/// The names of the capture triggers that exist now, among `names`.
pub async fn existing_triggers(
    conn: &mut SqliteConnection,
) -> Result<std::collections::HashSet<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '\\_switchyard\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(names.into_iter().collect())
}

/// The highest sequence number trimmed from the log so far.
pub async fn trimmed_upto(conn: &mut SqliteConnection) -> Result<i64> {
    let v: Option<String> =
        sqlx::query_scalar(&format!("SELECT value FROM {META} WHERE key = 'trimmed'"))
            .fetch_optional(&mut *conn)
            .await?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

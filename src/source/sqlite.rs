//! SQLite source: triggers feed a change log inside the source database.
//!
//! ```text
//!  app writes T ──AFTER trigger──▶ _switchyard_changes(seq, table_id, op)      seq: AUTOINCREMENT,
//!                                  _switchyard_log_<id>(seq, o0.., n0..)       never reused
//!  snapshot(T): one read transaction reads max(seq) = Ct and every row of T
//!  stream:      poll seq > P in one read transaction, in seq order       position = seq
//!  ack(P):      delete log rows with seq <= P (the target has committed them)
//! ```
//!
//! The log columns carry no declared type, so SQLite keeps every value's
//! storage class exactly (no affinity conversion). The source stays usable by
//! its application: WAL mode, a busy timeout, short read transactions.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{
    ConnectOptions, Connection, Decode, Executor, Row as _, SqliteConnection, TypeInfo, ValueRef,
};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Batch, Discovery, Installed, Problem, Source};
use crate::config::{Config, TableFilter};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Change, Column, LogicalType, Op, Position, Row, TableSchema, Value};
use crate::reject::{Rejected, Rejects};
use crate::sink::Durable;

const CHANGES: &str = "_switchyard_changes";
const REGISTRY: &str = "_switchyard_tables";
/// One row per setting; `origin` identifies this capture installation.
const META: &str = "_switchyard_meta";
/// Prefix of every object switchyard creates in the source.
pub const PREFIX: &str = "_switchyard_";

pub struct SqliteSource {
    path: PathBuf,
    pool: SqlitePool,
    options: SqliteConnectOptions,
    filter: TableFilter,
    renames: BTreeMap<String, String>,
    keys: BTreeMap<String, Vec<String>>,
    poll_interval: Duration,
    retry_attempts: usize,
    retry_max_delay: Duration,
    /// Where rows whose values do not fit go (`pipeline.reject_dir`).
    rejects: Arc<Rejects>,
    /// The last trim, so the log is trimmed every few seconds at most.
    last_trim: Mutex<Option<(Instant, Position)>>,
}

/// Quotes an SQLite identifier.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl SqliteSource {
    pub async fn open(path: &Path, config: &Config) -> Result<Self> {
        if !path.exists() {
            return Err(Error::connect(format!(
                "SQLite source {} does not exist; check source.url (a relative path is taken from the working directory {})",
                path.display(),
                std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default()
            )));
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_millis(config.source.busy_timeout_ms));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                Error::connect(format!("cannot open SQLite source {}", path.display()))
                    .with_source(e)
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            pool,
            options,
            filter: config.table_filter()?,
            renames: config.tables.rename.clone(),
            keys: config.tables.keys.clone(),
            poll_interval: Duration::from_millis(config.source.poll_interval_ms),
            retry_attempts: config.pipeline.retry_attempts,
            retry_max_delay: Duration::from_millis(config.pipeline.retry_max_delay_ms),
            rejects: config.rejects.clone(),
            last_trim: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn registry(&self) -> Result<HashMap<String, (i64, Vec<String>)>> {
        let exists: Option<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(REGISTRY)
                .fetch_optional(&self.pool)
                .await?;
        if exists.is_none() {
            return Ok(HashMap::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT id, name, columns FROM {}",
            quote(REGISTRY)
        ))
        .fetch_all(&self.pool)
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

    /// Whether a UNIQUE index (or constraint) of `table` makes `key` unique.
    async fn unique_over(&self, table: &str, columns: &[Column], key: &[usize]) -> Result<bool> {
        let want: std::collections::BTreeSet<&str> =
            key.iter().map(|&i| columns[i].name.as_str()).collect();
        let indexes: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1")
                .bind(table)
                .fetch_all(&self.pool)
                .await?;
        for index in indexes {
            let cols: Vec<Option<String>> =
                sqlx::query_scalar("SELECT name FROM pragma_index_info(?)")
                    .bind(&index)
                    .fetch_all(&self.pool)
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

    /// Runs `f` inside `BEGIN IMMEDIATE … COMMIT` (a write transaction that
    /// waits for the application's lock instead of failing on upgrade).
    async fn write_tx<T, F>(&self, statements: F) -> Result<T>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> futures::future::BoxFuture<'c, Result<T>>,
    {
        let mut conn = self.pool.acquire().await?;
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
}

/// Maps a declared SQLite type to a logical type, following SQLite's affinity
/// rules plus the declared names users rely on (BOOLEAN, JSON, DATETIME, DECIMAL).
pub fn logical_type(declared: &str) -> (LogicalType, Option<String>) {
    let t = declared.trim().to_ascii_uppercase();
    let base = t.split('(').next().unwrap_or("").trim().to_string();
    let word = |w: &str| base.split_whitespace().any(|x| x == w);
    if base.is_empty() {
        return (LogicalType::Any, None);
    }
    if word("BOOLEAN") || word("BOOL") {
        return (LogicalType::Bool, None);
    }
    if word("DATETIME") || word("TIMESTAMP") || word("TIMESTAMPTZ") {
        return (LogicalType::Timestamp, None);
    }
    if word("JSON") || word("JSONB") {
        return (LogicalType::Json, None);
    }
    if word("DECIMAL") || word("NUMERIC") {
        return (LogicalType::Decimal, None);
    }
    if base.contains("INT") {
        return (LogicalType::Int, None);
    }
    if base.contains("CHAR") || base.contains("CLOB") || base.contains("TEXT") {
        return (LogicalType::Text, None);
    }
    if base.contains("BLOB") {
        return (LogicalType::Bytes, None);
    }
    if base.contains("REAL") || base.contains("FLOA") || base.contains("DOUB") {
        return (LogicalType::Float, None);
    }
    (
        LogicalType::Any,
        Some(format!(
            "declared type {declared:?} has no mapping (NUMERIC affinity); each value keeps its own storage class"
        )),
    )
}

/// A cell as SQLite stores it.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Raw {
    fn class(&self) -> &'static str {
        match self {
            Raw::Null => "NULL",
            Raw::Integer(_) => "INTEGER",
            Raw::Real(_) => "REAL",
            Raw::Text(_) => "TEXT",
            Raw::Blob(_) => "BLOB",
        }
    }

    fn shown(&self) -> String {
        match self {
            Raw::Null => "NULL".into(),
            Raw::Integer(i) => i.to_string(),
            Raw::Real(x) => format!("{x:?}"),
            Raw::Text(s) => Value::Text(s.clone()).to_string(),
            Raw::Blob(b) => format!("<{} bytes>", b.len()),
        }
    }
}

fn read_raw(row: &SqliteRow, idx: usize) -> Result<Raw> {
    let v = row.try_get_raw(idx)?;
    if v.is_null() {
        return Ok(Raw::Null);
    }
    let class = v.type_info().name().to_string();
    let bad = |e: sqlx::error::BoxDynError| {
        Error::definite(format!("cannot decode a {class} value")).with_source(e)
    };
    Ok(match class.as_str() {
        "INTEGER" => Raw::Integer(<i64 as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
        "REAL" => Raw::Real(<f64 as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
        "TEXT" => Raw::Text(<String as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
        _ => Raw::Blob(<Vec<u8> as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
    })
}

/// Parses the text forms of a timestamp SQLite applications write.
pub fn parse_timestamp(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%:z",
        "%Y-%m-%d %H:%M%:z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    // SQLite's own datetime() output and its relatives carry no zone: UTC.
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc())
}

/// Checks decimal text (`-12.50`, `1e5`) and returns it as the model keeps it.
pub fn parse_decimal(s: &str) -> Option<String> {
    let t = s.trim();
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let digits = mantissa.strip_prefix(['-', '+']).unwrap_or(mantissa);
    let mut parts = digits.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("");
    let ok_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !ok_digits(int) || !ok_digits(frac) {
        return None;
    }
    if let Some(e) = exp {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        if e.is_empty() || !ok_digits(e) {
            return None;
        }
    }
    Some(t.strip_prefix('+').unwrap_or(t).to_string())
}

/// Converts a stored cell to the column's logical type, or explains why not.
fn convert(raw: Raw, col: &Column) -> std::result::Result<Value, String> {
    use LogicalType as L;
    let mismatch = |raw: &Raw| {
        format!(
            "column declared {:?} holds the {} value {}, which cannot be carried as {}",
            col.source_type,
            raw.class(),
            raw.shown(),
            col.logical
        )
    };
    Ok(match (col.logical, raw) {
        (_, Raw::Null) => Value::Null,
        (L::Any, Raw::Integer(i)) | (L::Int, Raw::Integer(i)) => Value::Int(i),
        (L::Any, Raw::Real(x)) | (L::Float, Raw::Real(x)) => Value::Float(x),
        (L::Float, Raw::Integer(i)) => Value::Float(i as f64),
        (L::Int, Raw::Real(x)) if x.fract() == 0.0 && x.abs() < 9.0e15 => Value::Int(x as i64),
        (L::Any, Raw::Text(s)) | (L::Text, Raw::Text(s)) => Value::Text(s),
        (L::Text, Raw::Integer(i)) => Value::Text(i.to_string()),
        (L::Text, Raw::Real(x)) => Value::Text(format!("{x:?}")),
        (L::Any, Raw::Blob(b)) | (L::Bytes, Raw::Blob(b)) => Value::Bytes(b),
        (L::Bool, Raw::Integer(0)) => Value::Bool(false),
        (L::Bool, Raw::Integer(1)) => Value::Bool(true),
        (L::Decimal, Raw::Integer(i)) => Value::Decimal(i.to_string()),
        (L::Decimal, Raw::Real(x)) if x.is_finite() => Value::Decimal(format!("{x:?}")),
        (L::Decimal, Raw::Text(s)) => match parse_decimal(&s) {
            Some(d) => Value::Decimal(d),
            None => {
                return Err(format!(
                    "{} (not a decimal number)",
                    mismatch(&Raw::Text(s))
                ))
            }
        },
        // JSON has NUMERIC affinity: a number written as JSON text is stored as a number.
        (L::Json, Raw::Integer(i)) => Value::Json(i.to_string()),
        (L::Json, Raw::Real(x)) if x.is_finite() => Value::Json(format!("{x:?}")),
        (L::Json, Raw::Text(s)) => match serde_json::from_str::<serde_json::Value>(&s) {
            Ok(_) => Value::Json(s),
            Err(e) => return Err(format!("{} (invalid JSON: {e})", mismatch(&Raw::Text(s)))),
        },
        (L::Timestamp, Raw::Text(s)) => match parse_timestamp(&s) {
            Some(t) => Value::Timestamp(t),
            None => {
                return Err(format!(
                    "{} (expected a date-time such as 2024-05-01 12:30:00 or 2024-05-01T12:30:00Z)",
                    mismatch(&Raw::Text(s))
                ))
            }
        },
        (_, raw) => return Err(mismatch(&raw)),
    })
}

/// A row holding a value its column's type cannot carry.
struct Misfit {
    column: usize,
    message: String,
    value: String,
    /// The row's key as far as it converts (`(id = 3)`).
    key: String,
    /// The key's values, where the misfit is in another column of a whole
    /// row: the row's old version can be deleted from the target.
    key_values: Option<Vec<Value>>,
    /// The cells as stored, by column name.
    row: serde_json::Map<String, serde_json::Value>,
}

impl Misfit {
    fn error(&self, table: &TableSchema) -> Error {
        Error::definite(format!(
            "table {:?}, key {}, column {:?}: {}; fix the value in the source, set pipeline.reject_dir to set such rows aside, or exclude the table with tables.exclude",
            table.name, self.key, table.columns[self.column].name, self.message
        ))
    }
}

/// Writes a misfit row to its table's reject file, or, without
/// `pipeline.reject_dir`, returns the error that stops the run.
fn set_aside(
    rejects: &Rejects,
    table: &TableSchema,
    m: Misfit,
    phase: &'static str,
    at: Position,
) -> Result<()> {
    if !rejects.enabled() {
        return Err(m.error(table));
    }
    rejects.record(&Rejected {
        table: table.name.clone(),
        key: m.key,
        column: Some(table.columns[m.column].name.clone()),
        value: Some(m.value),
        reason: m.message,
        phase,
        position: at.to_string(),
        row: m.row,
    })
}

impl Raw {
    fn json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Raw::Null => J::Null,
            Raw::Integer(i) => J::from(*i),
            Raw::Real(x) => serde_json::Number::from_f64(*x)
                .map(J::Number)
                .unwrap_or_else(|| J::String(format!("{x:?}"))),
            Raw::Text(s) => J::String(s.clone()),
            Raw::Blob(b) => J::String(crate::model::hex_text(b)),
        }
    }
}

/// Converts a row of raw cells (of columns `cols`); a misfit names the
/// column, the value and the row's key.
fn convert_row(
    table: &TableSchema,
    raws: Vec<Raw>,
    cols: &[usize],
) -> std::result::Result<Vec<Value>, Misfit> {
    let mut out = Vec::with_capacity(raws.len());
    let mut failure = None;
    for (raw, &ci) in raws.iter().zip(cols) {
        match convert(raw.clone(), &table.columns[ci]) {
            Ok(v) => out.push(v),
            Err(msg) => {
                failure.get_or_insert((ci, msg, raw.shown()));
                out.push(match raw {
                    Raw::Integer(i) => Value::Int(*i),
                    Raw::Text(s) => Value::Text(s.clone()),
                    _ => Value::Null,
                });
            }
        }
    }
    let Some((column, message, value)) = failure else {
        return Ok(out);
    };
    let key = if cols.len() == table.columns.len() {
        table.describe_key(&table.key_of(&out))
    } else {
        table.describe_key(&out[..table.key.len().min(out.len())])
    };
    let row = raws
        .iter()
        .zip(cols)
        .map(|(r, &ci)| (table.columns[ci].name.clone(), r.json()))
        .collect();
    let key_values = (cols.len() == table.columns.len() && !table.key.contains(&column))
        .then(|| table.key_of(&out));
    Err(Misfit {
        column,
        message,
        value,
        key,
        key_values,
        row,
    })
}

fn select_list(table: &TableSchema) -> String {
    table
        .columns
        .iter()
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn log_table(id: i64) -> String {
    format!("{PREFIX}log_{id}")
}

fn trigger_names(id: i64) -> [String; 3] {
    [
        format!("{PREFIX}{id}_insert"),
        format!("{PREFIX}{id}_update"),
        format!("{PREFIX}{id}_delete"),
    ]
}

/// The DDL of the log table and the three triggers of one table.
///
/// INSERT and UPDATE log the row as it is when our trigger runs, read back by
/// key, not `NEW.*`: an application trigger that fires before ours and changes
/// the same row would otherwise leave a stale image as the last word. `h` is
/// NULL when the row is gone by then (a later trigger deleted it): the insert
/// is skipped and the update becomes a delete of the old key, and the DELETE
/// that removed the row is logged as well.
fn capture_ddl(table: &TableSchema, id: i64) -> Vec<String> {
    let log = quote(&log_table(id));
    let nk = table.key.len();
    let nc = table.columns.len();
    let o: Vec<String> = (0..nk).map(|i| format!("o{i}")).collect();
    let n: Vec<String> = (0..nc).map(|i| format!("n{i}")).collect();
    let cols: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let cur_vals: Vec<String> = cols.iter().map(|c| format!("cur.{c}")).collect();
    let old_keys: Vec<String> = table
        .key
        .iter()
        .map(|&i| format!("OLD.{}", quote(&table.columns[i].name)))
        .collect();
    let by_new_key: Vec<String> = table
        .key
        .iter()
        .map(|&i| {
            let c = quote(&table.columns[i].name);
            format!("{c} IS NEW.{c}")
        })
        .collect();
    let t = quote(&table.name);
    let here = quote(&format!("{PREFIX}here"));
    let current = format!(
        "FROM (SELECT 1) LEFT JOIN (SELECT 1 AS {here}, {} FROM {t} WHERE {} LIMIT 1) AS cur",
        cols.join(", "),
        by_new_key.join(" AND ")
    );
    let [ti, tu, td] = trigger_names(id);
    let head = |op: &str| format!("INSERT INTO {CHANGES} (table_id, op) VALUES ({id}, '{op}');");
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {log} (seq INTEGER PRIMARY KEY, h, {}, {})",
            o.join(", "),
            n.join(", ")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER INSERT ON {t} BEGIN {} INSERT INTO {log} (seq, h, {}) SELECT last_insert_rowid(), cur.{here}, {} {current}; END",
            quote(&ti), head("I"), n.join(", "), cur_vals.join(", ")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER UPDATE ON {t} BEGIN {} INSERT INTO {log} (seq, h, {}, {}) SELECT last_insert_rowid(), cur.{here}, {}, {} {current}; END",
            quote(&tu), head("U"), o.join(", "), n.join(", "), old_keys.join(", "), cur_vals.join(", ")
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER DELETE ON {t} BEGIN {} INSERT INTO {log} (seq, h, {}) VALUES (last_insert_rowid(), 1, {}); END",
            quote(&td), head("D"), o.join(", "), old_keys.join(", ")
        ),
    ]
}

/// The names of the capture triggers that exist now, among `names`.
async fn existing_triggers(
    conn: &mut SqliteConnection,
) -> Result<std::collections::HashSet<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '\\_switchyard\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(names.into_iter().collect())
}

/// The column names of `table` as the source has them now.
async fn current_columns(conn: &mut SqliteConnection, table: &str) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT name FROM pragma_table_xinfo(?) WHERE hidden = 0 ORDER BY cid")
            .bind(table)
            .fetch_all(&mut *conn)
            .await?,
    )
}

/// Stops the stream when a replicated table lost its triggers (dropped and
/// created again, or rebuilt by a migration tool) or changed its columns:
/// changes would be missed or carry the wrong columns from here on.
async fn check_capture(
    conn: &mut SqliteConnection,
    tables: &HashMap<i64, Arc<TableSchema>>,
) -> Result<()> {
    let present = existing_triggers(conn).await?;
    for (id, t) in tables {
        if trigger_names(*id).iter().any(|n| !present.contains(n)) {
            return Err(Error::definite(format!(
                "table {:?} lost its change-capture triggers while streaming (was it dropped, or rebuilt by a migration?); \
                 changes to it are no longer captured. Start switchyard again: it installs capture again and copies the table anew",
                t.name
            )));
        }
        let now = current_columns(conn, &t.name).await?;
        let then: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        if now != then {
            return Err(Error::definite(format!(
                "table {:?} changed its columns while streaming (then {then:?}, now {now:?}); \
                 run `switchyard uninstall` and copy again into an empty target",
                t.name
            )));
        }
    }
    Ok(())
}

async fn high_water(conn: &mut SqliteConnection) -> Result<Position> {
    // sqlite_sequence exists once any AUTOINCREMENT table does (ours, after install).
    let exists: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if exists.is_none() {
        return Ok(Position::ZERO);
    }
    let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = ?")
        .bind(CHANGES)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(Position::new(seq.unwrap_or(0).max(0) as u64, 0))
}

/// The highest sequence number trimmed from the log so far.
async fn trimmed_upto(conn: &mut SqliteConnection) -> Result<i64> {
    let v: Option<String> =
        sqlx::query_scalar(&format!("SELECT value FROM {META} WHERE key = 'trimmed'"))
            .fetch_optional(&mut *conn)
            .await?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

#[async_trait]
impl Source for SqliteSource {
    async fn discover(&self) -> Result<Discovery> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut d = Discovery::default();
        let mut found = std::collections::BTreeSet::new();
        for name in names {
            if name.starts_with(PREFIX) || !self.filter.matches(&name) {
                continue;
            }
            found.insert(name.clone());
            let cols = sqlx::query(
                "SELECT name, type, \"notnull\", pk, hidden FROM pragma_table_xinfo(?) ORDER BY cid",
            )
            .bind(&name)
            .fetch_all(&self.pool)
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
                match self.keys.get(&name) {
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
            if !has_pk && !self.unique_over(&name, &columns, &key).await? {
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
            let uniques: Vec<String> = sqlx::query_scalar(
                "SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1 AND origin <> 'pk'",
            )
            .bind(&name)
            .fetch_all(&self.pool)
            .await?;
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
            let target_name = self
                .renames
                .get(&name)
                .cloned()
                .unwrap_or_else(|| name.clone());
            let column_defaults = self.column_defaults(&name, &columns, &key).await?;
            d.tables.push(TableSchema {
                column_defaults,
                ..TableSchema::keyed(name, target_name, columns, key)
            });
        }
        for t in self.keys.keys().chain(self.renames.keys()) {
            if !found.contains(t) {
                d.problems.push(Problem {
                    table: t.clone(),
                    column: None,
                    message: "named in [tables] but not found among the selected source tables"
                        .into(),
                    blocking: true,
                });
            }
        }
        Ok(d)
    }

    async fn install(&self, tables: &[Arc<TableSchema>]) -> Result<Installed> {
        let registry = self.registry().await?;
        let mut problems = Vec::new();
        for t in tables {
            let now: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
            if let Some((_, cols)) = registry.get(&t.name) {
                if cols != &now {
                    problems.push(format!(
                        "table {:?} changed its columns since switchyard installed its triggers (then {cols:?}, now {now:?}); run `switchyard uninstall` and copy again into an empty target",
                        t.name
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::definite(problems.join("; ")));
        }
        let count = tables.len();
        let tables = tables.to_vec();
        let installed = self
            .write_tx(move |conn| {
                Box::pin(async move {
                    conn.execute(
                        format!(
                            "CREATE TABLE IF NOT EXISTS {CHANGES} (seq INTEGER PRIMARY KEY AUTOINCREMENT, table_id INTEGER NOT NULL, op TEXT NOT NULL);
                             CREATE TABLE IF NOT EXISTS {REGISTRY} (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, columns TEXT NOT NULL, key TEXT NOT NULL, installed_at TEXT NOT NULL DEFAULT (datetime('now')));
                             CREATE TABLE IF NOT EXISTS {META} (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                             INSERT INTO {META} (key, value) VALUES ('origin', lower(hex(randomblob(16)))) ON CONFLICT (key) DO NOTHING;
                             INSERT INTO {META} (key, value) VALUES ('trimmed', '0') ON CONFLICT (key) DO NOTHING;"
                        )
                        .as_str(),
                    )
                    .await?;
                    let origin: String = sqlx::query_scalar(&format!("SELECT value FROM {META} WHERE key = 'origin'"))
                        .fetch_one(&mut *conn)
                        .await?;
                    let present = existing_triggers(conn).await?;
                    let mut recaptured = Vec::new();
                    for t in &tables {
                        let cols: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
                        sqlx::query(&format!(
                            "INSERT INTO {REGISTRY} (name, columns, key) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING"
                        ))
                        .bind(&t.name)
                        .bind(serde_json::to_string(&cols).unwrap_or_default())
                        .bind(serde_json::to_string(&t.key_names()).unwrap_or_default())
                        .execute(&mut *conn)
                        .await?;
                        let id: i64 = sqlx::query_scalar(&format!("SELECT id FROM {REGISTRY} WHERE name = ?"))
                            .bind(&t.name)
                            .fetch_one(&mut *conn)
                            .await?;
                        if trigger_names(id).iter().any(|n| !present.contains(n)) {
                            recaptured.push(t.name.clone());
                        }
                        for ddl in capture_ddl(t, id) {
                            conn.execute(ddl.as_str()).await?;
                        }
                    }
                    Ok(Installed { origin: format!("sqlite:{origin}"), recaptured })
                })
            })
            .await
            .map_err(|e| e.context(format!("installing change capture in {}", self.path.display())))?;
        info!(
            tables = count,
            new = installed.recaptured.len(),
            "change capture installed"
        );
        Ok(installed)
    }

    async fn verify_resume(&self, checkpoint: Position) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let high = high_water(&mut tx).await?;
        let trimmed = trimmed_upto(&mut tx).await?;
        tx.commit().await?;
        if high.commit < checkpoint.commit {
            return Err(Error::definite(format!(
                "the source's change log ends at {high}, before the target's checkpoint {checkpoint}: \
                 the source was restored from a backup or replaced. The target holds changes the source no longer has; \
                 replicate into an empty target (a new namespace or database)"
            )));
        }
        if trimmed > checkpoint.commit as i64 {
            return Err(Error::definite(format!(
                "the source's change log was trimmed up to {trimmed}, past the target's checkpoint {checkpoint}: \
                 another switchyard with another target consumes this source, and the changes in between are gone. \
                 Give each target its own copy of the source, and replicate into an empty target"
            )));
        }
        Ok(())
    }

    async fn uninstall(&self) -> Result<()> {
        let registry = self.registry().await?;
        let objects: Vec<(String, String)> = sqlx::query_as(
            "SELECT type, name FROM sqlite_master WHERE name LIKE '\\_switchyard\\_%' ESCAPE '\\' AND type IN ('trigger', 'table')",
        )
        .fetch_all(&self.pool)
        .await?;
        self.write_tx(move |conn| {
            Box::pin(async move {
                for (kind, name) in objects.iter().filter(|(k, _)| k == "trigger") {
                    conn.execute(
                        format!("DROP {} IF EXISTS {}", kind.to_uppercase(), quote(name)).as_str(),
                    )
                    .await?;
                }
                for (_, name) in objects
                    .iter()
                    .filter(|(k, n)| k == "table" && n != "sqlite_sequence")
                {
                    conn.execute(format!("DROP TABLE IF EXISTS {}", quote(name)).as_str())
                        .await?;
                }
                Ok(())
            })
        })
        .await?;
        let _ = sqlx::query("DELETE FROM sqlite_sequence WHERE name = ?")
            .bind(CHANGES)
            .execute(&self.pool)
            .await;
        info!(
            tables = registry.len(),
            "change capture removed from the source"
        );
        Ok(())
    }

    async fn count_rows(&self, table: &TableSchema) -> Result<Option<u64>> {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", quote(&table.name)))
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(n.max(0) as u64))
    }

    async fn current_position(&self) -> Result<Position> {
        let mut conn = self.pool.acquire().await?;
        high_water(&mut conn).await
    }

    async fn snapshot(
        &self,
        table: Arc<TableSchema>,
        batch_rows: usize,
        rows: mpsc::Sender<Vec<Row>>,
    ) -> Result<Position> {
        let mut tx = self.pool.begin().await?;
        // The first read starts the read transaction: the position and the rows
        // come from the same database state (invariant 3).
        let at = high_water(&mut tx).await?;
        let sql = format!("SELECT {} FROM {}", select_list(&table), quote(&table.name));
        let all: Vec<usize> = (0..table.columns.len()).collect();
        let mut stream = sqlx::query(&sql).fetch(&mut *tx);
        let mut batch = Vec::with_capacity(batch_rows);
        while let Some(r) = stream.try_next().await? {
            let raws = (0..all.len())
                .map(|i| read_raw(&r, i))
                .collect::<Result<Vec<_>>>()?;
            match convert_row(&table, raws, &all) {
                Ok(row) => batch.push(row),
                Err(m) => set_aside(&self.rejects, &table, m, "snapshot", at)?,
            }
            if batch.len() >= batch_rows {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
                if rows.send(full).await.is_err() {
                    return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                }
            }
        }
        drop(stream);
        if !batch.is_empty() && rows.send(batch).await.is_err() {
            return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
        }
        tx.commit().await?;
        Ok(at)
    }

    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let registry = self.registry().await?;
        let mut by_id: HashMap<i64, Arc<TableSchema>> = HashMap::new();
        for t in &tables {
            let (id, _) = registry.get(&t.name).ok_or_else(|| {
                Error::definite(format!(
                    "table {:?} has no change capture installed",
                    t.name
                ))
            })?;
            by_id.insert(*id, t.clone());
        }
        let mut conn = self.options.connect().await.map_err(|e| {
            Error::connect(format!("cannot open SQLite source {}", self.path.display()))
                .with_source(e)
        })?;
        let mut last = after.commit as i64;
        let mut last_version: Option<i64> = None;
        let mut schema_version: Option<i64> = None;
        let mut drained = true;
        let mut failures = 0usize;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let step: Result<Option<(i64, Polled)>> = async {
                // data_version moves when another connection commits.
                let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                    .fetch_one(&mut conn)
                    .await?;
                if drained && last_version == Some(version) {
                    return Ok(None);
                }
                let schema: i64 = sqlx::query_scalar("PRAGMA schema_version")
                    .fetch_one(&mut conn)
                    .await?;
                if schema_version != Some(schema) {
                    check_capture(&mut conn, &by_id).await?;
                    schema_version = Some(schema);
                }
                Ok(Some((
                    version,
                    poll(&mut conn, &by_id, last, max_batch, &self.rejects).await?,
                )))
            }
            .await;
            let wait = match step {
                Ok(None) => self.poll_interval,
                Ok(Some((version, batch))) => {
                    failures = 0;
                    last_version = Some(version);
                    drained = batch.seen < max_batch;
                    let Some(end) = batch.end else { continue };
                    last = end;
                    let out = Batch {
                        changes: batch.changes,
                        upto: Position::new(end as u64, 0),
                        // The change log has no commit times; lag in seconds
                        // counts from the last time nothing was behind.
                        committed_at: None,
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        sent = changes.send(out) => if sent.is_err() { return Ok(()) },
                    }
                    continue;
                }
                Err(e) if e.is_transient() && failures < self.retry_attempts => {
                    failures += 1;
                    let wait = crate::pipeline::backoff_delay(failures, self.retry_max_delay);
                    warn!(error = %e.report(), attempt = failures, retry_in_ms = wait.as_millis() as u64, "polling the change log failed, retrying");
                    wait
                }
                Err(e) => {
                    return Err(
                        e.context(format!("polling the change log of {}", self.path.display()))
                    );
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn ack(&self, durable: Durable) -> Result<()> {
        let upto = durable.position();
        {
            let mut last = self.last_trim.lock().await;
            if let Some((at, pos)) = *last {
                if pos >= upto || at.elapsed() < Duration::from_secs(2) {
                    return Ok(());
                }
            }
            *last = Some((Instant::now(), upto));
        }
        let registry = self.registry().await?;
        let seq = upto.commit as i64;
        self.write_tx(move |conn| {
            Box::pin(async move {
                sqlx::query(&format!("DELETE FROM {CHANGES} WHERE seq <= ?")).bind(seq).execute(&mut *conn).await?;
                sqlx::query(&format!(
                    "UPDATE {META} SET value = CAST(max(CAST(value AS INTEGER), ?) AS TEXT) WHERE key = 'trimmed'"
                ))
                .bind(seq)
                .execute(&mut *conn)
                .await?;
                for (id, _) in registry.values() {
                    sqlx::query(&format!("DELETE FROM {} WHERE seq <= ?", quote(&log_table(*id))))
                        .bind(seq)
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
        .await?;
        debug!(upto = %upto, "change log trimmed");
        Ok(())
    }

    async fn lag(&self, applied: Position) -> Result<crate::source::SourceLag> {
        let (rows, head): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), coalesce(max(seq), ?) FROM {CHANGES} WHERE seq > ?"
        ))
        .bind(applied.commit as i64)
        .bind(applied.commit as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(crate::source::SourceLag {
            head: head.to_string(),
            bytes: rows.max(0) as u64,
            ..Default::default()
        })
    }
}

impl SqliteSource {
    /// `INTEGER PRIMARY KEY AUTOINCREMENT` as an identity, and defaults a
    /// PostgreSQL target can keep: `datetime('now')` / `CURRENT_TIMESTAMP`
    /// as `now()`, numbers and quoted literals as they are.
    async fn column_defaults(
        &self,
        table: &str,
        columns: &[crate::model::Column],
        key: &[usize],
    ) -> Result<Vec<crate::model::ColumnDefault>> {
        let sql: Option<String> =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(table)
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        let autoincrement = sql.is_some_and(|s| s.to_ascii_uppercase().contains("AUTOINCREMENT"));
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT name, dflt_value FROM pragma_table_info(?)")
                .bind(table)
                .fetch_all(&self.pool)
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
                });
            }
        }
        Ok(out)
    }
}

struct Polled {
    changes: Vec<Change>,
    /// Log entries read (including those of tables not replicated).
    seen: usize,
    /// The last sequence number read.
    end: Option<i64>,
}

/// Reads up to `limit` log entries after `after` in one read transaction.
async fn poll(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_map_by_affinity_and_name() {
        for (decl, want) in [
            ("INTEGER", LogicalType::Int),
            ("BIGINT", LogicalType::Int),
            ("BOOLEAN", LogicalType::Bool),
            ("VARCHAR(20)", LogicalType::Text),
            ("REAL", LogicalType::Float),
            ("DOUBLE PRECISION", LogicalType::Float),
            ("BLOB", LogicalType::Bytes),
            ("", LogicalType::Any),
            ("JSON", LogicalType::Json),
            ("DATETIME", LogicalType::Timestamp),
            ("DECIMAL(10,2)", LogicalType::Decimal),
        ] {
            assert_eq!(logical_type(decl).0, want, "{decl}");
        }
        assert!(logical_type("MONEY").1.is_some());
    }

    #[test]
    fn timestamps_and_decimals_parse() {
        assert_eq!(
            parse_timestamp("2024-05-01 12:30:00").unwrap().to_rfc3339(),
            "2024-05-01T12:30:00+00:00"
        );
        assert_eq!(
            parse_timestamp("2024-05-01T12:30:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2024-05-01T10:30:00+00:00"
        );
        assert!(parse_timestamp("yesterday").is_none());
        assert_eq!(parse_decimal("-12.50").as_deref(), Some("-12.50"));
        assert_eq!(parse_decimal("1e5").as_deref(), Some("1e5"));
        assert!(
            parse_decimal("1.2.3").is_none()
                && parse_decimal("abc").is_none()
                && parse_decimal("").is_none()
        );
    }

    #[test]
    fn mismatched_storage_class_names_value() {
        let col = Column {
            name: "qty".into(),
            source_type: "INTEGER".into(),
            logical: LogicalType::Int,
            nullable: true,
        };
        let e = convert(Raw::Text("lots".into()), &col).unwrap_err();
        assert!(e.contains("INTEGER") && e.contains("lots"), "{e}");
        assert_eq!(
            convert(Raw::Integer(i64::MIN), &col).unwrap(),
            Value::Int(i64::MIN)
        );
    }
}

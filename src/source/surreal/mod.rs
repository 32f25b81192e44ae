//! SurrealDB source: the tables of one namespace and database, copied by
//! record id, then followed through their changefeeds.
//!
//! ```text
//!  install:     ALTER TABLE t CHANGEFEED <retention> where a table has none
//!               (source.define_changefeed), noted in _switchyard_capture:main
//!  snapshot(T): position P = the safe head, read first; then T in pages by record id
//!  stream:      SHOW CHANGES FOR DATABASE SINCE v LIMIT 1000, in versionstamp order,
//!               up to the safe head                        position = (versionstamp, change)
//!               every 2 s: tables created since → a changefeed, then Ddl::Copy
//!  ack:         nothing (the changefeed's retention removes old changes)
//!  cutover:     markers are records of _switchyard_marks (a changefeed of its own);
//!               the streaming process renews _switchyard_capture:stream (its lease);
//!               the fence is `none` (SurrealDB's users are not switchyard's to fence)
//! ```
//!
//! What SurrealDB 3.3 does that shapes this (see DESIGN.md):
//! - A versionstamp is `(unix milliseconds << 16) | counter`, taken just
//!   before a transaction commits, so a transaction can become visible after
//!   one with a higher stamp. The stream reads only up to the *safe head*,
//!   `source.changefeed_window_ms` behind the server's clock.
//! - The snapshot is read in pages, not in one transaction: changes after P
//!   that the pages already hold are applied again. Every change is applied
//!   by record id (a write as the record's whole content, a delete as a
//!   delete), so the target converges to the source.
//! - A page's LIMIT counts entries (one per versionstamp and table) before
//!   any filter: the database form is read, and a full page's last
//!   versionstamp is read again on the next page (SINCE is inclusive).
//! - Changes older than the retention are removed every 30 s, silently: a
//!   resume checks that nothing after its checkpoint can have gone.

pub mod values;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use surrealdb::types::{Number, Object, RecordId, RecordIdKey, ToSql, Value as SValue, Variables};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, TableFilter};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Change, Column, Ddl, Link, LogicalType, Marker, Op, Row, TableSchema, Value};
use crate::position::{Durable, Position, PositionKind};
use crate::redact::redact_url;
use crate::reject::{Rejected, Rejects};
use crate::schema::surreal::ident;
use crate::source::{
    Batch, Discovery, Fence, FenceMode, Installed, Pending, Problem, Source, SourceLag,
};

/// Where switchyard notes what it installed in the source.
const CAPTURE: &str = "_switchyard_capture";
/// Entries per changefeed page: SurrealDB's cap.
const PAGE: usize = 1000;
/// The markers cutover writes into the change stream, one record each.
const MARKS: &str = "_switchyard_marks";
/// How often the streaming process renews its lease, and how old a lease
/// may be and still hold.
const LEASE_EVERY: Duration = Duration::from_secs(2);
const LEASE_HOLDS: Duration = Duration::from_secs(10);
/// How often the stream looks for tables created in the source.
const CREATED_EVERY: Duration = Duration::from_secs(2);

pub struct SurrealSource {
    db: crate::surreal::Store,
    shown: String,
    namespace: String,
    database: String,
    filter: TableFilter,
    renames: BTreeMap<String, String>,
    /// Tables whose key is held in fields (`tables.keys`), not by the
    /// record id alone: their record ids are not a column.
    keys: BTreeMap<String, Vec<String>>,
    define_changefeed: bool,
    retention: String,
    window_ms: u64,
    poll_interval: Duration,
    rejects: Arc<Rejects>,
    /// Names this source's stream in its lease.
    holder: String,
}

/// An SDK error, its message after the context.
fn surreal_error(context: impl std::fmt::Display, e: surrealdb::Error) -> Error {
    crate::surreal::error(format!("{context}: {}", e.message()), e)
}

/// One versionstamp's changes as the changefeed gives them.
#[derive(Debug)]
struct ChangeSet {
    versionstamp: u64,
    changes: Vec<FeedChange>,
    /// The entries it takes of a page (one per table).
    entries: usize,
}

#[derive(Debug)]
enum FeedChange {
    /// A record created or updated: its whole content.
    Set {
        id: RecordId,
        record: Object,
    },
    Delete {
        id: RecordId,
    },
    /// A table (re)defined with a changefeed.
    Define {
        table: String,
    },
}

impl FeedChange {
    fn table(&self) -> &str {
        match self {
            FeedChange::Set { id, .. } | FeedChange::Delete { id } => id.table.as_str(),
            FeedChange::Define { table } => table,
        }
    }
}

fn int_of(v: Option<&SValue>) -> Option<i64> {
    match v {
        Some(SValue::Number(Number::Int(i))) => Some(*i),
        Some(SValue::Number(Number::Decimal(d))) => d.to_string().parse().ok(),
        _ => None,
    }
}

/// Parses `SHOW CHANGES` output.
fn change_sets(v: SValue) -> Result<Vec<ChangeSet>> {
    let bad = |what: &str| Error::definite(format!("unexpected SHOW CHANGES output: {what}"));
    let SValue::Array(rows) = v else {
        return Err(bad("not an array"));
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.into_iter() {
        let SValue::Object(row) = row else {
            return Err(bad("an entry is not an object"));
        };
        let versionstamp =
            int_of(row.get("versionstamp")).ok_or_else(|| bad("no versionstamp"))? as u64;
        let mut changes = Vec::new();
        if let Some(SValue::Array(list)) = row.get("changes") {
            for ch in list.iter() {
                let SValue::Object(ch) = ch else { continue };
                if let Some(SValue::Object(del)) = ch.get("delete") {
                    if let Some(SValue::RecordId(id)) = del.get("id") {
                        changes.push(FeedChange::Delete { id: id.clone() });
                    }
                } else if let Some(SValue::Object(record)) =
                    ch.get("current").or_else(|| ch.get("update"))
                {
                    if let Some(SValue::RecordId(id)) = record.get("id") {
                        changes.push(FeedChange::Set {
                            id: id.clone(),
                            record: record.clone(),
                        });
                    }
                } else if let Some(SValue::Object(def)) = ch.get("define_table") {
                    if let Some(SValue::String(name)) = def.get("name") {
                        changes.push(FeedChange::Define {
                            table: name.clone(),
                        });
                    }
                }
            }
        }
        let entries = changes
            .iter()
            .map(FeedChange::table)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            .max(1);
        out.push(ChangeSet {
            versionstamp,
            changes,
            entries,
        });
    }
    Ok(out)
}

/// A `record<t>` field's table, from its declared kind.
fn link_of(col: &Column) -> Option<&str> {
    let k = col.source_type.trim();
    let k = k
        .strip_prefix("option<")
        .and_then(|k| k.strip_suffix('>'))
        .or_else(|| k.strip_prefix("none |"))
        .or_else(|| k.strip_suffix("| none"))
        .unwrap_or(k)
        .trim();
    k.strip_prefix("record<")
        .and_then(|k| k.strip_suffix('>'))
        .filter(|t| !t.contains('|'))
        .map(str::trim)
}

/// A value that does not fit its column.
struct Misfit {
    column: usize,
    value: String,
    message: String,
}

/// The fields of a record that `table` has no column for yet (a schemaless
/// table's new fields).
fn new_fields(table: &TableSchema, record: &Object) -> Vec<String> {
    let keyed = !id_is_column(table);
    record
        .keys()
        .filter(|k| *k != "id" && !table.columns.iter().any(|c| c.name == column_of(keyed, k)))
        .cloned()
        .collect()
}

/// How the source type of the record id column reads.
const RECORD_ID: &str = "record id";

/// Whether the table's record id is its key column (`id`), as it is unless
/// `tables.keys` names the fields that hold the key.
fn id_is_column(table: &TableSchema) -> bool {
    table
        .columns
        .first()
        .is_some_and(|c| c.source_type == RECORD_ID)
}

/// The column a field is read as. Where the record id is not a column, the
/// field `source_id` is the column `id`: switchyard's SurrealDB target keeps a
/// source column named `id` there (`id` is the record id in SurrealDB).
fn column_of(keyed: bool, field: &str) -> &str {
    if keyed && field == "source_id" {
        "id"
    } else {
        field
    }
}

/// The field a column is read from (the inverse of [`column_of`]).
fn field_of(keyed: bool, column: &str) -> &str {
    if keyed && column == "id" {
        "source_id"
    } else {
        column
    }
}

/// A record as a row of `table` (fields it has no column for are not read:
/// see [`new_fields`]).
fn row_of(
    table: &TableSchema,
    id: &RecordId,
    mut record: Object,
) -> std::result::Result<Row, Misfit> {
    let mut row = Vec::with_capacity(table.columns.len());
    let keyed = !id_is_column(table);
    for (i, col) in table.columns.iter().enumerate() {
        if i == 0 && !keyed {
            row.push(key_of(table, &id.key).map_err(|message| Misfit {
                column: i,
                value: id.key.to_sql(),
                message,
            })?);
            continue;
        }
        let v = record
            .remove(field_of(keyed, &col.name))
            .unwrap_or(SValue::None);
        let v = values::convert(col, link_of(col), v).map_err(|r| Misfit {
            column: i,
            value: r.value,
            message: r.message,
        })?;
        row.push(v);
    }
    if keyed {
        // Deletes find the row by the record id alone: a record whose id is
        // not its key could never be deleted (or, its key edited, would
        // leave its old row).
        let from_id = key_values(table, &id.key);
        if from_id.as_ref().ok() != Some(&table.key_of(&row)) {
            return Err(Misfit {
                column: table.key[0],
                value: id.to_sql(),
                message: format!(
                    "the record id is not its key {}; the replica finds rows by record id, so write records with their key as the id{}",
                    table.describe_key(&table.key_of(&row)),
                    key_as_id(&id.table, &table.key_of(&row))
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            });
        }
    }
    Ok(row)
}

/// The record id a key of ints and strings makes, as SurrealQL writes it
/// (as switchyard's SurrealDB target makes record ids).
fn key_as_id(table: &str, key: &[Value]) -> Option<String> {
    let part = |v: &Value| match v {
        Value::Int(i) => Some(SValue::Number(Number::Int(*i))),
        Value::Text(s) => Some(SValue::String(s.clone())),
        _ => None,
    };
    let k = match key {
        [Value::Int(i)] => RecordIdKey::Number(*i),
        [Value::Text(s)] => RecordIdKey::String(s.clone()),
        [_] => return None,
        parts => RecordIdKey::Array(surrealdb::types::Array::from(
            parts.iter().map(part).collect::<Option<Vec<_>>>()?,
        )),
    };
    Some(RecordId::new(table.to_string(), k).to_sql())
}

/// A record id key as the value of the table's key column.
fn key_of(table: &TableSchema, key: &RecordIdKey) -> std::result::Result<Value, String> {
    let col = &table.columns[table.key[0]];
    let v = values::key_value(key);
    let fits = match col.logical {
        LogicalType::Any => true,
        l => values::key_type(key) == l,
    };
    if fits {
        Ok(v)
    } else {
        Err(format!(
            "the table's record ids are {} keys, and this one is {}; replicate tables whose record ids are of one kind",
            col.logical,
            key.to_sql()
        ))
    }
}

/// A record id as the values of the table's key columns: the record id
/// column itself, or the fields that hold the key (one, or an array of them
/// in key order, as switchyard's SurrealDB target makes record ids).
fn key_values(table: &TableSchema, key: &RecordIdKey) -> std::result::Result<Vec<Value>, String> {
    if id_is_column(table) {
        return key_of(table, key).map(|v| vec![v]);
    }
    let parts: Vec<SValue> = match (table.key.len(), key) {
        // A one-column key of a kind a record id cannot be itself (a
        // decimal, a datetime, …) is kept in a one-element array.
        (1, RecordIdKey::Array(a))
            if a.len() == 1
                && !matches!(
                    table.columns[table.key[0]].logical,
                    LogicalType::Json | LogicalType::Any
                ) =>
        {
            vec![a[0].clone()]
        }
        (1, k) => vec![key_svalue(k)],
        (n, RecordIdKey::Array(a)) if a.len() == n => a.iter().cloned().collect(),
        (n, k) => {
            return Err(format!(
                "the record id {} does not hold the table's {n} key field(s) ({}) as tables.keys names them",
                k.to_sql(),
                table
                    .key
                    .iter()
                    .map(|&i| table.columns[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    table
        .key
        .iter()
        .zip(parts)
        .map(|(&i, v)| {
            let col = &table.columns[i];
            values::convert(col, link_of(col), v).map_err(|r| r.message)
        })
        .collect()
}

/// A record id's key as a value.
fn key_svalue(key: &RecordIdKey) -> SValue {
    match key {
        RecordIdKey::Number(i) => SValue::Number(Number::Int(*i)),
        RecordIdKey::String(s) => SValue::String(s.clone()),
        RecordIdKey::Uuid(u) => SValue::Uuid(*u),
        RecordIdKey::Array(a) => SValue::Array(a.clone()),
        RecordIdKey::Object(o) => SValue::Object(o.clone()),
        RecordIdKey::Range(_) => SValue::String(key.to_sql()),
    }
}

/// A link column takes the kind of the linked table's keys (`keys`), where
/// the table is replicated and its keys are of one kind.
fn link_kinds(t: &mut TableSchema, keys: &HashMap<String, LogicalType>) {
    for l in t.links.clone() {
        let col = &mut t.columns[l.column];
        if let Some(&k) = link_of(col).and_then(|to| keys.get(to)) {
            if k != LogicalType::Any {
                col.logical = k;
            }
        }
    }
}

/// A name for one source's stream, unique among processes and within one.
fn holder() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "pid {} #{} {}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        chrono::Utc::now().timestamp_micros()
    )
}

impl SurrealSource {
    /// Connects to `endpoint` (signed in as `source.username` on a remote
    /// server) and selects the configured namespace and database, which must
    /// exist.
    pub async fn open(
        endpoint: &str,
        remote: bool,
        config: &Config,
        rejects: Arc<Rejects>,
    ) -> Result<Self> {
        let shown = redact_url(endpoint);
        if !remote {
            if let Some(db) =
                crate::surreal::shared(endpoint, || Self::connect(endpoint, &shown, config)).await?
            {
                return Self::from_client(db, &shown, config, rejects).await;
            }
        }
        let db = Self::connect(endpoint, &shown, config).await?;
        if remote {
            crate::surreal::sign_in(
                &db,
                &shown,
                &config.source.username,
                &config.source.password,
            )
            .await?;
        }
        Self::from_client(db, &shown, config, rejects).await
    }

    async fn connect(
        endpoint: &str,
        shown: &str,
        config: &Config,
    ) -> Result<crate::surreal::Store> {
        crate::surreal::open(endpoint, config.source.memory_mb).await.map_err(|m| {
            if m.to_ascii_lowercase().contains("lock") {
                Error::connect(format!(
                    "cannot open the embedded SurrealDB store {shown}: another process holds it ({m}). \
                     An embedded store is opened by one process at a time: stop the application for an offline copy, \
                     or run the sync inside the application (examples/surreal_live_sync.rs)"
                ))
            } else {
                Error::connect(format!("cannot connect to SurrealDB at {shown}: {m}"))
            }
        })
    }

    /// A source over a connection the caller opened: an application's own
    /// handle, for a live sync inside its process (an embedded store is
    /// opened by one process at a time).
    pub async fn from_client(
        db: impl crate::surreal::AsStore,
        shown: &str,
        config: &Config,
        rejects: Arc<Rejects>,
    ) -> Result<Self> {
        let db = db.store();
        let namespace = config.source.namespace.clone().unwrap_or_default();
        let database = config.source.database.clone().unwrap_or_default();
        let exists = crate::surreal::database_exists(&db, &namespace, &database)
            .await
            .map_err(|e| surreal_error(format!("reading the namespaces of {shown}"), e))?;
        if !exists {
            return Err(Error::config(format!(
                "source {shown} has no namespace {namespace:?} with a database {database:?}; set source.namespace and source.database to where the application's data is"
            )));
        }
        db.use_db(&database)
            .await
            .map_err(|e| surreal_error(format!("using database {database:?} on {shown}"), e))?;
        info!(source = %shown, namespace = %namespace, database = %database, "connected to the SurrealDB source");
        Ok(Self {
            db,
            shown: shown.to_string(),
            namespace,
            database,
            filter: config.table_filter()?,
            renames: config.tables.rename.clone(),
            keys: config.tables.keys.clone(),
            define_changefeed: config.source.define_changefeed,
            retention: config.source.changefeed_retention.clone(),
            window_ms: config.source.changefeed_window_ms,
            poll_interval: Duration::from_millis(config.source.poll_interval_ms.max(10)),
            rejects,
            holder: holder(),
        })
    }

    async fn query(
        &self,
        context: impl std::fmt::Display,
        sql: String,
        vars: Variables,
    ) -> Result<surrealdb::IndexedResults> {
        let mut resp = self
            .db
            .query(sql)
            .bind(vars)
            .await
            .map_err(|e| surreal_error(&context, e))?;
        match crate::surreal::failure(&mut resp) {
            None => Ok(resp),
            Some((_, e)) => Err(surreal_error(context, e)),
        }
    }

    /// The tables of the database as `INFO FOR DB STRUCTURE` describes them.
    /// The first statement's result as JSON (`INFO FOR …`).
    async fn query_json(&self, context: String, sql: String) -> Result<Option<serde_json::Value>> {
        let mut r = self.query(&context, sql, Variables::new()).await?;
        r.take(0).map_err(|e| surreal_error(context, e))
    }

    async fn table_infos(&self) -> Result<Vec<serde_json::Value>> {
        let info = self
            .query_json(
                format!(
                    "reading the tables of {} {}/{}",
                    self.shown, self.namespace, self.database
                ),
                "INFO FOR DB STRUCTURE".into(),
            )
            .await?;
        Ok(info
            .and_then(|v| v.get("tables").and_then(|t| t.as_array().cloned()))
            .unwrap_or_default())
    }

    /// The server's clock, in Unix milliseconds.
    async fn now_ms(&self) -> Result<u64> {
        let mut r = self
            .query(
                "reading the server's clock",
                "RETURN time::millis(time::now())".into(),
                Variables::new(),
            )
            .await?;
        let v: SValue = r
            .take(0)
            .map_err(|e| surreal_error("reading the server's clock", e))?;
        int_of(Some(&v))
            .map(|m| m.max(0) as u64)
            .ok_or_else(|| Error::definite("time::millis returned no number"))
    }

    /// The newest versionstamp every transaction stamped at or before has
    /// committed by: `changefeed_window_ms` behind the server's clock.
    async fn safe_head(&self) -> Result<u64> {
        Ok(self.now_ms().await?.saturating_sub(self.window_ms) << 16)
    }

    /// One page of the database's changefeed from `since` (inclusive).
    async fn page(&self, since: u64) -> Result<Vec<ChangeSet>> {
        let mut r = self
            .query(
                format!(
                    "reading the changefeed of {}/{} since versionstamp {since}",
                    self.namespace, self.database
                ),
                format!("SHOW CHANGES FOR DATABASE SINCE {since} LIMIT {PAGE}"),
                Variables::new(),
            )
            .await?;
        let v: SValue = r
            .take(0)
            .map_err(|e| surreal_error("reading the changefeed", e))?;
        change_sets(v)
    }

    /// The complete changesets of a page: a full page's last one may lack
    /// tables past the limit, so it is left for the next page.
    fn complete(mut sets: Vec<ChangeSet>) -> (Vec<ChangeSet>, bool) {
        let full = sets.iter().map(|s| s.entries).sum::<usize>() >= PAGE;
        if full && sets.len() > 1 {
            sets.pop();
        }
        (sets, full)
    }

    /// The longest changefeed retention of the database's tables.
    fn retention_of(infos: &[serde_json::Value]) -> Option<Duration> {
        infos
            .iter()
            .filter_map(|t| {
                t.get("changefeed")?
                    .get("expiry")?
                    .as_str()
                    .map(str::to_string)
            })
            .filter_map(|s| s.parse::<surrealdb::types::Duration>().ok())
            .map(|d| d.into_inner())
            .max()
    }

    fn set_aside(
        &self,
        table: &TableSchema,
        key: &str,
        m: Misfit,
        phase: &'static str,
        at: Position,
    ) -> Result<()> {
        let col = &table.columns[m.column].name;
        if !self.rejects.enabled() {
            return Err(Error::definite(format!(
                "table {:?}, record {key}, field {col:?}: {} (value {}); define the field's type to match its values, \
                 or set pipeline.reject_dir to set such records aside",
                table.name, m.message, m.value
            )));
        }
        self.rejects.record(&Rejected {
            table: table.name.clone(),
            key: key.to_string(),
            column: Some(col.clone()),
            value: Some(m.value),
            reason: m.message,
            phase,
            position: at.to_string(),
            row: Default::default(),
        })
    }

    /// The columns of a table: the record id, the defined fields, and (for
    /// a schemaless table) the fields its records hold that no definition
    /// names.
    /// Table `name`, which `INFO FOR DB STRUCTURE` lists as `listed`.
    async fn describe(
        &self,
        name: &str,
        listed: &serde_json::Value,
        d: &mut Discovery,
    ) -> Result<Option<TableSchema>> {
        let schemafull = listed
            .get("schemafull")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        let info = self
            .query_json(
                format!("reading the fields of table {name:?}"),
                format!("INFO FOR TABLE {} STRUCTURE", ident(name)),
            )
            .await?;
        let fields: Vec<serde_json::Value> = info
            .as_ref()
            .and_then(|v| v.get("fields")?.as_array().cloned())
            .unwrap_or_default();
        // The key column's kind, from the first and last record id (ids of
        // one kind sort together).
        let t = ident(name);
        let mut r = self
            .query(
                format!("reading the record ids of table {name:?}"),
                format!(
                    "SELECT VALUE id FROM {t} ORDER BY id ASC LIMIT 1; SELECT VALUE id FROM {t} ORDER BY id DESC LIMIT 1;"
                ),
                Variables::new(),
            )
            .await?;
        let first: Vec<SValue> = r
            .take(0)
            .map_err(|e| surreal_error("reading record ids", e))?;
        let last: Vec<SValue> = r
            .take(1)
            .map_err(|e| surreal_error("reading record ids", e))?;
        let kinds: Vec<LogicalType> = first
            .iter()
            .chain(last.iter())
            .filter_map(values::record_id)
            .map(|r| values::key_type(&r.key))
            .collect();
        let key_type = match kinds.as_slice() {
            [a, b] if a == b => *a,
            _ => LogicalType::Any,
        };
        // With tables.keys, fields hold the key and the record id is not a
        // column.
        let key_names = self.keys.get(name);
        let keyed = key_names.is_some();
        let mut columns = Vec::new();
        if !keyed {
            columns.push(Column {
                name: "id".into(),
                source_type: RECORD_ID.into(),
                logical: key_type,
                nullable: false,
            });
        }
        let mut links = Vec::new();
        for f in &fields {
            let Some(fname) = f.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            // Nested fields (`address.city`, `tags[*]`) are part of their
            // top-level field's value.
            if fname == "id" || fname.contains(['.', '[']) {
                continue;
            }
            let fname = column_of(keyed, fname.trim_matches('`')).to_string();
            let (col, link) = values::column(&fname, f.get("kind").and_then(|k| k.as_str()));
            if let Some(to) = link {
                links.push(Link {
                    column: columns.len(),
                    table: self.renames.get(&to).cloned().unwrap_or(to),
                });
            }
            columns.push(col);
        }
        if !schemafull {
            let keys: Vec<String> = self
                .record_fields(name)
                .await?
                .into_iter()
                .map(|k| column_of(keyed, &k).to_string())
                .filter(|k| (keyed || k != "id") && !columns.iter().any(|c| &c.name == k))
                .collect();
            if !keys.is_empty() {
                d.problems.push(Problem {
                    table: name.to_string(),
                    column: None,
                    message: format!(
                        "schemaless fields without a definition ({}) are carried with each value's own type (text in PostgreSQL); DEFINE FIELD gives them one",
                        keys.join(", ")
                    ),
                    blocking: false,
                });
            }
            columns.extend(keys.iter().map(|k| values::undefined(k)));
        }
        let indexes: Vec<serde_json::Value> = info
            .as_ref()
            .and_then(|v| v.get("indexes")?.as_array().cloned())
            .unwrap_or_default();
        let secondary = Self::indexes(name, &columns, &indexes, d);
        let target_name = self
            .renames
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        let key = match key_names {
            None => vec![0],
            Some(names) => names
                .iter()
                .map(|k| {
                    columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                        Error::config(format!(
                            "tables.keys names field {k:?} as a key of table {name:?}, which has no such field defined{}",
                            if k == "id" { " (a key column `id` is kept in the field `source_id`)" } else { "" }
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let events = info
            .as_ref()
            .and_then(|v| v.get("events")?.as_array().map(Vec::len))
            .unwrap_or(0);
        if events > 0 {
            d.problems.push(Problem {
                table: name.to_string(),
                column: None,
                message: format!(
                    "{events} event(s) not carried to a SurrealDB target: they would run again on every replicated write; define them there when the application moves"
                ),
                blocking: false,
            });
        }
        let mut defined = Vec::new();
        for f in &fields {
            let Some((path, clauses, left)) = values::definition(f, &self.renames) else {
                continue;
            };
            if !left.is_empty() {
                d.problems.push(Problem {
                    table: name.to_string(),
                    column: Some(path.clone()),
                    message: format!(
                        "{} not carried to a SurrealDB target ({})",
                        left.join(", "),
                        "the replica stores the source's values as they are"
                    ),
                    blocking: false,
                });
            }
            defined.push((path, clauses));
        }
        let (indexes, analyzers) = self.index_statements(name).await?;
        let mut t = TableSchema::keyed(name.to_string(), target_name, columns, key);
        t.links = links;
        t.secondary = secondary;
        t.surreal = Some(crate::model::SurrealTable {
            schemafull,
            fields: defined,
            indexes,
            analyzers,
        });
        Ok(Some(t))
    }

    /// The top-level fields the records of a schemaless table hold, read
    /// in pages of record ids (memory bounded by a page, not the table).
    async fn record_fields(&self, name: &str) -> Result<std::collections::BTreeSet<String>> {
        const FIELDS_PAGE: i64 = 1000;
        let t = ident(name);
        let mut found = std::collections::BTreeSet::new();
        let mut last: Option<SValue> = None;
        loop {
            let mut vars = Variables::new();
            vars.insert("n", FIELDS_PAGE);
            let filter = match last.take() {
                Some(id) => {
                    vars.insert("last", id);
                    "WHERE id > $last "
                }
                None => "",
            };
            let mut r = self
                .query(
                    format!("reading the fields of the records of table {name:?}"),
                    format!(
                        "SELECT id, object::keys($this) AS k FROM {t} {filter}ORDER BY id LIMIT $n"
                    ),
                    vars,
                )
                .await?;
            let page: Vec<SValue> = r
                .take(0)
                .map_err(|e| surreal_error(format!("reading the fields of table {name:?}"), e))?;
            let full = page.len() as i64 == FIELDS_PAGE;
            for rec in page {
                let SValue::Object(mut rec) = rec else {
                    continue;
                };
                if let Some(SValue::Array(keys)) = rec.remove("k") {
                    found.extend(keys.iter().filter_map(|k| match k {
                        SValue::String(k) => Some(k.clone()),
                        _ => None,
                    }));
                }
                last = rec.remove("id");
            }
            if !full || last.is_none() {
                return Ok(found);
            }
        }
    }

    /// Every index of the table as a SurrealDB target builds it (name,
    /// clauses), and the `DEFINE ANALYZER` statements of the analyzers its
    /// full-text indexes use.
    async fn index_statements(&self, name: &str) -> Result<(Vec<(String, String)>, Vec<String>)> {
        let info = self
            .query_json(
                format!("reading the indexes of table {name:?}"),
                format!("INFO FOR TABLE {}", ident(name)),
            )
            .await?;
        let mut indexes: Vec<(String, String)> = info
            .as_ref()
            .and_then(|v| v.get("indexes")?.as_object().cloned())
            .unwrap_or_default()
            .values()
            .filter_map(|s| values::index_clauses(s.as_str()?))
            .collect();
        indexes.sort();
        let used: std::collections::BTreeSet<&str> = indexes
            .iter()
            .filter_map(|(_, c)| values::analyzer_of(c))
            .collect();
        let mut analyzers = Vec::new();
        if !used.is_empty() {
            let db = self
                .query_json(
                    "reading the analyzers of the database".into(),
                    "INFO FOR DB".into(),
                )
                .await?;
            let all = db
                .as_ref()
                .and_then(|v| v.get("analyzers")?.as_object().cloned())
                .unwrap_or_default();
            for a in used {
                if let Some(stmt) = all.get(a).and_then(|s| s.as_str()) {
                    analyzers.push(stmt.to_string());
                }
            }
        }
        Ok((indexes, analyzers))
    }

    /// The table's plain and unique indexes on top-level fields, which a
    /// target builds after the load (named `table_index`: PostgreSQL's index
    /// names are its schema's); the others are noted as left out.
    fn indexes(
        table: &str,
        columns: &[Column],
        indexes: &[serde_json::Value],
        d: &mut Discovery,
    ) -> Vec<crate::model::Secondary> {
        let mut out = Vec::new();
        for ix in indexes {
            let Some(name) = ix.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let kind = ix
                .get("index")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .trim();
            let cols: Vec<String> = ix
                .get("cols")
                .and_then(|c| c.as_array())
                .map(|c| {
                    c.iter()
                        .filter_map(|c| c.as_str())
                        .map(|c| c.trim_matches('`').to_string())
                        .collect()
                })
                .unwrap_or_default();
            let plain = !cols.is_empty()
                && cols
                    .iter()
                    .all(|c| columns.iter().any(|col| &col.name == c && c != "id"));
            if !plain || !(kind.is_empty() || kind == "UNIQUE") {
                d.problems.push(Problem {
                    table: table.to_string(),
                    column: None,
                    message: format!(
                        "index {name:?} ({}{}) is carried into a SurrealDB target only: into PostgreSQL only plain and UNIQUE indexes on top-level fields are",
                        cols.join(", "),
                        if kind.is_empty() { String::new() } else { format!(" {kind}") }
                    ),
                    blocking: false,
                });
                continue;
            }
            out.push(crate::model::Secondary::Index {
                name: format!("{table}_{name}"),
                unique: kind == "UNIQUE",
                using: format!(
                    "USING btree ({})",
                    cols.iter()
                        .map(|c| crate::pg::quote_ident(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                deferred: false,
            });
        }
        out
    }

    /// The table with columns for `fields`, which it has none for (see
    /// [`new_fields`]).
    fn widened(table: &TableSchema, fields: &[String]) -> TableSchema {
        let mut t = table.clone();
        t.columns
            .extend(fields.iter().map(|f| values::undefined(f)));
        t
    }

    /// The capture record: its origin and the tables whose changefeed
    /// switchyard defined.
    async fn capture(&self) -> Result<Option<(String, Vec<String>)>> {
        let mut r = match self
            .query(
                "reading switchyard's capture record in the source",
                format!("SELECT origin, defined FROM ONLY {CAPTURE}:main"),
                Variables::new(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) if e.report().contains("does not exist") => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: Option<serde_json::Value> = r
            .take(0)
            .map_err(|e| surreal_error("reading the capture record", e))?;
        Ok(v.and_then(|v| {
            let origin = v.get("origin")?.as_str()?.to_string();
            let defined = v
                .get("defined")
                .and_then(|d| d.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            Some((origin, defined))
        }))
    }

    /// Defines a changefeed on `table` (which has none), noted as
    /// switchyard's; refused where `source.define_changefeed` is false.
    async fn define_feed(&self, table: &str) -> Result<()> {
        if !self.define_changefeed {
            return Err(Error::config(format!(
                "table {table:?} has no changefeed, and source.define_changefeed is false: run `ALTER TABLE {} CHANGEFEED {}` in the source, or set source.define_changefeed = true",
                ident(table),
                self.retention
            )));
        }
        let mut vars = Variables::new();
        vars.insert("tb", table.to_string());
        self.query(
            format!("defining a changefeed on table {table:?}"),
            format!(
                "ALTER TABLE {} CHANGEFEED {}; UPDATE {CAPTURE}:main SET defined += $tb RETURN NONE;",
                ident(table),
                self.retention
            ),
            vars,
        )
        .await?;
        info!(table = %table, retention = %self.retention, "defined a changefeed");
        Ok(())
    }

    /// The tables the filter selects that the source gained since `known`
    /// was read, each with a changefeed from now on (their copy reads after
    /// it).
    async fn created(
        &self,
        known: &HashMap<String, Arc<TableSchema>>,
    ) -> Result<Vec<Arc<TableSchema>>> {
        let mut d = Discovery::default();
        for info in self.table_infos().await? {
            let Some(name) = info.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            if known.contains_key(name)
                || name.starts_with("_switchyard")
                || !self.filter.matches(name)
                || info.get("view").is_some_and(|v| !v.is_null())
            {
                continue;
            }
            let target = self.renames.get(name).map(String::as_str).unwrap_or(name);
            if known.values().any(|t| t.target_name == target) {
                warn!(table = %name, target = %target, "a table created in the source goes to a target table another one fills: not followed (tables.rename)");
                continue;
            }
            if info.get("changefeed").is_none_or(|c| c.is_null()) {
                if !self.define_changefeed {
                    warn!(table = %name, "a table created in the source has no changefeed, and source.define_changefeed is false: not followed; define one and restart");
                    continue;
                }
                self.define_feed(name).await?;
            }
            if let Some(t) = self.describe(name, &info, &mut d).await? {
                d.tables.push(t);
            }
        }
        for p in &d.problems {
            warn!(table = %p.table, "{}", p.message);
        }
        let mut keys: HashMap<String, LogicalType> = known
            .values()
            .map(|t| (t.name.clone(), t.columns[t.key[0]].logical))
            .collect();
        keys.extend(
            d.tables
                .iter()
                .map(|t| (t.name.clone(), t.columns[t.key[0]].logical)),
        );
        Ok(d.tables
            .into_iter()
            .map(|mut t| {
                link_kinds(&mut t, &keys);
                Arc::new(t)
            })
            .collect())
    }

    /// Takes the lease on the stream (`stream_in_use`) and renews it every
    /// [`LEASE_EVERY`] from a task of its own (the stream may wait on a full
    /// queue), until the returned guard is dropped.
    async fn hold_lease(&self) -> Result<tokio_util::sync::DropGuard> {
        let mut vars = Variables::new();
        vars.insert("holder", self.holder.clone());
        self.query(
            "taking the stream's lease in the source",
            format!("UPSERT {CAPTURE}:stream CONTENT {{ holder: $holder, at: time::now() }} RETURN NONE"),
            vars,
        )
        .await?;
        let stop = CancellationToken::new();
        let (db, holder, token) = (self.db.clone(), self.holder.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(LEASE_EVERY) => {}
                }
                // UPDATE, not UPSERT: once `uninstall` removed the table (the
                // end of a cutover), nothing brings it back.
                let renewed = db
                    .query(format!(
                        "UPDATE {CAPTURE}:stream SET at = time::now() WHERE holder = $holder RETURN NONE"
                    ))
                    .bind(("holder", holder.clone()))
                    .await;
                if let Err(e) = renewed {
                    debug!(error = %e, "renewing the stream's lease");
                }
            }
        });
        Ok(stop.drop_guard())
    }

    /// Changes of `tables` in the changefeed after `after` and at or before
    /// `upto`, counted.
    async fn count_between(
        &self,
        tables: &[Arc<TableSchema>],
        after: Position,
        upto: Position,
    ) -> Result<u64> {
        let names: std::collections::HashSet<&str> =
            tables.iter().map(|t| t.name.as_str()).collect();
        let mut since = after.commit;
        let mut n = 0;
        loop {
            let (sets, full) = Self::complete(self.page(since).await?);
            let mut next = since;
            for s in &sets {
                if s.versionstamp > upto.commit {
                    return Ok(n);
                }
                for (i, ch) in s.changes.iter().enumerate() {
                    let at = Position::new(s.versionstamp, i as u64 + 1);
                    if at > after
                        && names.contains(ch.table())
                        && !matches!(ch, FeedChange::Define { .. })
                    {
                        n += 1;
                    }
                }
                next = s.versionstamp + 1;
            }
            if !full || next == since {
                return Ok(n);
            }
            since = next;
        }
    }
}

#[async_trait]
impl Source for SurrealSource {
    async fn discover(&self) -> Result<Discovery> {
        let mut d = Discovery::default();
        let mut infos = self.table_infos().await?;
        infos.sort_by(|a, b| {
            a.get("name")
                .and_then(|n| n.as_str())
                .cmp(&b.get("name").and_then(|n| n.as_str()))
        });
        for info in infos {
            let Some(name) = info.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            if name.starts_with("_switchyard") || !self.filter.matches(name) {
                continue;
            }
            if info.get("view").is_some_and(|v| !v.is_null()) {
                d.left_out.push(format!(
                    "{name}: a view (DEFINE TABLE … AS SELECT): the target computes its own"
                ));
                continue;
            }
            if let Some(t) = self.describe(name, &info, &mut d).await? {
                d.tables.push(t);
            }
        }
        let keys: HashMap<String, LogicalType> = d
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.columns[t.key[0]].logical))
            .collect();
        for t in &mut d.tables {
            link_kinds(t, &keys);
        }
        d.refuse_shared_targets();
        d.refuse_nothing_selected();
        Ok(d)
    }

    async fn install(&self, tables: &[Arc<TableSchema>]) -> Result<Installed> {
        let infos = self.table_infos().await?;
        let has_feed = |name: &str| {
            infos.iter().any(|t| {
                t.get("name").and_then(|n| n.as_str()) == Some(name)
                    && t.get("changefeed").is_some_and(|c| !c.is_null())
            })
        };
        self.query(
            "recording switchyard's capture in the source",
            format!(
                "DEFINE TABLE IF NOT EXISTS {CAPTURE} SCHEMALESS; IF (SELECT * FROM ONLY {CAPTURE}:main) == NONE {{ CREATE {CAPTURE}:main CONTENT {{ origin: <string> rand::uuid::v4(), defined: [] }} RETURN NONE; }};"
            ),
            Variables::new(),
        )
        .await?;
        let mut recaptured = Vec::new();
        for t in tables {
            if has_feed(&t.name) {
                continue;
            }
            self.define_feed(&t.name).await?;
            recaptured.push(t.name.clone());
        }
        let (origin, _) = self.capture().await?.ok_or_else(|| {
            Error::definite("switchyard's capture record vanished from the source")
        })?;
        Ok(Installed {
            origin: format!("surrealdb {}/{} {origin}", self.namespace, self.database),
            recaptured,
        })
    }

    async fn verify_resume(&self, checkpoint: Position) -> Result<()> {
        let now = self.now_ms().await?;
        let head = now << 16;
        if checkpoint.commit > head {
            return Err(Error::definite(format!(
                "the target's checkpoint {} is later than the source's clock: the source was restored from a backup or replaced. \
                 Replicate into an empty target (a new namespace or database)",
                checkpoint.show(PositionKind::Versionstamp)
            )));
        }
        let infos = self.table_infos().await?;
        let Some(retention) = Self::retention_of(&infos) else {
            return Err(Error::definite(
                "no table of the source has a changefeed any more (`switchyard uninstall`, or REMOVE TABLE): changes after the target's checkpoint were not recorded. \
                 Replicate into an empty target (a new namespace or database)",
            ));
        };
        let checkpoint_ms = checkpoint.commit >> 16;
        if checkpoint_ms + retention.as_millis() as u64 >= now {
            return Ok(());
        }
        // Older than the retention: intact only if the changefeed still
        // holds an entry at or before it (removal takes the oldest first).
        let oldest = self.page(0).await?.first().map(|s| s.versionstamp);
        if oldest.is_some_and(|o| o <= checkpoint.commit) {
            return Ok(());
        }
        Err(Error::definite(format!(
            "the target's checkpoint ({}, {} s ago) is older than the changefeed's retention ({} s): changes after it may have been removed. \
             The tables must be copied again: replicate into an empty target (a new namespace or database), \
             and give the changefeed a longer retention (source.changefeed_retention, or ALTER TABLE … CHANGEFEED) than the daemon is ever stopped",
            checkpoint.show(PositionKind::Versionstamp),
            (now - checkpoint_ms) / 1000,
            retention.as_secs()
        )))
    }

    async fn uninstall(&self) -> Result<()> {
        let Some((_, defined)) = self.capture().await? else {
            return Ok(());
        };
        for t in &defined {
            self.query(
                format!("removing the changefeed of table {t:?}"),
                format!("ALTER TABLE IF EXISTS {} DROP CHANGEFEED", ident(t)),
                Variables::new(),
            )
            .await?;
        }
        self.query(
            "removing switchyard's capture record",
            format!("REMOVE TABLE IF EXISTS {CAPTURE}; REMOVE TABLE IF EXISTS {MARKS};"),
            Variables::new(),
        )
        .await?;
        info!(
            tables = defined.len(),
            "removed the changefeeds switchyard defined"
        );
        Ok(())
    }

    async fn count_rows(&self, table: &TableSchema) -> Result<Option<u64>> {
        self.exact_count(table).await.map(Some)
    }

    async fn exact_count(&self, table: &TableSchema) -> Result<u64> {
        let mut r = self
            .query(
                format!("counting the records of table {:?}", table.name),
                format!("SELECT VALUE count() FROM {} GROUP ALL", ident(&table.name)),
                Variables::new(),
            )
            .await?;
        let v: Vec<SValue> = r
            .take(0)
            .map_err(|e| surreal_error("counting records", e))?;
        Ok(int_of(v.first()).unwrap_or(0).max(0) as u64)
    }

    async fn current_position(&self) -> Result<Position> {
        Ok(Position::new(self.safe_head().await?, Position::WHOLE))
    }

    async fn snapshot(
        &self,
        table: Arc<TableSchema>,
        batch_rows: usize,
        rows: mpsc::Sender<Vec<Row>>,
    ) -> Result<Position> {
        // Read first: every change after it is applied again by record id,
        // so the pages need not be one transaction.
        let at = self.current_position().await?;
        let t = ident(&table.name);
        let mut last: Option<RecordId> = None;
        loop {
            let mut vars = Variables::new();
            vars.insert("n", batch_rows.max(1) as i64);
            let sql = match &last {
                Some(id) => {
                    vars.insert("last", id.clone());
                    format!("SELECT * FROM {t} WHERE id > $last ORDER BY id LIMIT $n")
                }
                None => format!("SELECT * FROM {t} ORDER BY id LIMIT $n"),
            };
            let mut r = self
                .query(format!("reading table {:?}", table.name), sql, vars)
                .await?;
            let records: Vec<SValue> = r
                .take(0)
                .map_err(|e| surreal_error(format!("reading table {:?}", table.name), e))?;
            let n = records.len();
            let mut batch = Vec::with_capacity(n);
            for rec in records {
                let SValue::Object(rec) = rec else { continue };
                let Some(SValue::RecordId(id)) = rec.get("id").cloned() else {
                    continue;
                };
                let new = new_fields(&table, &rec);
                match row_of(&table, &id, rec) {
                    Ok(row) if new.is_empty() => batch.push(row),
                    Ok(_) => {
                        return Err(Error::transient(format!(
                        "table {:?} gained fields while it was copied ({}); the copy starts again",
                        table.name,
                        new.join(", ")
                    )))
                    }
                    Err(m) => self.set_aside(&table, &id.to_sql(), m, "snapshot", at)?,
                }
                last = Some(id);
            }
            if !batch.is_empty() && rows.send(batch).await.is_err() {
                return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
            }
            if n < batch_rows.max(1) {
                return Ok(at);
            }
        }
    }

    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let mut shapes: HashMap<String, Arc<TableSchema>> =
            tables.iter().map(|t| (t.name.clone(), t.clone())).collect();
        let mut after = after;
        let mut last_sent = Instant::now();
        let _lease = self.hold_lease().await?;
        let mut looked = Instant::now();
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let safe = self.safe_head().await?;
            let mut out = Batch {
                upto: after,
                ..Default::default()
            };
            let mut since = after.commit;
            let mut at_end = false;
            while !at_end && out.changes.len() < max_batch {
                let (sets, full) = Self::complete(self.page(since).await?);
                at_end = !full;
                let mut next = since;
                for s in sets {
                    if s.versionstamp > safe {
                        at_end = true;
                        break;
                    }
                    for (i, ch) in s.changes.into_iter().enumerate() {
                        let at = Position::new(s.versionstamp, i as u64 + 1);
                        if at <= after {
                            continue;
                        }
                        if ch.table() == MARKS {
                            if let FeedChange::Set { record, .. } = &ch {
                                if let Some(SValue::String(m)) = record.get("marker") {
                                    if let Ok(marker) = serde_json::from_str::<Marker>(m) {
                                        out.markers.push((at, marker));
                                    }
                                }
                            }
                            continue;
                        }
                        let Some(table) = shapes.get(ch.table()).cloned() else {
                            continue;
                        };
                        match ch {
                            FeedChange::Define { .. } => {}
                            FeedChange::Delete { id } => match key_values(&table, &id.key) {
                                Ok(key) => out.changes.push(Change {
                                    table,
                                    op: Op::Delete { key },
                                    position: at,
                                }),
                                Err(message) => self.set_aside(
                                    &table,
                                    &id.to_sql(),
                                    Misfit {
                                        column: 0,
                                        value: id.key.to_sql(),
                                        message,
                                    },
                                    "stream",
                                    at,
                                )?,
                            },
                            FeedChange::Set { id, record } => {
                                let mut table = table;
                                let new = new_fields(&table, &record);
                                if !new.is_empty() {
                                    // A schemaless table's new fields: the
                                    // target gains their columns first.
                                    info!(table = %table.name, fields = %new.join(", "), "new fields in a schemaless table");
                                    table = Arc::new(Self::widened(&table, &new));
                                    shapes.insert(table.name.clone(), table.clone());
                                    out.changes.push(Change {
                                        table: table.clone(),
                                        op: Op::Ddl(Ddl::Alter),
                                        position: at,
                                    });
                                }
                                match row_of(&table, &id, record) {
                                    Ok(row) => out.changes.push(Change {
                                        table,
                                        op: Op::Insert { row },
                                        position: at,
                                    }),
                                    Err(m) => {
                                        self.set_aside(&table, &id.to_sql(), m, "stream", at)?
                                    }
                                }
                            }
                        }
                    }
                    out.upto = Position::new(s.versionstamp, Position::WHOLE);
                    out.committed_at =
                        chrono::DateTime::from_timestamp_millis((s.versionstamp >> 16) as i64);
                    next = s.versionstamp + 1;
                }
                if next == since {
                    // A full page of one versionstamp: nothing more to read in it.
                    at_end = true;
                }
                since = next;
            }
            if at_end && out.upto.commit < safe {
                out.upto = Position::new(safe, Position::WHOLE);
                if out.changes.is_empty() {
                    out.committed_at = chrono::DateTime::from_timestamp_millis((safe >> 16) as i64);
                }
            }
            // Tables created in the source: captured from now on, copied
            // after every change read so far.
            if at_end && out.upto > after && looked.elapsed() >= CREATED_EVERY {
                looked = Instant::now();
                for t in self.created(&shapes).await? {
                    info!(table = %t.name, "table created in the source: capturing it, copying it, then following it");
                    shapes.insert(t.name.clone(), t.clone());
                    out.changes.push(Change {
                        table: t,
                        op: Op::Ddl(Ddl::Copy {
                            reason: "it was created in the source".into(),
                        }),
                        position: out.upto,
                    });
                }
            }
            let moved = out.upto > after;
            if !out.changes.is_empty()
                || !out.markers.is_empty()
                || (moved && last_sent.elapsed() >= Duration::from_secs(1))
            {
                debug!(changes = out.changes.len(), upto = %out.upto, "changefeed read");
                after = out.upto;
                last_sent = Instant::now();
                if changes.send(out).await.is_err() {
                    return Ok(());
                }
            }
            if at_end {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
    }

    async fn mark(&self, marker: &Marker) -> Result<()> {
        let text = serde_json::to_string(marker)
            .map_err(|e| Error::definite("cannot encode a marker").with_source(e))?;
        let mut vars = Variables::new();
        vars.insert("m", text);
        self.query(
            "writing a cutover marker into the source",
            format!(
                "DEFINE TABLE IF NOT EXISTS {MARKS} SCHEMALESS CHANGEFEED {}; CREATE {MARKS} CONTENT {{ marker: $m }} RETURN NONE;",
                self.retention
            ),
            vars,
        )
        .await?;
        Ok(())
    }

    async fn stream_in_use(&self) -> Result<bool> {
        let mut vars = Variables::new();
        vars.insert("holder", self.holder.clone());
        vars.insert("holds", format!("{}s", LEASE_HOLDS.as_secs()));
        let mut r = match self
            .query(
                "reading the stream's lease in the source",
                format!(
                    "RETURN (SELECT VALUE holder != $holder AND at > time::now() - <duration> $holds FROM ONLY {CAPTURE}:stream) ?? false"
                ),
                vars,
            )
            .await
        {
            Ok(r) => r,
            Err(e) if e.report().contains("does not exist") => return Ok(false),
            Err(e) => return Err(e),
        };
        let held: Option<bool> = r
            .take(0)
            .map_err(|e| surreal_error("reading the stream's lease", e))?;
        Ok(held.unwrap_or(false))
    }

    async fn cutover_problems(
        &self,
        mode: FenceMode,
        roles: Option<&[String]>,
        _tables: &[Arc<TableSchema>],
        reverse: bool,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if mode != FenceMode::None {
            out.push(
                "--fence: a SurrealDB source is cut over with --fence none: stop the application's writers into SurrealDB first \
                 (cutover then checks that nothing arrives in a quiet second)"
                    .into(),
            );
        }
        if roles.is_some_and(|r| !r.is_empty()) {
            out.push("--roles: a SurrealDB source's users are not fenced (--fence none)".into());
        }
        if reverse {
            out.push("--reverse: a SurrealDB source takes no reverse replica".into());
        }
        Ok(out)
    }

    async fn plan_fence(
        &self,
        mode: FenceMode,
        _roles: Option<&[String]>,
        _tables: &[Arc<TableSchema>],
    ) -> Result<Fence> {
        if mode != FenceMode::None {
            return Err(Error::config(
                "a SurrealDB source is cut over with --fence none",
            ));
        }
        Ok(Fence {
            mode,
            roles: Vec::new(),
            plan: serde_json::Value::Null,
            summary: vec![
                "no fence: the operator has stopped the application's writers into SurrealDB; cutover checks that nothing is written".into(),
            ],
        })
    }

    async fn apply_fence(&self, _fence: &Fence) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn end_replication(&self) -> Result<Vec<String>> {
        self.uninstall().await?;
        Ok(vec![
            "the changefeeds switchyard defined in the source are removed".into(),
        ])
    }

    async fn settled_position(&self, at: Position) -> Result<Position> {
        // Every change the pages can hold was stamped before now.
        Ok(at.max(Position::new(self.now_ms().await? << 16, Position::WHOLE)))
    }

    async fn ack(&self, _durable: Durable) -> Result<()> {
        Ok(())
    }

    async fn lag(&self, applied: Position) -> Result<SourceLag> {
        let head = self.safe_head().await?;
        let (sets, _) = Self::complete(self.page(applied.commit).await?);
        let waiting = sets
            .iter()
            .filter(|s| s.versionstamp <= head)
            .flat_map(|s| {
                (0..s.changes.len()).map(move |i| Position::new(s.versionstamp, i as u64 + 1))
            })
            .filter(|p| *p > applied)
            .count();
        Ok(SourceLag {
            head: Position::new(head, 0).show(PositionKind::Versionstamp),
            bytes: waiting as u64,
            ..Default::default()
        })
    }

    fn position_kind(&self) -> PositionKind {
        PositionKind::Versionstamp
    }

    async fn pending(
        &self,
        tables: &[Arc<TableSchema>],
        after: Position,
        upto: Position,
    ) -> Result<Pending> {
        Ok(Pending::counted(
            self.count_between(tables, after, upto).await?,
        ))
    }

    async fn capture_installed(&self) -> Result<bool> {
        Ok(self.capture().await?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_leaves_its_last_versionstamp_for_the_next() {
        let set = |vs: u64, entries: usize| ChangeSet {
            versionstamp: vs,
            changes: Vec::new(),
            entries,
        };
        let (sets, full) = SurrealSource::complete(vec![set(1, 600), set(2, 400)]);
        assert!(full);
        assert_eq!(sets.iter().map(|s| s.versionstamp).collect::<Vec<_>>(), [1]);
        let (sets, full) = SurrealSource::complete(vec![set(1, 3), set(2, 4)]);
        assert!(!full);
        assert_eq!(sets.len(), 2);
        // One versionstamp alone fills the page: it is all there is.
        let (sets, full) = SurrealSource::complete(vec![set(9, 1000)]);
        assert!(full);
        assert_eq!(sets.len(), 1);
    }

    #[test]
    fn record_links_name_their_table() {
        let (c, _) = values::column("customer", Some("option<record<customer>>"));
        assert_eq!(link_of(&c), Some("customer"));
        let (c, _) = values::column("owner", Some("record<user | team>"));
        assert_eq!(link_of(&c), None);
        let (c, link) = values::column("artist_id", Some("none | record<artist>"));
        assert_eq!(
            (link_of(&c), link.as_deref(), c.nullable),
            (Some("artist"), Some("artist"), true)
        );
    }
}

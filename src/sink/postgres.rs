//! PostgreSQL sink: the target schema generated from the source (or checked
//! against tables that exist), snapshot rows loaded with `COPY … FROM STDIN`,
//! and each batch of changes applied in one transaction together with the
//! checkpoint row in the `switchyard` schema (created from `migrations/`).
//!
//! Values travel as PostgreSQL text: COPY's text format for the snapshot,
//! `$n::text::type` parameters for changes, so every type reads its own input
//! syntax and nothing passes through a float.

use std::sync::Arc;

use async_trait::async_trait;
use futures::SinkExt;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{Durable, Sink, SinkState, TableState, TableStatus};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Change, Op, Position, Row, TableSchema, Value};
use crate::reject::{row_json, Rejected, Rejects};
use crate::schema::postgres::{cast_type, copy_field, holds, table_column_type, to_text};
use crate::source::postgres::conn::{pg_error, PgEndpoint};
use crate::source::postgres::replication::{quote_ident, quote_literal};

/// The daemon's own schema, versioned by `migrations/`.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How the target tables come to exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaMode {
    /// Generated from the source (default).
    Create,
    /// They exist; their columns are checked.
    Existing,
    /// The user's own migration files (`*.sql`, applied in name order, each
    /// once) make them; then the columns are checked as for `Existing`.
    Migrations(std::path::PathBuf),
}

pub struct PgSink {
    ep: PgEndpoint,
    mode: SchemaMode,
    /// `SET session_replication_role = replica` on the writing sessions.
    replica_role: bool,
    source_is_postgres: bool,
    /// Idle connections for loads and applies.
    pool: Mutex<Vec<tokio_postgres::Client>>,
    /// Target column types per table, as prepared.
    types: Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Where rows whose values the target refuses go (`pipeline.reject_dir`).
    rejects: Arc<Rejects>,
}

fn qualified(name: &str) -> String {
    quote_ident(name)
}

/// `COPY t (c1, …) FROM STDIN`: a table's rows as COPY text, every column.
fn copy_sql(table: &TableSchema) -> String {
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    format!(
        "COPY {} ({}) FROM STDIN",
        qualified(&table.target_name),
        cols.join(", ")
    )
}

/// `ON CONFLICT (key) DO UPDATE SET` every other column to the new row's
/// value, or `DO NOTHING` for a table of key columns only; `cols` are the
/// table's quoted column names.
fn on_conflict(table: &TableSchema, cols: &[String]) -> String {
    let keys: Vec<&str> = table.key.iter().map(|&i| cols[i].as_str()).collect();
    let rest: Vec<String> = (0..cols.len())
        .filter(|i| !table.key.contains(i))
        .map(|i| format!("{0} = EXCLUDED.{0}", cols[i]))
        .collect();
    if rest.is_empty() {
        format!("ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        format!(
            "ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            rest.join(", ")
        )
    }
}

impl PgSink {
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        let ep = PgEndpoint::parse(url, config.target.password.clone(), "target.url")?;
        let mode = match config.target.schema.as_deref().unwrap_or("create") {
            "create" => SchemaMode::Create,
            "existing" => SchemaMode::Existing,
            other => match other.strip_prefix("migrations:") {
                Some(dir) if !dir.is_empty() => SchemaMode::Migrations(dir.into()),
                _ => {
                    return Err(Error::config(format!(
                        "target.schema: {other:?} is not supported; use \"create\", \"existing\" or \"migrations:DIR\""
                    )))
                }
            },
        };
        let sink = Self {
            ep,
            mode,
            replica_role: config.target.replica_role,
            source_is_postgres: matches!(
                config.source_kind()?,
                crate::config::SourceKind::Postgres { .. }
            ),
            pool: Mutex::new(Vec::new()),
            types: Mutex::new(Default::default()),
            rejects: config.rejects.clone(),
        };
        let c = sink.take().await.map_err(|e| match e.kind() {
            crate::error::ErrorKind::Transient => Error::connect(e.to_string()),
            _ => e,
        })?;
        sink.migrate(&c).await?;
        if let SchemaMode::Migrations(dir) = &sink.mode {
            sink.user_migrations(&c, dir).await?;
        }
        sink.give(c).await;
        info!(target = %sink.ep.shown(), "connected to PostgreSQL");
        Ok(sink)
    }

    fn pg(&self, what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
        let what = what.to_string();
        move |e| pg_error(&self.ep, &what, e)
    }

    /// A connection with the session settings of a writer.
    async fn take(&self) -> Result<tokio_postgres::Client> {
        while let Some(c) = self.pool.lock().await.pop() {
            if !c.is_closed() {
                return Ok(c);
            }
        }
        let c = self.ep.connect().await?;
        c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 3")
            .await
            .map_err(self.pg("session settings"))?;
        if self.replica_role {
            c.batch_execute("SET session_replication_role = replica").await.map_err(|e| {
                Error::config(format!(
                    "target.replica_role: {} may not SET session_replication_role = replica (it needs a superuser, or on PostgreSQL 15 the role's SET privilege on it); \
                     grant it, or set target.replica_role = false (target triggers and foreign keys then fire for replicated rows)",
                    self.ep.shown()
                ))
                .with_source(e)
            })?;
        }
        Ok(c)
    }

    async fn give(&self, c: tokio_postgres::Client) {
        if !c.is_closed() {
            self.pool.lock().await.push(c);
        }
    }

    /// One `COPY … FROM STDIN` of COPY text.
    async fn copy_in(
        c: &tokio_postgres::Client,
        table: &TableSchema,
        data: String,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        let sink = c
            .copy_in::<_, bytes::Bytes>(copy_sql(table).as_str())
            .await?;
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from(data)).await?;
        sink.finish().await?;
        Ok(())
    }

    /// Which column of a refused row holds the value the target cannot
    /// take: each value cast on its own (on a connection of its own, as the
    /// batch's transaction has failed). `None` where no single cast fails.
    async fn refused_column(&self, types: &[String], row: &Row) -> Option<usize> {
        if let Some(i) = nul_column(row) {
            return Some(i);
        }
        let c = self.take().await.ok()?;
        let mut found = None;
        for (i, v) in row.iter().enumerate() {
            let Some(text) = to_text(v, &types[i]) else {
                continue;
            };
            match c
                .query_one(&format!("SELECT $1::text::{}", types[i]), &[&text])
                .await
            {
                Ok(_) => {}
                Err(e) if misfit_code(&e) => {
                    found = Some(i);
                    break;
                }
                Err(_) => break,
            }
        }
        self.give(c).await;
        found
    }

    /// A row whose value the target refuses: to the reject file where
    /// `pipeline.reject_dir` is set, else the error that stops the run,
    /// naming table, key, column and value.
    fn refuse(
        &self,
        table: &TableSchema,
        row: &Row,
        column: Option<usize>,
        e: &tokio_postgres::Error,
        phase: &'static str,
        position: Option<Position>,
    ) -> Result<()> {
        let reason = match e.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        let key = if table.whole_row {
            "(no key: the whole row)".to_string()
        } else {
            table.describe_key(&table.key_of(row))
        };
        let col_name = column.map(|i| table.columns[i].name.clone());
        let value = column.map(|i| row[i].to_string());
        if !self.rejects.enabled() {
            return Err(Error::definite(format!(
                "table {:?}, key {key}{}: the target refuses {}: {reason}; fix the value in the source, give the target column a type that holds it, \
                 or set pipeline.reject_dir to set such rows aside",
                table.name,
                col_name.as_deref().map(|c| format!(", column {c:?}")).unwrap_or_default(),
                value.as_deref().map(|v| format!("the value {v}")).unwrap_or_else(|| "the row".into()),
            )));
        }
        self.rejects.record(&Rejected {
            table: table.name.clone(),
            key,
            column: col_name,
            value,
            reason,
            phase,
            position: position.map(|p| p.to_string()).unwrap_or_default(),
            row: row_json(&table.columns, row),
        })
    }

    /// Applies `migrations/` that the target has not seen, each in its own
    /// transaction, recording versions and checksums like sqlx does.
    async fn migrate(&self, c: &tokio_postgres::Client) -> Result<()> {
        c.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS switchyard;
             CREATE TABLE IF NOT EXISTS switchyard.schema_migrations (
                 version bigint PRIMARY KEY, description text NOT NULL, checksum bytea NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(self.pg("creating switchyard.schema_migrations"))?;
        for m in MIGRATOR.iter() {
            let done = c
                .query_opt(
                    "SELECT checksum FROM switchyard.schema_migrations WHERE version = $1",
                    &[&m.version],
                )
                .await
                .map_err(self.pg("reading switchyard.schema_migrations"))?;
            match done {
                Some(row) => {
                    let sum: Vec<u8> = row.get(0);
                    if sum != m.checksum.as_ref() {
                        return Err(Error::definite(format!(
                            "switchyard's state schema migration {} ({}) in the target differs from this switchyard's; the target was set up by another version",
                            m.version, m.description
                        )));
                    }
                }
                None => {
                    let sql = format!(
                        "BEGIN;\n{}\n;\nINSERT INTO switchyard.schema_migrations (version, description, checksum) VALUES ({}, {}, '\\x{}'); COMMIT;",
                        m.sql,
                        m.version,
                        quote_literal(&m.description),
                        m.checksum.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    );
                    c.batch_execute(&sql)
                        .await
                        .map_err(self.pg(&format!("applying migration {}", m.version)))?;
                    info!(version = m.version, description = %m.description, "state schema migrated");
                }
            }
        }
        Ok(())
    }

    /// The user's migration files, each applied once in its own transaction
    /// and recorded with its checksum; a file changed after it was applied
    /// is an error.
    async fn user_migrations(
        &self,
        c: &tokio_postgres::Client,
        dir: &std::path::Path,
    ) -> Result<()> {
        use sha2::{Digest, Sha256};
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| {
                Error::config(format!(
                    "target.schema: cannot read the migrations directory {}",
                    dir.display()
                ))
                .with_source(e)
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("sql"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::config(format!(
                "target.schema: no .sql files in {}",
                dir.display()
            )));
        }
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS switchyard.user_migrations (
                 name text PRIMARY KEY, checksum bytea NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(self.pg("creating switchyard.user_migrations"))?;
        for f in files {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let sql = std::fs::read_to_string(&f).map_err(|e| {
                Error::config(format!("target.schema: cannot read {}", f.display())).with_source(e)
            })?;
            let sum = Sha256::digest(sql.as_bytes()).to_vec();
            let done = c
                .query_opt(
                    "SELECT checksum FROM switchyard.user_migrations WHERE name = $1",
                    &[&name],
                )
                .await
                .map_err(self.pg("reading switchyard.user_migrations"))?;
            match done {
                Some(r) if r.get::<_, Vec<u8>>(0) == sum => continue,
                Some(_) => {
                    return Err(Error::definite(format!(
                        "migration {name} changed after it was applied to the target; restore it and add a new migration file instead"
                    )))
                }
                None => {}
            }
            let mut c2 = self.ep.connect().await?;
            let tx = c2
                .transaction()
                .await
                .map_err(self.pg("beginning a migration"))?;
            tx.batch_execute(&sql)
                .await
                .map_err(|e| pg_error(&self.ep, &format!("applying migration {name}"), e))?;
            tx.execute(
                "INSERT INTO switchyard.user_migrations (name, checksum) VALUES ($1, $2)",
                &[&name, &sum],
            )
            .await
            .map_err(self.pg("recording a migration"))?;
            tx.commit()
                .await
                .map_err(self.pg(&format!("committing migration {name}")))?;
            info!(migration = %name, "target migration applied");
        }
        Ok(())
    }

    async fn column_types(&self, table: &TableSchema) -> Vec<String> {
        if let Some(t) = self.types.lock().await.get(&table.target_name) {
            if t.len() == table.columns.len() {
                return t.clone();
            }
        }
        (0..table.columns.len())
            .map(|i| table_column_type(table, i, self.source_is_postgres))
            .collect()
    }
}

/// The primary key of a table switchyard creates, built after its load.
pub fn primary_key_ddl(table: &TableSchema) -> String {
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|&i| quote_ident(&table.columns[i].name))
        .collect();
    format!(
        "ALTER TABLE {} ADD PRIMARY KEY ({})",
        qualified(&table.target_name),
        keys.join(", ")
    )
}

/// The statements that build the source's secondary indexes and foreign keys
/// on the target tables, in order (indexes first), each with the name it
/// creates; a foreign key to a table that is not replicated is skipped.
pub fn secondary_ddl(
    tables: &[Arc<TableSchema>],
) -> Vec<std::result::Result<(String, String), String>> {
    use crate::model::Secondary;
    let target_of = |source: &str| {
        tables
            .iter()
            .find(|t| t.name == source)
            .map(|t| t.target_name.clone())
    };
    let mut indexes = Vec::new();
    let mut fks = Vec::new();
    for t in tables {
        for s in &t.secondary {
            match s {
                Secondary::Index { name, unique, using } => indexes.push(Ok((
                    name.clone(),
                    format!(
                        "CREATE {}INDEX IF NOT EXISTS {} ON {} {using}",
                        if *unique { "UNIQUE " } else { "" },
                        quote_ident(name),
                        qualified(&t.target_name)
                    ),
                ))),
                Secondary::ForeignKey { name, columns, references, ref_columns, actions } => match target_of(references) {
                    Some(target) => {
                        let q = |v: &[String]| v.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
                        fks.push(Ok((
                            name.clone(),
                            format!(
                                "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) {actions}",
                                qualified(&t.target_name),
                                quote_ident(name),
                                q(columns),
                                qualified(&target),
                                q(ref_columns)
                            ),
                        )))
                    }
                    None => fks.push(Err(format!(
                        "table {:?}: foreign key {name:?} references {references:?}, which is not replicated; it is not built in the target",
                        t.name
                    ))),
                },
            }
        }
    }
    indexes.extend(fks);
    indexes
}

/// `"a" = $1::text::integer AND …` over `cols`, parameters from `first`.
fn matches(
    table: &TableSchema,
    cols: &[usize],
    types: &[String],
    first: usize,
    whole: bool,
) -> String {
    cols.iter()
        .enumerate()
        .map(|(n, &i)| {
            let c = quote_ident(&table.columns[i].name);
            let t = cast_type(&types[i]);
            if whole {
                format!(
                    "{c}::text IS NOT DISTINCT FROM (${}::text::{t})::text",
                    first + n
                )
            } else {
                format!("{c} = ${}::text::{t}", first + n)
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The full new row of a change that is a plain upsert (an insert, or an
/// update that keeps the key and carries every column) of a keyed table.
fn upsert_row(ch: &Change) -> Option<&Row> {
    if ch.table.whole_row {
        return None;
    }
    match &ch.op {
        Op::Insert { row } | Op::Update { old_key: None, row }
            if !row.iter().any(Value::is_unchanged) =>
        {
            Some(row)
        }
        _ => None,
    }
}

/// Query parameters as tokio-postgres takes them.
fn sql_params<T: tokio_postgres::types::ToSql + Sync>(
    values: &[T],
) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// `unnest($1::text[], …, $n::text[]) AS u(c0, …)`: rows given as one text
/// array per column, read back as `u.c0` … `u.c{n-1}`.
fn unnest_columns(n: usize) -> String {
    format!(
        "unnest({}) AS u({})",
        (1..=n)
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", "),
        (0..n)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One `INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE` for a run of
/// upserts of one table; of several changes to one key, the last wins (as
/// applying them in order would leave it).
fn grouped_upsert(
    table: &TableSchema,
    types: &[String],
    run: &[&Change],
) -> (String, Vec<Vec<Option<String>>>) {
    let n = table.columns.len();
    let mut last: std::collections::HashMap<Vec<Option<String>>, usize> =
        std::collections::HashMap::new();
    let rows: Vec<Vec<Option<String>>> = run
        .iter()
        .filter_map(|c| upsert_row(c))
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(i, v)| to_text(v, &types[i]))
                .collect()
        })
        .collect();
    for (at, r) in rows.iter().enumerate() {
        let key: Vec<Option<String>> = table.key.iter().map(|&k| r[k].clone()).collect();
        last.insert(key, at);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(keep.len()); n];
    for at in keep {
        for (i, v) in rows[at].iter().enumerate() {
            columns[i].push(v.clone());
        }
    }
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} {}",
        qualified(&table.target_name),
        cols.join(", "),
        (0..n)
            .map(|i| format!("u.c{i}::{}", cast_type(&types[i])))
            .collect::<Vec<_>>()
            .join(", "),
        unnest_columns(n),
        on_conflict(table, &cols)
    );
    (sql, columns)
}

/// A statement of a change: SQL, text parameters, and whether it must touch
/// a row (else the target is out of step with the source).
struct Statement {
    sql: String,
    params: Vec<Option<String>>,
    must_touch: bool,
}

/// One change as statements with text parameters.
fn statements(table: &TableSchema, types: &[String], op: &Op) -> Vec<Statement> {
    let name = qualified(&table.target_name);
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let text = |row: &[Value], idx: &[usize]| -> Vec<Option<String>> {
        idx.iter().map(|&i| to_text(&row[i], &types[i])).collect()
    };
    let all: Vec<usize> = (0..table.columns.len()).collect();
    let value = |n: usize, i: usize| format!("${n}::text::{}", cast_type(&types[i]));
    let insert = |row: &Row| -> Statement {
        let values: Vec<String> = all.iter().map(|&i| value(i + 1, i)).collect();
        let mut sql = format!(
            "INSERT INTO {name} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
            cols.join(", "),
            values.join(", ")
        );
        if !table.whole_row {
            sql.push(' ');
            sql.push_str(&on_conflict(table, &cols));
        }
        Statement {
            sql,
            params: text(row, &all),
            must_touch: false,
        }
    };
    let delete = |key: &[Value]| -> Statement {
        let params: Vec<Option<String>> = table
            .key
            .iter()
            .zip(key)
            .map(|(&i, v)| to_text(v, &types[i]))
            .collect();
        if table.whole_row {
            Statement {
                sql: format!(
                    "DELETE FROM {name} WHERE ctid = (SELECT ctid FROM {name} WHERE {} LIMIT 1)",
                    matches(table, &table.key, types, 1, true)
                ),
                params,
                must_touch: true,
            }
        } else {
            Statement {
                sql: format!(
                    "DELETE FROM {name} WHERE {}",
                    matches(table, &table.key, types, 1, false)
                ),
                params,
                must_touch: false,
            }
        }
    };
    match op {
        Op::Insert { row } => vec![insert(row)],
        Op::Update { old_key, row } if row.iter().any(Value::is_unchanged) && !table.whole_row => {
            // Unchanged (TOAST) columns keep their value: UPDATE the others
            // (the key columns only when the key changed).
            let changed: Vec<usize> = all
                .iter()
                .copied()
                .filter(|&i| {
                    !row[i].is_unchanged() && (old_key.is_some() || !table.key.contains(&i))
                })
                .collect();
            let sets: Vec<String> = changed
                .iter()
                .enumerate()
                .map(|(n, &i)| format!("{} = {}", cols[i], value(n + 1, i)))
                .collect();
            let key_vals = old_key.clone().unwrap_or_else(|| table.key_of(row));
            let mut params = text(row, &changed);
            params.extend(
                table
                    .key
                    .iter()
                    .zip(&key_vals)
                    .map(|(&i, v)| to_text(v, &types[i])),
            );
            if sets.is_empty() {
                return Vec::new();
            }
            vec![Statement {
                sql: format!(
                    "UPDATE {name} SET {} WHERE {}",
                    sets.join(", "),
                    matches(table, &table.key, types, changed.len() + 1, false)
                ),
                params,
                must_touch: true,
            }]
        }
        Op::Update { old_key: None, .. } if table.whole_row => Vec::new(),
        Op::Update { old_key: None, row } => vec![insert(row)],
        Op::Update {
            old_key: Some(old),
            row,
        } if table.whole_row => vec![delete(old), insert(row)],
        Op::Update {
            old_key: Some(old),
            row,
        } => {
            // The key changed: the row is updated in place (its foreign keys
            // and identity stay), or inserted if the target lacks it.
            let n = all.len();
            let sets: Vec<String> = all
                .iter()
                .map(|&i| format!("{} = {}", cols[i], value(i + 1, i)))
                .collect();
            let values: Vec<String> = all.iter().map(|&i| value(i + 1, i)).collect();
            let mut params = text(row, &all);
            params.extend(
                table
                    .key
                    .iter()
                    .zip(old)
                    .map(|(&i, v)| to_text(v, &types[i])),
            );
            vec![Statement {
                sql: format!(
                    "WITH moved AS (UPDATE {name} SET {} WHERE {} RETURNING 1) \
                     INSERT INTO {name} ({}) OVERRIDING SYSTEM VALUE SELECT {} WHERE NOT EXISTS (SELECT 1 FROM moved) {}",
                    sets.join(", "),
                    matches(table, &table.key, types, n + 1, false),
                    cols.join(", "),
                    values.join(", "),
                    on_conflict(table, &cols)
                ),
                params,
                must_touch: false,
            }]
        }
        Op::Delete { key } => vec![delete(key)],
        Op::Truncate => vec![Statement {
            sql: format!("TRUNCATE {name}"),
            params: Vec::new(),
            must_touch: false,
        }],
    }
}

#[async_trait]
impl Sink for PgSink {
    async fn prepare(&self, tables: &[Arc<TableSchema>]) -> Result<()> {
        let c = self.take().await?;
        for t in tables {
            let name = qualified(&t.target_name);
            let want: Vec<String> = (0..t.columns.len())
                .map(|i| table_column_type(t, i, self.source_is_postgres))
                .collect();
            if self.mode == SchemaMode::Create {
                // The source's enum types, created once.
                for (name, labels) in &t.enum_types {
                    let labels: Vec<String> = labels.iter().map(|l| quote_literal(l)).collect();
                    c.batch_execute(&format!(
                        "DO $$ BEGIN CREATE TYPE {name} AS ENUM ({}); EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                        labels.join(", ")
                    ))
                    .await
                    .map_err(self.pg(&format!("creating enum type {name}")))?;
                }
            }
            let have = c
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    &[&name],
                )
                .await
                .map_err(self.pg("reading the target table"))?;
            let have: std::collections::HashMap<String, String> =
                have.iter().map(|r| (r.get(0), r.get(1))).collect();
            let checked = self.mode != SchemaMode::Create;
            let mut types = Vec::new();
            if have.is_empty() {
                if checked {
                    return Err(Error::definite(format!(
                        "table {} does not exist in the target (target.schema = {:?}); create it, or use target.schema = \"create\"",
                        t.target_name,
                        if self.mode == SchemaMode::Existing { "existing".to_string() } else { "migrations:…".to_string() }
                    )));
                }
                let defs: Vec<String> = t
                    .columns
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .map(|(i, (col, ty))| {
                        let not_null = if col.nullable || t.whole_row {
                            ""
                        } else {
                            " NOT NULL"
                        };
                        let fills = match t.column_defaults.iter().find(|d| d.column == i) {
                            // Replicated rows carry their values (OVERRIDING
                            // SYSTEM VALUE); after the load the identity
                            // continues past the highest.
                            Some(d)
                                if d.identity
                                    && matches!(ty.as_str(), "smallint" | "integer" | "bigint") =>
                            {
                                " GENERATED BY DEFAULT AS IDENTITY".to_string()
                            }
                            Some(crate::model::ColumnDefault {
                                default: Some(e), ..
                            }) => format!(" DEFAULT {e}"),
                            _ => String::new(),
                        };
                        format!("{} {ty}{fills}{not_null}", quote_ident(&col.name))
                    })
                    .collect();
                // The primary key is built once the rows are in (finish_table),
                // as pg_dump restores: a bulk load without an index to keep
                // up is faster, and one sort builds the index.
                c.batch_execute(&format!("CREATE TABLE {name} ({})", defs.join(", ")))
                    .await
                    .map_err(self.pg(&format!("creating table {}", t.target_name)))?;
                info!(table = %t.target_name, "target table created");
                types = want;
            } else {
                let mut problems = Vec::new();
                for (col, ty) in t.columns.iter().zip(&want) {
                    match have.get(&col.name) {
                        Some(h) if !holds(ty, h) => {
                            problems.push(format!("column {:?} is {h} in the target, which does not hold {} values ({ty})", col.name, col.source_type));
                            types.push(h.clone());
                        }
                        Some(h) => types.push(h.clone()),
                        None if self.mode == SchemaMode::Create => {
                            // A column the source gained: added here too.
                            c.batch_execute(&format!(
                                "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {} {ty}",
                                quote_ident(&col.name)
                            ))
                            .await
                            .map_err(self.pg(&format!(
                                "adding column {:?} to {}",
                                col.name, t.target_name
                            )))?;
                            types.push(ty.clone());
                        }
                        None => problems.push(format!("column {:?} ({}) is missing", col.name, ty)),
                    }
                }
                if checked {
                    // A target column the source does not fill, NOT NULL and
                    // without a default, fails every insert.
                    let strict = c
                        .query(
                            "SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''",
                            &[&name],
                        )
                        .await
                        .map_err(self.pg("reading the target table"))?;
                    for r in strict {
                        let col: String = r.get(0);
                        if !t.columns.iter().any(|c| c.name == col) {
                            problems.push(format!("column {col:?} is NOT NULL without a default and the source has no such column"));
                        }
                    }
                }
                if !problems.is_empty() {
                    return Err(Error::definite(format!(
                        "target table {} does not fit the source: {}; add the columns (or let switchyard create the table)",
                        t.target_name,
                        problems.join("; ")
                    )));
                }
            }
            self.types.lock().await.insert(t.target_name.clone(), types);
        }
        self.give(c).await;
        Ok(())
    }

    async fn state(&self) -> Result<SinkState> {
        let c = self.take().await?;
        let mut state = SinkState::default();
        if let Some(r) = c
            .query_opt(
                "SELECT commit, ordinal, origin, to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM switchyard.checkpoint WHERE id = 1",
                &[],
            )
            .await
            .map_err(self.pg("reading the checkpoint"))?
        {
            state.checkpoint = Some(Position::new(r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64));
            state.origin = r.get(2);
            state.checkpoint_updated_at = r.get(3);
        }
        for r in c
            .query(
                "SELECT name, status, commit, ordinal, rows, source_id FROM switchyard.table_state",
                &[],
            )
            .await
            .map_err(self.pg("reading table states"))?
        {
            state.tables.insert(
                r.get(0),
                TableState {
                    status: if r.get::<_, String>(1) == "done" {
                        TableStatus::Done
                    } else {
                        TableStatus::Copying
                    },
                    position: Position::new(r.get::<_, i64>(2) as u64, r.get::<_, i64>(3) as u64),
                    rows: r.get::<_, i64>(4) as u64,
                    source_id: r.get(5),
                },
            );
        }
        self.give(c).await;
        Ok(state)
    }

    async fn start(&self, position: Position, origin: &str) -> Result<()> {
        let c = self.take().await?;
        c.execute(
            "INSERT INTO switchyard.checkpoint (id, commit, ordinal, origin) VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET commit = $1, ordinal = $2, origin = $3, updated_at = now()",
            &[&(position.commit as i64), &(position.ordinal as i64), &origin],
        )
        .await
        .map_err(self.pg("recording the start position"))?;
        self.give(c).await;
        Ok(())
    }

    async fn forget_table(&self, name: &str) -> Result<()> {
        let c = self.take().await?;
        c.execute(
            "DELETE FROM switchyard.table_state WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(self.pg("forgetting a table's copy state"))?;
        self.give(c).await;
        Ok(())
    }

    async fn begin_table(&self, table: &TableSchema) -> Result<()> {
        let mut c = self.take().await?;
        let tx = c.transaction().await.map_err(self.pg("beginning"))?;
        tx.batch_execute(&format!("TRUNCATE {}", qualified(&table.target_name)))
            .await
            .map_err(self.pg(&format!("emptying {}", table.target_name)))?;
        tx.execute(
            "INSERT INTO switchyard.table_state (name, status) VALUES ($1, 'copying')
             ON CONFLICT (name) DO UPDATE SET status = 'copying', commit = 0, ordinal = 0, rows = 0, updated_at = now()",
            &[&table.name],
        )
        .await
        .map_err(self.pg("recording the copy state"))?;
        tx.commit().await.map_err(self.pg("committing"))?;
        self.give(c).await;
        Ok(())
    }

    async fn load(&self, table: &TableSchema, rows: &[Row]) -> Result<u64> {
        let types = self.column_types(table).await;
        // Rows still to load: a value the target refuses takes its row out
        // (to the reject file) and the rest are loaded again.
        let mut pending: Vec<&Row> = rows.iter().collect();
        loop {
            let mut data = String::with_capacity(pending.len() * 64);
            for row in &pending {
                for (i, v) in row.iter().enumerate() {
                    if i > 0 {
                        data.push('\t');
                    }
                    copy_field(&mut data, to_text(v, &types[i]).as_deref());
                }
                data.push('\n');
            }
            let what = format!("loading {} rows into {}", pending.len(), table.target_name);
            let c = self.take().await?;
            let e = match Self::copy_in(&c, table, data).await {
                Ok(()) => {
                    self.give(c).await;
                    return Ok(pending.len() as u64);
                }
                Err(e) => e,
            };
            // After a refused COPY the session is ready for the next one.
            self.give(c).await;
            let line = misfit_code(&e)
                .then(|| copy_line(&e, table))
                .flatten()
                .filter(|l| (1..=pending.len()).contains(l));
            let Some(line) = line else {
                return Err(row_error(&self.ep, table, &what, e));
            };
            let row = pending.remove(line - 1);
            let column = copy_column(&e, table).or_else(|| nul_column(row));
            self.refuse(table, row, column, &e, "snapshot", None)?;
        }
    }

    async fn finish_table(&self, table: &TableSchema, position: Position, rows: u64) -> Result<()> {
        let mut c = self.take().await?;
        let tx = c.transaction().await.map_err(self.pg("beginning"))?;
        if self.mode == SchemaMode::Create && !table.whole_row {
            // The primary key of a table created without one, in the same
            // transaction as its "copied" mark: streaming never meets a
            // copied table without its key.
            let name = qualified(&table.target_name);
            let has_key = tx
                .query_opt(
                    "SELECT 1 FROM pg_index WHERE indrelid = to_regclass($1) AND indisprimary",
                    &[&name],
                )
                .await
                .map_err(self.pg("reading the target's primary key"))?
                .is_some();
            if !has_key {
                tx.batch_execute(&primary_key_ddl(table))
                    .await
                    .map_err(|e| {
                        use tokio_postgres::error::SqlState;
                        let advice = match e.code() {
                            Some(c) if *c == SqlState::UNIQUE_VIOLATION => Some(
                                "the copy holds a key twice: tables.keys names columns that are not unique in the source, \
                                 or two source keys became equal as target values (SQLite texts of one date-time, say), \
                                 or a load was retried after a lost reply (start again: the table is copied anew)",
                            ),
                            Some(c) if *c == SqlState::NOT_NULL_VIOLATION => Some(
                                "a key column holds NULL in the source: name key columns without NULLs in tables.keys",
                            ),
                            _ => None,
                        };
                        let e = pg_error(&self.ep, &format!("building the primary key of {}", table.target_name), e);
                        match advice {
                            Some(a) => e.context(format!("table {:?}: {a}", table.name)),
                            None => e,
                        }
                    })?;
                info!(table = %table.target_name, "primary key built after the load");
            }
        }
        tx.execute(
            "UPDATE switchyard.table_state SET status = 'done', commit = $2, ordinal = $3, rows = $4, source_id = $5, updated_at = now() WHERE name = $1",
            &[&table.name, &(position.commit as i64), &(position.ordinal as i64), &(rows as i64), &table.source_id],
        )
        .await
        .map_err(self.pg("marking the table as copied"))?;
        tx.commit().await.map_err(self.pg("committing"))?;
        self.give(c).await;
        Ok(())
    }

    async fn after_snapshot(&self, tables: &[Arc<TableSchema>]) -> Result<()> {
        if self.mode != SchemaMode::Create {
            return Ok(());
        }
        let c = self.take().await?;
        // Identity columns continue past the highest value copied.
        for t in tables {
            for d in t.column_defaults.iter().filter(|d| d.identity) {
                let col = &t.columns[d.column].name;
                c.execute(
                    &format!(
                        "SELECT setval(s, GREATEST((SELECT max({}) FROM {}), 1)) FROM pg_get_serial_sequence($1, $2) AS s WHERE s IS NOT NULL",
                        quote_ident(col),
                        qualified(&t.target_name)
                    ),
                    &[&qualified(&t.target_name), col],
                )
                .await
                .map_err(self.pg(&format!("moving the identity of {}.{col}", t.target_name)))?;
            }
        }
        for ddl in secondary_ddl(tables) {
            match ddl {
                Ok((name, sql)) => {
                    let exists = c
                        .query_opt("SELECT 1 FROM pg_class WHERE relname = $1 UNION ALL SELECT 1 FROM pg_constraint WHERE conname = $1", &[&name])
                        .await
                        .map_err(self.pg("reading the target catalog"))?;
                    if exists.is_none() {
                        c.batch_execute(&sql)
                            .await
                            .map_err(self.pg(&format!("building {name}")))?;
                        info!(name = %name, "built after the load");
                    }
                }
                Err(why) => warn!("{why}"),
            }
        }
        self.give(c).await;
        Ok(())
    }

    async fn takes_copy_text(&self, table: &TableSchema) -> bool {
        if !self.source_is_postgres {
            return false;
        }
        let types = self.column_types(table).await;
        table
            .columns
            .iter()
            .zip(&types)
            .all(|(c, t)| &c.source_type == t)
    }

    async fn load_copy_text(
        &self,
        table: &TableSchema,
        mut chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> Result<u64> {
        let c = self.take().await?;
        let what = format!("loading {} as COPY text", table.target_name);
        let sink = c
            .copy_in::<_, bytes::Bytes>(copy_sql(table).as_str())
            .await
            .map_err(self.pg(&what))?;
        futures::pin_mut!(sink);
        let mut rows = 0u64;
        while let Some(chunk) = chunks.recv().await {
            // COPY text escapes newlines inside values: each one ends a row.
            rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            sink.send(chunk)
                .await
                .map_err(|e| row_error(&self.ep, table, &what, e))?;
        }
        sink.finish()
            .await
            .map_err(|e| row_error(&self.ep, table, &what, e))?;
        self.give(c).await;
        Ok(rows)
    }

    /// Rendered by the target itself: the rows' values, cast to the target's
    /// column types, as `ROW(…)::text` (how `SELECT t::text` shows a stored
    /// row), and the key likewise; one query per batch.
    async fn expected_records(
        &self,
        table: &TableSchema,
        rows: &[Row],
    ) -> Result<Vec<crate::verify::Record>> {
        let types = self.column_types(table).await;
        let c = self.take().await?;
        let what = format!("rendering rows of {} for verify", table.target_name);
        let out = match render(&c, table, &types, rows).await {
            Ok(out) => out,
            // Rows the run sets aside are not expected in the target.
            Err(e) if misfit_code(&e) && self.rejects.enabled() => {
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    match render(&c, table, &types, std::slice::from_ref(row)).await {
                        Ok(r) => out.extend(r),
                        Err(e) if misfit_code(&e) => {
                            self.refuse(table, row, nul_column(row), &e, "verify", None)?
                        }
                        Err(e) => return Err(pg_error(&self.ep, &what, e)),
                    }
                }
                out
            }
            Err(e) => return Err(pg_error(&self.ep, &what, e)),
        };
        self.give(c).await;
        Ok(out)
    }

    /// Pages in key order (tables without a key: in `ctid` order).
    async fn records(
        &self,
        table: &TableSchema,
        after: Option<&crate::verify::Cursor>,
        limit: usize,
    ) -> Result<crate::verify::Page> {
        let types = self.column_types(table).await;
        let name = qualified(&table.target_name);
        let cols: Vec<String> = table
            .columns
            .iter()
            .map(|c| format!("zz_row.{}", quote_ident(&c.name)))
            .collect();
        let key_idx: Vec<usize> = if table.whole_row {
            (0..cols.len()).collect()
        } else {
            table.key.clone()
        };
        let key_expr = format!(
            "ROW({})::text",
            key_idx
                .iter()
                .map(|&i| cols[i].clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let last: Option<&Vec<Option<String>>> =
            after.and_then(|c| c.0.downcast_ref::<Vec<Option<String>>>());
        let (order, filter, params): (String, String, Vec<Option<String>>) = if table.whole_row {
            let f = if last.is_some() {
                "WHERE zz_row.ctid > $1::text::tid".to_string()
            } else {
                String::new()
            };
            ("zz_row.ctid".into(), f, last.cloned().unwrap_or_default())
        } else {
            let keys: Vec<String> = table.key.iter().map(|&i| cols[i].clone()).collect();
            let f = match last {
                Some(_) => format!(
                    "WHERE ({}) > ({})",
                    keys.join(", "),
                    table
                        .key
                        .iter()
                        .enumerate()
                        .map(|(n, &i)| format!("${}::text::{}", n + 1, cast_type(&types[i])))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => String::new(),
            };
            (keys.join(", "), f, last.cloned().unwrap_or_default())
        };
        let cursor_cols = if table.whole_row {
            "zz_row.ctid::text".to_string()
        } else {
            table
                .key
                .iter()
                .map(|&i| format!("{}::text", cols[i]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = format!(
            "SELECT {key_expr}, ROW({})::text, {cursor_cols} FROM {name} zz_row {filter} ORDER BY {order} LIMIT {limit}",
            cols.join(", ")
        );
        let refs = sql_params(&params);
        let c = self.take().await?;
        let rows = c
            .query(sql.as_str(), &refs)
            .await
            .map_err(self.pg(&format!("reading {} for verify", table.target_name)))?;
        self.give(c).await;
        let mut page = crate::verify::Page {
            records: Vec::with_capacity(rows.len()),
            stored: rows.len(),
            next: None,
        };
        for r in &rows {
            page.records.push((r.get(0), r.get(1)));
        }
        if let Some(r) = rows.last() {
            let n = if table.whole_row { 1 } else { table.key.len() };
            let cursor: Vec<Option<String>> =
                (0..n).map(|i| r.get::<_, Option<String>>(2 + i)).collect();
            page.next = Some(crate::verify::Cursor(Box::new(cursor)));
        }
        Ok(page)
    }

    async fn apply(&self, changes: &[Change], checkpoint: Position) -> Result<Durable> {
        match self.apply_batch(changes, checkpoint, false).await {
            Ok(()) => Ok(Durable::committed(checkpoint)),
            // A value the target refuses: once more change by change, to
            // name the change (and set it aside where that is configured).
            Err(f) if f.misfit => {
                info!(error = %f.error.report(), "the batch failed on a value or a unique index; applying it change by change");
                match self.apply_batch(changes, checkpoint, true).await {
                    Ok(()) => Ok(Durable::committed(checkpoint)),
                    Err(f) => {
                        warn!(error = %f.error.report(), "applying a batch to PostgreSQL failed");
                        Err(f.error)
                    }
                }
            }
            Err(f) => {
                warn!(error = %f.error.report(), "applying a batch to PostgreSQL failed");
                Err(f.error)
            }
        }
    }
}

/// Why a batch failed, and whether a value did not fit a column's type.
struct Failure {
    error: Error,
    misfit: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self {
            error,
            misfit: false,
        }
    }
}

impl PgSink {
    /// One transaction: the changes in order, then the checkpoint. `careful`:
    /// one statement per change, and where `pipeline.reject_dir` is set each
    /// change under a savepoint, so that a change whose value the target
    /// refuses is rolled back, written to the reject file and its row's
    /// old version deleted, and the rest commits.
    async fn apply_batch(
        &self,
        changes: &[Change],
        checkpoint: Position,
        careful: bool,
    ) -> std::result::Result<(), Failure> {
        // A refused value, or a unique index meeting a grouped statement's
        // order (the last change of each key, in the order of those last
        // changes): the batch goes again change by change, in source order.
        let failed = |table: &TableSchema, what: &str, e: tokio_postgres::Error| Failure {
            misfit: misfit_code(&e)
                || (!careful
                    && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)),
            error: row_error(&self.ep, table, what, e),
        };
        let set_aside = careful && self.rejects.enabled();
        let mut c = self.take().await?;
        let tx = c.transaction().await.map_err(self.pg("beginning"))?;
        let cp = tx
            .query_opt(
                "SELECT commit, ordinal FROM switchyard.checkpoint WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(self.pg("reading the checkpoint"))?
            .map(|r| Position::new(r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64));
        if cp.is_some_and(|cp| cp > checkpoint) {
            return Err(Error::definite(format!(
                "refusing to move the checkpoint backwards from {} to {checkpoint}",
                cp.expect("checked")
            ))
            .into());
        }
        if cp == Some(checkpoint) && !changes.is_empty() {
            // Committed before a lost reply: not applied again.
            info!(checkpoint = %checkpoint, "the batch was committed before the connection was lost; not applying it again");
            drop(tx);
            self.give(c).await;
            return Ok(());
        }
        // Target types per table and column count: a batch may hold a
        // table's changes from before and after a column was added.
        let mut types_of: std::collections::HashMap<(String, usize), Vec<String>> =
            std::collections::HashMap::new();
        let mut i = 0;
        while i < changes.len() {
            let ch = &changes[i];
            let t = &ch.table;
            if !careful && upsert_row(ch).is_some() {
                // A run of whole-row upserts: one statement per table. With
                // the replica role no trigger or foreign key fires on this
                // session, so upserts of different tables commute and a run
                // spans tables (each table's changes keep their order);
                // without it a run stays within one table.
                let mut j = i + 1;
                while j < changes.len()
                    && j - i < 5_000
                    && (self.replica_role || changes[j].table.name == t.name)
                    && upsert_row(&changes[j]).is_some()
                {
                    j += 1;
                }
                if j - i > 1 {
                    let mut runs: Vec<Vec<&Change>> = Vec::new();
                    for c in &changes[i..j] {
                        match runs.iter_mut().find(|r| {
                            r[0].table.name == c.table.name
                                && r[0].table.columns.len() == c.table.columns.len()
                        }) {
                            Some(r) => r.push(c),
                            None => runs.push(vec![c]),
                        }
                    }
                    for run in runs {
                        let rt = &run[0].table;
                        let at = (rt.target_name.clone(), rt.columns.len());
                        if !types_of.contains_key(&at) {
                            types_of.insert(at.clone(), self.column_types(rt).await);
                        }
                        let (sql, params) = grouped_upsert(rt, &types_of[&at], &run);
                        let refs = sql_params(&params);
                        tx.execute(sql.as_str(), &refs).await.map_err(|e| {
                            let what = format!(
                                "applying {} upserts of table {:?} (keys {} … {})",
                                run.len(),
                                rt.name,
                                rt.describe_key(&run[0].key()),
                                rt.describe_key(&run[run.len() - 1].key())
                            );
                            failed(rt, &what, e)
                        })?;
                    }
                    i = j;
                    continue;
                }
            }
            if matches!(ch.op, Op::Truncate) {
                // One TRUNCATE of a source transaction's tables together,
                // as the source ran it (foreign keys between them).
                let mut names = vec![qualified(&t.target_name)];
                while i + 1 < changes.len()
                    && matches!(changes[i + 1].op, Op::Truncate)
                    && changes[i + 1].position.commit == ch.position.commit
                {
                    i += 1;
                    names.push(qualified(&changes[i].table.target_name));
                }
                tx.batch_execute(&format!("TRUNCATE {}", names.join(", ")))
                    .await
                    .map_err(|e| failed(t, "applying a truncate", e))?;
                i += 1;
                continue;
            }
            let at = (t.target_name.clone(), t.columns.len());
            if !types_of.contains_key(&at) {
                types_of.insert(at.clone(), self.column_types(t).await);
            }
            let types = &types_of[&at];
            if set_aside {
                tx.batch_execute("SAVEPOINT switchyard_change")
                    .await
                    .map_err(self.pg("setting a savepoint"))?;
            }
            for st in statements(t, types, &ch.op) {
                let refs = sql_params(&st.params);
                let n = match tx.execute(st.sql.as_str(), &refs).await {
                    Ok(n) => n,
                    Err(e) if set_aside && misfit_code(&e) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT switchyard_change")
                            .await
                            .map_err(self.pg("rolling back to the savepoint"))?;
                        self.set_aside_change(&tx, ch, types, &e).await?;
                        break;
                    }
                    Err(e) if careful && misfit_code(&e) => {
                        // Without reject_dir: the change, its column where
                        // known, and what to do.
                        let refused = match &ch.op {
                            Op::Insert { row } | Op::Update { row, .. } => {
                                let column = self.refused_column(types, row).await;
                                self.refuse(t, row, column, &e, "stream", Some(ch.position))
                                    .err()
                            }
                            _ => None,
                        };
                        return Err(match refused {
                            Some(error) => Failure {
                                error,
                                misfit: true,
                            },
                            None => {
                                let what = format!(
                                    "applying a {} of table {:?}, key {}",
                                    ch.kind(),
                                    t.name,
                                    t.describe_key(&ch.key())
                                );
                                failed(t, &what, e)
                            }
                        });
                    }
                    Err(e) => {
                        let what = format!(
                            "applying a {} of table {:?}, key {}",
                            ch.kind(),
                            t.name,
                            t.describe_key(&ch.key())
                        );
                        return Err(failed(t, &what, e));
                    }
                };
                if st.must_touch && n == 0 {
                    return Err(Error::definite(format!(
                        "table {:?}: the target has no row for the {} of {}; the target's copy is out of step: copy the table again (run once with it in tables.exclude, then without)",
                        t.name,
                        ch.kind(),
                        t.describe_key(&ch.key())
                    ))
                    .into());
                }
            }
            if set_aside {
                tx.batch_execute("RELEASE SAVEPOINT switchyard_change")
                    .await
                    .map_err(self.pg("releasing a savepoint"))?;
            }
            i += 1;
        }
        tx.execute(
            "INSERT INTO switchyard.checkpoint (id, commit, ordinal) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET commit = $1, ordinal = $2, updated_at = now()",
            &[&(checkpoint.commit as i64), &(checkpoint.ordinal as i64)],
        )
        .await
        .map_err(self.pg("moving the checkpoint"))?;
        tx.commit().await.map_err(self.pg("committing the batch"))?;
        self.give(c).await;
        Ok(())
    }

    /// A change whose new values the target refuses: written to the reject
    /// file (synced before the batch commits), and the row's old version
    /// deleted, so that the target holds no version of a rejected row.
    async fn set_aside_change(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ch: &Change,
        types: &[String],
        e: &tokio_postgres::Error,
    ) -> Result<()> {
        let t = &ch.table;
        let (row, old_key) = match &ch.op {
            Op::Insert { row } => (row, None),
            Op::Update { old_key, row } => (row, old_key.clone()),
            // A key the target cannot hold: no such row is there to delete.
            _ => {
                info!(table = %t.name, key = %t.describe_key(&ch.key()), "a delete of a key the target cannot hold: nothing to delete");
                return Ok(());
            }
        };
        let column = self.refused_column(types, row).await;
        self.refuse(t, row, column, e, "stream", Some(ch.position))?;
        // Counted rows (no key): an insert leaves nothing behind; an update
        // removes one copy of the old row.
        let gone: Vec<Vec<Value>> = if t.whole_row {
            old_key.into_iter().collect()
        } else {
            std::iter::once(t.key_of(row)).chain(old_key).collect()
        };
        for key in gone {
            for st in statements(t, types, &Op::Delete { key }) {
                let refs = sql_params(&st.params);
                // A key the target cannot hold (the refused value is in the
                // key) is not there: its delete alone is rolled back.
                tx.batch_execute("SAVEPOINT switchyard_delete")
                    .await
                    .map_err(self.pg("setting a savepoint"))?;
                match tx.execute(st.sql.as_str(), &refs).await {
                    Ok(_) => {}
                    Err(e) if misfit_code(&e) => tx
                        .batch_execute("ROLLBACK TO SAVEPOINT switchyard_delete")
                        .await
                        .map_err(self.pg("rolling back to the savepoint"))?,
                    Err(e) => {
                        return Err(row_error(
                            &self.ep,
                            t,
                            "deleting the old version of a rejected row",
                            e,
                        ))
                    }
                }
                tx.batch_execute("RELEASE SAVEPOINT switchyard_delete")
                    .await
                    .map_err(self.pg("releasing a savepoint"))?;
            }
        }
        Ok(())
    }
}

/// Rows as the target renders them once stored: the key and the row as
/// `ROW(…)::text`, cast to the columns' full types (storing pads or rounds).
async fn render(
    c: &tokio_postgres::Client,
    table: &TableSchema,
    types: &[String],
    rows: &[Row],
) -> std::result::Result<Vec<crate::verify::Record>, tokio_postgres::Error> {
    let n = table.columns.len();
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(rows.len()); n];
    for row in rows {
        for (i, v) in row.iter().enumerate() {
            columns[i].push(to_text(v, &types[i]));
        }
    }
    let cast = |i: usize| format!("u.c{i}::{}", types[i]);
    let key_idx: Vec<usize> = if table.whole_row {
        (0..n).collect()
    } else {
        table.key.clone()
    };
    let sql = format!(
        "SELECT ROW({})::text, ROW({})::text FROM {}",
        key_idx
            .iter()
            .map(|&i| cast(i))
            .collect::<Vec<_>>()
            .join(", "),
        (0..n).map(cast).collect::<Vec<_>>().join(", "),
        unnest_columns(n)
    );
    let refs = sql_params(&columns);
    Ok(c.query(sql.as_str(), &refs)
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// A value the column's type cannot hold (SQLSTATE class 22, data
/// exception), as opposed to a constraint, a lost connection or a bug of
/// ours in the COPY format (22P04).
fn misfit_code(e: &tokio_postgres::Error) -> bool {
    e.code()
        .map(|c| c.code())
        .is_some_and(|c| c.starts_with("22") && c != "22P04")
}

/// The input line of a failed `COPY … FROM STDIN` (1-based), from the
/// error's context `COPY t, line 3, column n: "…"`.
fn copy_line(e: &tokio_postgres::Error, table: &TableSchema) -> Option<usize> {
    let at = e.as_db_error()?.where_()?;
    let rest = match at.strip_prefix(&format!("COPY {}, line ", table.target_name)) {
        Some(rest) => rest,
        None => &at[at.find(", line ")? + ", line ".len()..],
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The column named by a failed COPY's context, as an index into the table's
/// columns (the longest name that fits, for names holding `:`).
fn copy_column(e: &tokio_postgres::Error, table: &TableSchema) -> Option<usize> {
    let at = e.as_db_error()?.where_()?;
    let rest = &at[at.find(", column ")? + ", column ".len()..];
    table
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            rest.strip_prefix(c.name.as_str())
                .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        })
        .max_by_key(|(_, c)| c.name.len())
        .map(|(i, _)| i)
}

/// PostgreSQL text holds no NUL character, and its error names no column:
/// the first column whose text has one.
fn nul_column(row: &Row) -> Option<usize> {
    row.iter().position(|v| match v {
        Value::Text(s) | Value::Json(s) => s.contains('\0'),
        _ => false,
    })
}

/// A failed statement on a row: the server's words with the table and key.
fn row_error(ep: &PgEndpoint, table: &TableSchema, what: &str, e: tokio_postgres::Error) -> Error {
    pg_error(ep, what, e).context(format!("target table {}", table.target_name))
}

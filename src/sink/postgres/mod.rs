//! PostgreSQL sink: the target schema generated from the source (or checked
//! against tables that exist), snapshot rows loaded with `COPY … FROM STDIN`,
//! and each batch of changes applied in one transaction together with the
//! checkpoint row in the `switchyard` schema (created from `migrations/` by
//! the first `prepare`; opening a sink writes nothing).
//!
//! Values travel as PostgreSQL text: COPY's text format for the snapshot,
//! `$n::text::type` parameters for changes, so every type reads its own input
//! syntax and nothing passes through a float. A batch is planned first
//! (plan.rs: what statements), then executed here in one transaction.

pub mod compare;
pub mod cutover;
pub mod migrations;
pub mod plan;
pub mod refusal;
pub mod restore;
pub mod state;
pub mod tables;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::SinkExt;
use tokio::sync::Mutex;
use tracing::{info, warn};

use self::plan::{copy_sql, sql_params, statements, Statement, Step};
use self::refusal::{copy_column, copy_line, misfit_code, nul_column, row_error};
use self::tables::SchemaMode;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Change, Ddl, Marker, Op, Row, SequenceValue, TableSchema, Value};
use crate::pg::conn::{pg_error, relation_exists, PgEndpoint};
use crate::pg::{binary_form, quote_ident, quote_table, BinaryForm, CopyFormat};
use crate::position::{Durable, Position};
use crate::reject::{row_json, Rejected, Rejects};
use crate::schema::narrow::{misfit, Narrow};
use crate::schema::postgres::{
    alter_ddl, copy_field, primary_key_ddl, secondary_ddl, table_column_type, to_text,
};
use crate::sink::{Cursor, Page, Record, Sink, SinkState};

pub struct PgSink {
    ep: PgEndpoint,
    /// The state schema and the user's migrations are in place (done once,
    /// by the first `prepare`: opening a sink writes nothing).
    migrated: tokio::sync::OnceCell<()>,
    mode: SchemaMode,
    /// `SET session_replication_role = replica` on the writing sessions.
    replica_role: bool,
    source_is_postgres: bool,
    /// Idle connections for loads and applies.
    pool: Mutex<Vec<tokio_postgres::Client>>,
    /// Target column types per target table and column, as prepared.
    types: Mutex<HashMap<String, HashMap<String, String>>>,
    /// The shape each table has in the target (by source table name): what
    /// the DDL of a schema change starts from. Persisted with the copy state.
    shapes: Mutex<HashMap<String, Arc<TableSchema>>>,
    /// A column dropped in the source is dropped here too (else kept).
    drop_columns: bool,
    /// A table dropped in the source is dropped here too (else kept).
    drop_tables: bool,
    /// Where rows whose values the target refuses go (`pipeline.reject_dir`).
    rejects: Arc<Rejects>,
    /// The tables a restored pg_dump schema makes (their keys come with its
    /// post-data part, not from `finish_table`).
    dumped: Mutex<std::collections::HashSet<String>>,
    /// `target.fire_triggers`: accepted that triggers fire (no replica role).
    fire_triggers: bool,
    /// Per source table, its target columns narrower than the source's
    /// type (by column name), whose values are checked as they go in.
    narrow: Mutex<HashMap<String, Vec<(String, Narrow)>>>,
    /// `target.maintenance_work_mem_mb`: the keys and indexes built after
    /// the load are built with at least this much memory (0: the server's).
    key_build_mb: u64,
    /// What `key_build_mb` comes to for switchyard's sessions (one role,
    /// one database: the same for all), read once.
    key_memory: tokio::sync::OnceCell<Option<String>>,
}

impl PgSink {
    /// Connects (and checks that the server answers); writes nothing.
    pub async fn connect(url: &str, config: &Config, rejects: Arc<Rejects>) -> Result<Self> {
        let ep = PgEndpoint::parse(url, config.target.password.clone(), "target.url")?;
        let mode = match config.target.schema.as_deref().unwrap_or("create") {
            "create" => SchemaMode::Create,
            "existing" => SchemaMode::Existing,
            other => match migrations::parse(other) {
                Some((named, dir)) => {
                    let layout = migrations::layout_of(named, &dir)?;
                    SchemaMode::Migrations(dir, layout)
                }
                None => {
                    return Err(Error::config(format!(
                        "target.schema: {other:?} is not supported; use \"create\", \"existing\", \"migrations:DIR\", \"refinery:DIR\" or \"sqlx:DIR\""
                    )))
                }
            },
        };
        let sink = Self {
            ep,
            migrated: tokio::sync::OnceCell::new(),
            mode,
            replica_role: config.target.replica_role,
            source_is_postgres: matches!(
                config.source_kind()?,
                crate::config::SourceKind::Postgres { .. }
            ),
            pool: Mutex::new(Vec::new()),
            types: Mutex::new(Default::default()),
            shapes: Mutex::new(Default::default()),
            drop_columns: config.schema_changes.drop_column == crate::config::OnDrop::Drop,
            drop_tables: config.schema_changes.drop_table == crate::config::OnDrop::Drop,
            rejects,
            dumped: Mutex::new(Default::default()),
            fire_triggers: config.target.fire_triggers,
            narrow: Mutex::new(Default::default()),
            key_build_mb: config.target.maintenance_work_mem_mb,
            key_memory: tokio::sync::OnceCell::new(),
        };
        let c = sink.take().await.map_err(|e| match e.kind() {
            crate::error::ErrorKind::Transient => Error::connect(e.to_string()),
            _ => e,
        })?;
        sink.give(c).await;
        info!(target = %sink.ep.shown(), "connected to PostgreSQL");
        Ok(sink)
    }

    /// The `maintenance_work_mem` keys and indexes are built with (see
    /// [`restore::key_build_memory`]), read on the first build only.
    async fn key_memory(&self, c: &impl tokio_postgres::GenericClient) -> Result<&Option<String>> {
        self.key_memory
            .get_or_try_init(|| restore::key_build_memory(c, &self.ep, self.key_build_mb))
            .await
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
        let c = self.ep.session().await?;
        // Each commit durable before the source is told it may forget the
        // change (invariant 2), whatever the role's or database's default.
        c.batch_execute("SET synchronous_commit = on")
            .await
            .map_err(self.pg("setting synchronous_commit = on"))?;
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
        self.refuse_because(table, row, column, reason, phase, position)
    }

    /// As [`Self::refuse`], for a reason in words (a value a narrower
    /// column does not hold).
    fn refuse_because(
        &self,
        table: &TableSchema,
        row: &Row,
        column: Option<usize>,
        reason: String,
        phase: &'static str,
        position: Option<Position>,
    ) -> Result<()> {
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

    /// The state schema, then the user's migration files, once.
    async fn migrated(&self, c: &tokio_postgres::Client) -> Result<()> {
        self.migrated
            .get_or_try_init(|| async {
                state::migrate(&self.ep, c).await?;
                if let SchemaMode::Migrations(dir, layout) = &self.mode {
                    migrations::apply(&self.ep, c, dir, *layout).await?;
                }
                Ok::<(), Error>(())
            })
            .await?;
        Ok(())
    }

    /// For tables of the team's own schema not prepared by this sink
    /// (verify): the target's column types, read once.
    async fn read_target_types(&self, table: &TableSchema) {
        if self.mode == SchemaMode::Create
            || self.types.lock().await.contains_key(&table.target_name)
        {
            return;
        }
        let Ok(c) = self.take().await else {
            return;
        };
        let read = tables::target_columns(&c, &self.ep, &table.target_name).await;
        self.give(c).await;
        if let Ok(have) = read {
            if have.is_empty() {
                return;
            }
            let types = table
                .columns
                .iter()
                .enumerate()
                .map(|(i, col)| match have.iter().find(|h| h.name == col.name) {
                    Some(h) => h.ty.clone(),
                    None => table_column_type(table, i, self.source_is_postgres),
                })
                .collect();
            let narrow = tables::narrow_columns(table, &have, self.source_is_postgres);
            self.remember_narrow(table, &narrow).await;
            self.remember_types(table, types).await;
        }
    }

    async fn column_types(&self, table: &TableSchema) -> Vec<String> {
        let cache = self.types.lock().await;
        let known = cache.get(&table.target_name);
        table
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                known
                    .and_then(|m| m.get(&c.name))
                    .cloned()
                    .unwrap_or_else(|| table_column_type(table, i, self.source_is_postgres))
            })
            .collect()
    }

    /// Records the target columns of a table narrower than the source's types.
    async fn remember_narrow(&self, table: &TableSchema, narrow: &[(usize, Narrow)]) {
        let by_name = narrow
            .iter()
            .map(|(i, n)| (table.columns[*i].name.clone(), n.clone()))
            .collect();
        self.narrow.lock().await.insert(table.name.clone(), by_name);
    }

    /// The narrower columns of a table of the team's own schema, read again
    /// from the target (after a change of the table's shape).
    async fn refresh_narrow(
        &self,
        c: &impl tokio_postgres::GenericClient,
        table: &TableSchema,
    ) -> Result<()> {
        let have = tables::target_columns(c, &self.ep, &table.target_name).await?;
        let narrow = tables::narrow_columns(table, &have, self.source_is_postgres);
        self.remember_narrow(table, &narrow).await;
        Ok(())
    }

    /// The narrower columns of `table` as it is now (by column index).
    async fn narrow_of(&self, table: &TableSchema) -> Vec<(usize, Narrow)> {
        let narrow = self.narrow.lock().await;
        let Some(cols) = narrow.get(&table.name) else {
            return Vec::new();
        };
        cols.iter()
            .filter_map(|(name, n)| {
                table
                    .columns
                    .iter()
                    .position(|c| &c.name == name)
                    .map(|i| (i, n.clone()))
            })
            .collect()
    }

    /// The first value of a change's new row that a narrower column does
    /// not hold, with why.
    async fn change_misfit(&self, ch: &Change) -> Option<(usize, String)> {
        match &ch.op {
            Op::Insert { row } | Op::Update { row, .. } => {
                misfit(&self.narrow_of(&ch.table).await, row)
            }
            _ => None,
        }
    }

    /// Records the target column types of a table's columns.
    async fn remember_types(&self, table: &TableSchema, types: Vec<String>) {
        let by_name = table
            .columns
            .iter()
            .map(|c| c.name.clone())
            .zip(types)
            .collect();
        self.types
            .lock()
            .await
            .insert(table.target_name.clone(), by_name);
    }

    /// Brings the target table from the shape it has to `table`'s, inside
    /// the batch's transaction: the DDL (switchyard's own tables), or for
    /// tables of the user's schema a check that the user's migration has
    /// done it; and the shape recorded with the table's copy state.
    async fn follow(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        shapes: &mut HashMap<String, Arc<TableSchema>>,
        from: &str,
        table: &Arc<TableSchema>,
    ) -> Result<()> {
        let Some(old) = shapes.get(from).cloned() else {
            shapes.insert(table.name.clone(), table.clone());
            return Ok(());
        };
        if old.same_shape(table) && from == table.name && old.partitions == table.partitions {
            return Ok(());
        }
        if self.mode == SchemaMode::Create {
            tables::sync_partitions(tx, &self.ep, table).await?;
            for sql in alter_ddl(&old, table, self.source_is_postgres, self.drop_columns) {
                tx.batch_execute(&sql)
                    .await
                    .map_err(|e| {
                        pg_error(
                            &self.ep,
                            &format!("changing table {} as the source did", table.target_name),
                            e,
                        )
                    })
                    .map_err(|e| e.context(format!("statement {sql}")))?;
            }
            info!(table = %table.target_name, "target table changed as the source's");
        } else {
            let have: Vec<String> = tx
                .query(
                    "SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&quote_table(&table.target_name)],
                )
                .await
                .map_err(self.pg("reading the target table"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let missing: Vec<&str> = table
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .filter(|c| !have.iter().any(|h| h == c))
                .collect();
            if !missing.is_empty() {
                return Err(Error::definite(format!(
                    "table {:?} changed in the source and target table {} (your own schema, target.schema) lacks column(s) {missing:?}; \
                     change the target as the source was (a migration), then start switchyard again",
                    table.name, table.target_name
                )));
            }
        }
        let shape = serde_json::to_string(&**table)
            .map_err(|e| Error::definite("cannot encode a table's shape").with_source(e))?;
        tx.execute(
            "UPDATE switchyard.table_state SET name = $2, shape = $3, updated_at = now() WHERE name = $1",
            &[&from, &table.name, &shape],
        )
        .await
        .map_err(self.pg("recording the table's shape"))?;
        shapes.remove(from);
        shapes.insert(table.name.clone(), table.clone());
        Ok(())
    }
}

#[async_trait]
impl Sink for PgSink {
    async fn durability_notes(&self) -> Result<Vec<(String, bool)>> {
        let c = self.take().await?;
        let show = |name: &'static str| {
            let c = &c;
            async move {
                c.query_one(&format!("SHOW {name}"), &[])
                    .await
                    .map(|r| r.get::<_, String>(0))
                    .map_err(self.pg(&format!("reading {name}")))
            }
        };
        let (fsync, pages, sync, build) = (
            show("fsync").await?,
            show("full_page_writes").await?,
            show("synchronous_commit").await?,
            show("maintenance_work_mem").await?,
        );
        let raised = self.key_memory(&c).await?.clone();
        self.give(c).await;
        // What a session of the role gets without switchyard's SET.
        let plain = self.ep.connect().await?;
        let default_sync: String = plain
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(self.pg("reading synchronous_commit"))?
            .get(0);
        let mut out = vec![(
            format!(
                "switchyard's apply sessions commit with synchronous_commit = {sync}{}",
                if default_sync != "on" {
                    format!(" (this role's sessions default to {default_sync}: the application's commits are not durable until flushed)")
                } else {
                    String::new()
                }
            ),
            false,
        )];
        if fsync != "on" {
            out.push((
                "the target server runs with fsync = off: a crash of its machine can lose commits the source was told are durable, \
                 and the replica must then be copied again; set fsync = on for a migration"
                    .into(),
                false,
            ));
        }
        if pages != "on" {
            out.push((
                "the target server runs with full_page_writes = off: a crash can leave torn pages; set it on for a migration".into(),
                false,
            ));
        }
        out.push((
            match raised {
                Some(mem) => format!(
                    "keys and indexes built after the load get maintenance_work_mem = {mem} (the server's: {build}; target.maintenance_work_mem_mb)"
                ),
                None => format!(
                    "keys and indexes built after the load get the server's maintenance_work_mem = {build} (target.maintenance_work_mem_mb = {} does not raise it)",
                    self.key_build_mb
                ),
            },
            false,
        ));
        Ok(out)
    }

    async fn prepare(&self, tables: &[Arc<TableSchema>]) -> Result<()> {
        let c = self.take().await?;
        self.migrated(&c).await?;
        for t in tables {
            let prepared =
                tables::prepare(&c, &self.ep, &self.mode, self.source_is_postgres, t).await?;
            self.remember_narrow(t, &prepared.narrow).await;
            self.remember_types(t, prepared.types).await;
            self.shapes.lock().await.insert(t.name.clone(), t.clone());
        }
        self.give(c).await;
        Ok(())
    }

    async fn state(&self) -> Result<Option<SinkState>> {
        let c = self.take().await?;
        let state = state::read(&self.ep, &c).await?;
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
        let old = self.shapes.lock().await.get(&table.name).cloned();
        let exists = relation_exists(
            &tx,
            &self.ep,
            &quote_table(&table.target_name),
            "reading the target catalog",
        )
        .await?;
        let changed = old.is_some_and(|o| !o.same_shape(table));
        if self.mode == SchemaMode::Create && (changed || !exists) {
            // Copied again after a change it could not follow in place:
            // made anew in the shape the copy has (a table created in the
            // source while streaming: made).
            if changed {
                if self.dumped.lock().await.contains(&table.name) {
                    warn!(
                        table = %table.target_name,
                        "the table is made anew by switchyard's rules after a change it could not follow in place: \
                         what the source's schema (pg_dump) gave it beyond columns and keys (triggers, policies, \
                         CHECKs, views that read it) is dropped with it; restore them by hand or copy the whole schema again"
                    );
                }
                tx.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {} CASCADE",
                    quote_table(&table.target_name)
                ))
                .await
                .map_err(self.pg(&format!("dropping {} to make it anew", table.target_name)))?;
            }
            let prepared =
                tables::prepare(&tx, &self.ep, &self.mode, self.source_is_postgres, table).await?;
            self.remember_narrow(table, &prepared.narrow).await;
            self.remember_types(table, prepared.types).await;
        }
        if self.mode == SchemaMode::Create {
            tables::sync_partitions(&tx, &self.ep, table).await?;
        }
        tx.batch_execute(&format!("TRUNCATE {}", quote_table(&table.target_name)))
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
        // Values a narrower column does not hold, refused before the COPY
        // (which would cut or round some of them without a word).
        let narrow = self.narrow_of(table).await;
        if !narrow.is_empty() {
            let mut fitting = Vec::with_capacity(pending.len());
            for row in pending {
                match misfit(&narrow, row) {
                    Some((i, why)) => {
                        self.refuse_because(table, row, Some(i), why, "snapshot", None)?
                    }
                    None => fitting.push(row),
                }
            }
            pending = fitting;
        }
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
        let dumped = self.dumped.lock().await.contains(&table.name)
            && !restore::restored(&tx, &self.ep, crate::schema::dump::Section::PostData).await?;
        if self.mode == SchemaMode::Create && !table.whole_row && !dumped {
            // The primary key of a table created without one, in the same
            // transaction as its "copied" mark: streaming never meets a
            // copied table without its key.
            let name = quote_table(&table.target_name);
            let has_key = tx
                .query_opt(
                    "SELECT 1 FROM pg_index WHERE indrelid = to_regclass($1) AND indisprimary",
                    &[&name],
                )
                .await
                .map_err(self.pg("reading the target's primary key"))?
                .is_some();
            if !has_key {
                if let Some(mem) = self.key_memory(&tx).await? {
                    tx.batch_execute(&format!("SET LOCAL maintenance_work_mem = '{mem}'"))
                        .await
                        .map_err(self.pg("setting maintenance_work_mem"))?;
                }
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
        let shape = serde_json::to_string(table)
            .map_err(|e| Error::definite("cannot encode a table's shape").with_source(e))?;
        tx.execute(
            "UPDATE switchyard.table_state SET status = 'done', commit = $2, ordinal = $3, rows = $4, source_id = $5, shape = $6, updated_at = now() WHERE name = $1",
            &[&table.name, &(position.commit as i64), &(position.ordinal as i64), &(rows as i64), &table.source_id, &shape],
        )
        .await
        .map_err(self.pg("marking the table as copied"))?;
        tx.commit().await.map_err(self.pg("committing"))?;
        self.shapes
            .lock()
            .await
            .insert(table.name.clone(), Arc::new(table.clone()));
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
                        quote_table(&t.target_name)
                    ),
                    &[&quote_table(&t.target_name), col],
                )
                .await
                .map_err(self.pg(&format!("moving the identity of {}.{col}", t.target_name)))?;
            }
        }
        let secondary = secondary_ddl(tables);
        let memory = if secondary.is_empty() {
            None
        } else {
            self.key_memory(&c).await?.clone()
        };
        if let Some(mem) = &memory {
            c.batch_execute(&format!("SET maintenance_work_mem = '{mem}'"))
                .await
                .map_err(self.pg("setting maintenance_work_mem"))?;
        }
        for ddl in secondary {
            match ddl {
                Ok((name, sql)) => {
                    let exists: bool = c
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $1) OR EXISTS (SELECT 1 FROM pg_constraint WHERE conname = $1)",
                            &[&name],
                        )
                        .await
                        .map_err(self.pg("reading the target catalog"))?
                        .get(0);
                    if !exists {
                        c.batch_execute(&sql)
                            .await
                            .map_err(self.pg(&format!("building {name}")))?;
                        info!(name = %name, "built after the load");
                    }
                }
                Err(why) => warn!("{why}"),
            }
        }
        if memory.is_some() {
            c.batch_execute("RESET maintenance_work_mem")
                .await
                .map_err(self.pg("resetting maintenance_work_mem"))?;
        }
        self.give(c).await;
        Ok(())
    }

    async fn wants_schema_dump(&self) -> Result<bool> {
        if self.mode != SchemaMode::Create || !self.source_is_postgres {
            return Ok(false);
        }
        let c = self.take().await?;
        let done = restore::restored(&c, &self.ep, crate::schema::dump::Section::PostData).await;
        self.give(c).await;
        Ok(!done?)
    }

    async fn ready_for_schema(&self) -> Result<()> {
        let c = self.take().await?;
        self.migrated(&c).await?;
        self.give(c).await;
        Ok(())
    }

    async fn restore_schema(
        &self,
        dump: &crate::schema::dump::SchemaDump,
        section: crate::schema::dump::Section,
    ) -> Result<Vec<String>> {
        if !self.replica_role && !self.fire_triggers {
            let firing = dump.firing();
            if !firing.is_empty() {
                return Err(Error::config(format!(
                    "target.replica_role = false: the source's triggers and rules restored in the target would fire for every replicated row ({}); \
                     let switchyard SET session_replication_role = replica (target.replica_role = true), or accept it with target.fire_triggers = true",
                    firing.join(", ")
                )));
            }
        }
        let c = self.take().await?;
        self.migrated(&c).await?;
        let memory = match section {
            crate::schema::dump::Section::PostData => self.key_memory(&c).await,
            _ => Ok(&None),
        };
        let done = match memory {
            Ok(memory) => restore::restore(&c, &self.ep, dump, section, memory.as_deref()).await,
            Err(e) => Err(e),
        };
        self.give(c).await;
        self.dumped.lock().await.extend(dump.tables.iter().cloned());
        done
    }

    async fn mark(&self, marker: &Marker, at: Position, applied: u64) -> Result<()> {
        let c = self.take().await?;
        cutover::mark(&c, &self.ep, marker, at, applied).await?;
        self.give(c).await;
        Ok(())
    }

    async fn cutover_record(&self) -> Result<Option<serde_json::Value>> {
        let c = self.take().await?;
        let r = cutover::record(&c, &self.ep).await?;
        self.give(c).await;
        Ok(r)
    }

    async fn save_cutover_record(&self, id: &str, record: &serde_json::Value) -> Result<()> {
        let c = self.take().await?;
        cutover::save_record(&c, &self.ep, id, record).await?;
        self.give(c).await;
        Ok(())
    }

    async fn count(&self, table: &TableSchema) -> Result<u64> {
        let c = self.take().await?;
        let n = cutover::count(&c, &self.ep, table).await?;
        self.give(c).await;
        Ok(n)
    }

    async fn set_sequences(
        &self,
        tables: &[Arc<TableSchema>],
        sequences: &[SequenceValue],
    ) -> Result<Vec<String>> {
        let c = self.take().await?;
        let done = cutover::set_sequences(&c, &self.ep, tables, sequences).await?;
        self.give(c).await;
        Ok(done)
    }

    async fn cutover_problems(&self, tables: &[Arc<TableSchema>]) -> Result<Vec<String>> {
        let c = self.take().await?;
        let problems = cutover::problems(&c, &self.ep, tables).await?;
        self.give(c).await;
        Ok(problems)
    }

    async fn adopt(&self, tables: &[Arc<TableSchema>], at: Position, origin: &str) -> Result<()> {
        let mut c = self.take().await?;
        cutover::adopt(&mut c, &self.ep, tables, at, origin).await?;
        self.give(c).await;
        let mut shapes = self.shapes.lock().await;
        for t in tables {
            shapes.insert(t.name.clone(), t.clone());
        }
        Ok(())
    }

    async fn takes_copy(
        &self,
        table: &TableSchema,
        binary: Option<&BinaryForm>,
    ) -> Result<Option<CopyFormat>> {
        if !self.source_is_postgres {
            return Ok(None);
        }
        let types = self.column_types(table).await;
        let same = types.len() == table.columns.len()
            && table
                .columns
                .iter()
                .zip(&types)
                .all(|(c, t)| &c.source_type == t);
        if !same {
            return Ok(None);
        }
        let Some(source) = binary else {
            return Ok(Some(CopyFormat::Text));
        };
        let c = self.take().await?;
        let columns: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
        let ours = binary_form(&c, &quote_table(&table.target_name), &columns)
            .await
            .map_err(self.pg(&format!(
                "reading the column types of {}",
                table.target_name
            )))?;
        self.give(c).await;
        Ok(Some(if ours.as_ref() == Some(source) {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        }))
    }

    async fn load_copy(
        &self,
        table: &TableSchema,
        format: CopyFormat,
        mut chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> Result<u64> {
        let c = self.take().await?;
        let what = match format {
            CopyFormat::Text => format!("loading {} as COPY text", table.target_name),
            CopyFormat::Binary => format!("loading {} as binary COPY", table.target_name),
        };
        let sql = format!("{}{}", copy_sql(table), format.option());
        let sink = c
            .copy_in::<_, bytes::Bytes>(sql.as_str())
            .await
            .map_err(self.pg(&what))?;
        futures::pin_mut!(sink);
        while let Some(chunk) = chunks.recv().await {
            sink.send(chunk)
                .await
                .map_err(|e| row_error(&self.ep, table, &what, e))?;
        }
        let rows = sink
            .finish()
            .await
            .map_err(|e| row_error(&self.ep, table, &what, e))?;
        self.give(c).await;
        Ok(rows)
    }

    /// Rendered by the target itself: the rows' values, cast to the target's
    /// column types, as `ROW(…)::text` (how `SELECT t::text` shows a stored
    /// row), and the key likewise; one query per batch.
    async fn expected_records(&self, table: &TableSchema, rows: &[Row]) -> Result<Vec<Record>> {
        self.read_target_types(table).await;
        let types = self.column_types(table).await;
        // Rows whose values a narrower column does not hold are set aside
        // by the run (with reject_dir): not expected in the target.
        let narrow = self.narrow_of(table).await;
        let fitting: Vec<Row>;
        let rows = if self.rejects.enabled() && !narrow.is_empty() {
            fitting = rows
                .iter()
                .filter(|r| misfit(&narrow, r).is_none())
                .cloned()
                .collect();
            &fitting[..]
        } else {
            rows
        };
        let c = self.take().await?;
        let what = format!("rendering rows of {} for verify", table.target_name);
        let out = match compare::render(&c, table, &types, rows).await {
            Ok(out) => out,
            // Rows the run sets aside are not expected in the target.
            Err(e) if misfit_code(&e) && self.rejects.enabled() => {
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    match compare::render(&c, table, &types, std::slice::from_ref(row)).await {
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
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page> {
        self.read_target_types(table).await;
        let types = self.column_types(table).await;
        let c = self.take().await?;
        let page = compare::records(&c, &self.ep, table, &types, after, limit).await?;
        self.give(c).await;
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

/// Why the target does not take a change's new row.
enum Refused<'a> {
    /// PostgreSQL refused a value (SQLSTATE class 22).
    Pg(&'a tokio_postgres::Error),
    /// A narrower column does not hold the value of `column`.
    Value { column: usize, why: String },
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
        // The shapes the target tables have: a batch may change them.
        let mut shapes = self.shapes.lock().await.clone();
        // Target types per table shape: a batch may hold a table's changes
        // from before and after a column was added.
        let mut types = plan::Types::new();
        for ch in changes {
            let at = plan::shape(&ch.table);
            if !types.contains_key(&at) {
                types.insert(at, self.column_types(&ch.table).await);
            }
        }
        // The team's own tables whose shape changed (a column added or
        // renamed, the table renamed): their narrower columns read again.
        if self.mode != SchemaMode::Create {
            let mut seen = std::collections::HashSet::new();
            for ch in changes {
                let t = &ch.table;
                let known = shapes
                    .get(&t.name)
                    .is_some_and(|k| k.same_shape(t) && k.name == t.name);
                if !known && !matches!(ch.op, Op::Ddl(_)) && seen.insert(plan::shape(t)) {
                    self.refresh_narrow(&tx, t).await?;
                }
            }
        }
        // A value a narrower column does not hold: the batch goes again
        // change by change, where it is refused (or set aside). (Only the
        // team's own tables have narrower columns.)
        if !careful && self.mode != SchemaMode::Create {
            for ch in changes {
                if let Some((i, why)) = self.change_misfit(ch).await {
                    return Err(Failure {
                        misfit: true,
                        error: Error::definite(format!(
                            "table {:?}, key {}, column {:?}: {why}",
                            ch.table.name,
                            ch.table.describe_key(&ch.key()),
                            ch.table.columns[i].name
                        )),
                    });
                }
            }
        }
        for step in plan::plan(changes, &types, careful, self.replica_role) {
            match step {
                Step::Grouped {
                    table,
                    sql,
                    params,
                    run,
                } => {
                    self.follow(&tx, &mut shapes, &table.name, &run[0].table)
                        .await?;
                    let refs = sql_params(&params);
                    tx.execute(sql.as_str(), &refs).await.map_err(|e| {
                        let what = format!(
                            "applying {} upserts of table {:?} (keys {} … {})",
                            run.len(),
                            table.name,
                            table.describe_key(&run[0].key()),
                            table.describe_key(&run[run.len() - 1].key())
                        );
                        failed(table, &what, e)
                    })?;
                }
                Step::Truncate { table, sql } => {
                    tx.batch_execute(&sql)
                        .await
                        .map_err(|e| failed(table, "applying a truncate", e))?;
                }
                Step::Change { change, .. } if matches!(change.op, Op::Ddl(_)) => {
                    self.apply_ddl(&tx, &mut shapes, change).await?;
                }
                Step::Change { change, statements } => {
                    self.follow(&tx, &mut shapes, &change.table.name, &change.table)
                        .await?;
                    let types = &types[&plan::shape(&change.table)];
                    self.apply_change(&tx, change, statements, types, careful)
                        .await?;
                }
            }
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
        let mut kept = self.shapes.lock().await;
        for (name, t) in &shapes {
            if kept.get(name).is_none_or(|k| !Arc::ptr_eq(k, t)) {
                let types = (0..t.columns.len())
                    .map(|i| table_column_type(t, i, self.source_is_postgres))
                    .collect();
                if self.mode == SchemaMode::Create {
                    self.remember_types(t, types).await;
                }
            }
        }
        *kept = shapes;
        Ok(())
    }

    /// A change of a table's definition, in the batch's transaction.
    async fn apply_ddl(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        shapes: &mut HashMap<String, Arc<TableSchema>>,
        change: &Change,
    ) -> Result<()> {
        let t = &change.table;
        match &change.op {
            Op::Ddl(Ddl::Alter) => self.follow(tx, shapes, &t.name, t).await,
            Op::Ddl(Ddl::Rename { from }) => {
                info!(table = %from, now = %t.name, "table renamed in the source");
                self.follow(tx, shapes, from, t).await
            }
            Op::Ddl(Ddl::Drop) => {
                if self.drop_tables && self.mode == SchemaMode::Create {
                    tx.batch_execute(&format!(
                        "DROP TABLE IF EXISTS {}",
                        quote_table(&t.target_name)
                    ))
                    .await
                    .map_err(self.pg(&format!("dropping {}", t.target_name)))?;
                    info!(table = %t.target_name, "table dropped in the source: dropped in the target");
                } else {
                    info!(table = %t.target_name, "table dropped in the source: its copy in the target stays and is no longer followed");
                }
                tx.execute(
                    "DELETE FROM switchyard.table_state WHERE name = $1",
                    &[&t.name],
                )
                .await
                .map_err(self.pg("forgetting a dropped table"))?;
                shapes.remove(&t.name);
                Ok(())
            }
            _ => Err(Error::definite(format!(
                "a {} of table {:?} reached the target's apply (a bug: the pipeline copies tables)",
                change.kind(),
                t.name
            ))),
        }
    }

    /// One change's statements inside the batch's transaction. `careful`
    /// with `pipeline.reject_dir`: under a savepoint, so that a change whose
    /// value the target refuses is rolled back and set aside.
    async fn apply_change(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ch: &Change,
        statements: Vec<Statement>,
        types: &[String],
        careful: bool,
    ) -> std::result::Result<(), Failure> {
        let t = &ch.table;
        let set_aside = careful && self.rejects.enabled();
        let failed = |what: &str, e: tokio_postgres::Error| Failure {
            misfit: misfit_code(&e),
            error: row_error(&self.ep, t, what, e),
        };
        if let Some((column, why)) = self.change_misfit(ch).await {
            if set_aside {
                self.set_aside_change(tx, ch, types, Refused::Value { column, why })
                    .await?;
                return Ok(());
            }
            let (Op::Insert { row } | Op::Update { row, .. }) = &ch.op else {
                unreachable!("change_misfit reads inserts and updates only")
            };
            // Without reject_dir: the error that stops the run.
            return self
                .refuse_because(t, row, Some(column), why, "stream", Some(ch.position))
                .map_err(|error| Failure {
                    error,
                    misfit: true,
                });
        }
        if set_aside {
            tx.batch_execute("SAVEPOINT switchyard_change")
                .await
                .map_err(self.pg("setting a savepoint"))?;
        }
        for st in statements {
            let refs = sql_params(&st.params);
            let n = match tx.execute(st.sql.as_str(), &refs).await {
                Ok(n) => n,
                Err(e) if set_aside && misfit_code(&e) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT switchyard_change")
                        .await
                        .map_err(self.pg("rolling back to the savepoint"))?;
                    self.set_aside_change(tx, ch, types, Refused::Pg(&e))
                        .await?;
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
                            failed(&what, e)
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
                    return Err(failed(&what, e));
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
        refused: Refused<'_>,
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
        match refused {
            Refused::Pg(e) => {
                let column = self.refused_column(types, row).await;
                self.refuse(t, row, column, e, "stream", Some(ch.position))?;
            }
            Refused::Value { column, why } => {
                self.refuse_because(t, row, Some(column), why, "stream", Some(ch.position))?;
            }
        }
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

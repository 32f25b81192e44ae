//! SQLite source: triggers feed a change log inside the source database.
//!
//! ```text
//!  install:     log tables and triggers (capture.rs); journal mode → WAL
//!  snapshot(T): one read transaction reads the log's high water Ct and every row of T
//!  stream:      poll seq > P in one read transaction, in seq order (poll.rs)   position = seq
//!  ack(P):      delete log entries with seq <= P (the target has committed them)
//! ```
//!
//! The log columns carry no declared type, so SQLite keeps every value's
//! storage class exactly (no affinity conversion, see convert.rs). The source
//! stays usable by its application: WAL mode, a busy timeout, short read
//! transactions. Opened for a read-only command, nothing is written, not even
//! the journal mode.

pub mod capture;
pub mod catalog;
pub mod convert;
pub mod ddl;
pub mod fence;
pub mod follow;
pub mod poll;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, SqliteConnection};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::capture::{
    capture_ddl, earlier_format, existing_triggers, high_water, log_ddl, meta, quote, registry,
    trigger_names, trimmed_upto, write_tx, CHANGES, META, REGISTRY,
};
use self::convert::{convert_row, read_raw, set_aside};
use self::poll::{poll, Polled};
use crate::config::{Config, TableFilter};
use crate::error::{Error, ErrorKind, Result};
use crate::model::Change;
use crate::model::{Marker, Row, TableSchema};
use crate::position::{Durable, Position, PositionKind};
use crate::reject::Rejects;
use crate::retry::Retry;
use crate::source::{
    Access, Batch, Discovery, Fence, FenceMode, Installed, Pending, Problem, Source, SourceLag,
};

pub use self::capture::PREFIX;

pub struct SqliteSource {
    path: PathBuf,
    pool: SqlitePool,
    options: SqliteConnectOptions,
    filter: TableFilter,
    renames: BTreeMap<String, String>,
    keys: BTreeMap<String, Vec<String>>,
    types: crate::schema::cast::TypeRules,
    text_search: bool,
    poll_interval: Duration,
    retry: Retry,
    /// How schema changes are followed.
    policy: follow::Policy,
    /// Where rows whose values do not fit go (`pipeline.reject_dir`).
    rejects: Arc<Rejects>,
    /// The last trim, so the log is trimmed every few seconds at most.
    last_trim: Mutex<Option<(Instant, Position)>>,
    /// Held from `install` on: one process streams from this source.
    lock: std::sync::Mutex<Option<crate::lockfile::DaemonLock>>,
}

impl SqliteSource {
    /// Opens the database; `ReadOnly` opens it read-only and changes nothing.
    pub async fn open(
        path: &Path,
        config: &Config,
        rejects: Arc<Rejects>,
        access: Access,
    ) -> Result<Self> {
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
            .read_only(access == Access::ReadOnly)
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
            types: crate::schema::cast::TypeRules::compile(&config.tables.types)
                .map_err(Error::config)?,
            text_search: config.tables.text_search,
            poll_interval: Duration::from_millis(config.source.poll_interval_ms),
            retry: Retry::new(
                config.pipeline.retry_attempts,
                Duration::from_millis(config.pipeline.retry_max_delay_ms),
            ),
            rejects,
            last_trim: Mutex::new(None),
            lock: std::sync::Mutex::new(None),
            policy: follow::Policy {
                follow_renames: config.schema_changes.rename_table
                    == crate::config::OnRename::Follow,
                target_is_postgres: matches!(
                    config.target_kind(),
                    Ok(crate::config::TargetKind::Postgres { .. })
                ),
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn selection(&self) -> catalog::Selection<'_> {
        catalog::Selection {
            filter: &self.filter,
            renames: &self.renames,
            keys: &self.keys,
            types: &self.types,
            text_search: self.text_search,
        }
    }

    async fn journal_mode(&self) -> Result<String> {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await?;
        Ok(mode.to_ascii_lowercase())
    }

    /// Closes every pooled connection. sqlx's `Pool::close` can finish
    /// while a connection is still on its way back to the pool, which then
    /// stays open (seen: two idle connections after it returned): each one
    /// is taken out and closed here first.
    async fn close_every_connection(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pool.size() > 0 && Instant::now() < deadline {
            if self.pool.num_idle() == 0 {
                // Still in use or on its way back.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            if let Ok(c) = self.pool.acquire().await {
                let _ = c.detach().close().await;
            }
        }
        self.pool.close().await;
    }

    /// Sets the journal mode on a connection of its own, once every pooled
    /// connection is closed (leaving WAL needs the only connection).
    async fn set_journal_mode(&self, mode: &str) -> Result<String> {
        let mut conn = self.options.connect().await?;
        let now: std::result::Result<String, _> =
            sqlx::query_scalar(&format!("PRAGMA journal_mode = {mode}"))
                .fetch_one(&mut conn)
                .await;
        // Closed whatever the answer: a connection only dropped closes on
        // its own thread later, and until then it is the other connection
        // that keeps the next try from leaving WAL.
        let closed = conn.close().await;
        let now = now?;
        closed?;
        Ok(now.to_ascii_lowercase())
    }
}

/// The processes that have the database (or its WAL files) open, as
/// `pid 123 (python3)`, where the system says (Linux's /proc); for the
/// message of an uninstall that cannot leave WAL.
fn holders_of(path: &Path) -> Vec<String> {
    let Ok(db) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let names: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|s| PathBuf::from(format!("{}{s}", db.display())))
        .collect();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let open = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| names.contains(target))
            .count();
        if open > 0 {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let me = if pid == std::process::id().to_string() {
                ", this process"
            } else {
                ""
            };
            out.push(format!(
                "pid {pid} ({}{me}) with {open} file(s)",
                comm.trim()
            ));
        }
    }
    out
}

#[async_trait]
impl Source for SqliteSource {
    async fn discover(&self) -> Result<Discovery> {
        let mut d = catalog::discover(&self.pool, &self.selection()).await?;
        // A captured table is known by its capture id, which its triggers
        // carry through a rename.
        let ids: Vec<i64> = registry(&self.pool)
            .await?
            .values()
            .map(|(id, _)| *id)
            .collect();
        if !ids.is_empty() {
            let mut conn = self.pool.acquire().await?;
            for id in ids {
                if let Some(on) = capture::captured_table(&mut conn, id).await? {
                    if let Some(t) = d.tables.iter_mut().find(|t| t.name == on) {
                        t.source_id = id.to_string();
                    }
                }
            }
        }
        let mode = self.journal_mode().await?;
        if mode != "wal" && mode != "memory" {
            d.problems.push(Problem {
                table: "(source)".into(),
                column: None,
                message: format!(
                    "journal_mode is {mode}: `switchyard run` switches the database to WAL, so that it reads beside the application's writes; `switchyard uninstall` puts {mode} back"
                ),
                blocking: false,
            });
        }
        Ok(d)
    }

    async fn install(&self, tables: &[Arc<TableSchema>]) -> Result<Installed> {
        {
            let mut conn = self.pool.acquire().await?;
            if earlier_format(&mut conn).await? {
                return Err(Error::definite(format!(
                    "{} holds change capture installed by an earlier switchyard (values in the log); run `switchyard uninstall`, then replicate into an empty target",
                    self.path.display()
                )));
            }
        }
        self.lock()?;
        let mode = self.journal_mode().await?;
        let count = tables.len();
        let tables = tables.to_vec();
        let was = mode.clone();
        let installed = write_tx(&self.pool, move |conn| {
            Box::pin(async move {
                conn.execute(log_ddl().as_str()).await?;
                sqlx::query(&format!(
                    "INSERT INTO {META} (key, value) VALUES ('journal_mode', ?) ON CONFLICT (key) DO NOTHING"
                ))
                .bind(&was)
                .execute(&mut *conn)
                .await?;
                let origin: String =
                    sqlx::query_scalar(&format!("SELECT value FROM {META} WHERE key = 'origin'"))
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
                    let id: i64 =
                        sqlx::query_scalar(&format!("SELECT id FROM {REGISTRY} WHERE name = ?"))
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
                Ok(Installed {
                    origin: format!("sqlite:{origin}"),
                    recaptured,
                })
            })
        })
        .await
        .map_err(|e| {
            e.context(format!(
                "installing change capture in {}",
                self.path.display()
            ))
        })?;
        if mode != "wal" && mode != "memory" {
            let now = self.set_journal_mode("WAL").await?;
            info!(was = %mode, now = %now, "switched the source database to WAL journal mode, so that switchyard reads beside the application's writes; `switchyard uninstall` puts it back");
        }
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
        let registry = registry(&self.pool).await?;
        let was = {
            let mut conn = self.pool.acquire().await?;
            meta(&mut conn, "journal_mode").await?
        };
        let objects: Vec<(String, String)> = sqlx::query_as(
            "SELECT type, name FROM sqlite_master WHERE name LIKE '\\_switchyard\\_%' ESCAPE '\\' AND type IN ('trigger', 'table')",
        )
        .fetch_all(&self.pool)
        .await?;
        write_tx(&self.pool, move |conn| {
            Box::pin(async move {
                for (_, name) in objects.iter().filter(|(k, _)| k == "trigger") {
                    conn.execute(format!("DROP TRIGGER IF EXISTS {}", quote(name)).as_str())
                        .await?;
                }
                for (_, name) in objects.iter().filter(|(k, _)| k == "table") {
                    conn.execute(format!("DROP TABLE IF EXISTS {}", quote(name)).as_str())
                        .await?;
                }
                Ok(())
            })
        })
        .await?;
        // A log made by an earlier switchyard used AUTOINCREMENT.
        let _ = sqlx::query("DELETE FROM sqlite_sequence WHERE name = ?")
            .bind(CHANGES)
            .execute(&self.pool)
            .await;
        self.close_every_connection().await;
        if let Some(was) = was.filter(|m| m != "wal") {
            // Leaving WAL needs the only connection: another one (the
            // application's) may close in a moment.
            let mut tries = 0;
            let now = loop {
                let r = self.set_journal_mode(&was).await;
                match r {
                    Ok(now) if now == was => break now,
                    _ if tries < 120 => tries += 1,
                    r => {
                        let why = match r {
                            Ok(now) => format!("it stayed {now}"),
                            Err(e) => e.report(),
                        };
                        let holders = holders_of(&self.path);
                        return Err(Error::definite(format!(
                            "the change capture is removed, but the source's journal mode could not be set back to {was} \
                             ({why}): another connection holds the database open{}. Run `switchyard uninstall` again, or \
                             `PRAGMA journal_mode = {was}` yourself, once the application is stopped",
                            if holders.is_empty() { String::new() } else { format!(" ({})", holders.join(", ")) }
                        )));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            };
            info!(journal_mode = %now, "the source's journal mode is back to what it was before switchyard");
        }
        crate::lockfile::remove(&self.path)?;
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
        let select: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
        let sql = format!("SELECT {} FROM {}", select.join(", "), quote(&table.name));
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

    async fn check_conversions(
        &self,
        table: &TableSchema,
    ) -> Result<Vec<crate::source::ConversionCheck>> {
        let mut out: Vec<crate::source::ConversionCheck> = table
            .conversions
            .iter()
            .map(|c| crate::source::ConversionCheck {
                column: c.column,
                ..Default::default()
            })
            .collect();
        if out.is_empty() {
            return Ok(out);
        }
        let select: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
        let sql = format!("SELECT {} FROM {}", select.join(", "), quote(&table.name));
        let mut conn = self.pool.acquire().await?;
        let mut rows = sqlx::query(&sql).fetch(&mut *conn);
        while let Some(r) = rows.try_next().await? {
            for check in &mut out {
                check.rows += 1;
                let raw = read_raw(&r, check.column)?;
                if let Err(why) = convert::convert(raw, &table.columns[check.column]) {
                    check.failed += 1;
                    if check.keys.len() < 10 {
                        let key: Vec<crate::model::Value> = table
                            .key
                            .iter()
                            .map(|&k| {
                                let raw = read_raw(&r, k)?;
                                Ok(convert::convert(raw.clone(), &table.columns[k])
                                    .unwrap_or(crate::model::Value::Text(raw.shown())))
                            })
                            .collect::<Result<_>>()?;
                        check.keys.push(table.describe_key(&key));
                    }
                    check.example.get_or_insert(why);
                }
            }
        }
        Ok(out)
    }

    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let registry = registry(&self.pool).await?;
        let mut by_id: HashMap<i64, Arc<TableSchema>> = HashMap::new();
        for t in &tables {
            let id = match registry.get(&t.name) {
                Some((id, _)) => *id,
                None => t.source_id.parse().map_err(|_| {
                    Error::definite(format!(
                        "table {:?} has no change capture installed",
                        t.name
                    ))
                })?,
            };
            by_id.insert(id, t.clone());
        }
        let mut conn = self.options.connect().await.map_err(|e| {
            Error::connect(format!("cannot open SQLite source {}", self.path.display()))
                .with_source(e)
        })?;
        let mut last = after.commit as i64;
        let mut last_version: Option<i64> = None;
        let mut schema_version: Option<i64> = None;
        let mut drained = true;
        let mut backoff = self.retry.backoff();
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let step = self
                .poll_once(
                    &mut conn,
                    &mut by_id,
                    last,
                    max_batch,
                    drained,
                    &mut last_version,
                    &mut schema_version,
                )
                .await;
            let wait = match step {
                Ok(None) => self.poll_interval,
                Ok(Some((ddl, polled))) => {
                    backoff = self.retry.backoff();
                    drained = polled.seen < max_batch && ddl.is_empty();
                    let end = polled.end.unwrap_or(last);
                    if ddl.is_empty() && polled.end.is_none() {
                        continue;
                    }
                    last = end;
                    let mut changes_out = ddl;
                    changes_out.extend(polled.changes);
                    let out = Batch {
                        changes: changes_out,
                        upto: Position::new(end as u64, 0),
                        // The change log has no commit times; lag in seconds
                        // counts from the last time nothing was behind.
                        committed_at: None,
                        markers: polled.markers,
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        sent = changes.send(out) => if sent.is_err() { return Ok(()) },
                    }
                    continue;
                }
                Err(e) if e.is_transient() => {
                    let Some(wait) = backoff.next() else {
                        return Err(e.context(format!(
                            "polling the change log of {}",
                            self.path.display()
                        )));
                    };
                    crate::retry::counted("polling the change log", &e);
                    warn!(error = %e.report(), retry_in_ms = wait.as_millis() as u64, "polling the change log failed, retrying");
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
        let ids: Vec<i64> = registry(&self.pool)
            .await?
            .values()
            .map(|(id, _)| *id)
            .collect();
        let seq = upto.commit as i64;
        write_tx(&self.pool, move |conn| {
            Box::pin(async move { capture::trim(conn, &ids, seq).await })
        })
        .await?;
        debug!(upto = %upto, "change log trimmed");
        Ok(())
    }

    async fn lag(&self, applied: Position) -> Result<SourceLag> {
        let (rows, head): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), coalesce(max(seq), ?) FROM {CHANGES} WHERE seq > ?"
        ))
        .bind(applied.commit as i64)
        .bind(applied.commit as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(SourceLag {
            head: head.to_string(),
            bytes: rows.max(0) as u64,
            ..Default::default()
        })
    }

    fn position_kind(&self) -> PositionKind {
        PositionKind::Sequence
    }

    async fn pending(
        &self,
        tables: &[Arc<TableSchema>],
        after: Position,
        upto: Position,
    ) -> Result<Pending> {
        let registry = registry(&self.pool).await?;
        let ids: Vec<i64> = tables
            .iter()
            .filter_map(|t| registry.get(&t.name).map(|(id, _)| *id))
            .collect();
        let mut conn = self.pool.acquire().await?;
        let n = capture::count_between(&mut conn, &ids, after.commit as i64, upto.commit as i64)
            .await?;
        Ok(Pending::counted(n))
    }

    async fn capture_installed(&self) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        capture::table_exists(&mut conn, REGISTRY).await
    }

    async fn mark(&self, marker: &Marker) -> Result<()> {
        fence::mark(&self.pool, marker).await
    }

    async fn stream_in_use(&self) -> Result<bool> {
        if self.lock.lock().map(|l| l.is_some()).unwrap_or(false) {
            return Ok(false); // this process streams
        }
        Ok(crate::lockfile::holder(&self.path)?.is_some())
    }

    async fn cutover_problems(
        &self,
        mode: FenceMode,
        roles: Option<&[String]>,
        _tables: &[Arc<TableSchema>],
        reverse: bool,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if roles.is_some_and(|r| !r.is_empty()) && mode != FenceMode::None {
            out.push("--roles: a SQLite source has no roles; its fence refuses every write to the replicated tables".into());
        }
        if reverse {
            out.push("--reverse needs a PostgreSQL source and target: a SQLite source takes no reverse replica".into());
        }
        Ok(out)
    }

    async fn plan_fence(
        &self,
        mode: FenceMode,
        _roles: Option<&[String]>,
        tables: &[Arc<TableSchema>],
    ) -> Result<Fence> {
        Ok(fence::plan(mode, tables))
    }

    async fn apply_fence(&self, f: &Fence) -> Result<Vec<String>> {
        fence::apply(&self.pool, f).await?;
        Ok(Vec::new())
    }

    async fn lift_fence(&self, f: &Fence) -> Result<()> {
        fence::lift(&self.pool, f).await
    }

    async fn exact_count(&self, table: &TableSchema) -> Result<u64> {
        Ok(self.count_rows(table).await?.unwrap_or(0))
    }
}

impl SqliteSource {
    /// Takes the source's lock (once per process), or says which process
    /// streams from it already.
    fn lock(&self) -> Result<()> {
        let mut held = self
            .lock
            .lock()
            .map_err(|_| Error::definite("the source's lock was poisoned"))?;
        if held.is_some() {
            return Ok(());
        }
        match crate::lockfile::DaemonLock::acquire(&self.path)? {
            Some(l) => {
                *held = Some(l);
                Ok(())
            }
            None => Err(Error::definite(format!(
                "another switchyard process (pid {}) streams from {}: stop it first (one process reads a source's change log)",
                crate::lockfile::holder(&self.path)?.unwrap_or(0),
                self.path.display()
            ))),
        }
    }

    /// One look at the change log: nothing when no other connection
    /// committed since the last look and the log was drained; else the
    /// changes of definition the schema went through (the tables are
    /// described again whenever `schema_version` moved) and the entries
    /// after `last`.
    #[allow(clippy::too_many_arguments)]
    async fn poll_once(
        &self,
        conn: &mut SqliteConnection,
        by_id: &mut HashMap<i64, Arc<TableSchema>>,
        last: i64,
        max_batch: usize,
        drained: bool,
        last_version: &mut Option<i64>,
        schema_version: &mut Option<i64>,
    ) -> Result<Option<(Vec<Change>, Polled)>> {
        // data_version moves when another connection commits.
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await?;
        if drained && *last_version == Some(version) {
            return Ok(None);
        }
        let mut ddl = Vec::new();
        loop {
            let polled = poll(conn, by_id, last, max_batch, &self.rejects, *schema_version).await?;
            let Some(now) = polled.schema_changed else {
                *last_version = Some(version);
                return Ok(Some((ddl, polled)));
            };
            // The schema moved: the tables as they are now, before any entry
            // is read with their columns.
            let at = Position::new(last.max(0) as u64, 0);
            ddl.extend(
                follow::reconcile(&self.pool, &self.selection(), &self.policy, by_id, at).await?,
            );
            *schema_version = Some(now);
        }
    }
}

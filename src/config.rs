//! The TOML configuration: parsing, `${VAR}` expansion and validation.
//!
//! Every problem is reported at once, each with its key and line: unknown
//! keys, values of the wrong type, and what [`Config::validate`] finds.
//! Secrets are held in [`SecretString`], whose `Debug` prints nothing of the
//! value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use secrecy::SecretString;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::redact::{redact_url, url_has_password};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub target: TargetConfig,
    #[serde(default)]
    pub tables: TablesConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub schema_changes: SchemaChangesConfig,
    /// SurrealDB source: several namespace/database pairs, each replicated
    /// into its own pair of the target with its own position.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// The tenant (`ns/db` of the source) this config replicates, in a
    /// config [`Config::tenant_configs`] made; `None` otherwise.
    #[serde(skip)]
    pub tenant: Option<String>,
}

/// One tenant: a namespace and database of a SurrealDB source and where it
/// goes in the target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// `namespace/database` in the source.
    pub source: String,
    /// `namespace/database` in the target; the source's when left out.
    pub target: Option<String>,
}

impl TenantConfig {
    fn pair(s: &str) -> Option<(String, String)> {
        let (ns, db) = s.split_once('/')?;
        (!ns.is_empty() && !db.is_empty() && !db.contains('/')).then(|| (ns.into(), db.into()))
    }

    /// The source's namespace and database.
    pub fn source_pair(&self) -> Option<(String, String)> {
        Self::pair(&self.source)
    }

    /// The target's namespace and database.
    pub fn target_pair(&self) -> Option<(String, String)> {
        Self::pair(self.target.as_deref().unwrap_or(&self.source))
    }
}

/// What the target does when the source's schema changes while streaming.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SchemaChangesConfig {
    /// A column dropped in the source: `keep` it in the target (default;
    /// it stops being filled, and is made nullable), or `drop` it.
    #[serde(default)]
    pub drop_column: OnDrop,
    /// A table dropped in the source: `keep` its copy in the target
    /// (default; it stops being followed), or `drop` it.
    #[serde(default)]
    pub drop_table: OnDrop,
    /// A table renamed in the source: `follow` (default: the target table
    /// is renamed), or `keep` the target table's name.
    #[serde(default)]
    pub rename_table: OnRename,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnDrop {
    #[default]
    Keep,
    Drop,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnRename {
    #[default]
    Follow,
    Keep,
}

/// The HTTP endpoints: `/healthz`, `/readyz`, `/status`, `/metrics`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where to listen, e.g. `127.0.0.1:9650`; no HTTP unless set.
    pub address: Option<String>,
    /// A bearer token that `/status` and `/metrics` require
    /// (`/healthz` and `/readyz` tell nothing but up and ready).
    pub token: Option<SecretString>,
    /// `/readyz` answers 200 while streaming with at most this lag.
    #[serde(default = "default_ready_max_lag_seconds")]
    pub ready_max_lag_seconds: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `sqlite://PATH` (relative to the working directory) or `sqlite:///ABS/PATH`.
    pub url: String,
    pub password: Option<SecretString>,
    /// How often the SQLite change log is polled.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How long a SQLite statement waits for a lock held by the application.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// PostgreSQL: the logical replication slot switchyard reads from (and
    /// creates when it is missing).
    #[serde(default = "default_slot")]
    pub slot: String,
    /// PostgreSQL: the publication that lists the replicated tables.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// PostgreSQL: create the publication (for the selected tables) when it
    /// does not exist; otherwise it must exist.
    #[serde(default = "default_true")]
    pub create_publication: bool,
    /// PostgreSQL: carry columns whose type has no mapping for the target
    /// (user-defined types: composite types, base types of extensions, …)
    /// as their text form; when false such a column stops `run` and `check`
    /// names it.
    #[serde(default)]
    pub unmapped_as_text: bool,
    /// PostgreSQL: how often a heartbeat message is written to the source's
    /// WAL (`pg_logical_emit_message`), so that lag in seconds stays honest
    /// and the slot advances when the source is idle (0: none).
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// PostgreSQL: warn when the slot retains more WAL than this (MiB).
    #[serde(default = "default_slot_warn_mb")]
    pub slot_warn_mb: u64,
    /// SurrealDB: the namespace and database replicated.
    pub namespace: Option<String>,
    pub database: Option<String>,
    /// SurrealDB server: the root user to sign in as (password in
    /// `source.password`).
    pub username: Option<String>,
    /// SurrealDB: define a changefeed (`ALTER TABLE … CHANGEFEED`) on a
    /// replicated table that has none; when false such a table stops `run`.
    #[serde(default = "default_true")]
    pub define_changefeed: bool,
    /// SurrealDB: the retention of the changefeeds switchyard defines
    /// (a SurrealQL duration): longer than the daemon is ever stopped.
    #[serde(default = "default_changefeed_retention")]
    pub changefeed_retention: String,
    /// SurrealDB: how far behind the server's clock the stream reads, so
    /// that a transaction stamped earlier has committed (versionstamps are
    /// taken before commit).
    #[serde(default = "default_changefeed_window_ms")]
    pub changefeed_window_ms: u64,
    /// An embedded SurrealKV source (`surrealkv://`): the memory its engine
    /// may hold, in MiB (as `target.memory_mb`).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
}

/// A SurrealQL duration literal: `7d`, `1h30m`, `500ms`.
fn is_surreal_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len())
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

fn default_changefeed_retention() -> String {
    "7d".into()
}

fn default_changefeed_window_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `mem://`, `surrealkv://PATH`, `ws://host:port`, `wss://host:port`.
    pub url: String,
    pub namespace: Option<String>,
    pub database: Option<String>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    /// `DEFINE TABLE … SCHEMAFULL` with typed fields (default), or schemaless tables.
    #[serde(default = "default_true")]
    pub schemafull: bool,
    /// PostgreSQL target: `create` (default) generates the tables from the
    /// source; `existing` checks tables that are there.
    pub schema: Option<String>,
    /// PostgreSQL target: `SET session_replication_role = replica` on the
    /// writing sessions, so target triggers and foreign keys do not fire again
    /// for replicated rows.
    #[serde(default = "default_true")]
    pub replica_role: bool,
    /// PostgreSQL → PostgreSQL (`schema = "create"`): restore the source's
    /// owners and grants with its schema (the roles must exist in the
    /// target); by default they are left out.
    #[serde(default)]
    pub keep_owners: bool,
    /// PostgreSQL → PostgreSQL with `replica_role = false`: accept that the
    /// source's triggers and rules, restored in the target, fire for
    /// replicated rows (otherwise `run` refuses).
    #[serde(default)]
    pub fire_triggers: bool,
    /// SurrealDB target: a column whose (single-column) foreign key names
    /// the referenced table's primary key is stored as a record link
    /// (`record<customer>`), which SurrealQL traverses (`customer.name`).
    #[serde(default)]
    pub links: bool,
    /// An embedded SurrealKV target (`surrealkv://`): the memory its engine
    /// may hold, in MiB (its write buffers and block cache, which the
    /// engine would otherwise size from the machine's RAM).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// PostgreSQL target: the `maintenance_work_mem` (MiB) that builds the
    /// keys and indexes after the load, where the server's own is lower (a
    /// larger one is kept); 0 keeps the server's. A sort that fits in it
    /// does not spill to disk.
    #[serde(default = "default_maintenance_work_mem_mb")]
    pub maintenance_work_mem_mb: u64,
}

fn default_maintenance_work_mem_mb() -> u64 {
    256
}

/// The least `target.memory_mb`: a transaction must fit one write buffer.
pub const MIN_MEMORY_MB: u64 = 64;

/// `memory_mb` where the config does not set it.
pub const DEFAULT_MEMORY_MB: u64 = 128;

fn default_memory_mb() -> u64 {
    DEFAULT_MEMORY_MB
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablesConfig {
    /// Glob patterns of source table names to replicate.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Source table name → target table name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Key columns for tables that have no primary key.
    #[serde(default)]
    pub keys: BTreeMap<String, Vec<String>>,
    /// Type rules (SQLite source): `"table.column"` (patterns allowed) or
    /// `"type:DECLARED"` → the target type (`jsonb`, `boolean`, …).
    #[serde(default)]
    pub types: BTreeMap<String, String>,
    /// SQLite FTS tables over a replicated table become a `tsvector`
    /// column with a GIN index in a PostgreSQL target.
    #[serde(default)]
    pub text_search: bool,
}

impl Default for TablesConfig {
    fn default() -> Self {
        Self {
            include: default_include(),
            exclude: Vec::new(),
            rename: BTreeMap::new(),
            keys: BTreeMap::new(),
            types: BTreeMap::new(),
            text_search: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Changes applied in one target transaction, at most.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// How long a batch waits for more changes before it is applied.
    #[serde(default = "default_batch_delay_ms")]
    pub batch_delay_ms: u64,
    /// Batches queued between source and sink (bounds memory).
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Rows per insert during the snapshot.
    #[serde(default = "default_snapshot_batch_rows")]
    pub snapshot_batch_rows: usize,
    /// Attempts for an operation that fails transiently, before the daemon stops.
    #[serde(default = "default_retry_attempts")]
    pub retry_attempts: usize,
    /// The longest wait between two attempts.
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// Tables copied at the same time during the snapshot (default: the
    /// machine's cores).
    #[serde(default = "default_snapshot_workers")]
    pub snapshot_workers: usize,
    /// A PostgreSQL table whose heap is at least this many MiB is read in
    /// block ranges at once (0: never split).
    #[serde(default = "default_snapshot_split_mb")]
    pub snapshot_split_mb: u64,
    /// The block ranges such a table is read in (default: `snapshot_workers`,
    /// or half of them where a PostgreSQL server runs on this machine, whose
    /// cores each range's reader and loader then share).
    #[serde(default)]
    pub snapshot_split_parts: Option<usize>,
    /// Rows whose values do not fit the target are written to
    /// `<reject_dir>/<table>.jsonl` and counted, instead of stopping the run.
    #[serde(default)]
    pub reject_dir: Option<PathBuf>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_rows: default_batch_rows(),
            batch_delay_ms: default_batch_delay_ms(),
            queue_size: default_queue_size(),
            snapshot_batch_rows: default_snapshot_batch_rows(),
            retry_attempts: default_retry_attempts(),
            retry_max_delay_ms: default_retry_max_delay_ms(),
            snapshot_workers: default_snapshot_workers(),
            snapshot_split_mb: default_snapshot_split_mb(),
            snapshot_split_parts: None,
            reject_dir: None,
        }
    }
}

fn default_ready_max_lag_seconds() -> f64 {
    30.0
}
fn default_heartbeat_interval_ms() -> u64 {
    5_000
}
fn default_slot_warn_mb() -> u64 {
    1_024
}
fn default_snapshot_split_mb() -> u64 {
    64
}
fn default_snapshot_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
fn default_true() -> bool {
    true
}
fn default_include() -> Vec<String> {
    vec!["*".into()]
}
fn default_poll_interval_ms() -> u64 {
    200
}
fn default_slot() -> String {
    "switchyard".into()
}
fn default_publication() -> String {
    "switchyard".into()
}
fn default_busy_timeout_ms() -> u64 {
    5_000
}
fn default_batch_rows() -> usize {
    1_000
}
fn default_batch_delay_ms() -> u64 {
    10
}
fn default_queue_size() -> usize {
    8
}
fn default_snapshot_batch_rows() -> usize {
    2_000
}

/// `pipeline.snapshot_batch_rows` where it is not given and the target is an
/// embedded SurrealKV store. The engine remembers a fingerprint of every key
/// written by its last 1,024 transactions (to find write conflicts) in a
/// table that grows to fit them and never shrinks: copying a large table in
/// transactions of 2,000 rows left it at about 40 MiB for the life of the
/// process (a heap profile of `scripts/bench sqlite-surreal`); 500-row ones
/// bound it to 1,024 × 500 fingerprints, about 17 MiB, at the same speed.
pub const SURREALKV_SNAPSHOT_BATCH_ROWS: usize = 500;
fn default_retry_attempts() -> usize {
    10
}
fn default_retry_max_delay_ms() -> u64 {
    30_000
}

/// Where the source is.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    Sqlite {
        path: PathBuf,
    },
    /// `postgres://USER@HOST:PORT/DATABASE?sslmode=…` (password in `source.password`).
    Postgres {
        url: String,
    },
    /// A SurrealDB endpoint as the SDK's `engine::any` takes it.
    Surreal {
        endpoint: String,
        remote: bool,
    },
}

/// Where the target is.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetKind {
    /// A SurrealDB endpoint as the SDK's `engine::any` takes it.
    Surreal { endpoint: String, remote: bool },
    /// `postgres://USER@HOST:PORT/DATABASE?sslmode=…` (password in `target.password`).
    Postgres { url: String },
}

impl Config {
    /// Reads, expands `${VAR}` in string values, parses and validates.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read config file {}", path.display())).with_source(e)
        })?;
        Self::parse(&text).map_err(|e| e.context(format!("config file {}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let mut raw: toml::Table = toml::from_str(text)
            .map_err(|e: toml::de::Error| Error::config(toml_error(text, &e)))?;
        let mut problems = Vec::new();
        for (k, v) in raw.iter_mut() {
            expand_env(k, v, &mut problems);
        }
        // Every key or type problem: each error names its key, which is then
        // taken out (its default stands in) to find the next one.
        let mut parsed = None;
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(raw.clone())) {
                Ok(c) => {
                    parsed = Some(c);
                    break;
                }
                Err(e) => {
                    let path: Vec<String> = e
                        .path()
                        .iter()
                        .filter_map(|s| match s {
                            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                            _ => None,
                        })
                        .collect();
                    let message = e.inner().message().to_string();
                    let (key, said, removable) = describe_serde_error(&path, &message);
                    problems.push(Problem::new(key, said));
                    if !removable || !remove_key(&mut raw, &path) {
                        break;
                    }
                }
            }
        }
        if let Some(c) = parsed.as_mut() {
            let given = raw
                .get("pipeline")
                .and_then(|p| p.get("snapshot_batch_rows"))
                .is_some();
            if !given && c.target.url.starts_with("surrealkv://") {
                c.pipeline.snapshot_batch_rows = SURREALKV_SNAPSHOT_BATCH_ROWS;
            }
            problems.extend(c.problems());
        }
        if !problems.is_empty() {
            let lines: Vec<String> = problems.iter().map(|p| p.render(text)).collect();
            return Err(Error::config(lines.join("; ")));
        }
        Ok(parsed.expect("no problems means parsed"))
    }

    /// Every problem at once, each naming its key.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            let lines: Vec<String> = problems.iter().map(|p| p.render("")).collect();
            Err(Error::config(lines.join("; ")))
        }
    }

    /// What [`Config::validate`] finds, each with its key.
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        match self.source_kind() {
            Err(e) => problems.push(e.to_string()),
            Ok(SourceKind::Postgres { .. }) => {
                for (key, v) in [
                    ("slot", &self.source.slot),
                    ("publication", &self.source.publication),
                ] {
                    let ok = !v.is_empty()
                        && v.len() <= 63
                        && v.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        problems.push(format!(
                            "source.{key}: {v:?} must be 1 to 63 characters of lower-case letters, digits and _"
                        ));
                    }
                }
            }
            Ok(SourceKind::Sqlite { .. }) => {
                if let Err(e) = crate::schema::cast::TypeRules::compile(&self.tables.types) {
                    problems.push(e);
                }
            }
            Ok(SourceKind::Surreal { .. }) => {
                for (key, v) in [
                    ("namespace", &self.source.namespace),
                    ("database", &self.source.database),
                ] {
                    if self.tenants.is_empty() && v.as_deref().is_none_or(str::is_empty) {
                        problems.push(format!(
                            "source.{key}: a SurrealDB source needs the namespace and database to replicate (or [[tenants]])"
                        ));
                    }
                }
                if !is_surreal_duration(&self.source.changefeed_retention) {
                    problems.push(format!(
                        "source.changefeed_retention: {:?} is not a duration (for example \"7d\" or \"12h\")",
                        self.source.changefeed_retention
                    ));
                }
            }
        }
        if !matches!(self.source_kind(), Ok(SourceKind::Sqlite { .. })) {
            if !self.tables.types.is_empty() {
                problems.push("tables.types: type rules apply to a SQLite source; a PostgreSQL source's types are carried as they are".into());
            }
            if self.tables.text_search {
                problems.push("tables.text_search: applies to a SQLite source's FTS tables".into());
            }
        }
        match self.target_kind() {
            Err(e) => problems.push(e.to_string()),
            Ok(TargetKind::Surreal { remote, .. }) => {
                for (key, v) in [
                    ("namespace", &self.target.namespace),
                    ("database", &self.target.database),
                ] {
                    match v {
                        None if !self.tenants.is_empty() => {}
                        None => problems.push(format!(
                            "target.{key}: required for a SurrealDB target (for example {key} = \"app\")"
                        )),
                        Some(s) if s.trim().is_empty() => {
                            problems.push(format!("target.{key}: must not be empty"))
                        }
                        _ => {}
                    }
                }
                if remote && self.target.username.is_some() != self.target.password.is_some() {
                    problems.push(
                        "target.username and target.password: give both to sign in, or neither"
                            .into(),
                    );
                }
            }
            Ok(TargetKind::Postgres { .. }) => {
                if let Some(m) = &self.target.schema {
                    let dir = ["migrations:", "refinery:", "sqlx:"]
                        .iter()
                        .any(|p| m.strip_prefix(p).is_some_and(|d| !d.is_empty()));
                    if m != "create" && m != "existing" && !dir {
                        problems.push(format!("target.schema: {m:?} must be \"create\", \"existing\", \"migrations:DIR\", \"refinery:DIR\" or \"sqlx:DIR\""));
                    }
                }
            }
        }
        let p = &self.pipeline;
        for (key, v) in [
            ("batch_rows", p.batch_rows),
            ("queue_size", p.queue_size),
            ("snapshot_batch_rows", p.snapshot_batch_rows),
            ("retry_attempts", p.retry_attempts),
            ("snapshot_workers", p.snapshot_workers),
            ("snapshot_split_parts", p.snapshot_split_parts.unwrap_or(1)),
        ] {
            if v == 0 {
                problems.push(format!("pipeline.{key}: must be at least 1"));
            }
        }
        if p.reject_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().to_string_lossy().trim().is_empty())
        {
            problems.push(
                "pipeline.reject_dir: must not be empty (leave it out to stop on values that do not fit)"
                    .into(),
            );
        }
        if let Some(a) = &self.http.address {
            if a.parse::<std::net::SocketAddr>().is_err() {
                problems.push(format!(
                    "http.address: {a:?} is not an address and port such as 127.0.0.1:9650"
                ));
            }
        }
        if !(self.http.ready_max_lag_seconds >= 0.0) {
            problems
                .push("http.ready_max_lag_seconds: must be a number of seconds, 0 or more".into());
        }
        for (side, mb) in [
            ("source", self.source.memory_mb),
            ("target", self.target.memory_mb),
        ] {
            if mb < MIN_MEMORY_MB {
                problems.push(format!(
                    "{side}.memory_mb: {mb} is too little for an embedded SurrealDB store; give it at least {MIN_MEMORY_MB}"
                ));
            }
        }
        if self.source.poll_interval_ms == 0 {
            problems.push("source.poll_interval_ms: must be at least 1".into());
        }
        for (key, pats) in [
            ("include", &self.tables.include),
            ("exclude", &self.tables.exclude),
        ] {
            for pat in pats {
                if let Err(e) = Glob::new(pat) {
                    problems.push(format!("tables.{key}: invalid pattern {pat:?}: {e}"));
                }
            }
        }
        let mut seen = BTreeMap::new();
        for (from, to) in &self.tables.rename {
            if to.trim().is_empty() {
                problems.push(format!(
                    "tables.rename.{from}: the new name must not be empty"
                ));
            }
            if let Some(other) = seen.insert(to.clone(), from.clone()) {
                problems.push(format!(
                    "tables.rename: {other:?} and {from:?} are both renamed to {to:?}"
                ));
            }
        }
        for (table, cols) in &self.tables.keys {
            if cols.is_empty() {
                problems.push(format!("tables.keys.{table}: name at least one key column"));
            }
        }
        if !self.tenants.is_empty() {
            if !self.source_is_surreal()
                || !matches!(self.target_kind(), Ok(TargetKind::Surreal { .. }))
            {
                problems.push("tenants: apply to a SurrealDB source and a SurrealDB target (each tenant is a namespace/database pair of both)".into());
            }
            let mut targets = std::collections::BTreeSet::new();
            for (i, t) in self.tenants.iter().enumerate() {
                match (t.source_pair(), t.target_pair()) {
                    (Some(_), Some(to)) => {
                        if !targets.insert(to.clone()) {
                            problems.push(format!(
                                "tenants[{i}]: target {}/{} is also another tenant's; give each tenant a namespace/database of its own",
                                to.0, to.1
                            ));
                        }
                    }
                    _ => problems.push(format!(
                        "tenants[{i}]: source and target are written \"namespace/database\" (for example source = \"acme/main\")"
                    )),
                }
            }
        }
        problems
            .into_iter()
            .map(|m: String| match m.split_once(": ") {
                Some((key, said)) if !key.contains(' ') => {
                    Problem::new(key.to_string(), said.to_string())
                }
                _ => Problem::new(String::new(), m),
            })
            .collect()
    }

    /// The configuration of the reverse replica a cutover leaves behind:
    /// the target becomes the source (PostgreSQL: its own slot and
    /// publication, named after the forward ones with `_reverse`; a
    /// SurrealDB server: changefeeds on the tables), the old source the
    /// target, whose tables exist already (`schema = "existing"`).
    /// `tables`: each replicated table's (source name, target name);
    /// `keys`: each one's key columns by source name, which a SurrealDB
    /// target keeps in fields (`tables.keys` of the SurrealDB source).
    pub fn reversed(
        &self,
        tables: &[(String, String)],
        keys: &BTreeMap<String, Vec<String>>,
    ) -> Result<Config> {
        let surreal = match (self.source_kind()?, self.target_kind()?) {
            (SourceKind::Postgres { .. }, TargetKind::Postgres { .. }) => false,
            (SourceKind::Postgres { .. }, TargetKind::Surreal { remote: true, .. }) => true,
            (SourceKind::Postgres { .. }, TargetKind::Surreal { remote: false, .. }) => {
                return Err(Error::config(
                    "a reverse replica out of SurrealDB needs a SurrealDB server as the target: after the switch an embedded store \
                     is opened by the application alone (one process at a time); run the reverse replica inside the application \
                     with the library (SurrealSource::from_client), or migrate into a server (ws://, wss://)",
                ))
            }
            _ => {
                return Err(Error::config(
                    "a reverse replica needs a PostgreSQL source and a PostgreSQL target or SurrealDB server",
                ))
            }
        };
        let mut by_target = BTreeMap::new();
        let mut rename = BTreeMap::new();
        if surreal && !is_surreal_duration(&self.source.changefeed_retention) {
            return Err(Error::config(format!(
                "source.changefeed_retention: {:?} is not a duration (for example \"7d\"); the reverse replica defines changefeeds with it",
                self.source.changefeed_retention
            )));
        }
        for (source, target) in tables {
            // Out of SurrealDB the key columns are `keys` (which has the
            // forward tables.keys too); a PostgreSQL source has its own.
            if let (false, Some(k)) = (surreal, self.tables.keys.get(source)) {
                by_target.insert(target.clone(), k.clone());
            }
            if surreal {
                if let Some(k) = keys.get(source) {
                    // Where the record id alone holds the key (one column
                    // named `id`), the record id is the key column already.
                    if k.as_slice() != ["id"] {
                        by_target.insert(target.clone(), k.clone());
                    }
                }
            }
            if source != target {
                rename.insert(target.clone(), source.clone());
            }
        }
        let keys = by_target;
        let source = if surreal {
            SourceConfig {
                url: self.target.url.clone(),
                password: self.target.password.clone(),
                namespace: self.target.namespace.clone(),
                database: self.target.database.clone(),
                username: self.target.username.clone(),
                memory_mb: self.target.memory_mb,
                ..self.source.clone()
            }
        } else {
            SourceConfig {
                url: self.target.url.clone(),
                password: self.target.password.clone(),
                slot: format!("{}_reverse", self.source.slot),
                publication: format!("{}_reverse", self.source.publication),
                create_publication: true,
                memory_mb: self.target.memory_mb,
                ..self.source.clone()
            }
        };
        Ok(Config {
            source,
            target: TargetConfig {
                url: self.source.url.clone(),
                password: self.source.password.clone(),
                namespace: None,
                database: None,
                username: None,
                schemafull: true,
                schema: Some("existing".into()),
                replica_role: self.target.replica_role,
                keep_owners: false,
                fire_triggers: self.target.fire_triggers,
                links: false,
                memory_mb: self.source.memory_mb,
                maintenance_work_mem_mb: self.target.maintenance_work_mem_mb,
            },
            tables: TablesConfig {
                include: tables.iter().map(|(_, t)| globset::escape(t)).collect(),
                exclude: Vec::new(),
                rename,
                keys,
                types: BTreeMap::new(),
                text_search: false,
            },
            pipeline: PipelineConfig {
                reject_dir: None,
                ..self.pipeline.clone()
            },
            http: self.http.clone(),
            schema_changes: self.schema_changes.clone(),
            tenants: Vec::new(),
            tenant: None,
        })
    }

    /// The configs of the tenants (`[[tenants]]`), each with its source
    /// and target namespace and database, named `ns/db`; this config alone
    /// (named "") when there are none.
    pub fn tenant_configs(&self) -> Vec<(String, Config)> {
        if self.tenants.is_empty() {
            return vec![(String::new(), self.clone())];
        }
        self.tenants
            .iter()
            .filter_map(|t| {
                let ((sns, sdb), (tns, tdb)) = (t.source_pair()?, t.target_pair()?);
                let mut c = self.clone();
                c.tenants.clear();
                c.source.namespace = Some(sns.clone());
                c.source.database = Some(sdb.clone());
                c.target.namespace = Some(tns);
                c.target.database = Some(tdb);
                c.tenant = Some(format!("{sns}/{sdb}"));
                Some((format!("{sns}/{sdb}"), c))
            })
            .collect()
    }

    /// Whether the source is SurrealDB (embedded or a server).
    pub fn source_is_surreal(&self) -> bool {
        matches!(self.source_kind(), Ok(SourceKind::Surreal { .. }))
    }

    pub fn source_kind(&self) -> Result<SourceKind> {
        let url = self.source.url.trim();
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or("");
            if path.is_empty() {
                return Err(Error::config(
                    "source.url: a SQLite URL needs a path, for example sqlite://data/app.sqlite",
                ));
            }
            return Ok(SourceKind::Sqlite {
                path: PathBuf::from(path),
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            if url_has_password(url) {
                return Err(Error::config(
                    "source.url: put the password in source.password (\"${VAR}\"), not in the URL",
                ));
            }
            return Ok(SourceKind::Postgres {
                url: url.to_string(),
            });
        }
        let scheme = url.split("://").next().unwrap_or(url);
        if url.contains("://") && matches!(scheme, "mem" | "memory" | "surrealkv" | "ws" | "wss") {
            if scheme == "surrealkv" && url.len() <= "surrealkv://".len() {
                return Err(Error::config(
                    "source.url: surrealkv needs a path, for example surrealkv://data/app",
                ));
            }
            if url_has_password(url) {
                return Err(Error::config(
                    "source.url: put the password in source.password (\"${VAR}\"), not in the URL",
                ));
            }
            return Ok(SourceKind::Surreal {
                endpoint: url.to_string(),
                remote: matches!(scheme, "ws" | "wss"),
            });
        }
        Err(Error::config(format!(
            "source.url: unsupported scheme {scheme:?} in {}; use sqlite://PATH, postgres://USER@HOST:PORT/DATABASE, surrealkv://PATH or ws://HOST:PORT",
            redact_url(url)
        )))
    }

    pub fn target_kind(&self) -> Result<TargetKind> {
        let url = self.target.url.trim();
        let scheme = url.split("://").next().unwrap_or("");
        match scheme {
            "mem" | "memory" | "surrealkv" => {
                if scheme == "surrealkv" && url.len() <= "surrealkv://".len() {
                    return Err(Error::config(
                        "target.url: surrealkv needs a path, for example surrealkv://data/replica",
                    ));
                }
                Ok(TargetKind::Surreal { endpoint: url.to_string(), remote: false })
            }
            "ws" | "wss" if url.contains("://") => {
                if url_has_password(url) {
                    return Err(Error::config(
                        "target.url: put the password in target.password (\"${VAR}\"), not in the URL",
                    ));
                }
                Ok(TargetKind::Surreal { endpoint: url.to_string(), remote: true })
            }
            "postgres" | "postgresql" => {
                crate::pg::conn::PgEndpoint::parse(url, None, "target.url")?;
                Ok(TargetKind::Postgres { url: url.to_string() })
            }
            _ => Err(Error::config(format!(
                "target.url: unsupported target {}; use mem://, surrealkv://PATH, ws://HOST:PORT, wss://HOST:PORT or postgres://USER@HOST/DB",
                redact_url(url)
            ))),
        }
    }

    /// The compiled include/exclude patterns.
    pub fn table_filter(&self) -> Result<TableFilter> {
        Ok(TableFilter {
            include: globs(&self.tables.include)?,
            exclude: globs(&self.tables.exclude)?,
        })
    }
}

#[derive(Clone)]
pub struct TableFilter {
    include: GlobSet,
    exclude: GlobSet,
}

impl TableFilter {
    /// `table` as switchyard names it (`orders` for a table of PostgreSQL's
    /// `public` schema or of SQLite, `sales.orders` otherwise); a pattern
    /// may also name the `public` schema (`public.*`, `public.audit_*`).
    pub fn matches(&self, table: &str) -> bool {
        let qualified = (!table.contains('.')).then(|| format!("public.{table}"));
        let hit = |set: &GlobSet| {
            set.is_match(table) || qualified.as_ref().is_some_and(|q| set.is_match(q))
        };
        hit(&self.include) && !hit(&self.exclude)
    }
}

fn globs(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(
            Glob::new(p).map_err(|e| Error::config(format!("invalid table pattern {p:?}: {e}")))?,
        );
    }
    b.build()
        .map_err(|e| Error::config(format!("table patterns: {e}")))
}

fn expand_env(key: &str, value: &mut toml::Value, problems: &mut Vec<Problem>) {
    match value {
        toml::Value::String(s) => match expand_str(s) {
            Ok(x) => *s = x,
            Err(var) => problems.push(Problem::new(
                key.to_string(),
                format!("environment variable {var} is not set (the value refers to ${{{var}}})"),
            )),
        },
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                expand_env(&format!("{key}[{i}]"), v, problems);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                expand_env(&format!("{key}.{k}"), v, problems);
            }
        }
        _ => {}
    }
}

/// Replaces every `${NAME}` with the variable's value; `$${` stays a literal `${`.
fn expand_str(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[i..]);
            return Ok(out);
        };
        let name = &after[..end];
        match std::env::var(name) {
            Ok(v) => out.push_str(&v),
            Err(_) => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A problem of the config file: the key it concerns and what is wrong.
#[derive(Debug, Clone)]
struct Problem {
    /// `section.key` (empty when the problem is not one key's).
    key: String,
    message: String,
}

impl Problem {
    fn new(key: String, message: String) -> Self {
        Self { key, message }
    }

    /// `key: message (line N)`, the line found in `text` where it has the key.
    fn render(&self, text: &str) -> String {
        let line = (!self.key.is_empty())
            .then(|| line_of(text, &self.key))
            .flatten()
            .map(|n| format!(" (line {n})"))
            .unwrap_or_default();
        if self.key.is_empty() {
            format!("{}{line}", self.message)
        } else {
            format!("{}: {}{line}", self.key, self.message)
        }
    }
}

/// The key and the words for a deserialization error at `path`, and whether
/// the key can be taken out to look for further problems.
fn describe_serde_error(path: &[String], message: &str) -> (String, String, bool) {
    let dotted = path.join(".");
    let join = |field: &str| {
        if dotted.is_empty() {
            field.to_string()
        } else if dotted.ends_with(&format!(".{field}")) || dotted == field {
            dotted.clone()
        } else {
            format!("{dotted}.{field}")
        }
    };
    let quoted = |m: &str| m.split('`').nth(1).map(str::to_string);
    if let Some(field) = message
        .strip_prefix("missing field ")
        .and_then(|_| quoted(message))
    {
        return (join(&field), "required, and missing".into(), false);
    }
    if let Some(field) = message
        .strip_prefix("unknown field ")
        .and_then(|_| quoted(message))
    {
        let expected = message
            .split_once(", expected ")
            .map(|(_, e)| format!("; expected {e}"))
            .unwrap_or_default();
        return (join(&field), format!("unknown key{expected}"), true);
    }
    let mut said = message.to_string();
    if message.contains("expected a sequence") {
        said.push_str("; write a list, for example [\"*\"]");
    }
    (dotted, said, !path.is_empty())
}

/// Takes the key at `path` out of the table; false if it is not there.
fn remove_key(table: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut t = table;
    for p in parents {
        match t.get_mut(p) {
            Some(toml::Value::Table(inner)) => t = inner,
            _ => return false,
        }
    }
    t.remove(last).is_some()
}

/// The 1-based line of a dotted key in the TOML text, where it is found.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table: &toml::de::DeTable = doc.get_ref();
    let parts: Vec<&str> = key.split('.').collect();
    let mut span = None;
    for (i, part) in parts.iter().enumerate() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *part)?;
        span = Some(k.span());
        if i + 1 < parts.len() {
            table = v.get_ref().as_table()?;
        }
    }
    let start = span?.start.min(text.len());
    Some(text[..start].matches('\n').count() + 1)
}

/// A TOML syntax error as line, column and message, without quoting the
/// offending line: it may hold a password.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .map(|l| l.chars().count())
                .unwrap_or(0)
                + 1;
            format!(
                "invalid TOML at line {line}, column {column}: {}",
                e.message()
            )
        }
        None => format!("invalid TOML: {}", e.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [source]
        url = "sqlite://data/app.sqlite"
        [target]
        url = "mem://"
        namespace = "app"
        database = "app"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.tables.include, vec!["*"]);
        assert_eq!(c.pipeline.batch_rows, 1000);
        assert_eq!(
            c.source_kind().unwrap(),
            SourceKind::Sqlite {
                path: "data/app.sqlite".into()
            }
        );
    }

    #[test]
    fn an_embedded_surrealkv_target_copies_in_smaller_transactions_unless_told() {
        let kv = MIN.replace("mem://", "surrealkv://data/replica");
        let c = Config::parse(&kv).unwrap();
        assert_eq!(
            c.pipeline.snapshot_batch_rows,
            SURREALKV_SNAPSHOT_BATCH_ROWS
        );
        let c = Config::parse(&format!("{kv}\n[pipeline]\nsnapshot_batch_rows = 3000\n")).unwrap();
        assert_eq!(c.pipeline.snapshot_batch_rows, 3000);
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.pipeline.snapshot_batch_rows, 2000);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = Config::parse(&format!("{MIN}\n[pipeline]\nbatch_rowz = 3\n")).unwrap_err();
        assert!(e.to_string().contains("batch_rowz"), "{e}");
    }

    #[test]
    fn syntax_error_gives_line_and_column_without_quoting_the_line() {
        let e = Config::parse("[target]\nurl = \"ws://x\"\npassword = \"hunter2\" oops\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains("hunter2"), "the line was quoted: {e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [source]
            url = "oracle://x"
            [target]
            url = "surrealkv://data/r"
            [pipeline]
            batch_rows = 0
        "#;
        let e = Config::parse(text).unwrap_err().to_string();
        for needle in [
            "source.url",
            "target.namespace",
            "target.database",
            "pipeline.batch_rows",
        ] {
            assert!(e.contains(needle), "{needle} missing in {e}");
        }
    }

    #[test]
    fn an_embedded_stores_memory_budget_has_a_floor() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!((c.source.memory_mb, c.target.memory_mb), (128, 128));
        let e =
            Config::parse(&MIN.replace("database = \"app\"", "database = \"app\"\nmemory_mb = 16"))
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("target.memory_mb: 16 is too little") && e.contains("at least 64"),
            "{e}"
        );
        #[cfg(feature = "surrealdb")]
        assert_eq!(crate::surreal::engine_budget(128), (32 << 20, 32 << 20));
    }

    #[test]
    fn a_reverse_replica_out_of_surrealdb_reads_a_server_and_the_key_fields() {
        let pg = MIN.replace(
            "url = \"sqlite://data/app.sqlite\"",
            "url = \"postgres://sy@127.0.0.1:5432/app\"",
        );
        let tables = [
            ("acct".to_string(), "acct".to_string()),
            ("sales.item".to_string(), "item".to_string()),
        ];
        let keys = BTreeMap::from([
            ("acct".to_string(), vec!["id".to_string()]),
            (
                "sales.item".to_string(),
                vec!["sku".to_string(), "id".to_string()],
            ),
        ]);
        let e = Config::parse(&pg)
            .unwrap()
            .reversed(&tables, &keys)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SurrealDB server") && e.contains("embedded"),
            "{e}"
        );
        let remote = pg.replace(
            "url = \"mem://\"",
            "url = \"ws://127.0.0.1:8000\"\n        username = \"root\"\n        password = \"pw\"",
        );
        let r = Config::parse(&remote)
            .unwrap()
            .reversed(&tables, &keys)
            .unwrap();
        assert_eq!(r.source.url, "ws://127.0.0.1:8000");
        assert_eq!(
            (r.source.namespace.as_deref(), r.source.username.as_deref()),
            (Some("app"), Some("root"))
        );
        assert_eq!(r.target.url, "postgres://sy@127.0.0.1:5432/app");
        // A key in the record id alone needs no key fields.
        assert_eq!(
            r.tables.keys,
            BTreeMap::from([(
                "item".to_string(),
                vec!["sku".to_string(), "id".to_string()]
            )])
        );
        assert_eq!(
            r.tables.rename.get("item").map(String::as_str),
            Some("sales.item")
        );
    }

    #[test]
    fn env_vars_are_expanded_and_missing_ones_named() {
        std::env::set_var("SWITCHYARD_TEST_NS", "tenant1");
        let c = Config::parse(&MIN.replace(
            "\"app\"\n        database",
            "\"${SWITCHYARD_TEST_NS}\"\n        database",
        ))
        .unwrap();
        assert_eq!(c.target.namespace.as_deref(), Some("tenant1"));
        let e = Config::parse(&MIN.replace("mem://", "${SWITCHYARD_SURELY_UNSET}")).unwrap_err();
        assert!(
            e.to_string().contains("target.url")
                && e.to_string().contains("SWITCHYARD_SURELY_UNSET"),
            "{e}"
        );
        assert_eq!(expand_str("a$${b}").unwrap(), "a${b}");
    }

    #[test]
    fn passwords_never_print() {
        let text = MIN.replace(
            "database = \"app\"",
            "database = \"app\"\npassword = \"hunter2\"",
        );
        let c = Config::parse(&text).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let e =
            Config::parse(&MIN.replace("mem://", "ws://root:hunter2@localhost:8000")).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn every_key_and_type_problem_is_reported_with_its_key_and_line() {
        let text = r#"
[source]
url = "sqlite://data/app.sqlite"
poll_interval_ms = "fast"
colour = "blue"
[target]
url = "mem://"
namespace = "app"
database = "app"
flavour = 1
[tables]
include = "*"
[pipeline]
batch_rows = -5
batch_rowz = 3
"#;
        let e = Config::parse(text).unwrap_err().to_string();
        for needle in [
            "source.poll_interval_ms: invalid type: string \"fast\"",
            "(line 4)",
            "source.colour: unknown key",
            "(line 5)",
            "target.flavour: unknown key",
            "(line 10)",
            "tables.include: invalid type: string \"*\", expected a sequence",
            "(line 12)",
            "pipeline.batch_rows: invalid value: integer `-5`",
            "(line 14)",
            "pipeline.batch_rowz: unknown key",
            "(line 15)",
        ] {
            assert!(e.contains(needle), "{needle} missing in {e}");
        }
        let missing = Config::parse("[source]\n[target]\nurl = \"mem://\"\n").unwrap_err();
        assert!(
            missing.to_string().contains("source.url: required"),
            "{missing}"
        );
    }

    #[test]
    fn table_filter_applies_include_then_exclude() {
        let c = Config::parse(&format!(
            "{MIN}\n[tables]\ninclude = [\"shop_*\", \"users\"]\nexclude = [\"shop_tmp*\"]\n"
        ))
        .unwrap();
        let f = c.table_filter().unwrap();
        assert!(f.matches("shop_orders") && f.matches("users"));
        assert!(!f.matches("shop_tmp1") && !f.matches("other"));
        // The public schema may be named: its tables are `orders`, others `sales.orders`.
        let c = Config::parse(&format!(
            "{MIN}\n[tables]\ninclude = [\"public.*\", \"sales.orders\"]\nexclude = [\"public.audit_*\"]\n"
        ))
        .unwrap();
        let f = c.table_filter().unwrap();
        assert!(f.matches("orders") && f.matches("sales.orders"));
        assert!(!f.matches("audit_log") && !f.matches("sales.items"));
    }
}

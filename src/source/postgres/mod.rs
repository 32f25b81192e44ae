//! PostgreSQL source: a snapshot in the replication slot's exported snapshot,
//! then logical replication (pgoutput) from the slot.
//!
//! ```text
//!  install:  publication (created for the selected tables, or existing)
//!            slot: CREATE_REPLICATION_SLOT … (SNAPSHOT 'export') → consistent point CP
//!  snapshot: BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT '…'; COPY (SELECT …) TO STDOUT
//!            → rows as of CP; Ct = (CP − 1, whole): a transaction is in the copy
//!              exactly when its commit record starts before CP
//!  stream:   START_REPLICATION SLOT … LOGICAL checkpoint (proto_version '2', publication_names …)
//!            a change's position = (its transaction's commit LSN, its ordinal in it)
//!  ack:      standby status update, flush = commit LSN of the durable checkpoint
//! ```
//!
//! Values travel in PostgreSQL's text format, the same in COPY and in pgoutput,
//! with fixed session settings (ISO dates in UTC, hex bytea, exact floats), so
//! one decoder serves both.

pub mod conn;
pub mod pgoutput;
pub mod replication;
pub mod values;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{pin_mut, TryStreamExt};
use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::conn::PgEndpoint;
use self::pgoutput::{
    DecodeCtx, LogicalMessage, Lsn, OldTuple, RelationBody, ReplicationMessage, TupleData,
    TupleValue,
};
use self::replication::{quote_ident, quote_literal, ReplicationConn, SESSION_SETTINGS};
use super::{Batch, Discovery, Installed, Problem, Source};
use crate::config::{Config, TableFilter};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Change, Column, Op, Position, Row, TableSchema, Value};
use crate::sink::Durable;

/// How often a status update goes to the server when nothing else happens.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// The prefix of switchyard's heartbeat messages in the WAL.
const HEARTBEAT_PREFIX: &str = "switchyard_heartbeat";

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
struct PgTable {
    /// The table's OID: pgoutput names relations by it.
    oid: u32,
    /// A plain table (not a partitioned root): read with `ONLY`, without
    /// the rows of inheritance children (their changes are not its own).
    only: bool,
    schema: String,
    name: String,
    /// Column type OIDs (domains resolved to their base type).
    types: Vec<u32>,
}

impl PgTable {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// The name switchyard uses for a table: `table` in `public`, else `schema.table`.
pub fn display_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}.{table}")
    }
}

/// An exported snapshot, alive while its connection stays idle.
struct Export {
    _conn: ReplicationConn,
    snapshot: String,
    consistent_point: Lsn,
}

pub struct PgSource {
    ep: PgEndpoint,
    slot: String,
    publication: String,
    create_publication: bool,
    unmapped_as_text: bool,
    target_is_postgres: bool,
    filter: TableFilter,
    renames: std::collections::BTreeMap<String, String>,
    catalog: Mutex<HashMap<String, PgTable>>,
    export: Mutex<Option<Export>>,
    /// The LSN up to which the target has made everything durable, for
    /// status updates (see [`flush_lsn`]).
    durable: watch::Sender<u64>,
    retry_attempts: usize,
    retry_max_delay: Duration,
    /// COPY readers running at once, over all tables (`snapshot_workers`).
    copy_slots: Arc<tokio::sync::Semaphore>,
    /// Ranges a large table is read in at once.
    split_parts: usize,
    /// Tables at least this large (bytes of heap) are read in ranges.
    split_bytes: u64,
    heartbeat_interval: Duration,
    slot_warn_bytes: u64,
    /// The connection `lag` asks on, kept between calls.
    lag_client: Mutex<Option<tokio_postgres::Client>>,
    /// The last batch handed to the pipeline, and the end of the WAL
    /// received with it: once that batch is applied, so is all WAL before it.
    handed: Mutex<(Position, u64)>,
}

/// The flush LSN to confirm for a durable position: after a whole commit
/// `(L, whole)` everything before L + 1 is handled; inside the transaction at
/// L, only what is before L (so the server sends that transaction again and
/// the stream skips what was applied).
pub fn flush_lsn(p: Position) -> u64 {
    if p.ordinal == Position::WHOLE {
        p.commit + 1
    } else {
        p.commit
    }
}

/// The snapshot position for a consistent point: every transaction whose
/// commit record starts before `cp` is in the copy.
pub fn snapshot_position(cp: Lsn) -> Position {
    Position::new(cp.0.saturating_sub(1), Position::WHOLE)
}

impl PgSource {
    pub async fn open(url: &str, config: &Config) -> Result<Self> {
        let ep = PgEndpoint::parse(url, config.source.password.clone(), "source.url")?;
        // Fail early, with the server's own words, when it cannot be reached.
        let client = ep.connect().await.map_err(|e| match e.kind() {
            ErrorKind::Transient => Error::connect(e.to_string()),
            _ => e,
        })?;
        drop(client);
        Ok(Self {
            ep,
            slot: config.source.slot.clone(),
            publication: config.source.publication.clone(),
            create_publication: config.source.create_publication,
            unmapped_as_text: config.source.unmapped_as_text,
            // A PostgreSQL target reads every type's text form as that type.
            target_is_postgres: matches!(
                config.target_kind(),
                Ok(crate::config::TargetKind::Postgres { .. })
            ),
            filter: config.table_filter()?,
            renames: config.tables.rename.clone(),
            catalog: Mutex::new(HashMap::new()),
            export: Mutex::new(None),
            durable: watch::channel(0).0,
            retry_attempts: config.pipeline.retry_attempts,
            retry_max_delay: Duration::from_millis(config.pipeline.retry_max_delay_ms),
            copy_slots: Arc::new(tokio::sync::Semaphore::new(
                config.pipeline.snapshot_workers.max(1),
            )),
            split_parts: config.pipeline.snapshot_workers.max(1),
            split_bytes: config.pipeline.snapshot_split_mb.saturating_mul(1 << 20),
            heartbeat_interval: Duration::from_millis(config.source.heartbeat_interval_ms),
            slot_warn_bytes: config.source.slot_warn_mb.saturating_mul(1 << 20),
            lag_client: Mutex::new(None),
            handed: Mutex::new((Position::ZERO, 0)),
        })
    }

    pub fn endpoint(&self) -> &PgEndpoint {
        &self.ep
    }

    /// An ordinary connection with our session settings.
    async fn client(&self) -> Result<tokio_postgres::Client> {
        let c = self.ep.connect().await?;
        let settings: Vec<String> = SESSION_SETTINGS
            .iter()
            .map(|(k, v)| format!("SET {k} = {}", quote_literal(v)))
            .collect();
        c.batch_execute(&settings.join("; "))
            .await
            .map_err(|e| conn::pg_error(&self.ep, "session settings", e))?;
        Ok(c)
    }

    fn pg(&self, what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
        let what = what.to_string();
        move |e| conn::pg_error(&self.ep, &what, e)
    }

    async fn publication_exists(&self, c: &tokio_postgres::Client) -> Result<bool> {
        let row = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(self.pg("reading pg_publication"))?;
        Ok(row.is_some())
    }

    /// The slot's output plugin and confirmed flush LSN, if it exists. Slot
    /// names are per cluster: one of another database is an error, not ours.
    async fn slot_state(
        &self,
        c: &tokio_postgres::Client,
    ) -> Result<Option<(String, Option<String>)>> {
        let row = c
            .query_opt(
                "SELECT plugin::text, confirmed_flush_lsn::text, database::text, slot_type, wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(self.pg("reading pg_replication_slots"))?;
        let Some(r) = row else { return Ok(None) };
        let database: Option<String> = r.get(2);
        if database.as_deref() != Some(self.ep.dbname.as_str()) {
            return Err(Error::definite(format!(
                "replication slot {:?} already exists for {} (slot names are shared by the whole server); \
                 set another source.slot, or drop that slot if nothing uses it (SELECT pg_drop_replication_slot('{}'))",
                self.slot,
                match database {
                    Some(d) => format!("database {d:?}"),
                    None => format!("{} replication", r.get::<_, String>(3)),
                },
                self.slot
            )));
        }
        if r.get::<_, Option<String>>(4).as_deref() == Some("lost") {
            return Err(Error::definite(format!(
                "replication slot {:?} was invalidated by the server (wal_status = lost: it held back more WAL than max_slot_wal_keep_size allows); \
                 changes after the target's checkpoint are gone. Drop the slot (SELECT pg_drop_replication_slot('{}')) and replicate into an empty target",
                self.slot, self.slot
            )));
        }
        Ok(Some((
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get(1),
        )))
    }

    /// A new exported snapshot on a temporary slot, for tables copied after
    /// the main slot already exists (a restart in the middle of the snapshot).
    async fn temporary_export(&self) -> Result<Export> {
        let mut conn = ReplicationConn::connect(&self.ep).await?;
        // Unique per process and per export (several sources in one process,
        // verify beside the daemon), within the 63 characters of a name.
        static EXPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = EXPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base: String = self.slot.chars().take(40).collect();
        let name = format!("{base}_copy_{}_{n}", std::process::id());
        let created = conn.create_slot(&name, true).await?;
        let snapshot = created
            .snapshot
            .ok_or_else(|| Error::definite("the temporary slot exported no snapshot"))?;
        info!(consistent_point = %created.consistent_point, "new snapshot for the tables still to copy");
        Ok(Export {
            _conn: conn,
            snapshot,
            consistent_point: created.consistent_point,
        })
    }
}

/// Whether a default expression means the same in another database: a
/// literal (with its cast), a number, a boolean, or a clock or uuid function.
fn portable_default(e: &str) -> bool {
    let e = e.trim();
    const FUNCTIONS: &[&str] = &[
        "now()",
        "CURRENT_TIMESTAMP",
        "CURRENT_DATE",
        "CURRENT_TIME",
        "LOCALTIMESTAMP",
        "LOCALTIME",
        "gen_random_uuid()",
        "true",
        "false",
        "NULL",
    ];
    if FUNCTIONS.contains(&e) {
        return true;
    }
    if e.parse::<f64>().is_ok()
        || (e.starts_with('(') && e.ends_with(')') && e[1..e.len() - 1].parse::<f64>().is_ok())
    {
        return true;
    }
    // 'text'::type, without anything after the cast's type name.
    if let Some(rest) = e.strip_prefix('\'') {
        if let Some(end) = rest.rfind("'::") {
            let ty = &rest[end + 3..];
            return !rest[..end].contains("'::")
                && ty
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _()[],\"".contains(c));
        }
        return rest.ends_with('\'');
    }
    false
}

/// Logical type for a PostgreSQL type OID.
fn logical_for(oid: u32) -> (crate::model::LogicalType, bool) {
    use crate::model::LogicalType as L;
    match oid {
        16 => (L::Bool, true),
        20 | 21 | 23 | 26 => (L::Int, true),
        700 | 701 => (L::Float, true),
        1700 => (L::Decimal, true),
        25 | 1043 | 1042 | 19 | 18 => (L::Text, true),
        17 => (L::Bytes, true),
        114 | 3802 => (L::Json, true),
        1114 | 1184 => (L::Timestamp, true),
        _ => (L::Text, false),
    }
}

#[async_trait]
impl Source for PgSource {
    async fn discover(&self) -> Result<Discovery> {
        let c = self.client().await?;
        let mut d = Discovery::default();
        // What logical replication needs of the server and the role.
        let row = c
            .query_one(
                "SELECT current_setting('wal_level'), current_user::text,
                        (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
                &[],
            )
            .await
            .map_err(self.pg("reading wal_level and the role"))?;
        let (wal_level, user, can_replicate): (String, String, Option<bool>) =
            (row.get(0), row.get(1), row.get(2));
        let server_problem = |message: String| Problem {
            table: "(source)".into(),
            column: None,
            message,
            blocking: true,
        };
        if wal_level != "logical" {
            d.problems.push(server_problem(format!(
                "the server runs with wal_level = {wal_level}; logical replication needs wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart the server)"
            )));
        }
        if can_replicate != Some(true) {
            d.problems.push(server_problem(format!(
                "role {user:?} may not start replication; ALTER ROLE {} REPLICATION (or use a role that has it)",
                quote_ident(&user)
            )));
        }
        let published = self.publication_exists(&c).await?;
        let candidates = if published {
            c.query(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text FROM pg_publication_tables pt
                   JOIN pg_namespace n ON n.nspname = pt.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                  WHERE pt.pubname = $1 ORDER BY 2, 3",
                &[&self.publication],
            )
            .await
            .map_err(self.pg("reading the publication's tables"))?
        } else {
            if !self.create_publication {
                d.problems.push(Problem {
                    table: String::new(),
                    column: None,
                    message: format!(
                        "publication {:?} does not exist and source.create_publication is false; create it (CREATE PUBLICATION {} FOR TABLE …) or let switchyard create it",
                        self.publication,
                        quote_ident(&self.publication)
                    ),
                    blocking: true,
                });
                return Ok(d);
            }
            c.query(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
                  ORDER BY 2, 3",
                &[],
            )
            .await
            .map_err(self.pg("listing tables"))?
        };
        let mut catalog = HashMap::new();
        for r in candidates {
            let oid: u32 = r.get(0);
            let schema: String = r.get(1);
            let table: String = r.get(2);
            let replident: String = r.get(3);
            let relkind: String = r.get(4);
            let name = display_name(&schema, &table);
            if !self.filter.matches(&name) {
                continue;
            }
            let cols = c
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                            CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END,
                            a.attnotnull, t.typtype::text,
                            CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                      ORDER BY a.attnum",
                    &[&oid],
                )
                .await
                .map_err(self.pg("reading columns"))?;
            let mut columns = Vec::new();
            let mut types = Vec::new();
            for col in &cols {
                let cname: String = col.get(0);
                let declared: String = col.get(1);
                let base: u32 = col.get(2);
                let elem: u32 = col.get(5);
                // An array travels as a JSON array of its elements (`types`
                // then holds the element type).
                let (logical, native, base) = if elem != 0 {
                    (crate::model::LogicalType::Json, true, elem)
                } else {
                    let (l, n) = logical_for(base);
                    (l, n, base)
                };
                let typtype: String = col.get(4);
                if !native && typtype != "e" && !self.target_is_postgres {
                    d.problems.push(if self.unmapped_as_text {
                        Problem {
                            table: name.clone(),
                            column: Some(cname.clone()),
                            message: format!("type {declared} is carried as its PostgreSQL text form"),
                            blocking: false,
                        }
                    } else {
                        Problem {
                            table: name.clone(),
                            column: Some(cname.clone()),
                            message: format!(
                                "type {declared} has no mapping for the target; set source.unmapped_as_text = true to carry it as its PostgreSQL text form, or exclude the table"
                            ),
                            blocking: true,
                        }
                    });
                }
                types.push(base);
                columns.push(Column {
                    name: cname,
                    source_type: declared,
                    logical,
                    nullable: !col.get::<_, bool>(3),
                });
            }
            let key_rows = c
                .query(
                    // One index: the replica identity index if there is one
                    // (its columns are what the old key image holds), else
                    // the primary key.
                    "SELECT a.attname::text
                       FROM (SELECT indrelid, indkey FROM pg_index
                              WHERE indrelid = $1 AND (indisprimary OR indisreplident)
                              ORDER BY indisreplident DESC, indisprimary DESC LIMIT 1) i
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                      ORDER BY array_position(i.indkey::int2[], a.attnum)",
                    &[&oid],
                )
                .await
                .map_err(self.pg("reading the key"))?;
            let mut key = Vec::new();
            for k in key_rows {
                let kname: String = k.get(0);
                if let Some(i) = columns.iter().position(|c| c.name == kname) {
                    if !key.contains(&i) {
                        key.push(i);
                    }
                }
            }
            let target_name = self
                .renames
                .get(&name)
                .cloned()
                .unwrap_or_else(|| name.replace('.', "_"));
            let pg = PgTable {
                oid,
                only: relkind == "r",
                schema,
                name: table,
                types,
            };
            if key.is_empty() && replident == "f" {
                // REPLICA IDENTITY FULL: the old row image identifies the row.
                d.problems.push(Problem {
                    table: name.clone(),
                    column: None,
                    message:
                        "no key: rows are identified by their whole value (REPLICA IDENTITY FULL)"
                            .into(),
                    blocking: false,
                });
                catalog.insert(name.clone(), pg);
                d.tables.push(TableSchema {
                    source_id: oid.to_string(),
                    ..TableSchema::whole_row(name, target_name, columns)
                });
                continue;
            }
            if key.is_empty() {
                d.problems.push(Problem {
                    table: name.clone(),
                    column: None,
                    message: format!(
                        "no primary key or replica identity index, so its UPDATEs and DELETEs cannot be matched to a row; add a primary key, or ALTER TABLE {q} REPLICA IDENTITY USING INDEX <unique index>, or ALTER TABLE {q} REPLICA IDENTITY FULL (rows identified by their whole value), or exclude the table",
                        q = format_args!("{}.{}", quote_ident(&pg.schema), quote_ident(&pg.name))
                    ),
                    blocking: true,
                });
                continue;
            }
            for &k in &key {
                columns[k].nullable = false;
            }
            catalog.insert(name.clone(), pg);
            let secondary = self.secondary(&c, oid).await?;
            let enum_types = self.enum_types(&c, oid).await?;
            let column_defaults = self.column_defaults(&c, oid, &columns).await?;
            if self.target_is_postgres {
                // An array whose type the target keeps travels as its own
                // text, lower bounds and all (`[0:1]={a,b}`), not as JSON.
                for col in columns.iter_mut() {
                    if col.logical == crate::model::LogicalType::Json
                        && col.source_type.ends_with("[]")
                        && (crate::schema::postgres::is_built_in(&col.source_type)
                            || crate::schema::postgres::is_enum(&enum_types, &col.source_type))
                    {
                        col.logical = crate::model::LogicalType::Text;
                    }
                }
            }
            d.tables.push(TableSchema {
                source_id: oid.to_string(),
                secondary,
                enum_types,
                column_defaults,
                ..TableSchema::keyed(name, target_name, columns, key)
            });
        }
        *self.catalog.lock().await = catalog;
        Ok(d)
    }

    async fn install(&self, tables: &[Arc<TableSchema>]) -> Result<Installed> {
        let c = self.client().await?;
        let catalog = self.catalog.lock().await.clone();
        if !self.publication_exists(&c).await? {
            let list: Vec<String> = tables
                .iter()
                .filter_map(|t| catalog.get(&t.name))
                .map(|t| t.qualified())
                .collect();
            c.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quote_ident(&self.publication),
                list.join(", ")
            ))
            .await
            .map_err(self.pg("creating the publication"))?;
            info!(publication = %self.publication, tables = list.len(), "publication created");
        }
        let mut rconn = ReplicationConn::connect(&self.ep).await?;
        let system = rconn.identify_system().await?;
        let origin = format!(
            "postgres:{}:{}:{}",
            system.system_id, self.ep.dbname, self.slot
        );
        let mut recaptured = Vec::new();
        match self.slot_state(&c).await? {
            Some((plugin, _)) if plugin != "pgoutput" => {
                return Err(Error::definite(format!(
                    "replication slot {:?} exists but uses the output plugin {plugin:?}, not pgoutput; choose another source.slot",
                    self.slot
                )))
            }
            Some(_) => {}
            None => {
                let created = rconn.create_slot(&self.slot, false).await?;
                let snapshot = created.snapshot.ok_or_else(|| Error::definite("the new slot exported no snapshot"))?;
                info!(slot = %self.slot, consistent_point = %created.consistent_point, "replication slot created");
                // Everything copied before this slot existed is stale.
                recaptured = tables.iter().map(|t| t.name.clone()).collect();
                *self.export.lock().await = Some(Export {
                    _conn: rconn,
                    snapshot,
                    consistent_point: created.consistent_point,
                });
            }
        }
        Ok(Installed { origin, recaptured })
    }

    async fn verify_resume(&self, checkpoint: Position) -> Result<()> {
        let c = self.client().await?;
        match self.slot_state(&c).await? {
            None => Err(Error::definite(format!(
                "replication slot {:?} does not exist any more; changes after the checkpoint {} are gone. Start again to copy every table anew",
                self.slot, Lsn(checkpoint.commit)
            ))),
            Some((_, confirmed)) => {
                // The slot never confirms more than the target holds; if it
                // has, the target lost changes (restored from a backup, or
                // its last commits did not reach the disk), and the server
                // would silently start after them.
                let confirmed: Option<Lsn> = confirmed.as_deref().and_then(|t| t.parse().ok());
                match confirmed {
                    Some(l) if l.0 > flush_lsn(checkpoint) => Err(Error::definite(format!(
                        "the target's checkpoint {} is behind what replication slot {:?} confirmed ({l}): the changes in between are not in the target and the server no longer sends them. \
                         The target lost writes (restored from a backup?); start over with an empty target to copy every table anew",
                        Lsn(checkpoint.commit),
                        self.slot
                    ))),
                    _ => Ok(()),
                }
            }
        }
    }

    async fn uninstall(&self) -> Result<()> {
        let c = self.client().await?;
        if self.slot_state(&c).await?.is_some() {
            // A daemon that just stopped leaves its walsender a moment to exit.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let active: Option<i32> = c
                    .query_opt(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.slot],
                    )
                    .await
                    .map_err(self.pg("reading pg_replication_slots"))?
                    .and_then(|r| r.get(0));
                if active.is_none() || std::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                .await
                .map_err(
                    self.pg("dropping the replication slot (stop the running switchyard first)"),
                )?;
            info!(slot = %self.slot, "replication slot dropped");
        }
        if self.create_publication && self.publication_exists(&c).await? {
            c.batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&self.publication)
            ))
            .await
            .map_err(self.pg("dropping the publication"))?;
            info!(publication = %self.publication, "publication dropped");
        }
        Ok(())
    }

    async fn count_rows(&self, table: &TableSchema) -> Result<Option<u64>> {
        let Some(t) = self.catalog.lock().await.get(&table.name).cloned() else {
            return Ok(None);
        };
        let c = self.client().await?;
        let row = c
            .query_one(
                &format!(
                    "SELECT reltuples::int8 FROM pg_class WHERE oid = '{}'::regclass",
                    t.qualified().replace('\'', "''")
                ),
                &[],
            )
            .await
            .map_err(self.pg("estimating the row count"))?;
        let n: i64 = row.get(0);
        Ok((n >= 0).then_some(n as u64))
    }

    async fn current_position(&self) -> Result<Position> {
        if let Some(e) = self.export.lock().await.as_ref() {
            return Ok(snapshot_position(e.consistent_point));
        }
        let c = self.client().await?;
        let flushed = self.slot_state(&c).await?.and_then(|(_, f)| f);
        let lsn: Lsn = flushed.as_deref().unwrap_or("0/0").parse().map_err(|_| {
            Error::definite(format!(
                "slot {:?}: unreadable confirmed_flush_lsn {flushed:?}",
                self.slot
            ))
        })?;
        Ok(snapshot_position(lsn))
    }

    async fn snapshot(
        &self,
        table: Arc<TableSchema>,
        batch_rows: usize,
        rows: mpsc::Sender<Vec<Row>>,
    ) -> Result<Position> {
        self.copy_table(&table, CopyOut::Rows(rows, batch_rows))
            .await
    }

    async fn snapshot_copy_text(
        &self,
        table: Arc<TableSchema>,
        out: mpsc::Sender<bytes::Bytes>,
    ) -> Result<Option<Position>> {
        Ok(Some(self.copy_table(&table, CopyOut::Text(out)).await?))
    }

    async fn stream(
        &self,
        tables: Vec<Arc<TableSchema>>,
        after: Position,
        max_batch: usize,
        changes: mpsc::Sender<Batch>,
        cancel: CancellationToken,
    ) -> Result<()> {
        // The copy is done: release the exported snapshot (and a temporary slot).
        self.release_snapshot().await;
        let catalog = self.catalog.lock().await.clone();
        let by_name: HashMap<u32, (String, String, Replicated)> = tables
            .iter()
            .filter_map(|t| {
                catalog.get(&t.name).map(|pg| {
                    (
                        pg.oid,
                        (
                            pg.schema.clone(),
                            pg.name.clone(),
                            (t.clone(), pg.types.clone()),
                        ),
                    )
                })
            })
            .collect();
        let mut state = StreamState {
            held: None,
            relations: HashMap::new(),
            by_name,
            after,
            commit: None,
            ordinal: 0,
            pending: Vec::new(),
            sent_upto: after,
            advance: after,
            progressed: false,
            last_commit: None,
            heartbeat_seen: false,
            last_end: Lsn(flush_lsn(after)),
        };
        // Heartbeats: a small transaction in the source's WAL at an interval,
        // so the slot advances and lag in seconds is measured when idle.
        let _heartbeat = (self.heartbeat_interval > Duration::ZERO).then(|| {
            let ep = self.ep.clone();
            let every = self.heartbeat_interval;
            let stop = cancel.child_token();
            let guard = stop.clone().drop_guard();
            tokio::spawn(async move {
                let mut warned = false;
                let mut client: Option<tokio_postgres::Client> = None;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let sent = async {
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            client = Some(ep.connect().await?);
                        }
                        let c = client.as_ref().expect("connected above");
                        c.execute("SELECT pg_logical_emit_message(true, $1, now()::text)", &[&HEARTBEAT_PREFIX])
                            .await
                            .map_err(|e| conn::pg_error(&ep, "writing a heartbeat", e))
                    }
                    .await;
                    match sent {
                        Ok(_) => warned = false,
                        Err(e) if !warned => {
                            warn!(error = %e.report(), "cannot write a heartbeat to the source; lag in seconds is measured only when the source writes");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
            });
            guard
        });
        let mut failures = 0usize;
        loop {
            match self
                .stream_once(&mut state, max_batch, &changes, &cancel)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && failures < self.retry_attempts => {
                    if std::mem::take(&mut state.progressed) {
                        failures = 0;
                    }
                    failures += 1;
                    let wait = crate::pipeline::backoff_delay(failures, self.retry_max_delay);
                    warn!(error = %e.report(), attempt = failures, retry_in_ms = wait.as_millis() as u64,
                        "replication connection lost; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    state.restart();
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn release_snapshot(&self) {
        *self.export.lock().await = None;
    }

    async fn lag(&self, applied: Position) -> Result<crate::source::SourceLag> {
        let mut guard = self.lag_client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.ep.connect().await?);
        }
        let c = guard.as_ref().expect("connected above");
        let row = c
            .query_one(
                "SELECT pg_current_wal_lsn()::text, (pg_current_wal_lsn() - '0/0')::int8,
                        (SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&self.slot],
            )
            .await
            .map_err(self.pg("reading the server's WAL position"))?;
        let (head, current, retained): (String, i64, Option<i64>) =
            (row.get(0), row.get(1), row.get(2));
        let retained = retained.map(|r| r.max(0) as u64);
        let slot_warning = retained.filter(|r| self.slot_warn_bytes > 0 && *r > self.slot_warn_bytes).map(|r| {
            let m = format!(
                "replication slot {:?} holds back {} MiB of WAL, more than source.slot_warn_mb = {}; the server's disk fills while switchyard is behind or stopped",
                self.slot,
                r >> 20,
                self.slot_warn_bytes >> 20
            );
            warn!("{m}");
            m
        });
        let (handed, end) = *self.handed.lock().await;
        let applied_end = if applied >= handed {
            flush_lsn(applied).max(end)
        } else {
            flush_lsn(applied)
        };
        Ok(crate::source::SourceLag {
            head,
            bytes: (current.max(0) as u64).saturating_sub(applied_end),
            slot_retained_bytes: retained,
            slot_warning,
        })
    }

    async fn ack(&self, durable: Durable) -> Result<()> {
        let flush = flush_lsn(durable.position());
        self.durable.send_if_modified(|v| {
            if flush > *v {
                *v = flush;
                true
            } else {
                false
            }
        });
        Ok(())
    }
}

impl PgSource {
    /// One replication connection: from the last position sent to the
    /// pipeline, until cancelled or the connection fails.
    async fn stream_once(
        &self,
        state: &mut StreamState,
        max_batch: usize,
        changes: &mpsc::Sender<Batch>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let conn = ReplicationConn::connect(&self.ep).await?;
        let start = Lsn(state.after.commit);
        let mut stream = conn.start_replication(&self.slot, start, &self.publication).await.map_err(|e| {
            if e.to_string().contains("does not exist") {
                Error::definite(format!(
                    "{e}. The replication slot was dropped while switchyard used it, so changes after the checkpoint are lost; \
                     start switchyard again: it creates the slot anew and copies every table again"
                ))
            } else {
                e
            }
        })?;
        info!(slot = %self.slot, from = %start, "logical replication started");
        let mut durable_rx = self.durable.subscribe();
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received = start;
        loop {
            let ready: Option<Batch> = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                permit = changes.reserve(), if state.held.is_some() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    let (batch, end) = state.held.take().expect("guarded by the branch");
                    let handed = (batch.upto, end);
                    permit.send(batch);
                    *self.handed.lock().await = handed;
                    None
                }
                _ = tick.tick() => {
                    let flush = Lsn(*durable_rx.borrow());
                    stream.send_status(received, flush, false).await?;
                    None
                }
                changed = durable_rx.changed() => {
                    if changed.is_err() { return Ok(()); }
                    let flush = Lsn(*durable_rx.borrow_and_update());
                    stream.send_status(received, flush, false).await?;
                    None
                }
                msg = stream.next() => {
                    let Some(msg) = msg? else {
                        return Err(Error::transient("the server ended the replication stream"));
                    };
                    match msg {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            received = received.max(wal_end);
                            let m = LogicalMessage::decode(data, DecodeCtx::TOP_LEVEL)
                                .map_err(|e| Error::definite(format!("undecodable pgoutput message: {e}")))?;
                            state.progressed = true;
                            match m {
                                LogicalMessage::Relation(r) => {
                                    self.on_relation(state, r).await?;
                                    None
                                }
                                m => state.on_message(m, max_batch)?,
                            }
                        }
                        ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, server_time } => {
                            received = received.max(wal_end);
                            if reply_requested {
                                let flush = Lsn(*durable_rx.borrow());
                                stream.send_status(received, flush, false).await?;
                            }
                            // Idle: everything before the server's position was sent,
                            // so the checkpoint (and then the slot) may move up to it.
                            state.heartbeat(wal_end, pg_time(server_time))
                        }
                    }
                }
            };
            if let Some(batch) = ready {
                let end = state.last_end.0;
                let batch = match state.held.take() {
                    Some((mut h, _)) => {
                        h.merge(batch);
                        h
                    }
                    None => batch,
                };
                let handed = (batch.upto, end);
                match changes.try_send(batch) {
                    Ok(()) => *self.handed.lock().await = handed,
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    // Full: read on and hand the gathered transactions over
                    // at once when there is room, up to a batch's size.
                    Err(mpsc::error::TrySendError::Full(batch))
                        if batch.changes.len() < max_batch =>
                    {
                        state.held = Some((batch, end));
                    }
                    // A full batch waits for room; the server still hears
                    // from us meanwhile (wal_sender_timeout).
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        state.held = Some((batch, end));
                        loop {
                            tokio::select! {
                                _ = cancel.cancelled() => return Ok(()),
                                permit = changes.reserve() => {
                                    let Ok(permit) = permit else { return Ok(()) };
                                    let (batch, _) = state.held.take().expect("held above");
                                    permit.send(batch);
                                    *self.handed.lock().await = handed;
                                    break;
                                }
                                _ = tick.tick() => {
                                    let flush = Lsn(*durable_rx.borrow());
                                    stream.send_status(received, flush, false).await?;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A replicated table and its column type OIDs.
type Replicated = (Arc<TableSchema>, Vec<u32>);

impl PgSource {
    /// A Relation message: which table an OID is, and whether its columns
    /// still are the ones replicated. Columns added at the end are followed
    /// (the changes carry the wider table; the pipeline widens the target);
    /// any other change stops the stream without acknowledging it.
    async fn on_relation(&self, state: &mut StreamState, r: RelationBody) -> Result<()> {
        let Some((schema, name, (table, types))) = state.by_name.get(&r.oid).cloned() else {
            // Not replicated, unless it stands in for a replicated table of
            // the same name that was dropped and created again.
            if let Some((_, _, (t, _))) = state
                .by_name
                .values()
                .find(|(s, n, _)| *s == r.namespace && *n == r.name)
            {
                return Err(Error::definite(format!(
                    "table {:?} was dropped and created again while streaming (a new table under the same name); \
                     its changes are not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                    t.name
                )));
            }
            state.relations.insert(r.oid, None);
            return Ok(());
        };
        if (schema.as_str(), name.as_str()) != (r.namespace.as_str(), r.name.as_str()) {
            return Err(Error::definite(format!(
                "table {:?} was renamed to {:?} while streaming; its changes are not acknowledged. \
                 Rename it back, or replicate it under its new name (the publication follows the table; copy it again: run once with the new name in tables.exclude, then without)",
                table.name,
                display_name(&r.namespace, &r.name)
            )));
        }
        let now: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
        let then: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        if now == then {
            state.relations.insert(r.oid, Some((table, types)));
            return Ok(());
        }
        if now.len() <= then.len() || now[..then.len()] != then[..] {
            return Err(Error::definite(format!(
                "table {:?} changed its columns in a way switchyard cannot follow (then {then:?}, now {now:?}); \
                 the change is not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                table.name
            )));
        }
        let client = self.client().await?;
        let mut wider = (*table).clone();
        let mut types = types.clone();
        let mut added = Vec::new();
        for c in &r.columns[then.len()..] {
            let row = client
                .query_one(
                    "SELECT format_type(t.oid, $2), CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END,
                            (SELECT a.atthasmissing FROM pg_attribute a WHERE a.attrelid = $3 AND a.attname = $4),
                            CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END
                       FROM pg_type t WHERE t.oid = $1",
                    &[&c.type_oid, &c.type_modifier, &r.oid, &c.name],
                )
                .await
                .map_err(self.pg("reading the type of an added column"))?;
            let declared: String = row.get(0);
            let elem: u32 = row.get(3);
            let (logical, base) = if elem != 0 {
                (crate::model::LogicalType::Json, elem)
            } else {
                (logical_for(row.get(1)).0, row.get(1))
            };
            if row.get::<_, Option<bool>>(2) == Some(true) && table.whole_row {
                return Err(Error::definite(format!(
                    "table {:?} has no key and gained column {:?} with a default: the rows it identifies by their whole value changed in the source but not in the target; \
                     the change is not acknowledged. Copy the table again: run once with it in tables.exclude, then without",
                    table.name, c.name
                )));
            }
            if row.get::<_, Option<bool>>(2) == Some(true) {
                warn!(table = %table.name, column = %c.name,
                    "column added with a default: rows that existed before hold it in the source but not in the target; copy the table again to carry it");
            }
            wider.columns.push(Column {
                name: c.name.clone(),
                source_type: declared,
                logical,
                nullable: true,
            });
            if wider.whole_row {
                wider.key.push(wider.columns.len() - 1);
            }
            types.push(base);
            added.push(c.name.clone());
        }
        info!(table = %table.name, added = ?added, "table gained columns; replicating them from now on");
        if let Some(pg) = self.catalog.lock().await.get_mut(&table.name) {
            pg.types = types.clone();
        }
        let wider = Arc::new(wider);
        state
            .by_name
            .insert(r.oid, (schema, name, (wider.clone(), types.clone())));
        state.relations.insert(r.oid, Some((wider, types)));
        Ok(())
    }
}

impl PgSource {
    /// Identity (and serial) columns, and defaults that mean the same in any
    /// database: constants, `now()` and its kin, `gen_random_uuid()`.
    async fn column_defaults(
        &self,
        c: &tokio_postgres::Client,
        oid: u32,
        columns: &[Column],
    ) -> Result<Vec<crate::model::ColumnDefault>> {
        let rows = c
            .query(
                "SELECT a.attname::text, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid)
                   FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                    AND (a.attidentity <> '' OR d.adbin IS NOT NULL)",
                &[&oid],
            )
            .await
            .map_err(self.pg("reading the table's defaults"))?;
        let mut out = Vec::new();
        for r in rows {
            let name: String = r.get(0);
            let Some(column) = columns.iter().position(|c| c.name == name) else {
                continue;
            };
            let identity_kind: String = r.get(1);
            let expr: Option<String> = r.get(2);
            let serial = expr.as_deref().is_some_and(|e| e.starts_with("nextval("));
            let default = expr.filter(|e| !serial && portable_default(e));
            if !identity_kind.is_empty() || serial || default.is_some() {
                out.push(crate::model::ColumnDefault {
                    column,
                    identity: !identity_kind.is_empty() || serial,
                    default,
                });
            }
        }
        out.sort_by_key(|d| d.column);
        Ok(out)
    }

    /// The enum types of a table's columns and of its arrays' elements, with
    /// their labels.
    async fn enum_types(
        &self,
        c: &tokio_postgres::Client,
        oid: u32,
    ) -> Result<Vec<(String, Vec<String>)>> {
        let rows = c
            .query(
                "SELECT DISTINCT format_type(t.oid, NULL),
                        (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid)
                   FROM pg_attribute a JOIN pg_type at ON at.oid = a.atttypid
                   JOIN pg_type t ON t.oid = CASE WHEN at.typcategory = 'A' AND at.typelem <> 0 THEN at.typelem ELSE at.oid END
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype = 'e'",
                &[&oid],
            )
            .await
            .map_err(self.pg("reading the table's enum types"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
                )
            })
            .collect())
    }

    /// A table's secondary indexes (not the primary key, not exclusion
    /// constraints) and foreign keys, from the catalog.
    async fn secondary(
        &self,
        c: &tokio_postgres::Client,
        oid: u32,
    ) -> Result<Vec<crate::model::Secondary>> {
        use crate::model::Secondary;
        let mut out = Vec::new();
        for r in c
            .query(
                "SELECT ic.relname::text, i.indisunique, substring(pg_get_indexdef(i.indexrelid) from ' USING .*$')
                   FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                  WHERE i.indrelid = $1 AND NOT i.indisprimary
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint x WHERE x.conindid = i.indexrelid AND x.contype = 'x')
                  ORDER BY 1",
                &[&oid],
            )
            .await
            .map_err(self.pg("reading the table's indexes"))?
        {
            let using: Option<String> = r.get(2);
            if let Some(using) = using {
                out.push(Secondary::Index { name: r.get(0), unique: r.get(1), using: using.trim().to_string() });
            }
        }
        for r in c
            .query(
                "SELECT c.conname::text,
                        (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.conkey) WITH ORDINALITY k(attnum, n)
                           JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum),
                        rn.nspname::text, rc.relname::text,
                        (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.confkey) WITH ORDINALITY k(attnum, n)
                           JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum),
                        c.confupdtype::text, c.confdeltype::text
                   FROM pg_constraint c JOIN pg_class rc ON rc.oid = c.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                  WHERE c.conrelid = $1 AND c.contype = 'f' ORDER BY 1",
                &[&oid],
            )
            .await
            .map_err(self.pg("reading the table's foreign keys"))?
        {
            let action = |code: String| match code.as_str() {
                "r" => "RESTRICT",
                "c" => "CASCADE",
                "n" => "SET NULL",
                "d" => "SET DEFAULT",
                _ => "NO ACTION",
            };
            let (ns, rel): (String, String) = (r.get(2), r.get(3));
            out.push(Secondary::ForeignKey {
                name: r.get(0),
                columns: r.get(1),
                references: display_name(&ns, &rel),
                ref_columns: r.get(4),
                actions: format!("ON UPDATE {} ON DELETE {}", action(r.get(5)), action(r.get(6))),
            });
        }
        Ok(out)
    }

    /// Copies a whole table in the exported snapshot, in block ranges at once
    /// where it is large; the snapshot position.
    async fn copy_table(&self, table: &Arc<TableSchema>, out: CopyOut) -> Result<Position> {
        let (pg, snapshot, cp) = self.snapshot_of(table).await?;
        let ranges = self.ranges(&pg).await?;
        if ranges.len() > 1 {
            info!(table = %table.name, parts = ranges.len(), "copying the table in block ranges at once");
        }
        let parts = ranges
            .into_iter()
            .map(|r| self.copy_part(table, &pg, &snapshot, r, out.clone()));
        futures::future::try_join_all(parts).await?;
        Ok(snapshot_position(cp))
    }

    /// A table's catalog entry and the exported snapshot to read it in (a
    /// temporary one when the slot's is gone), with its consistent point.
    async fn snapshot_of(&self, table: &TableSchema) -> Result<(PgTable, String, Lsn)> {
        let pg = self
            .catalog
            .lock()
            .await
            .get(&table.name)
            .cloned()
            .ok_or_else(|| {
                Error::definite(format!("table {:?} is not in the catalog", table.name))
            })?;
        let mut export = self.export.lock().await;
        if export.is_none() {
            *export = Some(self.temporary_export().await?);
        }
        let e = export.as_ref().expect("set above");
        Ok((pg, e.snapshot.clone(), e.consistent_point))
    }
}

/// Where a COPY part goes: decoded rows in batches, or the COPY text itself.
#[derive(Clone)]
enum CopyOut {
    Rows(mpsc::Sender<Vec<Row>>, usize),
    Text(mpsc::Sender<bytes::Bytes>),
}

/// A part of a table's heap, in blocks: `[from, to)`, `to` open for the last.
type BlockRange = Option<(u32, Option<u32>)>;

impl PgSource {
    /// The parts a table is copied in: the whole table, or for a table of at
    /// least `split_bytes`, `split_parts` ranges of its blocks (TID range
    /// scans, PostgreSQL 14 and later), read at once in the same snapshot.
    async fn ranges(&self, pg: &PgTable) -> Result<Vec<BlockRange>> {
        if self.split_parts < 2 || self.split_bytes == 0 {
            return Ok(vec![None]);
        }
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT pg_relation_size($1::oid), current_setting('block_size')::int8, current_setting('server_version_num')::int4",
                &[&pg.oid],
            )
            .await
            .map_err(self.pg("reading the table's size"))?;
        let (bytes, block, version): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
        if version < 140000 || (bytes as u64) < self.split_bytes || block <= 0 {
            return Ok(vec![None]);
        }
        let blocks = (bytes / block) as u32;
        let step = blocks.div_ceil(self.split_parts as u32).max(1);
        let mut out = Vec::new();
        let mut from = 0u32;
        while from < blocks {
            let to = from.saturating_add(step);
            out.push(Some((from, (to < blocks).then_some(to))));
            from = to;
        }
        Ok(out)
    }

    /// Copies one part of a table in the exported snapshot into `rows`.
    async fn copy_part(
        &self,
        table: &Arc<TableSchema>,
        pg: &PgTable,
        snapshot: &str,
        range: BlockRange,
        out: CopyOut,
    ) -> Result<()> {
        let _slot = self
            .copy_slots
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Interrupted, "snapshot stopped"))?;
        let mut c = self.client().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(self.pg("starting the snapshot transaction"))?;
        tx.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(self.pg("importing the exported snapshot"))?;
        let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let filter = match range {
            None => String::new(),
            Some((from, Some(to))) => {
                format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
            }
            Some((from, None)) => format!(" WHERE ctid >= '({from},0)'::tid"),
        };
        let only = if pg.only { "ONLY " } else { "" };
        let sql = format!(
            "COPY (SELECT {} FROM {only}{}{filter}) TO STDOUT",
            cols.join(", "),
            pg.qualified()
        );
        let stream = tx
            .copy_out(sql.as_str())
            .await
            .map_err(self.pg(&format!("copying {}", table.name)))?;
        pin_mut!(stream);
        let (rows, batch_rows) = match out {
            CopyOut::Rows(rows, n) => (rows, n),
            CopyOut::Text(text) => {
                // Whole rows (one per CopyData message) gathered into 1 MiB chunks.
                let mut buf = bytes::BytesMut::with_capacity(1 << 20);
                while let Some(chunk) = stream
                    .try_next()
                    .await
                    .map_err(self.pg(&format!("copying {}", table.name)))?
                {
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= 1 << 20 && text.send(buf.split().freeze()).await.is_err() {
                        return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                    }
                }
                if !buf.is_empty() && text.send(buf.freeze()).await.is_err() {
                    return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                }
                tx.commit()
                    .await
                    .map_err(self.pg("ending the snapshot transaction"))?;
                return Ok(());
            }
        };
        let mut parser = values::CopyTextParser::new(table.columns.len());
        let mut batch = Vec::with_capacity(batch_rows);
        let ctx = |e: String| Error::definite(format!("table {:?}: {e}", table.name));
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(self.pg(&format!("copying {}", table.name)))?
        {
            for fields in parser.feed(&chunk).map_err(ctx)? {
                batch.push(values::decode_row(table, &pg.types, fields)?);
                if batch.len() >= batch_rows {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
                    if rows.send(full).await.is_err() {
                        return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
                    }
                }
            }
        }
        parser.finish().map_err(ctx)?;
        if !batch.is_empty() && rows.send(batch).await.is_err() {
            return Err(Error::new(ErrorKind::Interrupted, "snapshot stopped"));
        }
        tx.commit()
            .await
            .map_err(self.pg("ending the snapshot transaction"))?;
        Ok(())
    }
}

struct StreamState {
    /// Transactions the pipeline has had no room for yet, gathered into one
    /// batch (with the WAL end it covers) while the stream is read on. Kept
    /// across reconnects: `sent_upto` already covers them.
    held: Option<(Batch, u64)>,
    relations: HashMap<u32, Option<Replicated>>,
    /// The replicated tables by OID, with the schema and name they had when
    /// discovered.
    by_name: HashMap<u32, (String, String, Replicated)>,
    after: Position,
    /// The commit LSN of the transaction being received.
    commit: Option<Lsn>,
    ordinal: u64,
    pending: Vec<Change>,
    /// The position of the last batch sent to the pipeline.
    sent_upto: Position,
    /// Transactions without replicated changes received since: the next
    /// batch may move the checkpoint past them.
    advance: Position,
    /// Something arrived since the last (re)connect.
    progressed: bool,
    /// The commit time of the last transaction received.
    last_commit: Option<chrono::DateTime<chrono::Utc>>,
    /// The open transaction carries switchyard's heartbeat message.
    heartbeat_seen: bool,
    /// The end of the WAL received so far (a commit's end, an idle keepalive's position).
    last_end: Lsn,
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as a date-time.
fn pg_time(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(micros.checked_add(pgoutput::PG_EPOCH_OFFSET_MICROS)?)
}

impl StreamState {
    /// After a lost connection: start again after what the pipeline has.
    fn restart(&mut self) {
        self.after = self.sent_upto;
        self.commit = None;
        self.ordinal = 0;
        self.pending.clear();
        self.relations.clear();
    }

    /// A batch that moves the checkpoint to the server's position when no
    /// transaction is open and nothing is pending.
    fn heartbeat(
        &mut self,
        wal_end: Lsn,
        server_time: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Option<Batch> {
        // Every transaction whose commit record starts before `wal_end` was sent.
        let upto = snapshot_position(wal_end);
        if self.commit.is_some() || !self.pending.is_empty() || upto <= self.sent_upto {
            return None;
        }
        self.sent_upto = upto;
        self.last_end = self.last_end.max(wal_end);
        // Everything committed before the server sent this is sent.
        Some(Batch {
            changes: Vec::new(),
            upto,
            committed_at: server_time,
        })
    }

    fn take(&mut self, upto: Position) -> Batch {
        self.sent_upto = self.sent_upto.max(upto).max(self.advance);
        Batch {
            changes: std::mem::take(&mut self.pending),
            upto: self.sent_upto,
            committed_at: self.last_commit,
        }
    }

    fn table(&self, oid: u32) -> Result<Option<Replicated>> {
        match self.relations.get(&oid) {
            Some(t) => Ok(t.clone()),
            None => Err(Error::definite(format!(
                "pgoutput sent a change of relation {oid} before describing it"
            ))),
        }
    }

    /// Numbers a change message of the transaction: every one pgoutput sends
    /// counts, replicated or not, so that a position inside a transaction
    /// means the same whatever `tables.include` selects.
    fn count(&mut self) {
        self.ordinal += 1;
    }

    fn push(&mut self, table: Arc<TableSchema>, op: Op) {
        let commit = self.commit.map(|l| l.0).unwrap_or(0);
        let position = Position::new(commit, self.ordinal);
        if position <= self.after {
            return; // applied before the restart
        }
        self.pending.push(Change {
            table,
            op,
            position,
        });
    }

    fn on_message(&mut self, m: LogicalMessage, max_batch: usize) -> Result<Option<Batch>> {
        match m {
            LogicalMessage::Begin(b) => {
                self.commit = Some(b.final_lsn);
                self.ordinal = 0;
            }
            LogicalMessage::Commit(c) => {
                self.commit = None;
                self.last_end = self.last_end.max(c.end_lsn);
                self.last_commit = pg_time(c.timestamp.0);
                // The whole transaction is behind this position.
                let upto = Position::new(c.commit_lsn.0, Position::WHOLE);
                if upto <= self.after {
                    return Ok(None);
                }
                if self.pending.is_empty() {
                    if std::mem::take(&mut self.heartbeat_seen) {
                        // Our heartbeat: the target records how far it is.
                        return Ok(Some(self.take(upto)));
                    }
                    // Nothing of ours in it: moves the checkpoint with the next batch.
                    self.advance = self.advance.max(upto);
                    return Ok(None);
                }
                self.heartbeat_seen = false;
                return Ok(Some(self.take(upto)));
            }
            LogicalMessage::Relation(_) => {} // handled by PgSource::on_relation
            LogicalMessage::Insert(i) => {
                self.count();
                if let Some((t, types)) = self.table(i.oid)? {
                    let row = tuple_row(&t, &types, &i.new)?;
                    self.push(t, Op::Insert { row });
                }
            }
            LogicalMessage::Update(u) => {
                self.count();
                if let Some((t, types)) = self.table(u.oid)? {
                    let mut row = tuple_row(&t, &types, &u.new)?;
                    if t.whole_row {
                        let old = whole_old_row(&t, &types, u.old.as_ref())?;
                        // Unchanged TOAST values: the old image has them.
                        for (v, o) in row.iter_mut().zip(&old) {
                            if v.is_unchanged() {
                                *v = o.clone();
                            }
                        }
                        // By digest, which is the identity (0.0 and -0.0 differ there).
                        let digest = |r: &Row| {
                            t.row_digest(r)
                                .map_err(|m| Error::definite(format!("table {:?}: {m}", t.name)))
                        };
                        let old_key = (digest(&old)? != digest(&row)?).then_some(old);
                        self.push(t, Op::Update { old_key, row });
                        return self.flush_if_full(max_batch);
                    }
                    let old_key = match &u.old {
                        Some(old) => {
                            let k = old_key(&t, &types, old)?;
                            (k != t.key_of(&row)).then_some(k)
                        }
                        None => None,
                    };
                    self.push(t, Op::Update { old_key, row });
                }
            }
            LogicalMessage::Delete(d) => {
                self.count();
                if let Some((t, types)) = self.table(d.oid)? {
                    let key = if t.whole_row {
                        whole_old_row(&t, &types, Some(&d.old))?
                    } else {
                        old_key(&t, &types, &d.old)?
                    };
                    self.push(t, Op::Delete { key });
                }
            }
            LogicalMessage::Truncate(tr) => {
                for oid in tr.oids.clone() {
                    self.count();
                    if let Some((t, _)) = self.table(oid)? {
                        self.push(t, Op::Truncate);
                    }
                }
            }
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop(_)
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => {
                return Err(Error::definite(
                    "pgoutput sent a streamed in-progress transaction, which switchyard does not request",
                ));
            }
            LogicalMessage::Message(m) => {
                if m.prefix == HEARTBEAT_PREFIX {
                    self.heartbeat_seen = true;
                }
            }
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => {}
        }
        self.flush_if_full(max_batch)
    }

    /// Hands off part of a large transaction once `max_batch` changes wait.
    fn flush_if_full(&mut self, max_batch: usize) -> Result<Option<Batch>> {
        if self.pending.len() >= max_batch {
            debug!(
                changes = self.pending.len(),
                "sending part of a large transaction"
            );
            let upto = self
                .pending
                .last()
                .map(|c| c.position)
                .unwrap_or(self.sent_upto);
            return Ok(Some(self.take(upto)));
        }
        Ok(None)
    }
}

/// The old row image of a table identified by its whole row (`REPLICA
/// IDENTITY FULL`): every column, NULLs included.
fn whole_old_row(table: &TableSchema, types: &[u32], old: Option<&OldTuple>) -> Result<Row> {
    let old = match old {
        Some(OldTuple::Full(t)) => t,
        _ => {
            return Err(Error::definite(format!(
                "table {:?} has no key and pgoutput sent no whole old row; its REPLICA IDENTITY must stay FULL (ALTER TABLE … REPLICA IDENTITY FULL), then copy the table again",
                table.name
            )))
        }
    };
    let row = tuple_row(table, types, old)?;
    if let Some(i) = row.iter().position(Value::is_unchanged) {
        return Err(Error::definite(format!(
            "table {:?}: the old row image has no value for column {:?}",
            table.name, table.columns[i].name
        )));
    }
    Ok(row)
}

fn tuple_row(table: &TableSchema, types: &[u32], tuple: &TupleData) -> Result<Row> {
    if tuple.0.len() != table.columns.len() {
        return Err(Error::definite(format!(
            "table {:?}: pgoutput sent {} columns, expected {}",
            table.name,
            tuple.0.len(),
            table.columns.len()
        )));
    }
    let mut fields: Vec<Option<String>> = Vec::with_capacity(tuple.0.len());
    let mut unchanged = Vec::new();
    for (i, v) in tuple.0.iter().enumerate() {
        fields.push(match v {
            TupleValue::Null => None,
            TupleValue::Text(b) => Some(String::from_utf8(b.to_vec()).map_err(|_| {
                Error::definite(format!(
                    "table {:?}, column {:?}: value is not UTF-8",
                    table.name, table.columns[i].name
                ))
            })?),
            TupleValue::Unchanged => {
                unchanged.push(i);
                None
            }
            TupleValue::Binary(_) => {
                return Err(Error::definite(
                    "pgoutput sent a binary value, which switchyard does not request",
                ))
            }
        });
    }
    let mut row = values::decode_row(table, types, fields)?;
    for i in unchanged {
        if table.key.contains(&i) && !table.whole_row {
            return Err(Error::definite(format!(
                "table {:?}: key column {:?} arrived as an unchanged TOAST value; the key cannot be matched",
                table.name, table.columns[i].name
            )));
        }
        row[i] = Value::Unchanged;
    }
    Ok(row)
}

fn old_key(table: &TableSchema, types: &[u32], old: &OldTuple) -> Result<Vec<Value>> {
    let tuple = old.tuple();
    let mut key = Vec::with_capacity(table.key.len());
    for &k in &table.key {
        let v = tuple.0.get(k).ok_or_else(|| {
            Error::definite(format!(
                "table {:?}: the old row image lacks key column {}",
                table.name, table.columns[k].name
            ))
        })?;
        let text = match v {
            TupleValue::Text(b) => String::from_utf8_lossy(b).into_owned(),
            _ => {
                return Err(Error::definite(format!(
                    "table {:?}: the old row image has no value for key column {:?}; check the table's REPLICA IDENTITY",
                    table.name, table.columns[k].name
                )))
            }
        };
        key.push(
            values::decode(&table.columns[k], types[k], &text).map_err(|m| {
                Error::definite(format!(
                    "table {:?}, column {:?}: {m}",
                    table.name, table.columns[k].name
                ))
            })?,
        );
    }
    Ok(key)
}

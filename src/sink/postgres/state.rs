//! The daemon's own state in a PostgreSQL target: the `switchyard` schema
//! (from `migrations/`, recorded with checksums as sqlx does), the
//! checkpoint and the tables' copy states; and the user's own migration
//! files of `target.schema = "migrations:DIR"`.

use tokio_postgres::Client;
use tracing::info;

use crate::error::{Error, Result};
use crate::pg::conn::{pg_err, pg_error, relation_exists, PgEndpoint};
use crate::pg::quote_literal;
use crate::position::Position;
use crate::sink::{SinkState, TableState, TableStatus};

/// The daemon's own schema, versioned by `migrations/`.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies `migrations/` that the target has not seen, all of them in one
/// transaction (one commit to wait for on a durable server instead of one
/// each), recording versions and checksums like sqlx does.
pub async fn migrate(ep: &PgEndpoint, c: &Client) -> Result<()> {
    c.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS switchyard;
         CREATE TABLE IF NOT EXISTS switchyard.schema_migrations (
             version bigint PRIMARY KEY, description text NOT NULL, checksum bytea NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg_err(ep, "creating switchyard.schema_migrations"))?;
    let applied: std::collections::HashMap<i64, Vec<u8>> = c
        .query(
            "SELECT version, checksum FROM switchyard.schema_migrations",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading switchyard.schema_migrations"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut pending = Vec::new();
    let mut sql = String::from("BEGIN;\n");
    for m in MIGRATOR.iter() {
        match applied.get(&m.version) {
            Some(sum) if sum.as_slice() != m.checksum.as_ref() => {
                return Err(Error::definite(format!(
                    "switchyard's state schema migration {} ({}) in the target differs from this switchyard's; the target was set up by another version",
                    m.version, m.description
                )));
            }
            Some(_) => {}
            None => {
                sql.push_str(&format!(
                    "{}\n;\nINSERT INTO switchyard.schema_migrations (version, description, checksum) VALUES ({}, {}, '\\x{}');\n",
                    m.sql,
                    m.version,
                    quote_literal(&m.description),
                    m.checksum.iter().map(|b| format!("{b:02x}")).collect::<String>()
                ));
                pending.push(m);
            }
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    sql.push_str("COMMIT;");
    let versions: Vec<String> = pending.iter().map(|m| m.version.to_string()).collect();
    if let Err(e) = c.batch_execute(&sql).await {
        // The failed statement leaves the transaction open and aborted.
        let _ = c.batch_execute("ROLLBACK").await;
        return Err(pg_error(
            ep,
            &format!("applying state schema migrations {}", versions.join(", ")),
            e,
        ));
    }
    for m in pending {
        info!(version = m.version, description = %m.description, "state schema migrated");
    }
    Ok(())
}

/// The user's migration files, each applied once in its own transaction
/// and recorded with its checksum; a file changed after it was applied
/// is an error.
pub async fn user_migrations(
    ep: &PgEndpoint,
    c: &Client,
    dir: &std::path::Path,
) -> Result<Vec<String>> {
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
    .map_err(pg_err(ep, "creating switchyard.user_migrations"))?;
    let mut applied = Vec::new();
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
            .map_err(pg_err(ep, "reading switchyard.user_migrations"))?;
        match done {
            Some(r) if r.get::<_, Vec<u8>>(0) == sum => continue,
            Some(_) => {
                return Err(Error::definite(format!(
                    "migration {name} changed after it was applied to the target; restore it and add a new migration file instead"
                )))
            }
            None => {}
        }
        let mut c2 = ep.connect().await?;
        let tx = c2
            .transaction()
            .await
            .map_err(pg_err(ep, "beginning a migration"))?;
        tx.batch_execute(&sql)
            .await
            .map_err(|e| pg_error(ep, &format!("applying migration {name}"), e))?;
        tx.execute(
            "INSERT INTO switchyard.user_migrations (name, checksum) VALUES ($1, $2)",
            &[&name, &sum],
        )
        .await
        .map_err(pg_err(ep, "recording a migration"))?;
        tx.commit()
            .await
            .map_err(|e| pg_error(ep, &format!("committing migration {name}"), e))?;
        info!(migration = %name, "target migration applied");
        applied.push(name);
    }
    Ok(applied)
}

/// The checkpoint and the tables' copy states; `None` where the state schema
/// does not exist (switchyard never replicated into this database).
pub async fn read(ep: &PgEndpoint, c: &Client) -> Result<Option<SinkState>> {
    if !relation_exists(
        c,
        ep,
        "switchyard.checkpoint",
        "reading the target's state schema",
    )
    .await?
    {
        return Ok(None);
    }
    let mut state = SinkState::default();
    if let Some(r) = c
        .query_opt(
            "SELECT commit, ordinal, origin, to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), (to_jsonb(c) -> 'marker')::text
               FROM switchyard.checkpoint c WHERE id = 1",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading the checkpoint"))?
    {
        state.checkpoint = Some(Position::new(r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64));
        state.origin = r.get(2);
        state.checkpoint_updated_at = r.get(3);
        // (A column of a later migration: absent until a run applies it.)
        state.marker = r
            .get::<_, Option<String>>(4)
            .and_then(|m| serde_json::from_str(&m).ok());
    }
    for r in c
        .query(
            "SELECT name, status, commit, ordinal, rows, source_id, shape FROM switchyard.table_state",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading table states"))?
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
                shape: r
                    .get::<_, Option<String>>(6)
                    .and_then(|s| serde_json::from_str(&s).ok()),
            },
        );
    }
    Ok(Some(state))
}

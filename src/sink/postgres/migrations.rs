//! The team's own migration files (M4), applied the way the application's
//! own tool applies them, so that after the cutover the application starts
//! against the target, finds its history and applies only what is new.
//!
//! ```text
//!  layout     files                                  applied by            history
//!  refinery   V{n}__{name}.sql (U{n}__ too)          refinery's Runner     refinery_schema_history
//!  sqlx       {version}_{name}.sql, .up/.down.sql    sqlx's Migrator       _sqlx_migrations
//!  switchyard any other *.sql, in name order         switchyard            switchyard.user_migrations
//! ```
//!
//! The layout is read from the file names (`target.schema =
//! "migrations:DIR"`), or named (`"refinery:DIR"`, `"sqlx:DIR"`).

use std::path::{Path, PathBuf};

use tracing::info;

use super::state;
use crate::error::{Error, Result};
use crate::pg::conn::{pg_err, PgEndpoint, SslMode};

/// How a directory of migration files is laid out, and so who applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `V{n}__{name}.sql`: the `refinery` crate.
    Refinery,
    /// `{version}_{name}.sql`: sqlx's migrator.
    Sqlx,
    /// Anything else: switchyard, in name order, each file once.
    Own,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Refinery => "refinery",
            Layout::Sqlx => "sqlx",
            Layout::Own => "switchyard",
        }
    }

    /// The table that records what was applied.
    pub fn history(self) -> &'static str {
        match self {
            Layout::Refinery => "refinery_schema_history",
            Layout::Sqlx => "_sqlx_migrations",
            Layout::Own => "switchyard.user_migrations",
        }
    }
}

/// `V12__add_users.sql`, `U3__x.sql`.
fn is_refinery(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(['V', 'U']) else {
        return false;
    };
    let Some((version, tail)) = rest.split_once("__") else {
        return false;
    };
    !version.is_empty()
        && version
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && tail.len() > ".sql".len()
}

/// `20240101120000_add_users.sql`, `2_x.up.sql`.
fn is_sqlx(name: &str) -> bool {
    name.split_once('_').is_some_and(|(v, rest)| {
        !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()) && rest.len() > ".sql".len()
    })
}

/// The `.sql` files of `dir`, by name.
fn sql_files(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| {
            Error::config(format!(
                "target.schema: cannot read the migrations directory {}",
                dir.display()
            ))
            .with_source(e)
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::config(format!(
            "target.schema: no .sql files in {}",
            dir.display()
        )));
    }
    Ok(names)
}

/// The layout the file names of `dir` follow.
pub fn detect(dir: &Path) -> Result<Layout> {
    let names = sql_files(dir)?;
    Ok(if names.iter().all(|n| is_refinery(n)) {
        Layout::Refinery
    } else if names.iter().all(|n| is_sqlx(n)) {
        Layout::Sqlx
    } else {
        Layout::Own
    })
}

/// `target.schema` naming a directory: `migrations:DIR` (layout read from
/// the names), `refinery:DIR`, `sqlx:DIR`.
pub fn parse(value: &str) -> Option<(Option<Layout>, PathBuf)> {
    let (layout, dir) = if let Some(d) = value.strip_prefix("migrations:") {
        (None, d)
    } else if let Some(d) = value.strip_prefix("refinery:") {
        (Some(Layout::Refinery), d)
    } else if let Some(d) = value.strip_prefix("sqlx:") {
        (Some(Layout::Sqlx), d)
    } else {
        return None;
    };
    (!dir.is_empty()).then(|| (layout, PathBuf::from(dir)))
}

/// The layout of `dir`, checked against the one named.
pub fn layout_of(named: Option<Layout>, dir: &Path) -> Result<Layout> {
    let found = detect(dir)?;
    match named {
        None => Ok(found),
        Some(l) if l == found => Ok(l),
        Some(l) => {
            let bad: Vec<String> = sql_files(dir)?
                .into_iter()
                .filter(|n| match l {
                    Layout::Refinery => !is_refinery(n),
                    Layout::Sqlx => !is_sqlx(n),
                    Layout::Own => false,
                })
                .take(5)
                .collect();
            Err(Error::config(format!(
                "target.schema: {} names files like {}, which {} does not take: {}",
                dir.display(),
                match l {
                    Layout::Refinery => "V1__name.sql",
                    _ => "20240101120000_name.sql",
                },
                l.name(),
                bad.join(", ")
            )))
        }
    }
}

/// Applies what is not applied yet of `dir`, as its layout's tool does;
/// the migrations applied, by name.
pub async fn apply(
    ep: &PgEndpoint,
    c: &tokio_postgres::Client,
    dir: &Path,
    layout: Layout,
) -> Result<Vec<String>> {
    let applied = match layout {
        Layout::Own => return state::user_migrations(ep, c, dir).await,
        Layout::Refinery => refinery_apply(ep, dir).await?,
        Layout::Sqlx => sqlx_apply(ep, dir).await?,
    };
    for m in &applied {
        info!(migration = %m, tool = layout.name(), "target migration applied");
    }
    Ok(applied)
}

async fn refinery_apply(ep: &PgEndpoint, dir: &Path) -> Result<Vec<String>> {
    let failed = |e: refinery::Error| {
        Error::definite(format!(
            "applying the refinery migrations of {} to the target ({ep:?}): {}",
            dir.display(),
            ep.scrub(&e.to_string())
        ))
    };
    let migrations = refinery::load_sql_migrations(dir).map_err(failed)?;
    let mut client = ep.connect().await?;
    let runner = refinery::Runner::new(&migrations)
        .set_abort_divergent(true)
        .set_abort_missing(true);
    let report = runner.run_async(&mut client).await.map_err(failed)?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

async fn sqlx_apply(ep: &PgEndpoint, dir: &Path) -> Result<Vec<String>> {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Error::definite(format!(
            "{what} ({ep:?}, {}): {}",
            dir.display(),
            ep.scrub(&e.to_string())
        ))
    };
    let mut opts = PgConnectOptions::new_without_pgpass()
        .host(&ep.host)
        .port(ep.port)
        .username(&ep.user)
        .database(&ep.dbname)
        .application_name("switchyard")
        .ssl_mode(match ep.sslmode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    if let Some(p) = ep.password() {
        opts = opts.password(p);
    }
    if let Some(ca) = &ep.sslrootcert {
        opts = opts.ssl_root_cert(ca);
    }
    let migrator = sqlx::migrate::Migrator::new(dir.to_path_buf())
        .await
        .map_err(|e| failed("reading the sqlx migrations", &e))?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .map_err(|e| failed("connecting for the sqlx migrations", &e))?;
    let versions = |pool: sqlx::PgPool| async move {
        let have: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&pool)
            .await?;
        if !have {
            return Ok::<Vec<i64>, sqlx::Error>(Vec::new());
        }
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(&pool)
            .await
    };
    let before = versions(pool.clone())
        .await
        .map_err(|e| failed("reading _sqlx_migrations", &e))?;
    migrator
        .run(&pool)
        .await
        .map_err(|e| failed("applying the sqlx migrations", &e))?;
    let after = versions(pool.clone())
        .await
        .map_err(|e| failed("reading _sqlx_migrations", &e))?;
    pool.close().await;
    Ok(migrator
        .iter()
        .filter(|m| {
            after.contains(&m.version)
                && !before.contains(&m.version)
                && !m.migration_type.is_down_migration()
        })
        .map(|m| format!("{}_{}", m.version, m.description.replace(' ', "_")))
        .collect())
}

/// The SQL of the files `dir` holds that the target has not applied yet,
/// in the order the layout's tool applies them (for `check`, which runs it
/// in a transaction it rolls back).
pub async fn pending_sql(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    dir: &Path,
    layout: Layout,
) -> Result<Vec<(String, String)>> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| {
            Error::config(format!(
                "target.schema: cannot read {}",
                dir.join(name).display()
            ))
            .with_source(e)
        })
    };
    let applied = |sql: &'static str| async move {
        let exists: bool = c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&layout.history()])
            .await
            .map_err(pg_err(ep, "reading the target's migration history"))?
            .get(0);
        if !exists {
            return Ok::<Vec<String>, Error>(Vec::new());
        }
        Ok(c.query(sql, &[])
            .await
            .map_err(pg_err(ep, "reading the target's migration history"))?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
    };
    let mut files = sql_files(dir)?;
    match layout {
        Layout::Own => {
            let done = applied("SELECT name FROM switchyard.user_migrations").await?;
            files.retain(|f| !done.contains(f));
        }
        Layout::Refinery => {
            let done = applied("SELECT version::text FROM refinery_schema_history").await?;
            let version = |f: &str| -> (u64, String) {
                let v = f[1..].split("__").next().unwrap_or_default().to_string();
                (
                    v.split('.')
                        .next()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0),
                    v,
                )
            };
            files.retain(|f| !done.contains(&version(f).1));
            files.sort_by_key(|f| version(f).0);
        }
        Layout::Sqlx => {
            let done = applied("SELECT version::text FROM _sqlx_migrations WHERE success").await?;
            let version = |f: &str| {
                f.split('_')
                    .next()
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            files.retain(|f| !f.ends_with(".down.sql") && !done.contains(&version(f).to_string()));
            files.sort_by_key(|f| version(f));
        }
    }
    files
        .into_iter()
        .map(|f| read(&f).map(|sql| (f, sql)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_read_from_file_names() {
        assert!(is_refinery("V1__initial_schema.sql"));
        assert!(is_refinery("V10__more.sql"));
        assert!(is_refinery("U3__unversioned.sql"));
        assert!(is_refinery("V1.2__x.sql"));
        assert!(!is_refinery("V__x.sql"));
        assert!(!is_refinery("1_init.sql"));
        assert!(is_sqlx("20240101120000_create_users.sql"));
        assert!(is_sqlx("2_add.up.sql"));
        assert!(!is_sqlx("V1__x.sql"));
        assert!(!is_sqlx("schema.sql"));
        assert_eq!(
            parse("refinery:db/migrations"),
            Some((Some(Layout::Refinery), "db/migrations".into()))
        );
        assert_eq!(parse("migrations:m"), Some((None, "m".into())));
        assert_eq!(parse("sqlx:"), None);
        assert_eq!(parse("existing"), None);
    }
}

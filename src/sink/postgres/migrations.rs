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
use crate::pg::conn::{pg_err, relation_exists, PgEndpoint, SslMode};

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

/// `V12__add_users.sql`, `U3__x.sql`, as refinery 0.8 reads them: a
/// version that fits an `i32`, a name of word characters.
fn is_refinery(name: &str) -> bool {
    refinery_version(name).is_some()
}

/// The version of a refinery file name.
fn refinery_version(name: &str) -> Option<i64> {
    let rest = name.strip_prefix(['V', 'U'])?;
    let (version, tail) = rest.split_once("__")?;
    let title = tail.strip_suffix(".sql")?;
    let ok = !version.is_empty()
        && version.chars().all(|c| c.is_ascii_digit())
        && !title.is_empty()
        && title.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !ok {
        return None;
    }
    version.parse::<i32>().ok().map(i64::from)
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

/// The layout the file names of `dir` follow. Some but not all files named
/// as refinery's is an error: refinery would skip the others.
pub fn detect(dir: &Path) -> Result<Layout> {
    let names = sql_files(dir)?;
    let refinery = names.iter().filter(|n| is_refinery(n)).count();
    if refinery > 0 && refinery < names.len() {
        let odd: Vec<&str> = names
            .iter()
            .filter(|n| !is_refinery(n))
            .map(|n| n.as_str())
            .take(5)
            .collect();
        return Err(Error::config(format!(
            "target.schema: {} holds refinery migrations (V1__name.sql) and files refinery would skip: {}; \
             rename them V{{n}}__name.sql (a version that fits an i32, a name of letters, digits and _), or move them out",
            dir.display(),
            odd.join(", ")
        )));
    }
    Ok(if refinery == names.len() {
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
    let layout = effective(c, ep, layout).await?;
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

/// A target whose files switchyard applied (before it knew the layout)
/// keeps switchyard's bookkeeping: another tool would find no history of
/// its own and apply every file again.
async fn effective(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    layout: Layout,
) -> Result<Layout> {
    if layout == Layout::Own {
        return Ok(layout);
    }
    let row = c
        .query_one(
            "SELECT to_regclass('switchyard.user_migrations') IS NOT NULL, to_regclass($1) IS NOT NULL",
            &[&layout.history()],
        )
        .await
        .map_err(pg_err(ep, "reading the target's migration history"))?;
    let (own, theirs): (bool, bool) = (row.get(0), row.get(1));
    if own && !theirs {
        let n: i64 = c
            .query_one("SELECT count(*) FROM switchyard.user_migrations", &[])
            .await
            .map_err(pg_err(ep, "reading switchyard.user_migrations"))?
            .get(0);
        if n > 0 {
            tracing::warn!(
                layout = layout.name(),
                applied = n,
                "the target's migrations were applied by switchyard (switchyard.user_migrations): \
                 switchyard keeps applying them, so that none runs twice"
            );
            return Ok(Layout::Own);
        }
    }
    Ok(layout)
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
    use sqlx::ConnectOptions as _;
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
        // The migrations' SQL (a CREATE ROLE … PASSWORD, say) stays out of the log.
        .log_statements(tracing::log::LevelFilter::Off)
        .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::ZERO)
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
        if !relation_exists(
            c,
            ep,
            layout.history(),
            "reading the target's migration history",
        )
        .await?
        {
            return Ok::<Vec<String>, Error>(Vec::new());
        }
        Ok(c.query(sql, &[])
            .await
            .map_err(pg_err(ep, "reading the target's migration history"))?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
    };
    let layout = effective(c, ep, layout).await?;
    let mut files = sql_files(dir)?;
    match layout {
        Layout::Own => {
            let done = applied("SELECT name FROM switchyard.user_migrations").await?;
            files.retain(|f| !done.contains(f));
        }
        Layout::Refinery => {
            let done = applied("SELECT version::text FROM refinery_schema_history").await?;
            let version = |f: &str| refinery_version(f).unwrap_or(0);
            files.retain(|f| !done.contains(&version(f).to_string()));
            files.sort_by_key(|f| version(f));
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

/// Whether a migration file manages its own transaction (a top-level
/// `BEGIN`/`COMMIT`/`ROLLBACK`, or sqlx's `-- no-transaction`): `check`
/// cannot try it in a transaction it rolls back.
pub fn manages_transaction(sql: &str) -> bool {
    if sql.trim_start().starts_with("-- no-transaction") {
        return true;
    }
    // Dollar-quoted bodies (functions, DO blocks) hold BEGIN and END of
    // their own: left out.
    let mut top = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        top.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let tag_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if !after[tag_len..].starts_with('$') {
            // `$1` and the like.
            top.push('$');
            rest = after;
            continue;
        }
        let tag = format!("${}$", &after[..tag_len]);
        let body = &after[tag_len + 1..];
        match body.find(&tag) {
            Some(end) => rest = &body[end + tag.len()..],
            None => {
                rest = "";
            }
        }
    }
    top.push_str(rest);
    top.split(';').any(|statement| {
        let words: Vec<String> = statement
            .lines()
            .map(|l| l.split("--").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" ")
            .split_whitespace()
            .map(|w| w.to_ascii_lowercase())
            .collect();
        matches!(
            words.first().map(String::as_str),
            Some("begin" | "commit" | "end" | "rollback" | "abort")
        ) || words.starts_with(&["start".to_string(), "transaction".to_string()])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_read_from_file_names() {
        assert!(is_refinery("V1__initial_schema.sql"));
        assert!(is_refinery("V10__more.sql"));
        assert!(is_refinery("U3__unversioned.sql"));
        assert!(!is_refinery("V1.2__x.sql"));
        assert!(!is_refinery("V2__add-users.sql"));
        assert!(!is_refinery("V20240101120000__too_big.sql"));
        assert_eq!(refinery_version("V001__init.sql"), Some(1));
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

    #[test]
    fn files_that_manage_their_own_transaction_are_told_apart() {
        assert!(manages_transaction(
            "BEGIN;\nCREATE TABLE t (id int);\nCOMMIT;"
        ));
        assert!(manages_transaction(
            "-- no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);"
        ));
        assert!(!manages_transaction(
            "CREATE TABLE t (id int); INSERT INTO t VALUES ($1);"
        ));
        assert!(!manages_transaction(
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.x := 1; RETURN NEW; END; $$;"
        ));
        assert!(!manages_transaction(
            "DO $body$ BEGIN PERFORM 1; END $body$;"
        ));
    }
}

//! `check`, `status` and `verify` write nothing: run against sources and
//! targets switchyard never touched, they leave files, schemas, journal
//! modes and namespaces as they were, and say clearly that the target was
//! never replicated into. Also: `verify` after `snapshot` answers at once
//! with no daemon running, `uninstall` leaves a SQLite database as it was
//! before `run`, and an idle source costs the target little.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::pg_surreal::PgDb;
use crate::pg_target::{rows, target_config_text};
use crate::support::*;
use crate::surreal_remote::SurrealServer;

const SHOP: &str = "CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT NOT NULL, since DATETIME);
     CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT, customer_id INTEGER, total DECIMAL(10,2));
     INSERT INTO customer VALUES (1, 'Ada', '2024-01-01 10:00:00'), (2, 'Bo', NULL);
     INSERT INTO orders (customer_id, total) VALUES (1, 12.5), (2, 3);";

/// A SQLite database in rollback-journal mode (`delete`), as applications
/// that never chose WAL have them.
async fn sqlite_in_delete_mode(path: &Path, sql: &str) {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Delete)
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    sqlx::Connection::close(conn).await.unwrap();
}

/// Everything a read-only command must leave alone in a SQLite database:
/// the files next to it, their bytes, the schema and the journal mode.
async fn sqlite_fingerprint(path: &Path) -> (Vec<String>, String, String, Vec<String>) {
    let dir = path.parent().unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("source.sqlite"))
        .collect();
    files.sort();
    let bytes = format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));
    let (schema, mode) = sqlite_schema(path).await;
    (files, bytes, mode, schema)
}

/// The schema (`sqlite_master`) and journal mode, read without writing.
async fn sqlite_schema(path: &Path) -> (Vec<String>, String) {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let schema: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    (
        schema
            .into_iter()
            .map(|(t, n, s)| format!("{t} {n} {}", s.unwrap_or_default()))
            .collect(),
        mode,
    )
}

/// The relations of a PostgreSQL database outside the system schemas, and
/// its slots and publications.
async fn pg_fingerprint(db: &PgDb) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = db
        .client
        .query(
            "SELECT n.nspname || '.' || c.relname || ' ' || c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
             UNION ALL SELECT 'schema ' || nspname FROM pg_namespace
             UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    for r in db
        .client
        .query(
            "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
    {
        out.insert(r.get(0));
    }
    out
}

fn cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    run_cli(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_write_nothing_to_an_untouched_source_and_target() {
    let s = Scratch::new();
    let source = s.source_path();
    sqlite_in_delete_mode(&source, SHOP).await;
    let before = sqlite_fingerprint(&source).await;
    assert_eq!(before.2, "delete");

    // Into an embedded target that does not exist yet.
    let kv = s.path("replica");
    let kv_config = s.write_config(&format!("surrealkv://{}", kv.display()), "");
    let (code, out, err) = cli(&["check"], &kv_config);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(
        &out,
        &[
            "journal_mode is delete",
            "switches the database to WAL",
            "does not exist yet",
        ],
    );
    let (code, out, err) = cli(&["status"], &kv_config);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["not_started", "never replicated"]);
    let (code, out, err) = cli(&["verify"], &kv_config);
    assert_eq!(code, 2, "{out}{err}");
    assert_names(&err, &["never replicated"]);
    assert!(
        !kv.exists(),
        "a read-only command created the embedded target"
    );

    // Into a PostgreSQL database switchyard never used.
    let target = PgDb::new("").await;
    let pg_before = pg_fingerprint(&target).await;
    let pg_config = s.path("pg.toml");
    std::fs::write(
        &pg_config,
        target_config_text(&s.config_text("mem://", ""), &target),
    )
    .unwrap();
    let (code, out, err) = cli(&["check"], &pg_config);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["never replicated into this target"]);
    let (code, out, err) = cli(&["status"], &pg_config);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["not_started", "never replicated"]);
    let (code, out, err) = cli(&["verify"], &pg_config);
    assert_eq!(code, 2, "{out}{err}");
    assert_names(&err, &["never replicated"]);
    assert_eq!(
        pg_fingerprint(&target).await,
        pg_before,
        "the PostgreSQL target changed"
    );

    // Into a SurrealDB server.
    let server = SurrealServer::start(s.path("surreal.log")).await;
    let db = surrealdb::engine::any::connect(&server.url).await.unwrap();
    db.signin(surrealdb::opt::auth::Root {
        username: "root".into(),
        password: "s3rver-Secret".into(),
    })
    .await
    .unwrap();
    let namespaces = || async {
        let info: Option<serde_json::Value> =
            db.query("INFO FOR ROOT").await.unwrap().take(0).unwrap();
        info.unwrap()["namespaces"].clone()
    };
    let namespaces_before = namespaces().await;
    let remote = s.path("remote.toml");
    std::fs::write(
        &remote,
        s.config_text(&server.url, "").replace(
            "database = \"test\"\n",
            "database = \"test\"\nusername = \"root\"\npassword = \"s3rver-Secret\"\n",
        ),
    )
    .unwrap();
    for (cmd, want) in [("check", 0), ("status", 0), ("verify", 2)] {
        let (code, out, err) = cli(&[cmd], &remote);
        assert_eq!(code, want, "{cmd}: {out}{err}");
        assert!(
            format!("{out}{err}").contains("never replicated"),
            "{cmd}: {out}{err}"
        );
    }
    assert_eq!(
        namespaces().await,
        namespaces_before,
        "a read-only command defined a namespace"
    );

    assert_eq!(
        sqlite_fingerprint(&source).await,
        before,
        "the SQLite source changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_create_no_slot_or_publication_in_a_postgres_source() {
    let db = PgDb::new(
        "CREATE TABLE item (id int PRIMARY KEY, name text); INSERT INTO item VALUES (1, 'a');",
    )
    .await;
    let target = PgDb::new("").await;
    let before = (pg_fingerprint(&db).await, pg_fingerprint(&target).await);
    let s = Scratch::new();
    let config = s.path("pg.toml");
    std::fs::write(
        &config,
        target_config_text(&db.config_text("mem://", ""), &target),
    )
    .unwrap();
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["status"], &config);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["verify"], &config);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(
        (pg_fingerprint(&db).await, pg_fingerprint(&target).await),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_after_snapshot_answers_with_no_daemon_running() {
    let db = PgDb::new(
        "CREATE TABLE item (id int PRIMARY KEY, name text);
         INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, 500) g;",
    )
    .await;
    let target = PgDb::new("").await;
    let s = Scratch::new();
    let config = s.path("pg.toml");
    std::fs::write(
        &config,
        target_config_text(&db.config_text("mem://", ""), &target),
    )
    .unwrap();
    let (code, out, err) = cli(&["snapshot"], &config);
    assert_eq!(code, 0, "{out}{err}");

    // Another database on the server keeps writing: the WAL moves on, with
    // nothing for the replicated table.
    let other = PgDb::new("CREATE TABLE noise (n int)").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let client = crate::pg_surreal::connect(&other.cluster, &other.name).await;
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                client
                    .execute("INSERT INTO noise VALUES ($1)", &[&n])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let (code, out, err) = cli(&["verify", "--wait", "120"], &config);
    let took = started.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["item", "500", "identical"]);
    // It answered without waiting out --wait for a checkpoint that no
    // daemon moves.
    assert!(took < Duration::from_secs(60), "verify took {took:?}");
    let (code, out, err) = cli(&["verify"], &config);
    assert_eq!(code, 0, "{out}{err}");

    // Changes wait and nothing applies them: at once, exit 2, how many.
    db.exec("UPDATE item SET name = 'changed' WHERE id <= 3")
        .await;
    let started = Instant::now();
    let (code, out, err) = cli(&["verify"], &config);
    assert_eq!(code, 2, "{out}{err}");
    assert_names(
        &err,
        &["3 change(s)", "item", "start `switchyard run`", "--wait"],
    );
    assert!(started.elapsed() < Duration::from_secs(60));

    // status shows positions as LSNs, and what waits.
    let (code, out, err) = cli(&["status"], &config);
    assert_eq!(code, 0, "{out}{err}");
    let checkpoint = out
        .lines()
        .find(|l| l.starts_with("checkpoint"))
        .unwrap_or_default()
        .to_string();
    assert!(
        checkpoint.contains('/') && !checkpoint.contains(".end"),
        "{out}"
    );
    assert_names(&out, &["behind"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    assert_eq!(rows(&target.client, "item").await.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_leaves_the_sqlite_database_as_it_was_before_run() {
    let s = Scratch::new();
    let source = s.source_path();
    sqlite_in_delete_mode(&source, SHOP).await;
    let (schema_before, mode_before) = sqlite_schema(&source).await;
    let config = s.write_config(&format!("surrealkv://{}", s.path("replica").display()), "");
    let (code, out, err) = cli(&["snapshot"], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&err, &["switched the source database to WAL"]);
    let (schema_during, mode_during) = sqlite_schema(&source).await;
    assert_eq!(mode_during, "wal");
    assert!(schema_during.len() > schema_before.len());
    let (code, out, err) = cli(&["uninstall"], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        sqlite_schema(&source).await,
        (schema_before, mode_before),
        "uninstall left something behind"
    );
    // status now says the capture is gone, instead of failing on it.
    let (code, out, err) = cli(&["status"], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["change capture is not installed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_tries_every_endpoint_and_a_missing_database_cannot_run() {
    let s = Scratch::new();
    s.source(SHOP).await;
    // A PostgreSQL target nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = s.path("unreachable.toml");
    std::fs::write(
        &config,
        s.config_text(
            &format!("postgres://postgres@127.0.0.1:{port}/nowhere?sslmode=disable"),
            "",
        )
        .replace("namespace = \"test\"\n", "")
        .replace("database = \"test\"\n", ""),
    )
    .unwrap();
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 1, "{out}{err}");
    assert_names(
        &out,
        &[
            "(target)",
            "cannot connect",
            &port.to_string(),
            "1 blocking problem",
        ],
    );

    // A source database that does not exist: could not run, exit 2.
    let db = PgDb::new("").await;
    let missing = s.path("missing.toml");
    std::fs::write(
        &missing,
        db.config_text("mem://", "")
            .replace(&format!("/{}?", db.name), "/no_such_database?"),
    )
    .unwrap();
    for cmd in ["check", "run", "verify"] {
        let (code, out, err) = cli(&[cmd], &missing);
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert_names(&err, &["no_such_database", "does not exist"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_source_costs_the_target_a_handful_of_transactions_a_second() {
    let db = PgDb::new(
        "CREATE TABLE item (id int PRIMARY KEY, name text); INSERT INTO item VALUES (1, 'a');",
    )
    .await;
    let target = PgDb::new("").await;
    let other = PgDb::new("CREATE TABLE noise (n int)").await;
    let s = Scratch::new();
    let config = s.path("pg.toml");
    std::fs::write(
        &config,
        target_config_text(&db.config_text("mem://", ""), &target),
    )
    .unwrap();
    let daemon = Daemon::start(
        &["run", "--config", config.to_str().unwrap()],
        s.path("daemon.log"),
    );
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(&target.client, "item").await.len() == 1
    })
    .await;
    // (The source's schema is restored around the copy: its post-data part
    // ends the snapshot.)
    crate::pg_schema::post_data_restored(&target).await;
    let commits = || async {
        target
            .client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Another database writes all the time; the replicated table is idle.
    let client = crate::pg_surreal::connect(&other.cluster, &other.name).await;
    let window = Duration::from_secs(6);
    // A backend that went idle reports its transactions to pg_stat_database
    // up to 10 s later (PostgreSQL's idle stats interval): the copy's
    // sessions are heard from before the window opens.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let first = commits().await;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < window {
        n += 1;
        client
            .execute("INSERT INTO noise VALUES ($1)", &[&n])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let made = commits().await - first;
    // Statistics reach pg_stat_database with a delay; allow for our own
    // reads of the counter (two per sample).
    assert!(
        made <= 4 * window.as_secs() as i64,
        "{made} target transactions in {window:?} from an idle source"
    );
    let status = daemon.interrupt().await;
    assert!(status.success());
    let log = std::fs::read_to_string(s.path("daemon.log")).unwrap();
    let phases = log
        .lines()
        .filter(|l| l.contains("\"message\":\"phase\"") && l.contains("\"level\":\"INFO\""))
        .count();
    assert!(phases <= 5, "{phases} phase lines:\n{log}");
}

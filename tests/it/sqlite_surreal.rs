//! M2: SQLite → embedded SurrealDB, snapshot then stream, in process.

use std::sync::Arc;
use std::time::Duration;

use surrealdb::types::Value as SValue;
use switchyard::config::Config;
use switchyard::position::Position;
use switchyard::sink::surreal::SurrealSink;
use switchyard::sink::Sink;
use switchyard::source::sqlite::SqliteSource;
use switchyard::ErrorKind;

use crate::support::*;

const SCHEMA: &str = r#"
CREATE TABLE "order" (
    id INTEGER PRIMARY KEY,
    "select" TEXT,
    "naïve col" TEXT,
    total DECIMAL(12, 2)
);
CREATE TABLE "naïve table" (
    region TEXT NOT NULL,
    seq INTEGER NOT NULL,
    note TEXT,
    PRIMARY KEY (region, seq)
) WITHOUT ROWID;
CREATE TABLE edge (
    id INTEGER PRIMARY KEY,
    i INTEGER,
    r REAL,
    big TEXT,
    b BLOB,
    j JSON,
    t DATETIME,
    flag BOOLEAN,
    loose
);
INSERT INTO "order" (id, "select", "naïve col", total) VALUES
    (1, 'from', 'ünïcødé ✓', 12.50),
    (2, NULL, NULL, NULL),
    (3, 'it''s "quoted"', '日本語', '99999999.99');
INSERT INTO "naïve table" VALUES ('eu', 1, 'a'), ('eu', 2, NULL), ('us', 1, 'c');
INSERT INTO edge (id, i, r, big, b, j, t, flag, loose) VALUES
    (1, 9223372036854775807, 0.1, NULL, x'00FF10', '{"a": {"b": [1, 2, {"c": null}]}, "k": "v"}', '2024-05-01 12:30:00', 1, 42),
    (2, -9223372036854775808, -0.0, '', x'', '[]', '2024-05-01T12:30:00.123+02:00', 0, 'text'),
    (3, 0, 1.7976931348623157e308, NULL, NULL, 'null', NULL, NULL, x'CAFE'),
    (4, 1, 4.9406564584124654e-324, NULL, NULL, '"s"', '1999-12-31', NULL, 1.5),
    (5, 2, 9e999, NULL, NULL, '1.5', NULL, NULL, NULL),
    (6, 3, -9e999, NULL, NULL, '{}', NULL, NULL, NULL);
"#;

pub async fn start(config: Arc<Config>, sink: Option<Arc<SurrealSink>>) -> Running {
    let path = match config.source_kind().unwrap() {
        switchyard::config::SourceKind::Sqlite { path } => path,
        other => panic!("not a SQLite source: {other:?}"),
    };
    let source = Arc::new(
        SqliteSource::open(
            &path,
            &config,
            Default::default(),
            switchyard::source::Access::ReadWrite,
        )
        .await
        .unwrap(),
    );
    run_pipeline(config, source, sink).await
}

pub async fn wait_converged(pool: &sqlx::SqlitePool, config: &Config, sink: &SurrealSink) {
    let tables: Vec<String> = source_tables(config)
        .await
        .iter()
        .map(|t| t.target_name.clone())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let want = source_image(pool, config).await;
        let got = target_image(sink.client(), &tables).await;
        let Some(d) = diff(&want, &got) else { return };
        assert!(
            std::time::Instant::now() < deadline,
            "target never matched the source: {d}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn record(sink: &SurrealSink, rid: &str) -> SValue {
    let mut r = sink
        .client()
        .query(format!("SELECT * FROM ONLY {rid}"))
        .await
        .unwrap();
    r.take::<SValue>(0).unwrap()
}

fn field<'a>(v: &'a SValue, name: &str) -> &'a SValue {
    let SValue::Object(o) = v else {
        panic!("not an object: {v:?}")
    };
    o.get(name).unwrap_or(&SValue::None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_stream_every_shape() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    // A 1 MB text, inserted before the snapshot, and one after.
    let mb = "x".repeat(1 << 20);
    sqlx::query("UPDATE edge SET big = ? WHERE id = 1")
        .bind(&mb)
        .execute(&pool)
        .await
        .unwrap();
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;

    // Values the target holds, checked by hand rather than through the sink's mapping.
    let e1 = record(&run.sink, "edge:1").await;
    assert_eq!(field(&e1, "i"), &SValue::from_t(i64::MAX));
    assert_eq!(field(&e1, "r"), &SValue::from_t(0.1f64));
    assert!(matches!(field(&e1, "big"), SValue::String(x) if x.len() == 1 << 20));
    assert!(matches!(field(&e1, "b"), SValue::Bytes(b) if b.to_vec() == vec![0u8, 0xFF, 0x10]));
    assert!(
        matches!(field(&e1, "t"), SValue::Datetime(_)),
        "{:?}",
        field(&e1, "t")
    );
    assert_eq!(field(&e1, "flag"), &SValue::Bool(true));
    assert_eq!(field(&e1, "loose"), &SValue::from_t(42i64));
    let j = field(&e1, "j");
    assert_eq!(
        j.clone().into_json_value(),
        serde_json::json!({"a": {"b": [1, 2, {"c": null}]}, "k": "v"})
    );
    let e2 = record(&run.sink, "edge:2").await;
    assert_eq!(field(&e2, "i"), &SValue::from_t(i64::MIN));
    assert_eq!(
        field(&e2, "t").clone().into_json_value(),
        serde_json::json!("2024-05-01T10:30:00.123Z")
    );
    assert_eq!(field(&e2, "loose"), &SValue::String("text".into()));
    assert!(
        matches!(field(&record(&run.sink, "edge:5").await, "r"), SValue::Number(n) if n.to_f64() == Some(f64::INFINITY))
    );
    let o2 = record(&run.sink, "`order`:2").await;
    assert_eq!(
        field(&o2, "select"),
        &SValue::None,
        "NULL is carried as an absent field"
    );
    let o3 = record(&run.sink, "`order`:3").await;
    assert_eq!(field(&o3, "naïve col"), &SValue::String("日本語".into()));
    assert!(
        matches!(field(&o3, "total"), SValue::Number(surrealdb::types::Number::Decimal(d)) if d.to_string() == "99999999.99")
    );

    // Live changes: insert, update, delete, a primary-key change, a 1 MB value,
    // several changes in one source transaction, composite keys.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO \"order\" (id, \"select\", total) VALUES (10, 'new', 1.05)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE \"order\" SET \"select\" = 'changed' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM \"order\" WHERE id = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE \"order\" SET id = 30 WHERE id = 3")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE \"naïve table\" SET region = 'apac' WHERE region = 'eu' AND seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM \"naïve table\" WHERE region = 'us'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO edge (id, big, b) VALUES (7, ?, ?)")
        .bind(&mb)
        .bind(vec![7u8; 100_000])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE edge SET j = '{\"deep\": {\"er\": [true]}}', flag = 0 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    wait_converged(&pool, &config, &run.sink).await;
    assert_eq!(
        record(&run.sink, "`order`:3").await,
        SValue::None,
        "the old key is gone after a key change"
    );
    assert!(
        matches!(field(&record(&run.sink, "`order`:30").await, "naïve col"), SValue::String(s) if s == "日本語")
    );
    let rid = "`naïve table`:['apac', 2]";
    assert_eq!(
        field(&record(&run.sink, rid).await, "region"),
        &SValue::String("apac".into())
    );

    let report = run.stop().await;
    assert_eq!(report.tables.len(), 3);
    assert!(report.changes_applied >= 8, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_the_checkpoint_and_trims_the_log() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    for i in 100..150 {
        sqlx::query("INSERT INTO \"order\" (id, \"select\") VALUES (?, 'a')")
            .bind(i)
            .execute(&pool)
            .await
            .unwrap();
    }
    wait_converged(&pool, &config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;
    let cp1 = sink.state().await.unwrap().unwrap().checkpoint.unwrap();
    assert_eq!(cp1.commit as i64, source_high_water(&pool).await);

    // Changes while the daemon is down, including deletes of copied rows.
    sqlx::query("DELETE FROM \"order\" WHERE id < 120")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE \"naïve table\" SET note = 'while down'")
        .execute(&pool)
        .await
        .unwrap();
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_converged(&pool, &config, &run.sink).await;
    // The log is trimmed up to the checkpoint, never past it (its newest
    // entry stays: it keeps the sequence from being reused).
    wait_until(
        "the change log to be trimmed",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            let sink = sink.clone();
            async move {
                let cp = sink
                    .state()
                    .await
                    .unwrap()
                    .unwrap()
                    .checkpoint
                    .unwrap()
                    .commit as i64;
                let left: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM _switchyard_changes WHERE seq <= ? AND seq < (SELECT max(seq) FROM _switchyard_changes)")
                        .bind(cp)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                left == 0
            }
        },
    )
    .await;
    let report = run.stop().await;
    assert!(
        report.tables.iter().all(|t| t.already_copied),
        "no table is copied twice: {report:?}"
    );
    assert!(sink.state().await.unwrap().unwrap().checkpoint.unwrap() > cp1);
}

#[tokio::test]
async fn the_checkpoint_never_moves_backwards() {
    let s = Scratch::new();
    let _pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let sink = SurrealSink::connect("mem://", false, &config)
        .await
        .unwrap();
    sink.prepare(&source_tables(&config).await).await.unwrap();
    sink.apply(&[], Position::new(10, 0)).await.unwrap();
    let err = sink.apply(&[], Position::new(9, 0)).await.unwrap_err();
    assert!(err.report().contains("backwards"), "{}", err.report());
    assert_eq!(
        sink.state().await.unwrap().unwrap().checkpoint,
        Some(Position::new(10, 0))
    );
    sink.apply(&[], Position::new(10, 3)).await.unwrap();
    assert!(sink.apply(&[], Position::new(10, 2)).await.is_err());
    assert_eq!(
        sink.state().await.unwrap().unwrap().checkpoint,
        Some(Position::new(10, 3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_cannot_be_carried_stops_without_advancing() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    sqlx::query("INSERT INTO edge (id, i) VALUES (50, 1)")
        .execute(&pool)
        .await
        .unwrap();
    let good = source_high_water(&pool).await;
    // INTEGER affinity keeps text that does not look like a number as TEXT.
    sqlx::query("INSERT INTO edge (id, i) VALUES (51, 'lots')")
        .execute(&pool)
        .await
        .unwrap();
    let sink = run.sink.clone();
    let err = tokio::time::timeout(Duration::from_secs(30), run.handle)
        .await
        .expect("pipeline should stop by itself")
        .unwrap()
        .expect_err("the bad value must stop the pipeline");
    assert_eq!(err.kind(), ErrorKind::Definite);
    let msg = err.report();
    assert_names(&msg, &["\"edge\"", "id = 51", "\"i\"", "lots", "INTEGER"]);
    let cp = sink
        .state()
        .await
        .unwrap()
        .unwrap()
        .checkpoint
        .unwrap()
        .commit as i64;
    assert!(
        cp <= good,
        "checkpoint {cp} passed the bad change (good changes end at {good})"
    );
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM _switchyard_changes WHERE seq > ?")
        .bind(cp)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(kept >= 1, "the change that failed is still in the log");
}

#[tokio::test]
async fn check_refuses_a_table_without_a_key_and_accepts_configured_keys() {
    let s = Scratch::new();
    let _pool = s.source("CREATE TABLE events (ts TEXT, kind TEXT, body TEXT); CREATE TABLE ok (id INTEGER PRIMARY KEY);").await;
    let cfg = s.write_config("mem://", "");
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("\"events\"")
            && out.contains("no primary key")
            && out.contains("[tables.keys]"),
        "{out}"
    );
    let (code, _, err) = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("events") && err.contains("no primary key"),
        "{err}"
    );

    let cfg = s.write_config("mem://", "\n[tables.keys]\nevents = [\"ts\", \"kind\"]\n");
    // Named key columns must be unique in the source, or rows would collapse.
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("no UNIQUE index") && out.contains("CREATE UNIQUE INDEX"),
        "{out}"
    );
    sqlx::query("CREATE UNIQUE INDEX events_key ON events (kind, ts)")
        .execute(&_pool)
        .await
        .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("key (ts, kind)"), "{out}");
    // The key's own unique index is no other constraint.
    assert!(!out.contains("besides the key"), "{out}");
}

#[tokio::test]
async fn config_errors_name_the_key_and_exit_2() {
    let s = Scratch::new();
    let p = s.path("bad.toml");
    std::fs::write(&p, "[source]\nurl = \"sqlite://nowhere.sqlite\"\n[target]\nurl = \"ws://root:hunter2@localhost:1\"\nnamespace = \"a\"\ndatabase = \"b\"\nbogus = 1\n").unwrap();
    let (code, _, err) = run_cli(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("bogus"), "{err}");
    assert!(!err.contains("hunter2"), "a password leaked: {err}");
    std::fs::write(&p, "[source]\nurl = \"sqlite://nowhere.sqlite\"\n[target]\nurl = \"ws://localhost:1\"\nnamespace = \"a\"\ndatabase = \"b\"\nusername = \"root\"\npassword = \"hunter2\"\n").unwrap();
    let (code, _, err) = run_cli(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("nowhere.sqlite") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "a password leaked: {err}");
}

#[tokio::test]
async fn snapshot_command_reports_each_table_and_uninstall_cleans_up() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let target = s.path("replica");
    let url = format!("surrealkv://{}", target.display());
    let cfg = s.write_config(&url, "");
    let report = s.path("report.json");
    let (code, out, err) = run_cli(&[
        "snapshot",
        "--config",
        cfg.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("naïve table") && out.contains("rows/s"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let rows: Vec<(String, u64)> = r["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                t["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("edge".into(), 6),
            ("naïve table".into(), 3),
            ("order".into(), 3)
        ]
    );

    // A second snapshot copies nothing again.
    let (code, out, _) = run_cli(&["snapshot", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("copied earlier"), "{out}");

    wait_unlocked(&target).await;
    let config = Config::load(&cfg).unwrap();
    let db = open_target(&url).await;
    let tables: Vec<String> = source_tables(&config)
        .await
        .iter()
        .map(|t| t.target_name.clone())
        .collect();
    assert_eq!(
        diff(
            &source_image(&pool, &config).await,
            &target_image(&db, &tables).await
        ),
        None
    );
    drop(db);

    let (code, out, err) = run_cli(&["uninstall", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE name LIKE '\\_switchyard%' ESCAPE '\\'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The application's tables and rows are untouched.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM edge")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 6);
}

#[tokio::test]
async fn demo_source_is_replicable() {
    let s = Scratch::new();
    let db = s.path("shop.sqlite");
    let (code, _, err) = run_cli(&["demo-source", db.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(&["demo-source", db.to_str().unwrap()]);
    assert_eq!(code, 2, "an existing file is never overwritten: {err}");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/quickstart.toml"
    ))
    .unwrap()
    .replace(
        "sqlite://data/shop.sqlite",
        &format!("sqlite://{}", db.display()),
    );
    let cfg = s.path("qs.toml");
    std::fs::write(&cfg, text.replace("surrealkv://data/replica", "mem://")).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    for t in ["customers", "products", "orders", "order_lines"] {
        assert!(
            out.contains(&format!("table \"{t}\"")),
            "{t} missing: {out}"
        );
    }
}

#[tokio::test]
async fn a_batch_replayed_at_the_checkpoint_the_target_holds_is_not_applied_twice() {
    use switchyard::model::{Change, Column, LogicalType, Op, TableSchema, Value};
    let s = Scratch::new();
    let _pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let sink = SurrealSink::connect("mem://", false, &config)
        .await
        .unwrap();
    // A table without a key counts identical rows: an insert applied twice
    // would count two.
    let table = Arc::new(TableSchema::whole_row(
        "log".into(),
        "log".into(),
        vec![Column {
            name: "line".into(),
            source_type: "TEXT".into(),
            logical: LogicalType::Text,
            nullable: true,
        }],
    ));
    sink.prepare(std::slice::from_ref(&table)).await.unwrap();
    let at = Position::new(10, 1);
    let batch = vec![Change {
        table: table.clone(),
        op: Op::Insert {
            row: vec![Value::Text("hello".into())],
        },
        position: at,
    }];
    sink.apply(&batch, at).await.unwrap();
    // The same batch again (a second process, a replay after a lost
    // connection the sink did not see), at the checkpoint it left.
    let again = sink.apply(&batch, at).await.unwrap();
    assert_eq!(again.position(), at);
    let mut q = sink
        .client()
        .query("SELECT VALUE _switchyard_copies FROM log")
        .await
        .unwrap();
    let copies: Vec<i64> = q.take(0).unwrap();
    assert_eq!(copies, vec![1], "the replayed insert was counted again");
    // An empty batch at the same checkpoint still just holds it.
    sink.apply(&[], at).await.unwrap();
}

/// The memory budget of an embedded SurrealKV target: snapshot batches
/// larger than its write buffer load in parts; a change batch that large
/// stops with what to change and nothing advanced, and runs once changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_target_keeps_to_its_memory_budget() {
    capture_logs();
    let s = Scratch::new();
    // 3,500-byte values stay in the engine's write buffer (4 KiB and more
    // go to its value log).
    let pool = s
        .source(
            "CREATE TABLE wide (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6000)
             INSERT INTO wide SELECT i, printf('%.3500c', 'x') || i FROM n;",
        )
        .await;
    let dir = s.path("replica");
    let url = format!("surrealkv://{}", dir.display());
    // 64 MiB: write buffers of 16 MiB; 6,000 rows of 3.5 KB (21 MB) in one
    // transaction do not fit one.
    let config_with = |batch: usize| {
        Arc::new(
            Config::parse(
                &s.config_text(
                    &url,
                    &format!("snapshot_batch_rows = 6000\nbatch_rows = {batch}\n"),
                )
                .replace(
                    "database = \"test\"\n",
                    "database = \"test\"\nmemory_mb = 64\n",
                ),
            )
            .unwrap(),
        )
    };
    let config = config_with(6000);
    let sink = Arc::new(SurrealSink::connect(&url, false, &config).await.unwrap());
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_converged(&pool, &config, &sink).await;
    let before = target_checkpoint(sink.client()).await;
    // One source transaction of 6,000 changes, applied in one batch.
    sqlx::raw_sql("UPDATE wide SET body = body || 'y'")
        .execute(&pool)
        .await
        .unwrap();
    let e = run.error_within(Duration::from_secs(120)).await;
    assert_names(
        &e,
        &[
            "write buffer",
            "16 MiB",
            "target.memory_mb = 64",
            "pipeline.batch_rows",
        ],
    );
    assert_eq!(
        target_checkpoint(sink.client()).await,
        before,
        "nothing advanced"
    );
    drop(sink);
    wait_unlocked(&dir).await;
    // As the error says: smaller batches.
    let config = config_with(2000);
    let sink = Arc::new(SurrealSink::connect(&url, false, &config).await.unwrap());
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_converged(&pool, &config, &sink).await;
    assert!(target_checkpoint(sink.client()).await > before);
    run.stop().await;
}

/// A row the SurrealDB target refuses (a CHECK the source did not enforce
/// on it, now a field's ASSERT): without a reject directory the snapshot
/// stops naming the table, key, column and SurrealDB's words; with one, the
/// row is set aside and every other row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_surrealdb_refuses_is_named_or_set_aside() {
    capture_logs();
    // Rows 1234 and 4321 were written with the CHECK off, as an old
    // application version did.
    let schema = "CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('new', 'paid', 'shipped')));
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
         INSERT INTO orders SELECT i, 'paid' FROM n;
         PRAGMA ignore_check_constraints = ON;
         UPDATE orders SET status = 'legacy' WHERE id IN (1234, 4321);
         PRAGMA ignore_check_constraints = OFF;";
    let s = Scratch::new();
    s.source(schema).await;
    let config = s.config("mem://", "");
    let err = start(config, None)
        .await
        .error_within(Duration::from_secs(60))
        .await;
    // Whichever of the two a loader met first (batches load at once).
    assert!(
        err.contains("table \"orders\", key (id = 1234), column \"status\"")
            || err.contains("table \"orders\", key (id = 4321), column \"status\""),
        "{err}"
    );
    assert_names(
        &err,
        &[
            "'legacy'",
            "SurrealDB refused it",
            "must conform to",
            "reject_dir",
        ],
    );

    let s = Scratch::new();
    let pool = s.source(schema).await;
    let dir = s.path("rejects");
    let config = s.config("mem://", &format!("reject_dir = \"{}\"\n", dir.display()));
    let sink = Arc::new(
        SurrealSink::connect("mem://", false, &config)
            .await
            .unwrap()
            .with_rejects(Arc::new(switchyard::reject::Rejects::new(Some(
                dir.clone(),
            )))),
    );
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_until("the copy of orders", Duration::from_secs(60), || {
        let sink = sink.clone();
        async move {
            match sink
                .client()
                .query("RETURN count(SELECT VALUE id FROM orders)")
                .await
            {
                Ok(mut r) => r.take::<Option<i64>>(0).ok().flatten() == Some(4998),
                Err(_) => false,
            }
        }
    })
    .await;
    let lines = reject_lines(&dir.join("orders.jsonl"));
    let mut seen: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap_or_default().to_string(),
                l["column"].as_str().unwrap_or_default().to_string(),
                l["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("(id = 1234)".into(), "status".into(), "\"legacy\"".into()),
            ("(id = 4321)".into(), "status".into(), "\"legacy\"".into()),
        ],
        "{lines:?}"
    );
    assert!(
        lines[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SurrealDB refused it") && r.contains("must conform to")),
        "{lines:?}"
    );
    // A streamed change refused: set aside (its row's old version gone),
    // the rest of its transaction applied.
    sqlx::raw_sql(
        "PRAGMA ignore_check_constraints = ON;
         BEGIN; UPDATE orders SET status = 'legacy' WHERE id = 7; INSERT INTO orders VALUES (6000, 'new'); COMMIT;
         PRAGMA ignore_check_constraints = OFF;",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_until("the stream of orders", Duration::from_secs(60), || {
        let sink = sink.clone();
        async move {
            match sink
                .client()
                .query("RETURN count(SELECT VALUE id FROM orders); RETURN count(SELECT VALUE id FROM orders:6000); RETURN count(SELECT VALUE id FROM orders:7);")
                .await
            {
                Ok(mut r) => {
                    let mut n = |i: usize| r.take::<Option<i64>>(i).ok().flatten();
                    let (all, new, refused) = (n(0), n(1), n(2));
                    (all, new, refused) == (Some(4998), Some(1), Some(0))
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let streamed: Vec<serde_json::Value> = reject_lines(&dir.join("orders.jsonl"))
        .into_iter()
        .filter(|l| l["phase"] == "stream")
        .collect();
    assert_eq!(streamed.len(), 1, "{streamed:?}");
    assert_eq!(streamed[0]["key"], "(id = 7)");
    assert!(!run.handle.is_finished(), "the daemon stopped");
    drop(pool);
    run.stop().await;

    // Without a reject directory, the streamed change stops the run by name.
    let s = Scratch::new();
    let pool = s
        .source("CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('new', 'paid', 'shipped'))); INSERT INTO orders VALUES (1, 'new');")
        .await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    sqlx::raw_sql(
        "PRAGMA ignore_check_constraints = ON; UPDATE orders SET status = 'legacy' WHERE id = 1; PRAGMA ignore_check_constraints = OFF;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = run.error_within(Duration::from_secs(60)).await;
    assert_names(
        &err,
        &[
            "table \"orders\", key (id = 1), column \"status\"",
            "SurrealDB refused it",
            "'legacy'",
            "reject_dir",
            "the checkpoint stays before it",
        ],
    );
}

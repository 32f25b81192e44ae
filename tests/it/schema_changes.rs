//! Schema changes while streaming: each DDL a routine deploy makes is
//! followed without a stop (in place, or by copying the table again at a
//! snapshot of its own), under a concurrent writer, and across a restart
//! with WAL pending from before the change; `verify` says identical after
//! each. PostgreSQL → PostgreSQL, PostgreSQL → SurrealDB and SQLite →
//! PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::reject::Rejects;
use switchyard::source::Access;
use switchyard::verify::{verify, Options};

use crate::pg_surreal::{connect, PgDb};
use crate::pg_target::target_config_text;
use crate::support::*;

/// Verifies `config`'s source against its target until identical (the
/// daemon catches up meanwhile); panics with the verdict after a minute.
async fn until_identical(config: &Arc<Config>, what: &str) {
    capture_logs();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let source =
            switchyard::connect::source(config, Arc::new(Rejects::default()), Access::ReadOnly)
                .await
                .unwrap();
        let sink = switchyard::connect::sink(config, Arc::new(Rejects::default()))
            .await
            .unwrap();
        let verdict = verify(
            Arc::from(source),
            Arc::from(sink),
            &Options {
                tables: Vec::new(),
                wait: Some(Duration::from_secs(20)),
                batch_rows: 1000,
            },
        )
        .await;
        match verdict {
            Ok(v) if v.identical => return,
            other => {
                let shown = match &other {
                    Ok(v) => switchyard::commands::verify::render(v),
                    Err(e) => e.report(),
                };
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: the target never became identical:\n{shown}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The target table's columns: `name type [not null] [default …]`.
async fn target_columns(target: &PgDb, table: &str) -> Vec<String> {
    target
        .client
        .query(
            "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Writes to `table` until stopped: inserts and updates of the columns no
/// DDL of these tests touches (id, v), the way an application keeps running
/// through its deploys. While `paused`, it waits (verify compares a table
/// that holds still; a few hot rows updated faster than verify reads would
/// differ in every round).
struct Writer {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<u64>,
}

impl Writer {
    fn start(client: tokio_postgres::Client, table: &'static str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, p) = (stop.clone(), paused.clone());
        let handle = tokio::spawn(async move {
            let mut k: i64 = 0;
            while !s.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                k += 1;
                let sql = format!(
                    "INSERT INTO {table} (id, v) VALUES (1000 + {k}, {k}) ON CONFLICT (id) DO UPDATE SET v = excluded.v;
                     UPDATE {table} SET v = v + 1 WHERE id = 1 + {k} % 50;"
                );
                if let Err(e) = client.batch_execute(&sql).await {
                    // A DDL may hold the table for a moment; nothing else fails.
                    let text = e.to_string();
                    assert!(
                        text.contains("deadlock") || text.contains("lock"),
                        "writer: {e:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            k as u64
        });
        Writer {
            stop,
            paused,
            handle,
        }
    }

    /// Verifies with the writer paused, then lets it go on.
    async fn identical(&self, config: &Arc<Config>, what: &str) {
        self.paused.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        until_identical(config, what).await;
        self.paused.store(false, Ordering::SeqCst);
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.unwrap()
    }
}

const ACCT: &str = "CREATE TABLE acct (id int PRIMARY KEY, v int, note text, amount numeric(12,4));
     INSERT INTO acct SELECT g, g, 'n' || g, g * 1.2345 FROM generate_series(1, 100) g;";

/// The column changes of a deploy, each followed by an identical target.
const COLUMN_DDL: [(&str, &str); 10] = [
    ("add a nullable column", "ALTER TABLE acct ADD COLUMN c1 text"),
    (
        "add a column with a constant default",
        "ALTER TABLE acct ADD COLUMN flag boolean DEFAULT true",
    ),
    (
        "add a column with a volatile default",
        "ALTER TABLE acct ADD COLUMN token uuid DEFAULT gen_random_uuid()",
    ),
    ("rename a column", "ALTER TABLE acct RENAME COLUMN note TO memo"),
    (
        "widen a numeric's precision and scale",
        "ALTER TABLE acct ALTER COLUMN amount TYPE numeric(14,6)",
    ),
    ("widen an integer", "ALTER TABLE acct ALTER COLUMN v TYPE bigint"),
    (
        "compute values with USING (copied again)",
        "ALTER TABLE acct ALTER COLUMN v TYPE bigint USING v * 10",
    ),
    (
        "set a default and NOT NULL",
        "ALTER TABLE acct ALTER COLUMN c1 SET DEFAULT 'x'; UPDATE acct SET c1 = 'x' WHERE c1 IS NULL; ALTER TABLE acct ALTER COLUMN c1 SET NOT NULL",
    ),
    ("drop a column", "ALTER TABLE acct DROP COLUMN flag"),
    (
        "narrow a type (copied again)",
        "ALTER TABLE acct ALTER COLUMN amount TYPE numeric(10,2)",
    ),
];

/// The target after every change of [`COLUMN_DDL`] (the dropped column
/// kept, as `schema_changes.drop_column = "keep"` does, without NOT NULL).
fn check_target_columns(cols: &[String]) {
    let want = [
        "id integer not null",
        "v bigint",
        "memo text",
        "amount numeric(10,2)",
        "c1 text not null default 'x'::text",
        "token uuid default gen_random_uuid()",
    ];
    for w in want {
        assert!(cols.iter().any(|c| c == w), "{w} missing in {cols:?}");
    }
    assert!(!cols.iter().any(|c| c.starts_with("note ")), "{cols:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_changes_while_streaming_are_followed_under_a_writer() {
    capture_logs();
    let db = PgDb::new(ACCT).await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
    );
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "the copy").await;
    let w = Writer::start(connect(&db.cluster, &db.name).await, "acct");
    for (what, ddl) in COLUMN_DDL {
        db.exec(ddl).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.identical(&config, what).await;
        assert!(!run.is_finished(), "the daemon stopped at: {what}");
    }
    assert!(w.stop().await > 0);
    until_identical(&config, "after the writer").await;
    check_target_columns(&target_columns(&target, "acct").await);
    // Rows that existed before the column with a constant default was added
    // got its value on the target too (verify compared them); the kept
    // column is there, no longer filled.
    let kept: i64 = target
        .client
        .query_one("SELECT count(*) FROM acct WHERE flag", &[])
        .await
        .unwrap()
        .get(0);
    assert!(kept >= 100, "{kept}");
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_changes_made_while_the_daemon_is_stopped_are_followed_on_restart() {
    let db = PgDb::new(ACCT).await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
    );
    let start = || async {
        let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        (
            cancel,
            tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await }),
        )
    };
    let (cancel, run) = start().await;
    until_identical(&config, "the copy").await;
    cancel.cancel();
    run.await.unwrap().unwrap();
    // WAL pending from before each change: a change of the old shape, the
    // DDL, changes of the new one.
    for (_, ddl) in COLUMN_DDL {
        db.exec(&format!(
            "UPDATE acct SET v = v + 1 WHERE id = 2; {ddl}; INSERT INTO acct (id, v) VALUES ((SELECT max(id) + 1 FROM acct), 1)"
        ))
        .await;
    }
    let (cancel, run) = start().await;
    until_identical(&config, "after the restart").await;
    check_target_columns(&target_columns(&target, "acct").await);
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_dropped_and_renamed_while_streaming_are_followed() {
    let db = PgDb::new(
        "CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct SELECT g, g FROM generate_series(1, 50) g;
         CREATE TABLE old_name (id int PRIMARY KEY, v int); INSERT INTO old_name VALUES (1, 1);
         CREATE TABLE gone (id int PRIMARY KEY); INSERT INTO gone VALUES (1);",
    )
    .await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
    );
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "the copy").await;
    let w = Writer::start(connect(&db.cluster, &db.name).await, "acct");
    // A table created with rows, then written to.
    db.exec(
        "CREATE TABLE fresh (id int PRIMARY KEY, v int); INSERT INTO fresh SELECT g, g FROM generate_series(1, 300) g;",
    )
    .await;
    db.exec("UPDATE fresh SET v = -v WHERE id <= 10; INSERT INTO fresh VALUES (301, 1);")
        .await;
    w.identical(&config, "a table created").await;
    assert_eq!(
        crate::pg_target::rows(&target.client, "fresh").await.len(),
        301
    );
    // A table renamed: the target table follows, rows and all.
    db.exec("ALTER TABLE old_name RENAME TO new_name; INSERT INTO new_name VALUES (2, 2);")
        .await;
    w.identical(&config, "a table renamed").await;
    assert_eq!(
        crate::pg_target::rows(&target.client, "new_name")
            .await
            .len(),
        2
    );
    // A table dropped: its copy stays (drop_table = "keep"), no longer followed.
    db.exec("DROP TABLE gone").await;
    w.identical(&config, "a table dropped").await;
    assert_eq!(
        crate::pg_target::rows(&target.client, "gone").await.len(),
        1
    );
    w.stop().await;
    until_identical(&config, "after the writer").await;
    assert!(!run.is_finished());
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_attached_detached_dropped_and_truncated_are_followed() {
    capture_logs();
    let db = PgDb::new(
        "CREATE TABLE events (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO events SELECT g, '2024-03-01'::date + (g % 500), g FROM generate_series(1, 400) g;
         CREATE TABLE events_2026 (id int, at date, v int, PRIMARY KEY (id, at));
         INSERT INTO events_2026 SELECT g, '2026-02-01', g FROM generate_series(1, 30) g;",
    )
    .await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(
            &db.config_text("mem://", "").replace(
                "[pipeline]",
                "[tables]\ninclude = [\"events\"]\n\n[pipeline]",
            ),
            &target,
        ))
        .unwrap(),
    );
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "the copy").await;
    for (what, ddl) in [
        (
            "a partition attached with rows",
            "ALTER TABLE events ATTACH PARTITION events_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        ),
        ("a partition's rows changed", "UPDATE events SET v = 0 WHERE at >= '2026-01-01'"),
        ("a partition truncated", "TRUNCATE events_2025"),
        ("a partition detached", "ALTER TABLE events DETACH PARTITION events_2026"),
        ("a partition dropped", "DROP TABLE events_2024"),
    ] {
        db.exec(ddl).await;
        db.exec("INSERT INTO events VALUES (9999, '2025-06-01', 1) ON CONFLICT DO NOTHING")
            .await;
        until_identical(&config, what).await;
        let (s, t): (i64, i64) = (
            db.client.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get(0),
            target.client.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get(0),
        );
        assert_eq!(s, t, "{what}");
    }
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_landing_in_one_target_table_are_refused() {
    let db = PgDb::new(
        "CREATE SCHEMA audit; CREATE TABLE audit.log (id int PRIMARY KEY); CREATE TABLE public.audit_log (id int PRIMARY KEY);",
    )
    .await;
    let s = Scratch::new();
    let path = s.path("c.toml");
    std::fs::write(&path, db.config_text("mem://", "")).unwrap();
    for cmd in ["check", "run"] {
        let (code, out, err) = run_cli(&[cmd, "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{cmd}: {out}{err}");
        assert_names(
            &format!("{out}{err}"),
            &["\"audit.log\"", "\"audit_log\"", "[tables.rename]"],
        );
    }
    // Renamed apart, both are replicated.
    std::fs::write(
        &path,
        db.config_text("mem://", "").replace(
            "[pipeline]",
            "[tables.rename]\n\"audit.log\" = \"audit_log_2\"\n\n[pipeline]",
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_switchyard_cannot_follow_stops_with_the_table_and_the_fix() {
    let db =
        PgDb::new("CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct VALUES (1, 1);")
            .await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
    );
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "the copy").await;
    let before = target
        .client
        .query_one("SELECT commit FROM switchyard.checkpoint", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    // Without its key, its changes cannot be matched to rows.
    db.exec("ALTER TABLE acct DROP CONSTRAINT acct_pkey; INSERT INTO acct VALUES (2, 2);")
        .await;
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the daemon kept running")
        .unwrap()
        .expect_err("the daemon must stop")
        .report();
    assert_names(&err, &["\"acct\"", "no primary key", "not acknowledged"]);
    let after = target
        .client
        .query_one("SELECT commit FROM switchyard.checkpoint", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    let slot = db.confirmed_flush().await.unwrap();
    assert!(after >= before && slot <= after as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_into_surrealdb_follows_column_changes() {
    let db = PgDb::new(ACCT).await;
    let config = db.config("mem://", "");
    let run = crate::pg_surreal::start(config.clone(), None).await;
    crate::pg_surreal::wait_converged(&config, &run.sink).await;
    for ddl in [
        "ALTER TABLE acct ADD COLUMN c1 text",
        "ALTER TABLE acct ADD COLUMN flag boolean DEFAULT true",
        "ALTER TABLE acct RENAME COLUMN note TO memo",
        "ALTER TABLE acct DROP COLUMN c1",
        "ALTER TABLE acct ALTER COLUMN v TYPE bigint",
    ] {
        db.exec(&format!("{ddl}; UPDATE acct SET v = v + 1 WHERE id = 3;"))
            .await;
        crate::pg_surreal::wait_converged(&config, &run.sink).await;
    }
    run.stop().await;
}

const SQLITE_SCHEMA: &str = "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL,
         total REAL GENERATED ALWAYS AS (price * 2) STORED, label TEXT GENERATED ALWAYS AS (upper(name)) VIRTUAL);
     INSERT INTO item (id, name, price) VALUES (1, 'tea', 2.5), (2, 'cake', 4);
     CREATE TABLE old_one (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO old_one VALUES (1, 'a');
     CREATE TABLE doomed (id INTEGER PRIMARY KEY); INSERT INTO doomed VALUES (1);";

/// SQLite DDL while `run` polls, each followed by an identical target.
const SQLITE_DDL: [(&str, &str); 6] = [
    ("add a column", "ALTER TABLE item ADD COLUMN note TEXT"),
    (
        "add a column with a default",
        "ALTER TABLE item ADD COLUMN qty INTEGER NOT NULL DEFAULT 7",
    ),
    ("rename a column", "ALTER TABLE item RENAME COLUMN note TO memo"),
    ("drop a column", "ALTER TABLE item DROP COLUMN memo"),
    (
        "create a table",
        "CREATE TABLE fresh (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO fresh VALUES (1, 'x'), (2, 'y')",
    ),
    (
        "rename and drop tables",
        "ALTER TABLE old_one RENAME TO new_one; INSERT INTO new_one VALUES (2, 'b'); DROP TABLE doomed",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_generated_columns_and_ddl_while_polling_are_followed() {
    let s = Scratch::new();
    let pool = s.source(SQLITE_SCHEMA).await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&s.config_text("mem://", ""), &target)).unwrap(),
    );
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "the copy").await;
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let writer = {
        let pool = pool.clone();
        let (stop, paused) = (stop.clone(), paused.clone());
        tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                if paused.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                k += 1;
                sqlx::raw_sql(&format!(
                    "INSERT INTO item (id, name, price) VALUES (100 + {k}, 'w{k}', {k}) ON CONFLICT (id) DO UPDATE SET price = excluded.price;
                     UPDATE item SET price = price + 1 WHERE id = 1;"
                ))
                .execute(&pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for (what, ddl) in SQLITE_DDL {
        sqlx::raw_sql(ddl).execute(&pool).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        paused.store(true, Ordering::SeqCst);
        until_identical(&config, what).await;
        paused.store(false, Ordering::SeqCst);
        assert!(!run.is_finished(), "the daemon stopped at: {what}");
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    until_identical(&config, "after the writer").await;
    // Generated columns hold the source's values; the dropped table's copy
    // stays, the renamed one followed.
    let total: f64 = target
        .client
        .query_one("SELECT total FROM item WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 8.0);
    assert_eq!(
        crate::pg_target::rows(&target.client, "new_one")
            .await
            .len(),
        2
    );
    assert_eq!(
        crate::pg_target::rows(&target.client, "doomed").await.len(),
        1
    );
    let qty: i64 = target
        .client
        .query_one("SELECT qty FROM item WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(qty, 7);
    cancel.cancel();
    run.await.unwrap().unwrap();

    // Across a restart, with changes pending from before the DDL.
    sqlx::raw_sql(
        "UPDATE item SET price = 99 WHERE id = 2; ALTER TABLE item ADD COLUMN extra TEXT; UPDATE item SET extra = 'e' WHERE id = 2;
         ALTER TABLE fresh RENAME COLUMN v TO w; INSERT INTO fresh VALUES (3, 'z');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "after the restart").await;
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_and_partition_changes_made_while_stopped_are_followed_on_restart() {
    let db = PgDb::new(
        "CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct VALUES (1, 1);
         CREATE TABLE old_name (id int PRIMARY KEY, v int); INSERT INTO old_name VALUES (1, 1);
         CREATE TABLE gone (id int PRIMARY KEY); INSERT INTO gone VALUES (1);
         CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE events_a PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO events SELECT g, '2024-01-01'::date + g FROM generate_series(1, 600) g;",
    )
    .await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(
            &db.config_text("mem://", "").replace(
                "[pipeline]",
                "[schema_changes]\ndrop_table = \"drop\"\ndrop_column = \"drop\"\n\n[pipeline]",
            ),
            &target,
        ))
        .unwrap(),
    );
    let start = || async {
        let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        (
            cancel,
            tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await }),
        )
    };
    let (cancel, run) = start().await;
    until_identical(&config, "the copy").await;
    cancel.cancel();
    run.await.unwrap().unwrap();
    db.exec(
        "UPDATE acct SET v = 2; ALTER TABLE acct ADD COLUMN extra text; ALTER TABLE acct DROP COLUMN extra; UPDATE acct SET v = 3;
         CREATE TABLE fresh (id int PRIMARY KEY); INSERT INTO fresh SELECT generate_series(1, 40);
         UPDATE old_name SET v = 2; ALTER TABLE old_name RENAME TO new_name; UPDATE new_name SET v = 3;
         DROP TABLE gone;
         TRUNCATE events_a; DELETE FROM events WHERE id = 400;",
    )
    .await;
    let (cancel, run) = start().await;
    until_identical(&config, "after the restart").await;
    assert_eq!(
        crate::pg_target::rows(&target.client, "fresh").await.len(),
        40
    );
    assert_eq!(
        crate::pg_target::rows(&target.client, "new_name")
            .await
            .len(),
        1
    );
    // drop_table = "drop": the dropped table is gone from the target too.
    let gone: bool = target
        .client
        .query_one("SELECT to_regclass('gone') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(gone);
    assert!(!target_columns(&target, "acct")
        .await
        .iter()
        .any(|c| c.starts_with("extra")));
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_a_users_publication_leaves_out_are_reported() {
    let db = PgDb::new(
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); INSERT INTO a VALUES (1); INSERT INTO b VALUES (1);
         CREATE PUBLICATION mine FOR TABLE a;",
    )
    .await;
    let target = PgDb::new("").await;
    let s = Scratch::new();
    let path = s.path("c.toml");
    std::fs::write(
        &path,
        target_config_text(
            &db.config_text("mem://", "").replace(
                "unmapped_as_text = true",
                "unmapped_as_text = true\npublication = \"mine\"\ncreate_publication = false",
            ),
            &target,
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(
        &out,
        &["\"b\"", "not in publication \"mine\"", "ALTER PUBLICATION"],
    );
    let (code, out, err) = run_cli(&["snapshot", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // verify: b is not replicated, which is a difference, not silence.
    let (code, out, err) = run_cli(&["verify", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert_names(&out, &["b", "not replicated", "DIFFERENT"]);
    let (code, out, err) = run_cli(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["not in publication"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_superuser_columns_are_followed_and_new_tables_are_named() {
    let db = PgDb::new(ACCT).await;
    let role = format!("{}_plain", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'plain-pass';
         ALTER TABLE acct OWNER TO {role}; GRANT CREATE ON DATABASE {} TO {role};",
        db.name
    ))
    .await;
    let target = PgDb::new("").await;
    let source_text = db
        .config_text("mem://", "")
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            &format!("password = \"{}\"", db.cluster.password),
            "password = \"plain-pass\"",
        );
    let text = target_config_text(&source_text, &target);
    let config = Arc::new(Config::parse(&text).unwrap());
    let s = Scratch::new();
    let path = s.path("c.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&format!("{out}{err}"), &["no superuser", "event triggers"]);

    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    until_identical(&config, "the copy").await;
    // Followed from the Relation message and the catalog when the table's
    // next change arrives.
    for (what, ddl) in [
        (
            "add a column with a constant default",
            "ALTER TABLE acct ADD COLUMN flag boolean DEFAULT true",
        ),
        (
            "rename a column",
            "ALTER TABLE acct RENAME COLUMN note TO memo",
        ),
    ] {
        db.exec(&format!("{ddl}; UPDATE acct SET v = v + 1 WHERE id = 1"))
            .await;
        until_identical(&config, what).await;
        assert!(!run.is_finished(), "the daemon stopped at: {what}");
    }
    let cols = target_columns(&target, "acct").await;
    assert!(
        cols.iter().any(|c| c.starts_with("memo ")) && cols.iter().any(|c| c.starts_with("flag ")),
        "{cols:?}"
    );
    let event_triggers: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'switchyard%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(event_triggers, 0);
    // A table created now is not in the publication: status names it and
    // the fix.
    db.exec(&format!(
        "CREATE TABLE fresh (id int PRIMARY KEY); ALTER TABLE fresh OWNER TO {role}"
    ))
    .await;
    let (code, out, err) = run_cli(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&format!("{out}{err}"), &["fresh", "ALTER PUBLICATION"]);
    cancel.cancel();
    run.await.unwrap().unwrap();
}

//! PostgreSQL as the target: M5 (PostgreSQL → PostgreSQL, every built-in type
//! round-trips exactly) and M6 (SQLite → PostgreSQL with the type rules),
//! snapshot then stream, against the test cluster.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::pipeline::Mode;
use tokio_util::sync::CancellationToken;

use crate::pg_surreal::{PgDb, LIVE_CHANGES, SCHEMA};
use crate::support::*;

/// Every column of the target's public tables: `table.column`, its default
/// and whether it is an identity.
async fn column_fills(client: &tokio_postgres::Client) -> Vec<(String, Option<String>, String)> {
    client
        .query(
            "SELECT (table_name || '.' || column_name)::text, column_default::text, is_identity::text FROM information_schema.columns
              WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every row of `table` as PostgreSQL's text of the whole row.
pub async fn rows(client: &tokio_postgres::Client, table: &str) -> BTreeSet<String> {
    match client
        .query(&format!("SELECT zz_row::text FROM {table} zz_row"), &[])
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        // Not created yet.
        Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => BTreeSet::new(),
        Err(e) => panic!("reading {table}: {e:?}"),
    }
}

pub async fn wait_same(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    tables: &[&str],
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut diff = None;
        for t in tables {
            let (a, b) = (rows(source, t).await, rows(target, t).await);
            if a != b {
                diff = Some(format!(
                    "{t}: only in the source {:?}; only in the target {:?}",
                    a.difference(&b).collect::<Vec<_>>(),
                    b.difference(&a).collect::<Vec<_>>()
                ));
                break;
            }
        }
        let Some(d) = diff else { return };
        assert!(
            std::time::Instant::now() < deadline,
            "the target never matched the source: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn target_config(source_text: &str, target: &PgDb) -> Arc<Config> {
    let text = target_config_text(source_text, target);
    Arc::new(Config::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// A source's config text with the test database as the target.
pub fn target_config_text(source_text: &str, target: &PgDb) -> String {
    source_text
        .replace(
            "url = \"mem://\"",
            &format!(
                "url = \"{}\"\npassword = \"{}\"",
                target.url("postgres", "?sslmode=disable"),
                target.cluster.password
            ),
        )
        .replace("namespace = \"test\"\n", "")
        .replace("database = \"test\"\n", "")
}

struct Running {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<switchyard::Result<switchyard::pipeline::Report>>,
}

async fn run(config: Arc<Config>) -> Running {
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    Running {
        cancel,
        handle: tokio::spawn(async move { pipeline.run(Mode::Run, c).await }),
    }
}

impl Running {
    async fn stop(self) -> switchyard::pipeline::Report {
        self.cancel.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

const TABLES: [&str; 5] = [
    "\"order\"",
    "lines",
    "\"naïve table\"",
    "measurements",
    "every_type",
];

/// Rounds of writes over the M5 schema until `stop`: updates of every kind of
/// value in `every_type`, upserts of `lines` (some large enough for TOAST),
/// deletes, and inserts of `order` rows with arrays.
async fn m5_writer(
    client: tokio_postgres::Client,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let mut k: i64 = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        k += 1;
        client
            .batch_execute(&format!(
                "UPDATE every_type SET i4 = i4 - 1, f8 = {k}.25, n2 = n2 + 0.0000000001, jb = jsonb_build_object('k', {k}, 'a', ARRAY[{k}, null]),
                        ts = ts + interval '1 second', tz = tz + interval '1 minute', iv = iv + interval '1.5 seconds',
                        m = (enum_range(null::mood))[{k} % 3 + 1], moods = ARRAY[(enum_range(null::mood))[{k} % 3 + 1], 'ok'], lb = '[-1:0]={{{k},1}}', t = E'round\\t{k}\\n', ar = ARRAY[[{k}, 2], [3, NULL]]
                  WHERE id = 1;
                 INSERT INTO lines VALUES (100 + {k} % 50, {k} % 7, {k}, repeat(md5({k}::text), {k} % 200))
                   ON CONFLICT (order_id, n) DO UPDATE SET qty = excluded.qty, note = excluded.note;
                 DELETE FROM lines WHERE order_id = 100 + ({k} * 7) % 50 AND n = {k} % 3;
                 INSERT INTO \"order\" (id, \"select\", total, tags, doc) VALUES (1000 + {k}, 'w', {k} * 1.25, ARRAY['x', '{k}'], '{{\"k\": {k}}}');"
            ))
            .await
            .expect("application write");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    k as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m5_every_built_in_type_round_trips_postgres_to_postgres() {
    let source = PgDb::new(SCHEMA).await;
    // An array of an enum keeps its type too, and an array its lower bound.
    source
        .exec(
            "ALTER TABLE every_type ADD COLUMN moods mood[], ADD COLUMN lb int[];
               UPDATE every_type SET moods = ARRAY['happy', NULL, 'sad']::mood[], lb = '[0:2]={7,8,9}' WHERE id = 1;
             -- Every built-in type, without the user's types: copied as binary COPY
             -- (dropped columns left behind in the catalog).
             CREATE TABLE builtin_type (LIKE every_type INCLUDING ALL);
             INSERT INTO builtin_type SELECT * FROM every_type;
             ALTER TABLE builtin_type DROP COLUMN m, DROP COLUMN dom, DROP COLUMN moods;",
        )
        .await;
    let tables: Vec<&str> = TABLES.iter().copied().chain(["builtin_type"]).collect();
    let target = PgDb::new("").await;
    let config = target_config(&source.config_text("mem://", ""), &target);
    // An application writes every kind of value while the snapshot runs and
    // after it: the copy and the stream must meet exactly.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(m5_writer(
        crate::pg_surreal::connect(&source.cluster, &source.name).await,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = run(config.clone()).await;
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(&target.client, "every_type").await.len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 50, "the writer barely ran ({writes} rounds)");
    wait_same(&source.client, &target.client, &tables).await;

    // Built-in types are kept exactly; the enum and the domain become their base.
    let types = "SELECT a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                  WHERE a.attrelid = 'every_type'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";
    let src: Vec<String> = source
        .client
        .query(types, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let tgt: Vec<String> = target
        .client
        .query(types, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Enum types and domains come with the source's schema (pg_dump).
    for (s, t) in src.iter().zip(&tgt) {
        assert_eq!(s, t);
    }
    assert_eq!(src.len(), tgt.len());

    // Live changes of every kind, and a TOAST value left unchanged.
    source.exec(LIVE_CHANGES).await;
    source
        .exec(
            "ALTER TABLE lines ALTER COLUMN note SET STORAGE EXTERNAL;
             UPDATE lines SET note = (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i) WHERE order_id = 3 AND n = 1;
             UPDATE lines SET qty = 99 WHERE order_id = 3 AND n = 1;",
        )
        .await;
    wait_same(&source.client, &target.client, &tables).await;
    let report = r.stop().await;
    assert!(report.changes_applied >= 10, "{report:?}");
    // The target's schema is the source's (pg_dump): every table is of the
    // same types on both sides and went through as COPY data; binary where
    // every column is of a built-in type, text where one is the user's.
    let through: Vec<(&str, bool, Option<&str>)> = report
        .tables
        .iter()
        .map(|t| (t.table.as_str(), t.pass_through, t.copy_format))
        .collect();
    assert!(
        through.len() == tables.len() && through.iter().all(|(_, p, _)| *p),
        "{through:?}"
    );
    let format = |name: &str| through.iter().find(|t| t.0 == name).and_then(|t| t.2);
    assert_eq!(format("every_type"), Some("text"), "{through:?}");
    for name in ["builtin_type", "lines", "order", "measurements"] {
        assert_eq!(format(name), Some("binary"), "{name}: {through:?}");
    }

    // A restart resumes from the target's checkpoint (switchyard schema).
    source
        .exec("DELETE FROM every_type WHERE id = 2; INSERT INTO lines VALUES (9, 9, 9, 'nine');")
        .await;
    let r = run(config.clone()).await;
    wait_same(&source.client, &target.client, &TABLES).await;
    let report = r.stop().await;
    assert!(report.tables.iter().all(|t| t.already_copied), "{report:?}");
    let versions: i64 = target
        .client
        .query_one("SELECT count(*) FROM switchyard.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    // Each migration once.
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(versions, migrations);
    // A target whose recorded migration differs (another switchyard's) is
    // refused, naming it, and nothing is applied over it.
    target
        .exec(
            "UPDATE switchyard.schema_migrations SET checksum = '\\x00'
              WHERE version = (SELECT min(version) FROM switchyard.schema_migrations)",
        )
        .await;
    let e = switchyard::connect::pipeline(&config)
        .await
        .unwrap()
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("state schema migration") && e.contains("another version"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m6_sqlite_to_postgres_follows_the_type_rules() {
    let s = Scratch::new();
    let pool = s
        .source(
            "CREATE TABLE product (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, price DECIMAL(8, 2), weight REAL,
                                   active BOOLEAN DEFAULT 1, attrs JSON, photo BLOB, added DATETIME DEFAULT (datetime('now')));
             CREATE TABLE stock (sku TEXT NOT NULL, site TEXT NOT NULL, qty INTEGER, PRIMARY KEY (sku, site)) WITHOUT ROWID;
             INSERT INTO product (name, price, weight, active, attrs, photo, added) VALUES
               ('tea', 4.50, 0.25, 1, '{\"leaf\": \"green\"}', x'00ff', '2024-05-01 12:30:00'),
               ('ünïcødé', NULL, NULL, 0, NULL, NULL, NULL);
             INSERT INTO stock VALUES ('TEA', 'north', 5), ('TEA', 'south', NULL);",
        )
        .await;
    let target = PgDb::new("").await;
    let config = target_config(&s.config_text("mem://", ""), &target);
    let r = run(config.clone()).await;
    let expect = |rows: &'static [&'static str]| {
        rows.iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };
    wait_until("the copy", Duration::from_secs(60), || async {
        target
            .client
            .query("SELECT 1 FROM product", &[])
            .await
            .map(|r| r.len() == 2)
            .unwrap_or(false)
    })
    .await;
    let types: Vec<String> = target
        .client
        .query(
            "SELECT a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
              WHERE a.attrelid = 'product'::regclass AND a.attnum > 0 ORDER BY a.attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types,
        vec![
            "id bigint",
            "name text",
            "price numeric(8,2)",
            "weight double precision",
            "active boolean",
            "attrs jsonb",
            "photo bytea",
            "added timestamp with time zone"
        ]
    );
    // AUTOINCREMENT becomes an identity; datetime('now') becomes now().
    let defaults = column_fills(&target.client).await;
    let find = |n: &str| {
        defaults
            .iter()
            .find(|c| c.0 == n)
            .unwrap_or_else(|| panic!("{n} in {defaults:?}"))
            .clone()
    };
    assert_eq!(find("product.id").2, "YES", "{defaults:?}");
    assert_eq!(
        find("product.active").1.as_deref(),
        Some("true"),
        "{defaults:?}"
    );
    assert_eq!(
        find("product.added").1.as_deref(),
        Some("now()"),
        "{defaults:?}"
    );
    assert_eq!(
        rows(&target.client, "product").await,
        expect(&[
            "(1,tea,4.50,0.25,t,\"{\"\"leaf\"\": \"\"green\"\"}\",\"\\\\x00ff\",\"2024-05-01 12:30:00+00\")",
            "(2,ünïcødé,,,f,,,)"
        ])
    );
    sqlx::raw_sql(
        "UPDATE product SET price = 5, active = 1 WHERE id = 2;
         DELETE FROM product WHERE id = 1;
         UPDATE stock SET site = 'east' WHERE site = 'south';
         INSERT INTO stock VALUES ('MATE', 'north', 7);",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_until("the changes", Duration::from_secs(60), || async {
        rows(&target.client, "stock").await
            == expect(&["(MATE,north,7)", "(TEA,east,)", "(TEA,north,5)"])
            && rows(&target.client, "product").await == expect(&["(2,ünïcødé,5.00,,t,,,)"])
    })
    .await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_a_postgres_target_finds_each_difference_by_key() {
    let source = PgDb::new(
        "CREATE TABLE acct (id int PRIMARY KEY, balance numeric(12, 2), tags text[], at timestamptz);
         INSERT INTO acct SELECT g, g * 1.5, ARRAY['a', 'b \"' || g], '2024-01-01'::timestamptz + g * interval '1 hour' FROM generate_series(1, 1200) g;
         CREATE TABLE log (msg text, n int);
         ALTER TABLE log REPLICA IDENTITY FULL;
         INSERT INTO log VALUES ('same', 1), ('same', 1), (NULL, 2);",
    )
    .await;
    let target = PgDb::new("").await;
    let config = target_config(&source.config_text("mem://", ""), &target);
    let r = run(config.clone()).await;
    wait_same(&source.client, &target.client, &["acct", "log"]).await;
    let src: Arc<dyn switchyard::source::Source> = Arc::new(
        switchyard::source::postgres::PgSource::open(&config.source.url, &config)
            .await
            .unwrap(),
    );
    let sink: Arc<dyn switchyard::sink::Sink> = Arc::from(
        switchyard::connect::sink(&config, Default::default())
            .await
            .unwrap(),
    );
    let verdict = assert_identical(src.clone(), sink.clone(), 500).await;
    assert_eq!(
        verdict.tables.iter().map(|t| t.target_rows).sum::<u64>(),
        1203
    );
    let options = switchyard::verify::Options {
        tables: Vec::new(),
        wait: Some(Duration::from_secs(30)),
        batch_rows: 500,
    };

    target
        .exec("UPDATE acct SET tags = ARRAY['tampered'] WHERE id = 7; DELETE FROM acct WHERE id = 8; INSERT INTO acct VALUES (9999, 1, NULL, NULL); DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE msg = 'same' LIMIT 1);")
        .await;
    let verdict = switchyard::verify::verify(src, sink, &options)
        .await
        .unwrap();
    let found: Vec<(String, switchyard::verify::DifferenceKind, String)> = verdict
        .tables
        .iter()
        .flat_map(|t| {
            t.differences
                .iter()
                .map(|d| (t.table.clone(), d.kind.clone(), d.key.clone()))
        })
        .collect();
    use switchyard::verify::DifferenceKind::*;
    assert_eq!(
        found,
        vec![
            ("acct".into(), Different, "(7)".into()),
            ("acct".into(), Missing, "(8)".into()),
            ("acct".into(), Extra, "(9999)".into()),
            ("log".into(), Different, "(same,1)".into()),
        ],
        "{}",
        switchyard::commands::verify::render(&verdict)
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m4_own_migrations_are_checked_and_a_violation_stops_without_advancing() {
    let s = Scratch::new();
    let pool = s
        .source(
            "CREATE TABLE product (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price DECIMAL(10, 2), weight REAL);
             INSERT INTO product VALUES (1, 'tea', 4.50, 0.25), (2, 'mate', 6.00, NULL);",
        )
        .await;
    let target = PgDb::new("").await;
    let dir = s.path("migrations");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("a_product.sql"),
        "CREATE TABLE product (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10,2) CHECK (price >= 0),
                               weight text, sku text NOT NULL, created timestamptz DEFAULT now());",
    )
    .unwrap();
    let text = s.config_text("mem://", "").replace(
        "url = \"mem://\"",
        &format!(
            "url = \"mem://\"\nschema = \"migrations:{}\"",
            dir.display()
        ),
    );
    let config = target_config(&text, &target);
    let cfg = s.path("m4.toml");
    std::fs::write(&cfg, target_config_text(&text, &target)).unwrap();

    // Every mismatch is reported before anything is loaded.
    let (code, out, err) = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("column \"weight\" is text in the target"),
        "{err}"
    );
    assert!(
        err.contains("column \"sku\" is NOT NULL without a default"),
        "{err}"
    );
    assert_eq!(rows(&target.client, "product").await.len(), 0);

    // A second migration fixes the schema; the first is not applied again.
    std::fs::write(
        dir.join("b_fix.sql"),
        "ALTER TABLE product ALTER COLUMN sku SET DEFAULT 'n/a', ALTER COLUMN weight TYPE double precision USING weight::double precision;",
    )
    .unwrap();
    let r = run(config.clone()).await;
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(&target.client, "product").await.len() == 2
    })
    .await;
    let applied: i64 = target
        .client
        .query_one("SELECT count(*) FROM switchyard.user_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 2);

    // A row the stricter target refuses stops the daemon with its key, and
    // the checkpoint stays before it.
    let before = switchyard::connect::sink(&config, Default::default())
        .await
        .unwrap()
        .state()
        .await
        .unwrap()
        .unwrap()
        .checkpoint;
    sqlx::raw_sql("INSERT INTO product VALUES (3, 'bad', -1, NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), r.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .report();
    assert!(
        err.contains("product") && err.contains("id = 3") && err.contains("check constraint"),
        "{err}"
    );
    assert_eq!(
        switchyard::connect::sink(&config, Default::default())
            .await
            .unwrap()
            .state()
            .await
            .unwrap()
            .unwrap()
            .checkpoint,
        before
    );
    assert_eq!(rows(&target.client, "product").await.len(), 2);
}

/// The target's checkpoint commit position (switchyard.checkpoint).
async fn target_checkpoint_pg(target: &PgDb) -> Option<u64> {
    target
        .client
        .query_opt("SELECT commit FROM switchyard.checkpoint WHERE id = 1", &[])
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, i64>(0) as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_load_and_apply_into_postgres_converges() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let source = PgDb::new(crate::pg_crash::SCHEMA).await;
    let target = PgDb::new("").await;
    let s = Scratch::new();
    let text = source.config_text("mem://", "snapshot_batch_rows = 500\nbatch_rows = 200\n");
    let text = target_config_text(&text, &target);
    let cfg = s.path("pg.toml");
    std::fs::write(&cfg, &text).unwrap();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(crate::pg_crash::writer(
        crate::pg_surreal::connect(&source.cluster, &source.name).await,
        stop.clone(),
        0x2545_F491_4F6C_DD1D,
    ));
    let mut rng = crate::pg_crash::Rng(7);
    let mut streaming_kills = 0;
    for round in 0..4 {
        let d = Daemon::start(
            &["run", "--config", &cfg_s],
            s.path(&format!("round{round}.log")),
        );
        let what = if round == 0 {
            "copying from scratch"
        } else {
            "logical replication started"
        };
        wait_until(what, Duration::from_secs(120), || {
            let t = d.log_text();
            async move { t.contains(what) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100 + rng.below(700) as u64)).await;
        if d.log_text().contains("logical replication started") {
            streaming_kills += 1;
        }
        d.kill();
        // The slot never confirms past the target's checkpoint.
        if let (Some(flushed), Some(cp)) = (
            source.confirmed_flush().await,
            target_checkpoint_pg(&target).await,
        ) {
            assert!(
                flushed <= cp + 1,
                "the slot confirmed {flushed}, past the target's checkpoint {cp}"
            );
        }
    }
    assert!(streaming_kills >= 2, "too few kills while streaming");
    stop.store(true, Ordering::Relaxed);
    assert!(w.await.unwrap() > 50, "the writer barely ran");
    let d = Daemon::start(&["run", "--config", &cfg_s], s.path("final.log"));
    wait_same(&source.client, &target.client, &["items", "pairs"]).await;
    assert!(d.interrupt().await.success());
    assert!(rows(&target.client, "items").await.len() > 30_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_server_restarting_mid_apply_loses_nothing_and_doubles_nothing() {
    let source = PgDb::new("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g;").await;
    let (own, cluster) = crate::pg_surreal::OwnCluster::start();
    let target = PgDb::on(cluster, "").await;
    // Attempts enough to outlast a restart (backoff doubles up to 500 ms).
    let text = source
        .config_text("mem://", "")
        .replace("retry_attempts = 3", "retry_attempts = 30");
    let config = target_config(&text, &target);
    let r = run(config.clone()).await;
    wait_same(&source.client, &target.client, &["t"]).await;
    // Changes keep coming while the target restarts.
    let writer = {
        let client = crate::pg_surreal::connect(&source.cluster, &source.name).await;
        tokio::spawn(async move {
            for i in 0..60 {
                client
                    .batch_execute(&format!(
                        "BEGIN; UPDATE t SET v = 'w{i}' WHERE id % 60 = {i}; INSERT INTO t VALUES ({}, 'new'); DELETE FROM t WHERE id = {}; COMMIT;",
                        2000 + i,
                        i + 1
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    own.script("restart");
    writer.await.unwrap();
    // The test's own connection to the target died with the server.
    let target_client = crate::pg_surreal::connect(&target.cluster, &target.name).await;
    wait_same(&source.client, &target_client, &["t"]).await;
    let report = r.stop().await;
    assert!(report.changes_applied > 60, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shows_each_columns_postgres_type_and_what_changes() {
    let source = PgDb::new(
        "CREATE TYPE mood AS ENUM ('sad', 'ok'); CREATE TABLE t (id int PRIMARY KEY, n numeric(12,2), m mood, tags text[]);",
    )
    .await;
    let target = PgDb::new("").await;
    let s = Scratch::new();
    let cfg = s.path("check.toml");
    let text = target_config_text(&source.config_text("mem://", ""), &target)
        .replace("unmapped_as_text = true\n", "");
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("target: PRIMARY KEY (id)")
            && out.contains("numeric(12,2)    → numeric(12,2)"),
        "{out}"
    );
    assert!(
        out.contains("m     mood             → mood"),
        "the enum keeps its type: {out}"
    );
    assert!(
        !out.contains("has no mapping"),
        "a PostgreSQL target reads every type: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_and_foreign_keys_are_built_after_the_load() {
    let source = PgDb::new(
        "CREATE TABLE parent (id int PRIMARY KEY, code text UNIQUE);
         CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id) ON DELETE CASCADE, note text);
         CREATE INDEX child_note ON child (lower(note)) WHERE note IS NOT NULL;
         INSERT INTO parent VALUES (1, 'a'), (2, 'b');
         INSERT INTO child VALUES (10, 1, 'X'), (11, 2, NULL);",
    )
    .await;
    let target = PgDb::new("").await;
    let config = target_config(&source.config_text("mem://", ""), &target);
    // check shows what is built after the load, indexes first.
    let s = Scratch::new();
    let cfg = s.path("c.toml");
    std::fs::write(
        &cfg,
        target_config_text(&source.config_text("mem://", ""), &target),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (i, f) = (
        out.find("INDEX public.child_note").unwrap_or(usize::MAX),
        out.find("FK CONSTRAINT public.child child_parent_id_fkey")
            .unwrap_or(0),
    );
    assert!(out.contains("after the load") && i < f, "{out}");

    let report = switchyard::connect::pipeline(&config.clone())
        .await
        .unwrap()
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.tables.iter().map(|t| t.rows).sum::<u64>(), 4);
    let defs: Vec<String> = target
        .client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        defs.iter().any(|d| d.contains("child_note")
            && d.contains("lower(note)")
            && d.contains("WHERE (note IS NOT NULL)")),
        "{defs:?}"
    );
    assert!(
        defs.iter()
            .any(|d| d.contains("UNIQUE INDEX parent_code_key")),
        "{defs:?}"
    );
    let fk: String = target
        .client
        .query_one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'child_parent_id_fkey'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        fk,
        "FOREIGN KEY (parent_id) REFERENCES parent(id) ON DELETE CASCADE"
    );
    // A second run finds them built and changes nothing.
    switchyard::connect::pipeline(&config)
        .await
        .unwrap()
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serials_identities_and_every_default_are_kept() {
    let source = PgDb::new(
        "CREATE TABLE s (id serial PRIMARY KEY, created timestamptz DEFAULT now(), flag boolean DEFAULT true,
                         code text DEFAULT 'x', n numeric DEFAULT 1.5, other int DEFAULT length(current_user));
         CREATE TABLE g (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
         INSERT INTO s (code) SELECT 'c' || g FROM generate_series(1, 5) g;
         INSERT INTO g (v) VALUES ('a'), ('b');",
    )
    .await;
    let target = PgDb::new("").await;
    let config = target_config(&source.config_text("mem://", ""), &target);
    switchyard::connect::pipeline(&config)
        .await
        .unwrap()
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await
        .unwrap();
    let cols = column_fills(&target.client).await;
    let find = |n: &str| {
        cols.iter()
            .find(|c| c.0 == n)
            .unwrap_or_else(|| panic!("{n} in {cols:?}"))
            .clone()
    };
    // As the source has them (pg_dump): a serial stays a serial.
    assert_eq!(
        find("s.id").1.as_deref(),
        Some("nextval('s_id_seq'::regclass)"),
        "{cols:?}"
    );
    assert_eq!(find("g.id").2, "YES", "{cols:?}");
    assert_eq!(find("s.created").1.as_deref(), Some("now()"));
    assert_eq!(find("s.flag").1.as_deref(), Some("true"));
    assert_eq!(find("s.code").1.as_deref(), Some("'x'::text"));
    assert_eq!(find("s.n").1.as_deref(), Some("1.5"));
    assert_eq!(
        find("s.other").1.as_deref(),
        Some("length((CURRENT_USER)::text)")
    );
    // The sequence continues past the copied rows.
    let next: i32 = target
        .client
        .query_one("INSERT INTO s (code) VALUES ('new') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 6);
}

const MIXED: &str = "CREATE TABLE reading (id INTEGER PRIMARY KEY, n INTEGER, note TEXT, price DECIMAL(5, 2), raw);
     INSERT INTO reading VALUES (1, 10, 'one', 1.5, 1), (2, 'abc', 'two', 2, 2.5), (3, 30, 'three', 12345.678, 'text'),
                                (4, 40, 'a' || char(0) || 'b', 4, x'00ff'), (5, 50, 'five', 5, NULL);
     CREATE TABLE tag (name TEXT PRIMARY KEY, v INTEGER);
     INSERT INTO tag VALUES ('ok', 1);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m6_values_that_do_not_fit_stop_the_load_naming_table_key_column_and_value() {
    let s = Scratch::new();
    let pool = s.source(MIXED).await;
    let target = PgDb::new("").await;
    let config = target_config(&s.config_text("mem://", ""), &target);
    // A TEXT in an INTEGER column: refused by the source's conversion.
    let e = snapshot(config.clone()).await.unwrap_err().to_string();
    assert_names(
        &e,
        &[
            "\"reading\"",
            "id = 2",
            "column \"n\"",
            "\"abc\"",
            "reject_dir",
        ],
    );
    // Fixed in the source; next a decimal past numeric(5,2), refused by the
    // target, then a NUL character, which PostgreSQL text cannot hold.
    sqlx::raw_sql("UPDATE reading SET n = 20 WHERE id = 2")
        .execute(&pool)
        .await
        .unwrap();
    let e = snapshot(config.clone()).await.unwrap_err().to_string();
    assert_names(
        &e,
        &[
            "\"reading\"",
            "id = 3",
            "column \"price\"",
            "12345.678",
            "22003",
        ],
    );
    sqlx::raw_sql("UPDATE reading SET price = 123.45 WHERE id = 3")
        .execute(&pool)
        .await
        .unwrap();
    let e = snapshot(config.clone()).await.unwrap_err().to_string();
    assert_names(&e, &["\"reading\"", "id = 4", "column \"note\"", "22021"]);
    sqlx::raw_sql("UPDATE reading SET note = 'four' WHERE id = 4")
        .execute(&pool)
        .await
        .unwrap();
    let report = snapshot(config.clone()).await.unwrap();
    let reading = report.tables.iter().find(|t| t.table == "reading").unwrap();
    assert_eq!((reading.rows, reading.rejected), (5, 0), "{report:?}");
    // While streaming, a value the target refuses stops the run the same
    // way, in a batch with changes that fit, and the checkpoint stays.
    let before = target_checkpoint_pg(&target).await;
    let r = run(config.clone()).await;
    sqlx::raw_sql(
        "BEGIN;
         INSERT INTO reading VALUES (6, 60, 'six', 6, NULL), (7, 70, 'seven', 99999, NULL);
         COMMIT;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), r.handle)
        .await
        .expect("the run stops")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert_names(
        &e,
        &[
            "\"reading\"",
            "id = 7",
            "column \"price\"",
            "99999",
            "22003",
            "reject_dir",
        ],
    );
    assert_eq!(target_checkpoint_pg(&target).await, before);
    assert_eq!(rows(&target.client, "reading").await.len(), 5);
    // The column without a declared type holds each storage class as text.
    assert_eq!(
        rows(&target.client, "reading").await,
        [
            "(1,10,one,1.50,1)",
            "(2,20,two,2.00,2.5)",
            "(3,30,three,123.45,text)",
            "(4,40,four,4.00,\"\\\\x00ff\")",
            "(5,50,five,5.00,)",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<BTreeSet<String>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m6_values_that_do_not_fit_go_to_the_reject_file_and_are_counted() {
    let s = Scratch::new();
    let pool = s.source(MIXED).await;
    let target = PgDb::new("").await;
    let dir = s.path("rejects");
    let config = target_config(
        &s.config_text("mem://", &format!("reject_dir = \"{}\"\n", dir.display())),
        &target,
    );
    let file = dir.join("reading.jsonl");
    let pipeline = switchyard::connect::pipeline(&config.clone())
        .await
        .unwrap();
    let observer = pipeline.observer();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let handle = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(&target.client, "reading").await.len() == 2
            && rows(&target.client, "tag").await.len() == 1
    })
    .await;
    let lines = reject_lines(&file);
    let by_key = |key: &str| {
        lines
            .iter()
            .find(|l| l["key"] == key)
            .unwrap_or_else(|| panic!("{key} not in {lines:?}"))
            .clone()
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    let two = by_key("(id = 2)");
    assert_eq!(two["column"], "n");
    assert_eq!(two["value"], "\"abc\"");
    assert_eq!(two["phase"], "snapshot");
    assert_eq!(two["row"]["n"], "abc");
    assert_eq!(two["row"]["raw"], 2.5);
    let three = by_key("(id = 3)");
    assert_eq!(three["column"], "price");
    assert_eq!(three["value"], "12345.678");
    assert!(
        three["reason"].as_str().unwrap().contains("22003"),
        "{three}"
    );
    let four = by_key("(id = 4)");
    assert_eq!(four["column"], "note");
    assert_eq!(four["row"]["raw"], "\\x00ff");
    assert_eq!(observer.view().tables["reading"].rejected, 3);
    // While streaming: a misfit of the source (id 6), one of the target in
    // a batch with rows that fit (id 7), an update whose new value does not
    // fit (id 1: its old version leaves the target), a fixed source row
    // (id 2) arriving by its next update, a replaced row whose new version
    // does not fit (id 5: the old one leaves), and a key the target cannot
    // hold (a NUL in a text key).
    sqlx::raw_sql(
        "BEGIN;
         INSERT INTO reading VALUES (6, 'six', 'six', 6, NULL);
         INSERT INTO reading VALUES (7, 70, 'seven', 99999, NULL);
         INSERT INTO reading VALUES (8, 80, 'eight', 8, NULL);
         UPDATE reading SET price = 1000000 WHERE id = 1;
         UPDATE reading SET n = 2 WHERE id = 2;
         INSERT OR REPLACE INTO reading VALUES (5, 'five', 'five', 5, NULL);
         INSERT INTO tag VALUES ('b' || char(0), 2), ('c', 3);
         COMMIT;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let want: BTreeSet<String> = ["(2,2,two,2.00,2.5)", "(8,80,eight,8.00,)"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tags: BTreeSet<String> = ["(c,3)", "(ok,1)"].iter().map(|s| s.to_string()).collect();
    wait_until("the changes", Duration::from_secs(60), || async {
        rows(&target.client, "reading").await == want && rows(&target.client, "tag").await == tags
    })
    .await;
    let lines = reject_lines(&file);
    assert_eq!(lines.len(), 7, "{lines:?}");
    let tag_lines = reject_lines(&dir.join("tag.jsonl"));
    assert_eq!(tag_lines.len(), 1, "{tag_lines:?}");
    assert_eq!(tag_lines[0]["column"], "name");
    assert_eq!(tag_lines[0]["row"]["v"], 2);
    let streamed: Vec<(String, String)> = lines
        .iter()
        .filter(|l| l["phase"] == "stream")
        .map(|l| {
            (
                l["key"].as_str().unwrap().to_string(),
                l["column"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        streamed,
        [
            ("(id = 6)".to_string(), "n".to_string()),
            ("(id = 5)".to_string(), "n".to_string()),
            ("(id = 7)".to_string(), "price".to_string()),
            ("(id = 1)".to_string(), "price".to_string()),
        ]
    );
    assert_eq!(observer.view().tables["reading"].rejected, 7);
    // verify expects every source row but the ones set aside, and reading
    // the source again writes nothing to the reject file.
    let text = s.config_text("mem://", &format!("reject_dir = \"{}\"\n", dir.display()));
    let vconfig = Arc::new(Config::parse(&target_config_text(&text, &target)).unwrap());
    let verdict = assert_identical(
        Arc::from(
            switchyard::connect::source(
                &vconfig,
                std::sync::Arc::new(switchyard::reject::Rejects::count_only()),
                switchyard::source::Access::ReadOnly,
            )
            .await
            .unwrap(),
        ),
        Arc::from(
            switchyard::connect::sink(
                &vconfig,
                std::sync::Arc::new(switchyard::reject::Rejects::count_only()),
            )
            .await
            .unwrap(),
        ),
        500,
    )
    .await;
    assert_eq!(verdict.tables.iter().map(|t| t.target_rows).sum::<u64>(), 4);
    assert_eq!(reject_lines(&file).len(), 7);
    cancel.cancel();
    let report = handle.await.unwrap().unwrap();
    let reading = report.tables.iter().find(|t| t.table == "reading").unwrap();
    assert_eq!((reading.rows, reading.rejected), (2, 3), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_index_sees_the_sources_order_within_a_batch() {
    // Codes swap places within one transaction: applied in the source's
    // order the unique index holds at every step; the grouped statement's
    // order (the last change of each key) would trip it.
    let source = PgDb::new(
        "CREATE TABLE badge (id int PRIMARY KEY, code text NOT NULL UNIQUE, n int);
         INSERT INTO badge VALUES (1, 'a', 0), (2, 'b', 0);",
    )
    .await;
    let target = PgDb::new("").await;
    let config = target_config(&source.config_text("mem://", ""), &target);
    let r = run(config.clone()).await;
    wait_same(&source.client, &target.client, &["badge"]).await;
    source
        .exec(
            "BEGIN;
             UPDATE badge SET code = 'c', n = 1 WHERE id = 1;
             UPDATE badge SET code = 'a', n = 2 WHERE id = 2;
             UPDATE badge SET code = 'b', n = 3 WHERE id = 1;
             COMMIT;",
        )
        .await;
    wait_same(&source.client, &target.client, &["badge"]).await;
    let report = r.stop().await;
    assert!(report.changes_applied >= 3, "{report:?}");
    let unique: i64 = target
        .client
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'badge'::regclass AND indisunique AND NOT indisprimary",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unique, 1, "the unique index was built in the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_lost_under_a_writer_lose_nothing() {
    // A queue of one batch: the source often holds transactions the pipeline
    // has no room for, and the walsender is ended again and again meanwhile.
    let source = PgDb::new(
        "CREATE TABLE tick (id bigint PRIMARY KEY, v int NOT NULL); INSERT INTO tick VALUES (0, 0);",
    )
    .await;
    let target = PgDb::new("").await;
    let config = target_config(
        // Reconnects right after a walsender ends may find the slot still
        // held by it for a while on a loaded machine: attempts enough.
        &source
            .config_text("mem://", "queue_size = 1\nbatch_rows = 500\n")
            .replace("retry_attempts = 3", "retry_attempts = 30"),
        &target,
    );
    let r = run(config.clone()).await;
    wait_same(&source.client, &target.client, &["tick"]).await;
    // A slow target (a trigger that fires on the apply session too).
    target
        .exec(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.0005); RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON tick FOR EACH ROW EXECUTE FUNCTION slow();
             ALTER TABLE tick ENABLE ALWAYS TRIGGER slow;",
        )
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = {
        let client = crate::pg_surreal::connect(&source.cluster, &source.name).await;
        let (stop, rounds) = (stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut k: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                rounds.store(k, std::sync::atomic::Ordering::Relaxed);
                client
                    .batch_execute(&format!(
                        "INSERT INTO tick VALUES ({k}, 0); UPDATE tick SET v = v + 1 WHERE id = {k} / 2 + 1"
                    ))
                    .await
                    .expect("application write");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            k
        })
    };
    // Each walsender is ended after the writer has written 60 more rounds
    // (by the clock, a loaded machine let it write too few between ends).
    for _ in 0..4 {
        let from = rounds.load(std::sync::atomic::Ordering::Relaxed);
        wait_until("the writer to go on", Duration::from_secs(60), || async {
            rounds.load(std::sync::atomic::Ordering::Relaxed) >= from + 60
        })
        .await;
        wait_until("the walsender to run", Duration::from_secs(30), || async {
            crate::pg_surreal::kill_walsender(&source).await
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    if r.handle.is_finished() {
        panic!(
            "the daemon stopped: {:?}",
            r.handle.await.unwrap().err().map(|e| e.report())
        );
    }
    wait_same(&source.client, &target.client, &["tick"]).await;
    r.stop().await;
}

/// The type system's extremes, as PostgreSQL writes them.
const EXTREMES: &str = "
  ('4713-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC', '4713-01-01 BC', '00:00:00', '00:00:00+1559', '-178000000 years',
   repeat('9', 1000)::numeric, '[-9223372036854775808,9223372036854775807)', tstzrange('-infinity', 'infinity'),
   (SELECT array_agg(g) FROM generate_series(1, 100000) g)),
  ('294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00', '5874897-12-31', '24:00:00', '24:00:00-1559', '178000000 years',
   ('-0.' || repeat('0', 998) || '1')::numeric, 'empty', tstzrange('294276-12-31 23:59:59+00', NULL),
   ARRAY[[1, 2], [3, 4]]),
  ('infinity', '-infinity', 'infinity', '12:00:00', '12:00:00+00', '0', 'NaN', NULL, NULL, '{}')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_systems_extremes_reach_a_postgres_target_unchanged_in_snapshot_and_stream() {
    let columns = "ts, tstz, d, t, ttz, iv, n, r, tr, arr";
    let source = PgDb::new(&format!(
        "CREATE TABLE extremes (id serial PRIMARY KEY, ts timestamp, tstz timestamptz, d date, t time, ttz timetz, iv interval,
                                n numeric, r int8range, tr tstzrange, arr int[]);
         INSERT INTO extremes ({columns}) VALUES {EXTREMES};"
    ))
    .await;
    let target = PgDb::new("").await;
    let r = run(target_config(&source.config_text("mem://", ""), &target)).await;
    wait_same(&source.client, &target.client, &["extremes"]).await;
    // The stream: the same values inserted, then updated into each other.
    source
        .client
        .batch_execute(&format!(
            "INSERT INTO extremes ({columns}) VALUES {EXTREMES};
             UPDATE extremes SET ts = '294276-12-31 23:59:59', tstz = '294276-01-01 00:00:00+00' WHERE id = 4;"
        ))
        .await
        .unwrap();
    wait_same(&source.client, &target.client, &["extremes"]).await;
    assert_eq!(rows(&target.client, "extremes").await.len(), 6);
    r.stop().await;
}

/// A large table is read in block ranges at once, and each range loads in a
/// COPY of its own: binary where every column is of a built-in type, text
/// where one is the user's (an enum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_tables_load_in_parts_at_once_as_binary_or_text_copy() {
    let source = PgDb::new(
        "CREATE TYPE tone AS ENUM ('lo', 'hi');
         CREATE TABLE big (id int PRIMARY KEY, pad text, at timestamptz, n numeric(12, 3), a float8[]);
         INSERT INTO big SELECT g, repeat(md5(g::text), 4), '2024-01-01'::timestamptz + g * interval '1 minute',
                                g / 7.0, ARRAY[g, -g, 'NaN']::float8[]
           FROM generate_series(1, 30000) g;
         DELETE FROM big WHERE id % 7 = 0;
         CREATE TABLE toned (id int PRIMARY KEY, t tone, pad text);
         INSERT INTO toned SELECT g, CASE WHEN g % 2 = 0 THEN 'hi' ELSE 'lo' END::tone, repeat(md5(g::text), 4)
           FROM generate_series(1, 30000) g;",
    )
    .await;
    let target = PgDb::new("").await;
    // About 5 MiB of heap each: three ranges of each table.
    let config = target_config(
        &source.config_text(
            "mem://",
            "snapshot_split_mb = 1\nsnapshot_workers = 3\nsnapshot_split_parts = 3\n",
        ),
        &target,
    );
    let r = run(config.clone()).await;
    wait_same(&source.client, &target.client, &["big", "toned"]).await;
    source
        .exec("UPDATE big SET pad = 'x' WHERE id = 1; UPDATE toned SET t = 'hi' WHERE id = 1")
        .await;
    wait_same(&source.client, &target.client, &["big", "toned"]).await;
    let report = r.stop().await;
    let got: Vec<(&str, u64, Option<&str>)> = report
        .tables
        .iter()
        .map(|t| (t.table.as_str(), t.rows, t.copy_format))
        .collect();
    assert_eq!(
        got,
        vec![
            ("big", 30000 - 30000 / 7, Some("binary")),
            ("toned", 30000, Some("text"))
        ]
    );
}

/// A part the target refuses (a stricter CHECK in a target of the user's
/// own tables) stops the copy with the target's words and the table's name;
/// the other parts' COPYs end with it, and the table is not marked copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_part_of_a_binary_copy_stops_the_table_with_its_error() {
    let source = PgDb::new(
        "CREATE TABLE big (id int PRIMARY KEY, pad text);
         INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 250000) g;
         UPDATE big SET pad = 'refused' WHERE id = 1;",
    )
    .await;
    let target = PgDb::new(
        "CREATE TABLE big (id int PRIMARY KEY, pad text CONSTRAINT pad_is_not_refused CHECK (pad <> 'refused'));",
    )
    .await;
    let text = target_config_text(
        &source.config_text(
            "mem://",
            "snapshot_split_mb = 1\nsnapshot_workers = 3\nsnapshot_split_parts = 3\n",
        ),
        &target,
    )
    .replace("[target]\n", "[target]\nschema = \"existing\"\n");
    let config = Arc::new(Config::parse(&text).unwrap());
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    // Three parts of about 14 MiB: more than a part's queue holds, so the
    // other parts are still reading when the first one fails, and must stop.
    let err = tokio::time::timeout(
        Duration::from_secs(180),
        pipeline.run(Mode::SnapshotOnly, CancellationToken::new()),
    )
    .await
    .expect("the copy stops when a part fails")
    .expect_err("the target refuses a row");
    let shown = err.report();
    assert!(
        shown.contains("pad_is_not_refused") && shown.contains("big"),
        "{shown}"
    );
    let status: String = target
        .client
        .query_one(
            "SELECT status FROM switchyard.table_state WHERE name = 'big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "copying");
}

/// switchyard's snapshot alone (`Mode::SnapshotOnly`) with `config`.
async fn snapshot(config: Arc<Config>) -> switchyard::error::Result<switchyard::pipeline::Report> {
    switchyard::connect::pipeline(&config)
        .await
        .unwrap()
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await
}

/// A target's event trigger that logs, for every statement that builds a
/// key or an index of a table in `public` (not switchyard's state schema),
/// the `maintenance_work_mem` it ran with. ENABLE ALWAYS: it fires in
/// switchyard's replica-role sessions too.
pub const BUILD_MEMORY_LOG: &str = "CREATE SCHEMA probe;
 CREATE TABLE probe.builds (query text, mem text);
 CREATE FUNCTION probe.log_build() RETURNS event_trigger LANGUAGE plpgsql AS $$
 BEGIN
   IF (current_query() ILIKE '%PRIMARY KEY%' OR current_query() ILIKE '%CREATE %INDEX%')
      AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() WHERE schema_name = 'public') THEN
     INSERT INTO probe.builds VALUES (current_query(), current_setting('maintenance_work_mem'));
   END IF;
 END $$;
 CREATE EVENT TRIGGER log_build ON ddl_command_end EXECUTE FUNCTION probe.log_build();
 ALTER EVENT TRIGGER log_build ENABLE ALWAYS;";

/// The settings the keys and indexes of a snapshot into `target` were built
/// with, one per build, and how many of them built a primary key.
pub async fn build_memory(target: &PgDb) -> (BTreeSet<String>, usize) {
    let rows = target
        .client
        .query("SELECT query, mem FROM probe.builds", &[])
        .await
        .unwrap();
    let keys = rows
        .iter()
        .filter(|r| r.get::<_, String>(0).to_uppercase().contains("PRIMARY KEY"))
        .count();
    (rows.iter().map(|r| r.get(1)).collect(), keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_indexes_are_built_with_more_memory_than_the_servers_default_but_never_less() {
    const SOURCE: &str = "CREATE TABLE big (id int PRIMARY KEY, v text);
         CREATE INDEX big_v ON big (v);
         INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 2000) g;";
    let server_default: String = PgDb::new("")
        .await
        .client
        .query_one("SHOW maintenance_work_mem", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        server_default, "256MB",
        "the test needs a server whose default is not switchyard's"
    );

    // PostgreSQL → PostgreSQL (the key and index come with pg_restore's
    // post-data part), the default: 256 MB.
    let (source, target) = (PgDb::new(SOURCE).await, PgDb::new(BUILD_MEMORY_LOG).await);
    snapshot(target_config(&source.config_text("mem://", ""), &target))
        .await
        .unwrap();
    let (mems, keys) = build_memory(&target).await;
    assert_eq!(mems, BTreeSet::from(["256MB".to_string()]));
    assert_eq!(keys, 1);
    assert_eq!(
        target
            .client
            .query("SELECT 1 FROM probe.builds", &[])
            .await
            .unwrap()
            .len(),
        2,
        "the key and the index"
    );

    // A server that already gives more keeps it.
    let (source, target) = (PgDb::new(SOURCE).await, PgDb::new(BUILD_MEMORY_LOG).await);
    target
        .exec(&format!(
            "ALTER DATABASE {} SET maintenance_work_mem = '1GB'",
            target.name
        ))
        .await;
    snapshot(target_config(&source.config_text("mem://", ""), &target))
        .await
        .unwrap();
    assert_eq!(
        build_memory(&target).await.0,
        BTreeSet::from(["1GB".to_string()])
    );

    // maintenance_work_mem_mb = 0: the server's own.
    let (source, target) = (PgDb::new(SOURCE).await, PgDb::new(BUILD_MEMORY_LOG).await);
    let text = target_config_text(&source.config_text("mem://", ""), &target).replacen(
        "[target]\n",
        "[target]\nmaintenance_work_mem_mb = 0\n",
        1,
    );
    snapshot(Arc::new(Config::parse(&text).unwrap()))
        .await
        .unwrap();
    assert_eq!(
        build_memory(&target).await.0,
        BTreeSet::from([server_default])
    );

    // SQLite → PostgreSQL: the key built in switchyard's own session, with
    // the table's "copied" mark.
    let s = Scratch::new();
    s.source(
        "CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO big (v) VALUES ('a'), ('b'), ('c');",
    )
    .await;
    let target = PgDb::new(BUILD_MEMORY_LOG).await;
    snapshot(target_config(&s.config_text("mem://", ""), &target))
        .await
        .unwrap();
    assert_eq!(
        build_memory(&target).await,
        (BTreeSet::from(["256MB".to_string()]), 1)
    );
    // (A SurrealDB source's indexes, built after the load in a pooled
    // session: surreal_source::every_surrealdb_type_into_postgresql.)
}

//! M1: PostgreSQL → embedded SurrealDB, against the throwaway cluster that
//! `scripts/test` starts (`scripts/pg-cluster`): wal_level=logical, TLS with
//! its own CA, a role per authentication method.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::pg::conn::PgEndpoint;
use switchyard::sink::surreal::SurrealSink;
use switchyard::sink::Sink;
use switchyard::source::postgres::replication::ReplicationConn;
use switchyard::source::postgres::slot::flush_lsn;
use switchyard::source::postgres::PgSource;

use crate::support::*;

/// The test cluster, as `scripts/pg-cluster start` describes it.
#[derive(Clone)]
pub struct Cluster {
    pub host: String,
    pub port: u16,
    pub password: String,
    pub ca: String,
}

pub fn cluster() -> Cluster {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run the suite with `bash scripts/test`, which starts the test PostgreSQL (scripts/pg-cluster)")
        })
    };
    Cluster {
        host: var("SWITCHYARD_TEST_PG_HOST"),
        port: var("SWITCHYARD_TEST_PG_PORT").parse().unwrap(),
        password: var("SWITCHYARD_TEST_PG_PASSWORD"),
        ca: var("SWITCHYARD_TEST_PG_CA"),
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A database of its own for one test, with its own slot name.
pub struct PgDb {
    pub cluster: Cluster,
    pub name: String,
    pub client: tokio_postgres::Client,
}

impl PgDb {
    pub async fn new(schema: &str) -> PgDb {
        PgDb::on(cluster(), schema).await
    }

    /// A database on a given cluster.
    pub async fn on(cluster: Cluster, schema: &str) -> PgDb {
        let name = format!(
            "sy_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(&cluster, "postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let client = connect(&cluster, &name).await;
        client.batch_execute(schema).await.unwrap();
        PgDb {
            cluster,
            name,
            client,
        }
    }

    pub fn url(&self, user: &str, query: &str) -> String {
        format!(
            "postgres://{user}@{}:{}/{}{query}",
            self.cluster.host, self.cluster.port, self.name
        )
    }

    pub fn config_text(&self, target: &str, extra: &str) -> String {
        format!(
            "[source]\nurl = \"{}\"\npassword = \"{}\"\nslot = \"{}\"\nunmapped_as_text = true\n\n[target]\nurl = \"{target}\"\nnamespace = \"test\"\ndatabase = \"test\"\n\n[pipeline]\nbatch_delay_ms = 10\nretry_attempts = 3\nretry_max_delay_ms = 500\n{extra}",
            self.url("postgres", "?sslmode=disable"),
            self.cluster.password,
            self.name
        )
    }

    /// `switchyard check` of this database into `mem://`, with or without
    /// `source.unmapped_as_text`: exit code, stdout, stderr.
    pub fn check(&self, unmapped_as_text: bool) -> (i32, String, String) {
        let s = Scratch::new();
        let cfg = s.path("pg.toml");
        let mut text = self.config_text("mem://", "");
        if !unmapped_as_text {
            text = text.replace("unmapped_as_text = true\n", "");
        }
        std::fs::write(&cfg, text).unwrap();
        run_cli(&["check", "--config", cfg.to_str().unwrap()])
    }

    pub fn config(&self, target: &str, extra: &str) -> Arc<Config> {
        Arc::new(Config::parse(&self.config_text(target, extra)).unwrap())
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// The slot's confirmed flush LSN as a number.
    pub async fn confirmed_flush(&self) -> Option<u64> {
        let row = self
            .client
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
    }
}

pub async fn connect(c: &Cluster, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host(&c.host)
        .port(c.port)
        .user("postgres")
        .password(&c.password)
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
    tokio::spawn(conn);
    client
}

pub async fn start(config: Arc<Config>, sink: Option<Arc<SurrealSink>>) -> Running {
    let source = Arc::new(PgSource::open(&config.source.url, &config).await.unwrap());
    run_pipeline(config, source, sink).await
}

/// Waits until the target holds exactly what a fresh snapshot of the source
/// reads, through the pipeline's own conversion.
pub async fn wait_converged(config: &Arc<Config>, sink: &SurrealSink) {
    // Generous: each round reads the whole source in a new exported
    // snapshot, which waits for the other tests' open transactions.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let source = PgSource::open(&config.source.url, config).await.unwrap();
        let want = image_via(&source).await;
        drop(source);
        let tables: Vec<String> = want.keys().cloned().collect();
        let got = target_image(sink.client(), &tables).await;
        let Some(d) = diff(&want, &got) else { return };
        assert!(
            std::time::Instant::now() < deadline,
            "target never matched the source: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub const SCHEMA: &str = r#"
CREATE TABLE "order" (
    id bigint PRIMARY KEY,
    "select" text,
    "naïve col" varchar(20),
    total numeric(12, 2),
    paid boolean,
    data bytea,
    doc jsonb,
    at timestamptz,
    local_at timestamp,
    r double precision,
    f real,
    small smallint,
    u uuid,
    day date
);
ALTER TABLE "order" ADD COLUMN tags text[], ADD COLUMN grid int[];
CREATE TABLE lines (order_id int NOT NULL, n int NOT NULL, qty int, note text, PRIMARY KEY (order_id, n));
CREATE TABLE "naïve table" (k text PRIMARY KEY, v text);
INSERT INTO "order" VALUES
    (1, 'from', 'ünïcødé ✓', 12.50, true, '\x00ff10', '{"a": {"b": [1, 2, null]}, "k": "v"}',
     '2024-05-01 12:30:00+02', '2024-05-01 12:30:00.123456', 0.1, 1.5, -32768,
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29'),
    (2, NULL, NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, 'NaN', 'Infinity', NULL, NULL, NULL),
    (9223372036854775807, 'it''s "quoted"', '日本語', 99999999.99, false, '\x', '[]', NULL, NULL, '-Infinity', -0, 32767, NULL, NULL);
INSERT INTO lines SELECT o, n, o * n, 'line ' || n FROM generate_series(1, 3) o, generate_series(1, 4) n;
INSERT INTO "naïve table" VALUES ('eu', 'a'), ('us', NULL);
CREATE TABLE measurements (id int NOT NULL, day date NOT NULL, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO measurements VALUES (1, '2024-03-01', 10), (2, '2025-03-01', 20);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TABLE every_type (
    id int PRIMARY KEY, b boolean, i2 int2, i4 int4, i8 int8, f4 real, f8 double precision, n numeric, n2 numeric(30, 10),
    t text, vc varchar(10), c char(3), nm name, by bytea, u uuid, j json, jb jsonb,
    d date, tm time, tz timetz, ts timestamp, tstz timestamptz, iv interval, ar int[], m mood, dom positive,
    inet_ inet, cidr_ cidr, mac macaddr, bits bit(4), vbits varbit, money_ money, r int4range, tsv tsvector, x xml, o oid
);
INSERT INTO every_type VALUES (
    1, true, -32768, 2147483647, -9223372036854775808, 1.5, 'NaN', 'NaN', 12345678901234567890.0123456789,
    'text', 'varchar', 'ch', 'a_name', '\xdeadbeef', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": null}',
    '2024-02-29', '23:59:59.999999', '12:00:00+05:30', '1999-12-31 23:59:59', '2000-01-01 00:00:00+00', '1 year 2 months 3 days 04:05:06.789', '{{1,2},{3,4}}', 'happy', 7,
    '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', B'1010', B'101', 12.34, '[1,10)', 'a fat cat', '<a>x</a>', 4242
), (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
UPDATE "order" SET tags = ARRAY['a', 'b,c', NULL, 'say "hi"'], grid = '{{1,2},{3,NULL}}' WHERE id = 1;
ALTER TABLE every_type ADD COLUMN jba jsonb[], ADD COLUMN fa float8[], ADD COLUMN far timestamptz;
UPDATE every_type SET jba = ARRAY['null'::jsonb, '[1, 2]', '{"k": 1.10}', '"x"', NULL], fa = ARRAY[1.5777777777770001, 'NaN', -0.0],
    far = '12345-06-07 08:09:10+00' WHERE id = 1;
UPDATE "order" SET tags = '{}' WHERE id = 2;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m1_snapshot_then_stream_into_embedded_surrealdb() {
    let db = PgDb::new(SCHEMA).await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    let run_sink = run.sink.clone();
    wait_converged(&config, &run.sink).await;

    db.exec(LIVE_CHANGES).await;
    wait_converged(&config, &run.sink).await;
    let report = run.stop().await;
    m1_after(&db, report, run_sink).await;
}

/// Live changes: a multi-row transaction, an update of a primary key, a
/// delete, a TRUNCATE, a partition move, arrays, and a value with tabs and
/// newlines (every_type gets the extreme timestamps a SurrealDB datetime holds).
pub const LIVE_CHANGES: &str = "BEGIN;
         INSERT INTO \"order\" (id, \"select\", total) VALUES (10, E'tab\\there\\nnewline', 1.01);
         UPDATE \"order\" SET paid = true, doc = '{\"x\": 1}' WHERE id = 1;
         UPDATE lines SET n = 40 WHERE order_id = 1 AND n = 4;
         DELETE FROM lines WHERE order_id = 2 AND n = 1;
         COMMIT;
         UPDATE \"order\" SET id = 11 WHERE id = 10;
         TRUNCATE \"naïve table\";
         INSERT INTO \"naïve table\" VALUES ('jp', 'after truncate');
         INSERT INTO measurements VALUES (3, '2025-06-01', 30);
         UPDATE \"order\" SET tags = tags || ARRAY['{brace}'] WHERE id = 1;
         INSERT INTO every_type SELECT 3, b, i2, i4, i8, f4, '-Infinity', 'Infinity', n2, E'line\\nbreak\\ttab', vc, c, nm, by, u, j, jb,
                d, tm, tz, '99999-12-31 23:59:59', '4713-01-01 00:00:00+00 BC', iv, ar, 'sad', dom, inet_, cidr_, mac, bits, vbits, money_, r, tsv, x, o FROM every_type WHERE id = 1;
         UPDATE every_type SET iv = '-1 day', m = 'ok', tsv = 'other words' WHERE id = 1;
         UPDATE measurements SET day = '2025-01-15' WHERE id = 1;";

/// What the M1 test checks once the live changes arrived.
async fn m1_after(db: &PgDb, report: switchyard::pipeline::Report, run_sink: Arc<SurrealSink>) {
    assert!(report.changes_applied >= 7, "{report:?}");
    // Arrays arrive as arrays.
    let mut r = run_sink
        .client()
        .query("SELECT VALUE [tags, grid] FROM `order`:1")
        .await
        .unwrap();
    let v: Vec<serde_json::Value> = r.take(0).unwrap();
    assert_eq!(
        v,
        vec![serde_json::json!([
            ["a", "b,c", null, "say \"hi\"", "{brace}"],
            [[1, 2], [3, null]]
        ])]
    );
    // `check` shows each column's SurrealDB field; built-in types need no
    // unmapped_as_text.
    let (code, out, err) = db.check(false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("u: option<uuid>") && out.contains("day: option<datetime>"),
        "{out}"
    );
    assert!(
        out.contains("total") && out.contains("numeric(12,2)"),
        "{out}"
    );
    let copied: u64 = report.tables.iter().map(|t| t.rows).sum();
    assert_eq!(copied, 3 + 12 + 2 + 2 + 2, "{report:?}");
    // The partitioned table replicates as its root only.
    let names: Vec<&str> = report.tables.iter().map(|t| t.table.as_str()).collect();
    assert!(
        names.contains(&"measurements") && !names.iter().any(|n| n.starts_with("measurements_")),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_and_the_slot_never_passes_the_checkpoint() {
    let db = PgDb::new(SCHEMA).await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    db.exec("INSERT INTO lines VALUES (7, 1, 7, 'seven')").await;
    wait_converged(&config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;
    let cp = sink.state().await.unwrap().unwrap().checkpoint.unwrap();
    let flushed = db.confirmed_flush().await.unwrap();
    assert!(
        flushed <= flush_lsn(cp),
        "slot confirmed {flushed}, past the target's checkpoint {cp}"
    );

    // Changes while switchyard is down arrive after the restart.
    db.exec("UPDATE lines SET qty = 700 WHERE order_id = 7; DELETE FROM \"order\" WHERE id = 2;")
        .await;
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_converged(&config, &run.sink).await;
    run.stop().await;
    let cp = sink.state().await.unwrap().unwrap().checkpoint.unwrap();
    let flushed = db.confirmed_flush().await.unwrap();
    assert!(
        flushed <= flush_lsn(cp),
        "slot confirmed {flushed}, past the target's checkpoint {cp}"
    );

    // uninstall removes the slot and the publication switchyard created.
    use switchyard::source::Source;
    PgSource::open(&config.source.url, &config)
        .await
        .unwrap()
        .uninstall()
        .await
        .unwrap();
    assert_eq!(db.confirmed_flush().await, None, "the slot is still there");
    let pubs: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_is_refused_with_the_fix() {
    let db = PgDb::new(
        "CREATE TABLE events (at timestamptz, body text); CREATE TABLE ok (id int PRIMARY KEY);",
    )
    .await;
    let s = Scratch::new();
    let cfg = s.path("pg.toml");
    std::fs::write(&cfg, db.config_text("mem://", "")).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("events") && out.contains("REPLICA IDENTITY"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_table_with_replica_identity_full_is_replicated_by_its_whole_row() {
    // Identical rows, NULLs, far and BC timestamps, TOASTed values.
    let db = PgDb::new(
        "CREATE TABLE events (at timestamptz, body text, n int);
         ALTER TABLE events REPLICA IDENTITY FULL;
         INSERT INTO events VALUES
           ('2024-01-01 00:00:00+00', 'same', 1), ('2024-01-01 00:00:00+00', 'same', 1), (NULL, 'null at', 2),
           ('99999-01-01 00:00:00+00', 'forever', 3), ('4713-01-01 00:00:00+00 BC', 'always', 4), ('0044-03-15 12:00:00+00 BC', 'ides', 5);",
    )
    .await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    let copies = |body: &'static str| {
        let sink = run.sink.clone();
        async move {
            let mut r = sink
                .client()
                .query("SELECT VALUE _switchyard_copies FROM events WHERE body = $b")
                .bind(("b", body))
                .await
                .unwrap();
            r.take::<Vec<i64>>(0).unwrap()
        }
    };
    assert_eq!(copies("same").await, vec![2]);

    db.exec(
        "INSERT INTO events VALUES ('2024-01-01 00:00:00+00', 'same', 1);
         DELETE FROM events WHERE n = 2;
         UPDATE events SET body = 'changed' WHERE ctid = (SELECT ctid FROM events WHERE n = 1 LIMIT 1);
         UPDATE events SET n = n WHERE n = 3;
         INSERT INTO events (body, n) SELECT (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 4000) i), 7
           FROM generate_series(1, 2) g;
         UPDATE events SET n = 8 WHERE n = 7;",
    )
    .await;
    wait_converged(&config, &run.sink).await;
    assert_eq!(copies("same").await, vec![2]);
    assert_eq!(copies("changed").await, vec![1]);
    // A row the target does not hold cannot be removed: the batch stops
    // with the table named, and the checkpoint stays before it.
    run.sink
        .client()
        .query("DELETE events WHERE body = 'forever'")
        .await
        .unwrap()
        .check()
        .unwrap();
    let sink = run.sink.clone();
    db.exec("DELETE FROM events WHERE n = 3").await;
    let err = run.error_within(Duration::from_secs(30)).await;
    assert!(
        err.contains("\"events\" has no key") && err.contains("copy the table again"),
        "{err}"
    );
    // Not acknowledged: a restart meets the same change again.
    let again = start(config.clone(), Some(sink)).await;
    let err = again.error_within(Duration::from_secs(30)).await;
    assert!(err.contains("\"events\" has no key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_table_is_read_in_block_ranges_at_once() {
    let db = PgDb::new(
        "CREATE TABLE big (id int PRIMARY KEY, pad text);
         INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 30000) g;
         DELETE FROM big WHERE id % 7 = 0;",
    )
    .await;
    // About 5 MiB of heap: three ranges of one table.
    let config = db.config(
        "mem://",
        "snapshot_split_mb = 1\nsnapshot_workers = 3\nsnapshot_split_parts = 3\n",
    );
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    db.exec("UPDATE big SET pad = 'x' WHERE id = 1").await;
    wait_converged(&config, &run.sink).await;
    let report = run.stop().await;
    assert_eq!(
        report.tables.iter().map(|t| t.rows).sum::<u64>(),
        30000 - 30000 / 7,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_renamed_or_recreated_while_streaming_is_followed() {
    // (change, the target's tables and their records afterwards)
    for (change, expected) in [
        (
            "ALTER TABLE t RENAME TO t2; INSERT INTO t2 VALUES (2)",
            // SurrealDB has no rename: a copy under the new name; the old
            // copy stays (drop_table = "keep", the default).
            vec![("t", 1), ("t2", 2)],
        ),
        (
            "DROP TABLE t; CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (3)",
            vec![("t", 1)],
        ),
    ] {
        let db = PgDb::new("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);").await;
        let config = db.config("mem://", "");
        let run = start(config.clone(), None).await;
        wait_converged(&config, &run.sink).await;
        db.exec(change).await;
        let sink = run.sink.clone();
        wait_until(
            "the change to reach the target",
            Duration::from_secs(60),
            || async {
                let mut got = Vec::new();
                for (table, _) in &expected {
                    // (A table not created yet is an error in strict mode.)
                    let n: Option<i64> = match sink
                        .client()
                        .query("SELECT count() AS n FROM type::table($t) GROUP ALL")
                        .bind(("t", table.to_string()))
                        .await
                    {
                        Ok(mut r) => r.take((0, "n")).unwrap_or(None),
                        Err(_) => None,
                    };
                    got.push((*table, n.unwrap_or(0)));
                }
                got == expected
            },
        )
        .await;
        wait_converged(&config, &run.sink).await;
        assert!(!run.handle.is_finished(), "{change}: the daemon stopped");
        run.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_behind_the_slot_is_refused() {
    let db =
        PgDb::new("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
            .await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;
    let old = sink.state().await.unwrap().unwrap().checkpoint.unwrap();
    db.exec("INSERT INTO t VALUES (2, 'b')").await;
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_converged(&config, &run.sink).await;
    wait_until(
        "the slot to confirm the insert",
        Duration::from_secs(30),
        || async { db.confirmed_flush().await.unwrap() > flush_lsn(old) },
    )
    .await;
    run.stop().await;
    // The target loses its last writes (restored from a backup).
    sink.client()
        .query("UPDATE _switchyard_checkpoint:main SET commit = $c, ordinal = $o")
        .bind(("c", old.commit as i64))
        .bind(("o", old.ordinal as i64))
        .await
        .unwrap()
        .check()
        .unwrap();
    let run = start(config.clone(), Some(sink.clone())).await;
    let err = run.error_within(Duration::from_secs(30)).await;
    assert!(
        err.contains("is behind what replication slot")
            && err.contains("start over with an empty target"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error_without_the_secret() {
    let db = PgDb::new("CREATE TABLE t (id int PRIMARY KEY);").await;
    let s = Scratch::new();
    let cfg = s.path("pg.toml");
    let text = db.config_text("mem://", "").replace(
        &format!("password = \"{}\"", db.cluster.password),
        "password = \"Wr0ng-s3cret\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("password authentication failed") && err.contains("postgres"),
        "{err}"
    );
    assert!(
        !err.contains("Wr0ng-s3cret") && !out.contains("Wr0ng-s3cret"),
        "the password leaked: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connection_speaks_every_auth_method_and_tls_mode() {
    let db = PgDb::new("").await;
    let c = &db.cluster;
    let cases: Vec<(&str, Option<&str>, String)> = vec![
        ("sy_trust", None, "?sslmode=disable".into()),
        ("sy_clear", Some("clear-pass"), "?sslmode=require".into()),
        ("sy_md5", Some("md5-pass"), "?sslmode=prefer".into()),
        (
            "postgres",
            Some(c.password.as_str()),
            format!("?sslmode=verify-full&sslrootcert={}", c.ca),
        ),
        (
            "postgres",
            Some(c.password.as_str()),
            format!("?sslmode=verify-ca&sslrootcert={}", c.ca),
        ),
    ];
    for (user, password, query) in cases {
        let url = db.url(user, &query);
        let ep =
            PgEndpoint::parse(&url, password.map(|p| p.to_string().into()), "source.url").unwrap();
        let mut conn = ReplicationConn::connect(&ep)
            .await
            .unwrap_or_else(|e| panic!("{url}: {}", e.report()));
        let sys = conn.identify_system().await.unwrap();
        assert!(
            !sys.system_id.is_empty() && u64::from(sys.xlogpos) > 0,
            "{url}: {sys:?}"
        );
        // The ordinary connection honours the same settings.
        let client = ep
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{url}: {}", e.report()));
        let ssl: bool = client
            .query_one("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(ssl, !query.contains("disable"), "{url}");
    }
    // verify-full without our CA: the server's certificate is not trusted.
    let no_ca = db.url("postgres", "?sslmode=verify-full");
    let ep = PgEndpoint::parse(&no_ca, Some(c.password.clone().into()), "source.url").unwrap();
    let e = ReplicationConn::connect(&ep)
        .await
        .err()
        .expect("an unknown CA must be refused");
    assert!(e.report().contains("TLS handshake"), "{}", e.report());
    // A role that needs a password, without one.
    let ep = PgEndpoint::parse(&db.url("sy_md5", "?sslmode=disable"), None, "source.url").unwrap();
    let e = ReplicationConn::connect(&ep)
        .await
        .err()
        .expect("no password");
    assert!(e.report().contains("source.password"), "{}", e.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_left_as_they_are() {
    // Random hex does not compress: about 12 kB per value, stored out of line.
    let db = PgDb::new(
        "CREATE TABLE docs (id int PRIMARY KEY, big text NOT NULL, n int, note text);
         INSERT INTO docs SELECT i, (SELECT string_agg(md5(random()::text || g::text || i::text), '') FROM generate_series(1, 400) g), i, 'x'
           FROM generate_series(1, 3) i;",
    )
    .await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    // Neither update touches `big`: pgoutput sends it as "unchanged".
    db.exec("UPDATE docs SET n = n + 10, note = NULL WHERE id = 1; UPDATE docs SET id = 20, note = 'moved' WHERE id = 2;").await;
    wait_converged(&config, &run.sink).await;
    // A target that lost the row cannot keep the unchanged value: a clear
    // error naming the row, not a record with the column missing.
    run.sink.client().query("DELETE docs:3").await.unwrap();
    db.exec("UPDATE docs SET n = 0 WHERE id = 3").await;
    let r = tokio::time::timeout(Duration::from_secs(60), run.handle)
        .await
        .expect("the daemon kept running")
        .unwrap();
    let err = r
        .expect_err("an unchanged value with no row to keep it from")
        .report();
    assert_names(
        &err,
        &["\"docs\"", "id = 3", "unchanged", "copy the table again"],
    );
}

/// Ends the walsender that serves the slot; returns whether one was running.
pub async fn kill_walsender(db: &PgDb) -> bool {
    let row = db
        .client
        .query_one(
            "SELECT coalesce(bool_or(pg_terminate_backend(active_pid)), false) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&db.name],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replication_connection_is_reconnected_without_loss() {
    let db = PgDb::new(SCHEMA).await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    for round in 0..3 {
        db.exec(&format!(
            "INSERT INTO lines VALUES (100, {round}, 1, 'before')"
        ))
        .await;
        wait_until("the walsender to run", Duration::from_secs(30), || async {
            kill_walsender(&db).await
        })
        .await;
        // Written while switchyard reconnects.
        db.exec(&format!("INSERT INTO lines VALUES (200, {round}, 2, 'during'); UPDATE \"order\" SET small = {round} WHERE id = 1;"))
            .await;
        wait_converged(&config, &run.sink).await;
    }
    let report = run.stop().await;
    assert!(report.changes_applied >= 9, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_behind_the_daemons_back_stops_it_with_the_reason() {
    let db = PgDb::new(SCHEMA).await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    // The slot is busy while the walsender runs: end it, then drop the slot
    // before switchyard reconnects.
    wait_until(
        "the slot to be dropped",
        Duration::from_secs(30),
        || async {
            kill_walsender(&db).await;
            db.client
                .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
                .await
                .is_ok()
        },
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(60), run.handle)
        .await
        .expect("the daemon kept running")
        .unwrap();
    let err = r
        .expect_err("streaming from a dropped slot must fail")
        .report();
    assert!(
        err.contains("does not exist") && err.contains("copies every table again"),
        "{err}"
    );
}

/// A cluster of a test's own (scripts/pg-cluster on another port), for tests
/// that restart the server; stopped and removed on drop.
pub struct OwnCluster {
    env: Vec<(String, String)>,
}

impl OwnCluster {
    pub fn script(&self, cmd: &str) -> std::process::Output {
        let out = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-cluster"))
            .arg(cmd)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg-cluster {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn start() -> (OwnCluster, Cluster) {
        OwnCluster::start_with(false)
    }

    /// With `durable`, PostgreSQL's durability defaults (fsync, full-page
    /// writes, synchronous commit on) instead of the tests' fast settings.
    pub fn start_with(durable: bool) -> (OwnCluster, Cluster) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let own = OwnCluster {
            env: vec![
                ("SWITCHYARD_PG_PORT".into(), port.to_string()),
                (
                    "SWITCHYARD_PG_DIR".into(),
                    format!("/tmp/switchyard-pg-own-{port}"),
                ),
                (
                    "SWITCHYARD_PG_DURABLE".into(),
                    if durable { "1" } else { "0" }.into(),
                ),
            ],
        };
        let out = own.script("start");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
                .to_string()
        };
        let cluster = Cluster {
            host: get("SWITCHYARD_TEST_PG_HOST"),
            port: get("SWITCHYARD_TEST_PG_PORT").parse().unwrap(),
            password: get("SWITCHYARD_TEST_PG_PASSWORD"),
            ca: get("SWITCHYARD_TEST_PG_CA"),
        };
        (own, cluster)
    }
}

impl OwnCluster {
    /// `pg_ctl stop -m immediate`, `down_ms` down, then a start with crash
    /// recovery (blocking).
    pub fn crash(&self, down_ms: u64) {
        let out = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-cluster"))
            .arg("crash")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SWITCHYARD_PG_DOWN_MS", down_ms.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg-cluster crash: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-cluster"))
            .arg("stop")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_server_restarting_during_streaming_loses_nothing() {
    let (own, cluster) = OwnCluster::start();
    let db = PgDb::on(cluster, SCHEMA).await;
    // Attempts enough to outlast a restart (backoff doubles up to 500 ms).
    let config = Arc::new(
        Config::parse(
            &db.config_text("mem://", "")
                .replace("retry_attempts = 3", "retry_attempts = 200"),
        )
        .unwrap(),
    );
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    db.exec("INSERT INTO lines VALUES (50, 1, 1, 'before the restart')")
        .await;
    own.script("restart");
    // The test's own connection died with the server: a new one.
    let client = connect(&db.cluster, &db.name).await;
    client
        .batch_execute("INSERT INTO lines VALUES (50, 2, 2, 'after the restart'); UPDATE \"order\" SET small = 7 WHERE id = 1;")
        .await
        .unwrap();
    let sink = run.sink.clone();
    wait_until(
        "both rows in the target, or the daemon stopping",
        Duration::from_secs(120),
        || async {
            let got = target_image(sink.client(), &["lines".to_string()]).await;
            run.handle.is_finished() || got.get("lines").is_some_and(|l| l.len() >= 14)
        },
    )
    .await;
    assert!(
        !run.handle.is_finished(),
        "the daemon stopped: {:?}",
        run.handle.await
    );
    wait_converged(&config, &run.sink).await;
    let report = run.stop().await;
    assert!(report.changes_applied >= 3, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_name_taken_by_another_database_is_refused() {
    let first = PgDb::new("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);").await;
    let second = PgDb::new("CREATE TABLE t (id int PRIMARY KEY);").await;
    let config = first.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    // Its slot exists now; the stop may come before the copy is recorded
    // as done (the row shows first), which is no concern here.
    run.cancel.cancel();
    let first_run = run.handle.await.unwrap();
    assert!(
        first_run
            .as_ref()
            .map_or_else(|e| e.kind() == switchyard::ErrorKind::Interrupted, |_| true),
        "{:?}",
        first_run.err().map(|e| e.report())
    );
    // The second database's config names the first one's slot.
    let text = second.config_text("mem://", "").replace(
        &format!("slot = \"{}\"", second.name),
        &format!("slot = \"{}\"", first.name),
    );
    let config = Arc::new(Config::parse(&text).unwrap());
    let run = start(config, None).await;
    let r = tokio::time::timeout(Duration::from_secs(60), run.handle)
        .await
        .expect("the daemon kept running")
        .unwrap();
    let err = r
        .expect_err("another database's slot must be refused")
        .report();
    assert!(
        err.contains(&first.name) && err.contains("source.slot"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_told_what_to_grant() {
    let db = PgDb::new("CREATE TABLE t (id int PRIMARY KEY);").await;
    let role = format!("{}_norepl", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'norepl-pass'; GRANT SELECT ON t TO {role};"
    ))
    .await;
    let s = Scratch::new();
    let cfg = s.path("pg.toml");
    let text = db
        .config_text("mem://", "")
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            &format!("password = \"{}\"", db.cluster.password),
            "password = \"norepl-pass\"",
        );
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("may not start replication")
            && out.contains(&format!("ALTER ROLE \"{role}\" REPLICATION")),
        "{out}"
    );
    assert!(!out.contains("norepl-pass") && !err.contains("norepl-pass"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_swapping_a_deferrable_key_in_one_transaction_lose_nothing() {
    let db = PgDb::new(
        "CREATE TABLE seat (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, guest text);
         ALTER TABLE seat REPLICA IDENTITY FULL;
         INSERT INTO seat VALUES (1, 'ada'), (2, 'bob'), (3, 'cy'), (4, 'dee');",
    )
    .await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    // Two rows swap keys; three rotate; one moves twice.
    db.exec(
        "BEGIN;
         UPDATE seat SET id = 2 WHERE guest = 'ada';
         UPDATE seat SET id = 1 WHERE guest = 'bob';
         COMMIT;
         UPDATE seat SET id = CASE id WHEN 1 THEN 3 WHEN 3 THEN 4 WHEN 4 THEN 1 END WHERE id IN (1, 3, 4);
         BEGIN;
         UPDATE seat SET id = 10 WHERE guest = 'ada';
         UPDATE seat SET id = 11 WHERE guest = 'ada';
         COMMIT;",
    )
    .await;
    wait_converged(&config, &run.sink).await;
    let mut q = run.sink.client().query("SELECT * FROM seat").await.unwrap();
    let got: Vec<surrealdb::types::Value> = q.take(0).unwrap();
    assert_eq!(got.len(), 4, "{got:?}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_truncated_before_its_copy_starts_is_copied_in_a_new_snapshot() {
    capture_logs();
    // One table copied at a time: `a_big` first, `z_ev` (no key) after it.
    let db = PgDb::new(
        "CREATE TABLE a_big (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO a_big SELECT i, repeat('v', 200) FROM generate_series(1, 20000) i;
         CREATE TABLE z_ev (kind text NOT NULL, n int NOT NULL);
         ALTER TABLE z_ev REPLICA IDENTITY FULL;
         INSERT INTO z_ev SELECT 'k' || (i % 3), i % 5 FROM generate_series(1, 30) i;",
    )
    .await;
    let config = db.config("mem://", "snapshot_workers = 1\n");
    let run = start(config.clone(), None).await;
    let sink = run.sink.clone();
    wait_until(
        "a_big's copy to be under way",
        Duration::from_secs(120),
        || {
            let sink = sink.clone();
            async move {
                let status: Vec<String> = sink
                    .client()
                    .query("SELECT VALUE status FROM _switchyard_table:a_big")
                    .await
                    .ok()
                    .and_then(|mut r| r.take(0).ok())
                    .unwrap_or_default();
                status.first().is_some_and(|s| s == "copying")
            }
        },
    )
    .await;
    // After the snapshot was exported and before z_ev's copy: an old
    // snapshot reads a truncated table as empty (TRUNCATE is not
    // MVCC-safe), and the DELETE before the TRUNCATE would then find no row.
    db.exec(
        "DELETE FROM z_ev WHERE ctid = (SELECT ctid FROM z_ev WHERE kind = 'k1' LIMIT 1);
         TRUNCATE z_ev;
         INSERT INTO z_ev VALUES ('after', 1), ('after', 1);",
    )
    .await;
    wait_converged(&config, &run.sink).await;
    assert!(!run.handle.is_finished(), "the run stopped");
    let got = target_image(run.sink.client(), &["z_ev".to_string()]).await;
    // The two identical rows: one record counting two.
    let text = format!("{got:?}");
    assert!(
        text.contains("after") && text.contains("Number(Int(2))"),
        "{text}"
    );
    run.stop().await;
}

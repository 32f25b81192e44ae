//! SurrealDB as a source (M3, and the way back of M1): an embedded store
//! followed through its changefeeds into a real SurrealDB server and into
//! PostgreSQL; a retention that passed while the daemon was stopped.

use std::sync::Arc;
use std::time::Duration;

use surrealdb::engine::any::Any;
use surrealdb::types::{ToSql, Value as SValue};
use surrealdb::Surreal;
use switchyard::config::Config;
use switchyard::sink::surreal::SurrealSink;
use switchyard::source::surreal::SurrealSource;
use switchyard::source::Source;
use switchyard::surreal::AsStore;

use crate::pg_surreal::PgDb;
use crate::support::*;
use crate::surreal_remote::{SurrealServer, PASSWORD};

const SCHEMA: &str = "
DEFINE TABLE customer SCHEMAFULL;
DEFINE FIELD name ON customer TYPE string ASSERT string::len($value) > 0 COMMENT 'display name' PERMISSIONS FOR select FULL, FOR update WHERE $auth.admin = true;
DEFINE FIELD slug ON customer TYPE option<string> VALUE string::lowercase(name);
DEFINE FIELD joined ON customer TYPE datetime;
DEFINE FIELD balance ON customer TYPE decimal;
DEFINE FIELD score ON customer TYPE float;
DEFINE FIELD visits ON customer TYPE int;
DEFINE FIELD active ON customer TYPE bool;
DEFINE FIELD token ON customer TYPE uuid;
DEFINE FIELD session ON customer TYPE duration;
DEFINE FIELD avatar ON customer TYPE option<bytes>;
DEFINE FIELD prefs ON customer TYPE object FLEXIBLE;
DEFINE FIELD tags ON customer TYPE array<string>;
DEFINE FIELD OVERWRITE tags.* ON customer TYPE string ASSERT string::len($value) < 40;
DEFINE FIELD note ON customer TYPE option<string>;
DEFINE TABLE purchase SCHEMALESS;
DEFINE FIELD customer ON purchase TYPE record<customer>;
DEFINE INDEX token ON customer FIELDS token UNIQUE;
DEFINE INDEX by_status ON purchase FIELDS status, customer;
DEFINE INDEX words ON customer FIELDS name FULLTEXT ANALYZER ascii;
DEFINE ANALYZER ascii TOKENIZERS blank;
DEFINE TABLE reading SCHEMALESS;
CREATE reading:['sensor-1', d'2025-01-01T00:00:00Z'] SET v = 1.5dec;
CREATE reading:['sensor-2', d'2025-01-01T00:05:00Z'] SET v = 2;
";

fn customer(i: i64) -> String {
    format!(
        "CREATE customer:{i} CONTENT {{ name: 'c{i}', joined: d'2024-01-{:02}T10:00:00.123456Z', balance: {i}.50dec, score: {i}.25, \
         visits: {i}, active: {}, token: u'0190a5e4-3b1c-7e2a-9f00-{i:012}', session: {i}h30m15s, \
         avatar: {}, prefs: {{ theme: 'dark', size: {i} }}, tags: ['a{i}', 'b'], note: {} }};",
        i % 28 + 1,
        i % 2 == 0,
        if i % 3 == 0 { "NONE".to_string() } else { format!("<bytes>'x{i}'") },
        if i % 4 == 0 { "NONE".to_string() } else { format!("'note {i}'") },
    )
}

fn purchase(i: i64) -> String {
    format!(
        "CREATE purchase:{i} CONTENT {{ customer: customer:{}, total: {i}, placed: d'2025-03-04T05:06:07Z', status: 'new', items: [{{ sku: 's{i}', n: 2, at: d'2025-03-04T05:06:{:02}Z', price: {i}.75dec, by: customer:1, wait: 90s, ref: u'0190a5e4-3b1c-7e2a-9f00-000000000001' }}], at: (-0.1275, 51.{i}) }};",
        i % 20 + 1,
        i % 60
    )
}

/// An embedded store with the schema and some rows, as an application
/// would have it.
async fn app_store(url: &str) -> Surreal<Any> {
    let db = surrealdb::engine::any::connect((
        url.to_string(),
        surrealdb::opt::Config::default().changefeed_gc_interval(Duration::from_millis(200)),
    ))
    .await
    .unwrap();
    db.query("DEFINE NAMESPACE app; USE NS app; DEFINE DATABASE main;")
        .await
        .unwrap()
        .check()
        .unwrap();
    db.use_ns("app").use_db("main").await.unwrap();
    let mut seed = String::from(SCHEMA);
    for i in 1..=40 {
        seed.push_str(&customer(i));
    }
    for i in 1..=60 {
        seed.push_str(&purchase(i));
    }
    db.query(seed).await.unwrap().check().unwrap();
    db
}

fn source_config(url: &str, target: &str, extra: &str) -> Arc<Config> {
    let text = format!(
        "[source]\nurl = \"{url}\"\nnamespace = \"app\"\ndatabase = \"main\"\npoll_interval_ms = 50\nchangefeed_window_ms = 300\n\n\
         [target]\n{target}\n\n[pipeline]\nbatch_delay_ms = 10\nretry_attempts = 3\nretry_max_delay_ms = 500\n{extra}"
    );
    Arc::new(Config::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// Every record of `table`, as SurrealQL writes it.
async fn records(db: &impl AsStore, table: &str) -> Vec<String> {
    let db = db.store();
    // A table not created yet has no records.
    let rows: Vec<SValue> = match db.query(format!("SELECT * FROM {table} ORDER BY id")).await {
        Ok(mut r) => r.take(0).unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    rows.into_iter().map(|r| r.to_sql()).collect()
}

async fn same_records(
    source: &impl AsStore,
    target: &impl AsStore,
    tables: &[&str],
) -> Option<String> {
    for t in tables {
        let (s, g) = (records(source, t).await, records(target, t).await);
        if s != g {
            let first = s
                .iter()
                .zip(g.iter())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("source {a}\ntarget {b}"))
                .unwrap_or_default();
            return Some(format!(
                "{t}: {} source records, {} target records\n{first}",
                s.len(),
                g.len()
            ));
        }
    }
    None
}

/// Runs `sql` as an application does: a transaction conflict SurrealDB
/// says can be retried is retried.
async fn apply(db: &Surreal<Any>, sql: &str) {
    for _ in 0..50 {
        match db.query(sql).await.and_then(|r| r.check()) {
            Ok(_) => return,
            // In a transaction the first error reported may be the notice
            // that the rest was not executed.
            Err(e)
                if e.message().contains("can be retried")
                    || e.message().contains("failed transaction") =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
    panic!("{sql}: still conflicting after 50 attempts");
}

/// A writer of the application: updates, creates and deletes in both
/// tables, in single statements and in transactions.
async fn write(db: Surreal<Any>, rounds: i64, start: i64) {
    for r in 0..rounds {
        let i = start + r;
        let sql = match r % 4 {
            0 => format!("UPDATE customer:{} SET visits += 1, note = 'seen {i}';", r % 40 + 1),
            1 => format!("BEGIN; {} UPDATE purchase:{} SET status = 'paid', extra = {{ by: 'w{i}' }}; COMMIT;", purchase(i), r % 60 + 1),
            2 => format!("DELETE purchase:{};", i - 1),
            _ => format!("BEGIN; {} UPDATE customer:{i} SET tags += 'late', avatar = NONE; COMMIT;", customer(i)),
        };
        apply(&db, &sql).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_into_a_server_snapshot_then_stream_under_a_writer() {
    capture_logs();
    let scratch = Scratch::new();
    let url = format!("surrealkv://{}", scratch.path("app").display());
    let app = app_store(&url).await;
    let server = SurrealServer::start(scratch.path("server.log")).await;
    let config = source_config(
        &url,
        &format!("url = \"{}\"\nnamespace = \"m3\"\ndatabase = \"main\"\nusername = \"root\"\npassword = \"{PASSWORD}\"", server.url),
        "",
    );
    // The application's own handle: an embedded store is opened by one
    // process at a time.
    let source = Arc::new(
        SurrealSource::from_client(app.clone(), &url, &config, Default::default())
            .await
            .unwrap(),
    );
    let found = source.discover().await.unwrap();
    let purchase_t = found.tables.iter().find(|t| t.name == "purchase").unwrap();
    let names: Vec<&str> = purchase_t.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["id", "customer", "at", "items", "placed", "status", "total"]
    );
    assert_eq!(purchase_t.links.len(), 1, "record<customer> is a link");
    let writer = tokio::spawn(write(app.clone(), 200, 1000));
    let sink = Arc::new(
        SurrealSink::connect(&server.url, true, &config)
            .await
            .unwrap(),
    );
    let running = run_pipeline(config.clone(), source.clone(), Some(sink.clone())).await;
    writer.await.unwrap();
    let target = sink.client().clone();
    wait_until(
        "the server to hold the store's records",
        Duration::from_secs(90),
        || {
            let (app, target) = (app.clone(), target.clone());
            async move {
                same_records(&app, &target, &["customer", "purchase", "reading"])
                    .await
                    .is_none()
            }
        },
    )
    .await;
    // A table the application creates while the daemon streams is captured,
    // copied and followed.
    let mut created = String::from(
        "DEFINE TABLE shipment SCHEMAFULL; DEFINE FIELD purchase ON shipment TYPE record<purchase>; DEFINE FIELD at ON shipment TYPE datetime;",
    );
    for i in 1..=30 {
        created.push_str(&format!(
            "CREATE shipment:{i} SET purchase = purchase:{i}, at = time::now();"
        ));
    }
    app.query(created).await.unwrap().check().unwrap();
    for i in 1..=10 {
        app.query(format!(
            "UPDATE shipment:{i} SET at = d'2026-0{}-01T00:00:00Z'; DELETE shipment:{};",
            i % 9 + 1,
            i + 20
        ))
        .await
        .unwrap()
        .check()
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(
        "the table created while streaming",
        Duration::from_secs(60),
        || {
            let (app, target) = (app.clone(), target.clone());
            async move {
                let n = records(&app, "shipment").await.len();
                n == 20 && same_records(&app, &target, &["shipment"]).await.is_none()
            }
        },
    )
    .await;
    // Read back with SurrealQL: links traverse, types are the source's.
    let linked: Vec<SValue> = target
        .query("SELECT VALUE customer.name FROM purchase:5")
        .await
        .unwrap()
        .take(0)
        .unwrap();
    assert_eq!(linked.first().map(|v| v.to_sql()), Some("'c6'".into()));
    let kinds: Vec<SValue> = target
        .query("SELECT VALUE [type::is_datetime(joined), type::is_uuid(token), type::is_duration(session), type::is_decimal(balance)] FROM customer:2")
        .await
        .unwrap()
        .take(0)
        .unwrap();
    assert_eq!(
        kinds.first().map(|v| v.to_sql()),
        Some("[true, true, true, true]".into())
    );
    let mut r = target
        .query("INFO FOR TABLE customer; INFO FOR TABLE purchase;")
        .await
        .unwrap();
    let (c, p): (Option<SValue>, Option<SValue>) = (r.take(0).unwrap(), r.take(1).unwrap());
    let (c, p) = (c.unwrap().to_sql(), p.unwrap().to_sql());
    // Every index as the source defines it, the full-text one with its
    // analyzer.
    assert!(
        c.contains("DEFINE INDEX token ON customer FIELDS token UNIQUE")
            && c.contains("DEFINE INDEX words ON customer FIELDS name FULLTEXT ANALYZER ascii"),
        "{c}"
    );
    assert!(
        p.contains("DEFINE INDEX by_status ON purchase FIELDS status, customer"),
        "{p}"
    );
    let analyzers: Option<SValue> = target.query("INFO FOR DB").await.unwrap().take(0).unwrap();
    assert!(
        analyzers
            .unwrap()
            .to_sql()
            .contains("DEFINE ANALYZER ascii TOKENIZERS BLANK"),
        "the analyzer of the full-text index is carried"
    );
    // The fields as the source defines them, nested ones too; VALUE not
    // (the replica stores what the source computed).
    let fields = |db: switchyard::surreal::Store| async move {
        let v: Option<serde_json::Value> = db
            .query("INFO FOR TABLE customer")
            .await
            .unwrap()
            .take(0)
            .unwrap();
        v.unwrap()["fields"].as_object().unwrap().clone()
    };
    let (want, got) = (fields(app.store()).await, fields(target.store()).await);
    for (name, def) in &want {
        let carried = got.get(name).and_then(|d| d.as_str()).unwrap_or_default();
        if name == "slug" {
            assert_eq!(
                carried,
                "DEFINE FIELD slug ON customer TYPE none | string PERMISSIONS FULL"
            );
        } else {
            assert_eq!(Some(carried), def.as_str(), "field {name}");
        }
    }
    assert!(
        want.contains_key("tags.*") && want.len() == got.len(),
        "{got:?}"
    );
    assert_identical(source.clone(), sink.clone(), 100).await;
    let report = running.stop().await;
    assert!(
        report.changes_applied > 0,
        "the stream applied the writer's changes"
    );
    if let Some(d) = same_records(
        &app,
        &target,
        &["customer", "purchase", "reading", "shipment"],
    )
    .await
    {
        panic!("after stopping: {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_surrealdb_type_into_postgresql() {
    capture_logs();
    let url = "mem://".to_string();
    let app = app_store(&url).await;
    apply(
        &app,
        "DEFINE TABLE place SCHEMAFULL; DEFINE FIELD loc ON place TYPE geometry<point>; DEFINE FIELD area ON place TYPE option<geometry<polygon>>; \
         CREATE place:1 SET loc = (1.5, 2.5), area = { type: 'Polygon', coordinates: [[[0, 0], [1, 0], [1, 1], [0, 0]]] };",
    )
    .await;
    let target = PgDb::new(crate::pg_target::BUILD_MEMORY_LOG).await;
    let config = source_config(
        &url,
        &format!(
            "url = \"{}\"\npassword = \"{}\"",
            target.url("postgres", "?sslmode=disable"),
            target.cluster.password
        ),
        "",
    );
    let source = Arc::new(
        SurrealSource::from_client(app.clone(), "mem://", &config, Default::default())
            .await
            .unwrap(),
    );
    let sink: Arc<dyn switchyard::sink::Sink> = Arc::from(
        switchyard::connect::sink(&config, Default::default())
            .await
            .unwrap(),
    );
    let pipeline = switchyard::pipeline::Pipeline::new(
        config.clone(),
        source.clone(),
        sink.clone(),
        Default::default(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let handle =
        tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    wait_until("the copy", Duration::from_secs(60), || {
        let client = &target.client;
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM information_schema.tables WHERE table_name = 'purchase'",
                    &[],
                )
                .await
                .unwrap()
                .is_some()
                && client
                    .query_one("SELECT count(*) FROM purchase", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) == 60)
                    .unwrap_or(false)
        }
    })
    .await;
    app.query("UPDATE customer:7 SET visits = 700, note = NONE; DELETE purchase:3; CREATE purchase:900 SET customer = customer:2, total = 9, extra = 'new field';")
        .await
        .unwrap()
        .check()
        .unwrap();
    wait_until("the stream", Duration::from_secs(60), || {
        let client = &target.client;
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM purchase WHERE id = 900 AND extra = 'new field'",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .is_some()
        }
    })
    .await;
    let types: Vec<(String, String)> = target
        .client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_name = 'customer' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The indexes built after the load (a pooled session), like the keys,
    // with 256 MB of maintenance_work_mem (see
    // pg_target::keys_and_indexes_are_built_with_more_memory_…).
    wait_until("the indexes", Duration::from_secs(60), || {
        let client = &target.client;
        async move {
            client
                .query(
                    "SELECT 1 FROM probe.builds WHERE query ILIKE '%CREATE %INDEX%'",
                    &[],
                )
                .await
                .unwrap()
                .len()
                >= 2
        }
    })
    .await;
    let (mems, keys) = crate::pg_target::build_memory(&target).await;
    assert!(
        keys >= 2 && mems == std::collections::BTreeSet::from(["256MB".to_string()]),
        "{keys} keys, built with {mems:?}"
    );
    let types: Vec<String> = types.iter().map(|(c, t)| format!("{c} {t}")).collect();
    assert_eq!(
        types,
        [
            "id bigint",
            "active boolean",
            "avatar bytea",
            "balance numeric",
            "joined timestamp with time zone",
            "name text",
            "note text",
            "prefs jsonb",
            "score double precision",
            "session interval",
            "slug text",
            "tags jsonb",
            "token uuid",
            "visits bigint"
        ]
    );
    let row = target
        .client
        .query_one(
            "SELECT name, joined::text, balance::text, score, visits, active, token::text, session::text, avatar, prefs::text, tags::text, note \
             FROM customer WHERE id = 7",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "c7");
    assert_eq!(row.get::<_, String>(1), "2024-01-08 10:00:00.123456+00");
    assert_eq!(
        row.get::<_, String>(2),
        "7.5",
        "SurrealDB keeps 7.50dec as 7.5"
    );
    assert_eq!(row.get::<_, f64>(3), 7.25);
    assert_eq!(row.get::<_, i64>(4), 700);
    assert!(!row.get::<_, bool>(5));
    assert_eq!(
        row.get::<_, String>(6),
        "0190a5e4-3b1c-7e2a-9f00-000000000007"
    );
    assert_eq!(row.get::<_, String>(7), "07:30:15");
    assert_eq!(row.get::<_, Option<Vec<u8>>>(8), Some(b"x7".to_vec()));
    assert_eq!(row.get::<_, String>(9), r#"{"size": 7, "theme": "dark"}"#);
    assert_eq!(row.get::<_, String>(10), r#"["a7", "b"]"#);
    assert_eq!(row.get::<_, Option<String>>(11), None, "NONE is NULL");
    let indexes: Vec<String> = target
        .client
        .query("SELECT indexdef FROM pg_indexes WHERE tablename IN ('customer', 'purchase') AND indexname NOT LIKE '%pkey' ORDER BY indexname", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(indexes.len(), 2, "{indexes:?}");
    assert!(
        indexes[0].starts_with(
            "CREATE UNIQUE INDEX customer_token ON public.customer USING btree (token)"
        ),
        "{indexes:?}"
    );
    assert!(
        indexes[1].contains("purchase_by_status") && indexes[1].contains("(status, customer)"),
        "{indexes:?}"
    );
    let gone = target
        .client
        .query_opt("SELECT 1 FROM purchase WHERE id = 3", &[])
        .await
        .unwrap();
    assert!(gone.is_none(), "the delete arrived");
    let place = target
        .client
        .query_one(
            "SELECT loc->>'type', (loc->'coordinates'->>0)::float8, (loc->'coordinates'->>1)::float8, area->>'type', jsonb_typeof(area->'coordinates') FROM place WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            place.get::<_, String>(0),
            place.get::<_, f64>(1),
            place.get::<_, f64>(2),
            place.get::<_, String>(3),
            place.get::<_, String>(4)
        ),
        ("Point".into(), 1.5, 2.5, "Polygon".into(), "array".into()),
        "geometry arrives as GeoJSON"
    );
    let link: String = target
        .client
        .query_one("SELECT customer::text FROM purchase WHERE id = 900", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        link, "2",
        "a record<customer> link is the linked record's key"
    );
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_past_the_retention_stop_the_resume_with_copy_again() {
    capture_logs();
    let app = app_store("mem://").await;
    let text = "[source]\nurl = \"mem://\"\nnamespace = \"app\"\ndatabase = \"main\"\npoll_interval_ms = 50\nchangefeed_window_ms = 100\nchangefeed_retention = \"1s\"\n\n[target]\nurl = \"mem://\"\nnamespace = \"t\"\ndatabase = \"t\"\n\n[pipeline]\nbatch_delay_ms = 10\nretry_attempts = 2\nretry_max_delay_ms = 200\n";
    let short = Arc::new(Config::parse(text).unwrap());
    let source = Arc::new(
        SurrealSource::from_client(app.clone(), "mem://", &short, Default::default())
            .await
            .unwrap(),
    );
    let running = run_pipeline(short.clone(), source.clone(), None).await;
    // The sink's own session: a clone made before it selects its
    // namespace would have none.
    let sink = running.sink.clone();
    wait_until("the copy", Duration::from_secs(30), || {
        let sink = sink.clone();
        async move { records(sink.client(), "purchase").await.len() == 60 }
    })
    .await;
    // A change the stream brings.
    apply(&app, "UPDATE customer:1 SET visits = 11;").await;
    wait_until("the first change", Duration::from_secs(30), || {
        let sink = sink.clone();
        async move {
            let v: Option<Vec<SValue>> = match sink
                .client()
                .query("SELECT VALUE visits FROM customer:1")
                .await
            {
                Ok(mut r) => r.take(0).ok(),
                Err(_) => None,
            };
            v.and_then(|v| v.first().map(|v| v.to_sql())) == Some("11".into())
        }
    })
    .await;
    let target = sink.client().clone();
    running.stop().await;
    // Stopped: changes are made and removed from the changefeed by its
    // retention before the daemon comes back.
    app.query("UPDATE customer:1 SET visits = 12;")
        .await
        .unwrap()
        .check()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let again = run_pipeline(short.clone(), source.clone(), Some(sink.clone())).await;
    let e = again.error_within(Duration::from_secs(30)).await;
    assert_names(&e, &["retention", "copied again", "empty target"]);
    let v: Vec<SValue> = target
        .query("SELECT VALUE visits FROM customer:1")
        .await
        .unwrap()
        .take(0)
        .unwrap();
    assert_eq!(
        v.first().map(|v| v.to_sql()),
        Some("11".into()),
        "nothing applied past the gap"
    );
}

/// M3 with the application stopped: the store copied by the CLI into a
/// new embedded store, verified; while the application holds the store,
/// the run says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_copy_of_a_stopped_application_from_the_cli() {
    let scratch = Scratch::new();
    let dir = scratch.path("app");
    let url = format!("surrealkv://{}", dir.display());
    let app = app_store(&url).await;
    let target_url = format!("surrealkv://{}", scratch.path("replica").display());
    let config = scratch.path("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{url}\"\nnamespace = \"app\"\ndatabase = \"main\"\n\n[target]\nurl = \"{target_url}\"\nnamespace = \"app\"\ndatabase = \"main\"\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, _, err) = run_cli(&["snapshot", "--config", config]);
    assert_ne!(code, 0, "the application holds the store");
    assert_names(
        &err,
        &[
            "another process holds it",
            "stop the application",
            "inside the application",
        ],
    );
    drop(app);
    wait_unlocked(&dir).await;
    let (code, out, err) = run_cli(&["check", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(
        &out,
        &[
            "customer",
            "purchase",
            "record<customer>",
            "\"words\"",
            "VALUE not carried",
            "FULLTEXT ANALYZER ascii",
        ],
    );
    let (code, out, err) = run_cli(&["snapshot", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_cli(&["verify", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(&out, &["identical"]);
    // Read back with SurrealQL, with the source closed.
    let source = surrealdb::engine::any::connect(url.as_str()).await.unwrap();
    source.use_ns("app").use_db("main").await.unwrap();
    let target = surrealdb::engine::any::connect(target_url.as_str())
        .await
        .unwrap();
    target.use_ns("app").use_db("main").await.unwrap();
    assert!(
        same_records(&source, &target, &["customer", "purchase", "reading"])
            .await
            .is_none()
    );
    assert_eq!(records(&target, "purchase").await.len(), 60);
}

/// A signed-in connection to the test server, in `ns`/`db`.
async fn server_client(server: &SurrealServer, ns: &str, db: &str) -> Surreal<Any> {
    let c = surrealdb::engine::any::connect(server.url.as_str())
        .await
        .unwrap();
    c.signin(surrealdb::opt::auth::Root {
        username: "root".into(),
        password: PASSWORD.into(),
    })
    .await
    .unwrap();
    c.query(format!(
        "DEFINE NAMESPACE IF NOT EXISTS {ns}; USE NS {ns}; DEFINE DATABASE IF NOT EXISTS {db};"
    ))
    .await
    .unwrap()
    .check()
    .unwrap();
    c.use_ns(ns).use_db(db).await.unwrap();
    c
}

/// Two tenants of one server, each into its own namespace of the target,
/// by the daemon: killed with SIGKILL in the copy and in the stream, it
/// converges; neither tenant sees the other's records; status and verify
/// answer per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_each_into_its_own_namespace_through_sigkills() {
    let scratch = Scratch::new();
    let server = SurrealServer::start(scratch.path("server.log")).await;
    let acme = server_client(&server, "acme", "main").await;
    let globex = server_client(&server, "globex", "main").await;
    acme.query("DEFINE TABLE customer SCHEMAFULL; DEFINE FIELD name ON customer TYPE string; DEFINE FIELD n ON customer TYPE int; \
                FOR $i IN 1..=20000 { CREATE type::record('customer', $i) SET name = 'acme ' + <string> $i, n = $i; };")
        .await
        .unwrap()
        .check()
        .unwrap();
    globex
        .query("DEFINE TABLE customer SCHEMAFULL; DEFINE FIELD name ON customer TYPE string; DEFINE FIELD n ON customer TYPE int; \
                FOR $i IN 1..=5 { CREATE type::record('customer', $i) SET name = 'globex ' + <string> $i, n = $i; }; CREATE supplier:1 SET name = 'only globex';")
        .await
        .unwrap()
        .check()
        .unwrap();
    let config = scratch.path("switchyard.toml");
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{url}\"\nusername = \"root\"\npassword = \"{PASSWORD}\"\npoll_interval_ms = 50\nchangefeed_window_ms = 300\n\n\
             [target]\nurl = \"{url}\"\nusername = \"root\"\npassword = \"{PASSWORD}\"\n\n[http]\naddress = \"{http}\"\n\n\
             [[tenants]]\nsource = \"acme/main\"\ntarget = \"r_acme/main\"\n\n[[tenants]]\nsource = \"globex/main\"\ntarget = \"r_globex/main\"\n",
            url = server.url
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let r_acme = server_client(&server, "r_acme", "main").await;
    let r_globex = server_client(&server, "r_globex", "main").await;
    let args = ["run", "--config", config.as_str()];
    // Killed in the copy of 20,000 records.
    let daemon = Daemon::start(&args, scratch.path("daemon.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.kill();
    let writer = {
        let (acme, globex) = (acme.clone(), globex.clone());
        tokio::spawn(async move {
            for i in 0..150i64 {
                apply(&acme, &format!("BEGIN; UPDATE customer:{} SET n = n + 1000; CREATE customer:{} SET name = 'new', n = 0; DELETE customer:{}; COMMIT;", i * 7 + 1, 30_000 + i, 19_000 + i)).await;
                apply(
                    &globex,
                    &format!("UPDATE customer:{} SET n += 1;", i % 5 + 1),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let daemon = Daemon::start(&args, scratch.path("daemon.log"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Killed in the stream.
    daemon.kill();
    let daemon = Daemon::start(&args, scratch.path("daemon.log"));
    writer.await.unwrap();
    for (src, dst, name) in [(&acme, &r_acme, "acme"), (&globex, &r_globex, "globex")] {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while let Some(d) = same_records(src, dst, &["customer"]).await {
            if std::time::Instant::now() > deadline {
                let log = daemon.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!("tenant {name} did not converge: {d}\n{}", tail.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(records(&r_globex, "supplier").await.len(), 1);
    let leaked: Vec<SValue> = r_acme.query("INFO FOR DB").await.unwrap().take(0).unwrap();
    assert!(
        !leaked[0].to_sql().contains("supplier"),
        "acme's target has no globex table: {}",
        leaked[0].to_sql()
    );
    let (code, out, err) = run_cli(&["status", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(
        &out,
        &[
            "tenant acme/main → r_acme/main",
            "tenant globex/main → r_globex/main",
        ],
    );
    // One HTTP endpoint for both tenants.
    use crate::observe::http_get;
    let (code, body) = http_get(&http, "/status", None).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(v["tenants"]["acme/main"]["tenant"], "acme/main", "{body}");
    assert_eq!(v["tenants"]["globex/main"]["phase"], "streaming", "{body}");
    let (code, body) = http_get(&http, "/status?tenant=globex%2Fmain", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["tenant"],
        "globex/main"
    );
    assert_eq!(
        http_get(&http, "/status?tenant=nobody%2Fmain", None)
            .await
            .0,
        404
    );
    let (_, metrics) = http_get(&http, "/metrics", None).await;
    assert_names(
        &metrics,
        &[
            "switchyard_lag_seconds{tenant=\"acme/main\"}",
            "switchyard_lag_seconds{tenant=\"globex/main\"}",
        ],
    );
    wait_until("both tenants ready", Duration::from_secs(30), || async {
        http_get(&http, "/readyz", None).await.0 == 200
    })
    .await;
    let (code, body) = http_get(&http, "/readyz?cutover", None).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "no-go: cutover is not available with [[tenants]]\n")
    );
    assert!(daemon.interrupt().await.success());
    let (code, out, err) = run_cli(&["verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(
        &out,
        &["tenant acme/main", "tenant globex/main", "identical"],
    );
    // Nothing doubled or lost: the counts are the source's.
    assert_eq!(records(&r_acme, "customer").await.len(), 20_000);
}

/// The documented live sync (examples/surreal_live_sync.rs), built with the
/// tests, run as an application would: it syncs its own store into the
/// server while writing, and says so once verify agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_sync_example_runs_inside_the_application() {
    let scratch = Scratch::new();
    let server = SurrealServer::start(scratch.path("server.log")).await;
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/surreal_live_sync");
    assert!(
        exe.exists(),
        "{} is missing: examples are built with the tests (`bash scripts/test`)",
        exe.display()
    );
    let store = format!("surrealkv://{}", scratch.path("app").display());
    let out = std::process::Command::new(&exe)
        .args([store.as_str(), server.url.as_str(), "root", PASSWORD])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_names(&stdout, &["identical", "in sync"]);
    let target = server_client(&server, "app", "main").await;
    let notes = records(&target, "note").await;
    assert_eq!(notes.len(), 100, "100 first notes, 50 new, 50 deleted");
    let edited: Vec<SValue> = target
        .query("SELECT VALUE body FROM note:1")
        .await
        .unwrap()
        .take(0)
        .unwrap();
    assert_eq!(
        edited.first().map(|v| v.to_sql()),
        Some("'note 1 (edited)'".into())
    );
}

/// An application whose handle is the local engine's (`Surreal<Db>`, not
/// `Surreal<Any>`) is a source too: its records arrive as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_engine_handle_is_a_source_too() {
    let app = mem_app().await;
    let mut seed = String::from(SCHEMA);
    for i in 1..=12 {
        seed.push_str(&customer(i));
        seed.push_str(&purchase(i));
    }
    app.query(seed).await.unwrap().check().unwrap();
    let (config, source) = mem_source(&app, "").await;
    let source = Arc::new(source);
    let sink = Arc::new(
        SurrealSink::connect("mem://", false, &config)
            .await
            .unwrap(),
    );
    let report = switchyard::pipeline::Pipeline::new(
        config.clone(),
        source,
        sink.clone(),
        Default::default(),
    )
    .run(
        switchyard::pipeline::Mode::SnapshotOnly,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let copied: u64 = report.tables.iter().map(|t| t.rows).sum();
    assert_eq!(copied, 24 + 2, "12 customers, 12 purchases, 2 readings");
    assert_eq!(
        same_records(&app, sink.client(), &["customer", "purchase", "reading"]).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemaless_fields_are_found_past_the_first_page_of_records() {
    let app = mem_app().await;
    let mut seed = String::from("DEFINE TABLE bulk SCHEMALESS;");
    for i in 1..=2500 {
        seed.push_str(&format!("CREATE bulk:{i} SET n = {i};"));
    }
    // Only in a record of the third page of 1,000.
    seed.push_str("UPDATE bulk:2400 SET late = d'2026-01-01T00:00:00Z';");
    app.query(seed).await.unwrap().check().unwrap();
    let (_, source) = mem_source(&app, "").await;
    let found = source.discover().await.unwrap();
    let bulk = found.tables.iter().find(|t| t.name == "bulk").unwrap();
    let names: Vec<&str> = bulk.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "late", "n"]);
}

/// `tables.keys` on a SurrealDB source (what the way back of a cutover
/// sets): the key comes from the fields, `source_id` is the column `id`, a
/// key kept in a one-element array record id (a decimal) is read back, and
/// a record whose id is not its key is named, never carried half-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_fields_name_the_row_and_a_record_id_that_is_not_its_key_is_refused() {
    let app = mem_app().await;
    app.query(
        "DEFINE TABLE item SCHEMAFULL; DEFINE FIELD sku ON item TYPE string; DEFINE FIELD source_id ON item TYPE int;
         DEFINE TABLE price SCHEMAFULL; DEFINE FIELD amount ON price TYPE decimal; DEFINE FIELD label ON price TYPE string;
         CREATE item:⟨a-1⟩ SET sku = 'a-1', source_id = 1;
         CREATE item:⟨x⟩ SET sku = 'b-2', source_id = 2;
         CREATE price:[1.50dec] SET amount = 1.50dec, label = 'cheap';",
    )
    .await
    .unwrap()
    .check()
    .unwrap();
    let (_, source) = mem_source(
        &app,
        "[tables.keys]\nitem = [\"sku\"]\nprice = [\"amount\"]\n",
    )
    .await;
    let found = source.discover().await.unwrap();
    let item = found.tables.iter().find(|t| t.name == "item").unwrap();
    let names: Vec<&str> = item.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["sku", "id"],
        "source_id is the column id; no record id column"
    );
    assert_eq!(item.key_names(), ["sku"]);
    let item = Arc::new(item.clone());
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let err = source.snapshot(item, 100, tx).await.unwrap_err().report();
    assert_names(
        &err,
        &[
            "item:x",
            "the record id is not its key (sku = \"b-2\")",
            "item:`b-2`",
        ],
    );
    let first = rx.recv().await;
    assert!(first.is_none(), "nothing of the table was sent: {first:?}");
    let price = Arc::new(
        found
            .tables
            .iter()
            .find(|t| t.name == "price")
            .unwrap()
            .clone(),
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    source.snapshot(price, 100, tx).await.unwrap();
    let rows = rx.recv().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0][0].to_string(),
        "1.5",
        "SurrealDB keeps 1.50dec as 1.5"
    );
}

/// An application's in-memory store (the local engine's handle), with
/// namespace `app` and database `main` in use.
async fn mem_app() -> Surreal<surrealdb::engine::local::Db> {
    let app = Surreal::new::<surrealdb::engine::local::Mem>(())
        .await
        .unwrap();
    app.query("DEFINE NAMESPACE app; USE NS app; DEFINE DATABASE main;")
        .await
        .unwrap()
        .check()
        .unwrap();
    app.use_ns("app").use_db("main").await.unwrap();
    app
}

/// The source of `app` (an in-memory store, [`mem_app`]) with `extra`
/// config, replicating into `mem://` namespace `copy`, and its config.
async fn mem_source(
    app: &Surreal<surrealdb::engine::local::Db>,
    extra: &str,
) -> (Arc<Config>, SurrealSource) {
    let config = source_config(
        "mem://",
        "url = \"mem://\"\nnamespace = \"copy\"\ndatabase = \"main\"",
        extra,
    );
    let source = SurrealSource::from_client(app.clone(), "mem://", &config, Default::default())
        .await
        .unwrap();
    (config, source)
}

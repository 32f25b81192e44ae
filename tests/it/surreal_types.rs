//! PostgreSQL types into SurrealDB as a SurrealDB user would define them
//! (issue 15): uuids, dates, intervals, enums and listed CHECK values,
//! arrays; the values read back with SurrealQL, in the snapshot and in the
//! stream, embedded and on the real server.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard::reject::Rejects;
use switchyard::sink::surreal::SurrealSink;

use crate::pg_surreal::{start, wait_converged, PgDb};
use crate::support::*;

const TYPED: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed (
    id uuid PRIMARY KEY,
    d date, ts timestamp, tstz timestamptz,
    span interval, months interval, back interval,
    tm time, tz timetz, m mood,
    status varchar(10) NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'active', 'closed')),
    tags text[], grid int[], ip inet, r int4range, p point, doc jsonb, n numeric(6, 2),
    email text UNIQUE, created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX typed_by_status ON typed (status, d DESC);
CREATE INDEX typed_lower_email ON typed (lower(email));
INSERT INTO typed VALUES
  ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '1999-12-31 23:59:59.5', '2000-01-01 00:00:00+02',
   '3 days 04:05:06.5', '1 mon 2 days', '-1 day', '23:59:59.999999', '12:00:00+05:30', 'happy', 'active',
   '{a,NULL}', '{{1,2},{3,4}}', '192.168.0.1/24', '[1,10)', '(1.5,2)', '{"a": [1, {"b": null}]}', 12.50, 'a@example.com'),
  ('00000000-0000-0000-0000-000000000001', '0044-03-15 BC', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'draft',
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"#;

/// Every field of the fully set row, as SurrealQL reads it.
const READ_FULL_ROW: &str = "SELECT VALUE [<string> record::id(id), type::is_uuid(record::id(id)), \
     <string> d, type::is_datetime(d), <string> ts, <string> tstz, <string> span, type::is_duration(span), \
     months, back, tm, tz, m, status, tags, grid, ip, r, p, doc, type::is_decimal(n), <string> n] \
     FROM typed WHERE status = 'active'";

async fn query(sink: &SurrealSink, q: &str) -> Vec<serde_json::Value> {
    let mut r = sink.client().query(q).await.unwrap();
    r.take(0).unwrap_or_else(|e| panic!("{q}: {e}"))
}

async fn types_arrive_as_surrealdb_types(target: &str, password: Option<&str>) {
    let db = PgDb::new(TYPED).await;
    // No unmapped_as_text: every built-in type has its mapping.
    let mut text = db
        .config_text(target, "")
        .replace("unmapped_as_text = true\n", "");
    if let Some(p) = password {
        text = text.replace(
            "database = \"test\"\n",
            &format!("database = \"test\"\nusername = \"root\"\npassword = \"{p}\"\n"),
        );
    }
    let config = Arc::new(switchyard::config::Config::parse(&text).unwrap());
    let sink = Arc::new(
        SurrealSink::connect(target, password.is_some(), &config)
            .await
            .unwrap(),
    );
    let run = start(config.clone(), Some(sink)).await;
    wait_converged(&config, &run.sink).await;

    let full = json!([
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        true,
        "2024-02-29T00:00:00Z",
        true,
        "1999-12-31T23:59:59.500Z",
        "1999-12-31T22:00:00Z",
        "3d4h5m6s500ms",
        true,
        "P1M2D",
        "P-1D",
        "23:59:59.999999",
        "12:00:00+05:30",
        "happy",
        "active",
        ["a", null],
        [[1, 2], [3, 4]],
        "192.168.0.1/24",
        "[1,10)",
        "(1.5,2)",
        {"a": [1, {"b": null}]},
        true,
        "12.50"
    ]);
    assert_eq!(query(&run.sink, READ_FULL_ROW).await, vec![full]);
    // A BC date, and NULLs left out.
    assert_eq!(
        query(
            &run.sink,
            "SELECT VALUE [<string> d, ts, span, tags] FROM typed WHERE status = 'draft'"
        )
        .await,
        vec![json!(["-0043-03-15T00:00:00Z", null, null, null])]
    );
    // The fields a SurrealDB user would define.
    let info = query(&run.sink, "INFO FOR TABLE typed").await;
    let fields = &info[0]["fields"];
    let def = |f: &str| fields[f].as_str().unwrap_or_default().to_string();
    assert!(def("d").contains("TYPE none | datetime"), "{fields}");
    assert!(
        def("span").contains("TYPE none | duration | string"),
        "{fields}"
    );
    assert!(def("tags").contains("TYPE none | array"), "{fields}");
    assert!(
        def("status").contains("TYPE string")
            && def("status").contains("['draft', 'active', 'closed']"),
        "{fields}"
    );
    assert!(def("m").contains("['sad', 'ok', 'happy']"), "{fields}");
    // Defaults a SurrealDB application writing into the table gets.
    assert!(def("status").contains("DEFAULT 'draft'"), "{fields}");
    assert!(
        def("created").contains("TYPE datetime DEFAULT time::now()"),
        "{fields}"
    );
    assert_eq!(
        query(
            &run.sink,
            "CREATE typed:u'12345678-1234-1234-1234-123456789abc' SET d = d'2020-01-01' RETURN VALUE [status, type::is_datetime(created)]; \
             DELETE typed:u'12345678-1234-1234-1234-123456789abc';"
        )
        .await,
        vec![json!(["draft", true])]
    );
    // The indexes, built after the load (which the rows can show before:
    // waited for); an expression index is not.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = query(&run.sink, "INFO FOR TABLE typed").await;
        let built = info[0]["indexes"].as_object().is_some_and(|m| m.len() >= 2);
        if built || std::time::Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let indexes = &info[0]["indexes"];
    assert!(
        indexes["typed_email_key"]
            .as_str()
            .is_some_and(|d| d.contains("FIELDS email UNIQUE")),
        "{indexes}"
    );
    assert!(
        indexes["typed_by_status"]
            .as_str()
            .is_some_and(|d| d.contains("FIELDS status, d")),
        "{indexes}"
    );
    assert!(indexes.get("typed_lower_email").is_none(), "{indexes}");
    // The ASSERTs hold in the target.
    let refused = run
        .sink
        .client()
        .query("CREATE typed SET status = 'bogus'")
        .await
        .unwrap()
        .check();
    assert!(refused.is_err(), "a status outside the list was stored");
    // So does the unique index.
    let refused = run
        .sink
        .client()
        .query("CREATE typed SET status = 'draft', email = 'a@example.com'")
        .await
        .unwrap()
        .check();
    assert!(refused.is_err(), "a second a@example.com was stored");

    // The stream: a new row, a key change, a duration that changes.
    db.exec(
        "INSERT INTO typed (id, d, span, status) VALUES ('ffffffff-ffff-ffff-ffff-ffffffffffff', '2000-01-01', '1 day', 'closed');
         UPDATE typed SET id = '00000000-0000-0000-0000-000000000002' WHERE id = '00000000-0000-0000-0000-000000000001';
         UPDATE typed SET span = '00:00:01', months = '1 year' WHERE status = 'active';",
    )
    .await;
    wait_converged(&config, &run.sink).await;
    assert_eq!(
        query(
            &run.sink,
            "SELECT VALUE [<string> record::id(id), type::is_uuid(record::id(id)), <string> span, months] FROM typed WHERE span != NONE ORDER BY id"
        )
        .await,
        vec![
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", true, "1s", "P1Y"]),
            json!(["ffffffff-ffff-ffff-ffff-ffffffffffff", true, "1d", null]),
        ]
    );
    assert_eq!(
        query(
            &run.sink,
            "SELECT VALUE <string> record::id(id) FROM typed WHERE status = 'draft'"
        )
        .await,
        vec![json!("00000000-0000-0000-0000-000000000002")]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_types_arrive_as_surrealdb_types_embedded() {
    types_arrive_as_surrealdb_types("mem://", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_types_arrive_as_surrealdb_types_on_the_server() {
    let s = Scratch::new();
    let server = crate::surreal_remote::SurrealServer::start(s.path("surreal.log")).await;
    types_arrive_as_surrealdb_types(&server.url, Some(crate::surreal_remote::PASSWORD)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_dates_are_refused_by_name_or_set_aside() {
    let schema = "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz, d date);
         INSERT INTO ev VALUES (1, 'infinity', '2024-01-01'), (2, '2024-01-01', '-infinity'), (3, '2024-01-01', '2024-01-01');";
    // Without a reject directory: the run stops naming table, key, column
    // and value, and what to do.
    let db = PgDb::new(schema).await;
    let config = db.config("mem://", "");
    let run = start(config.clone(), None).await;
    let err = run.error_within(Duration::from_secs(60)).await;
    assert!(
        err.contains("table \"ev\", key (id = 1), column \"at\"")
            && err.contains("infinity has no SurrealDB datetime")
            && err.contains("reject_dir"),
        "{err}"
    );

    // With one: those rows are set aside, in the snapshot and the stream.
    let db = PgDb::new(schema).await;
    let s = Scratch::new();
    let dir = s.path("rejects");
    let config = db.config("mem://", &format!("reject_dir = \"{}\"\n", dir.display()));
    let sink = Arc::new(
        SurrealSink::connect("mem://", false, &config)
            .await
            .unwrap()
            .with_rejects(Arc::new(Rejects::new(Some(dir.clone())))),
    );
    let run = start(config.clone(), Some(sink)).await;
    // Empty until the pipeline defined the namespace and the table.
    let ids = |sink: Arc<SurrealSink>| async move {
        match sink
            .client()
            .query("SELECT VALUE record::id(id) FROM ev ORDER BY id")
            .await
        {
            Ok(mut r) => r.take::<Vec<serde_json::Value>>(0).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    };
    wait_until("the copy of ev", Duration::from_secs(60), || {
        let sink = run.sink.clone();
        async move { ids(sink).await == vec![json!(3)] }
    })
    .await;
    db.exec(
        "INSERT INTO ev VALUES (4, '-infinity', NULL), (5, '2025-01-01', NULL);
         UPDATE ev SET at = 'infinity' WHERE id = 3;",
    )
    .await;
    wait_until("the stream of ev", Duration::from_secs(60), || {
        let sink = run.sink.clone();
        async move { ids(sink).await == vec![json!(5)] }
    })
    .await;
    run.stop().await;
    let lines = reject_lines(&dir.join("ev.jsonl"));
    let seen: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap().to_string(),
                l["column"].as_str().unwrap().to_string(),
                l["phase"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = |k: &str, c: &str, p: &str| (k.to_string(), c.to_string(), p.to_string());
    assert_eq!(
        seen,
        vec![
            want("(id = 1)", "at", "snapshot"),
            want("(id = 2)", "d", "snapshot"),
            want("(id = 4)", "at", "stream"),
            want("(id = 3)", "at", "stream"),
        ],
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_defined_type_needs_unmapped_as_text() {
    let db = PgDb::new(
        "CREATE TYPE pair AS (a int, b int);
         CREATE TABLE t (id int PRIMARY KEY, p pair, u uuid);
         CREATE UNIQUE INDEX t_u ON t (u);",
    )
    .await;
    let (code, out, err) = db.check(false);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("error  table \"t\", column \"p\": type pair has no mapping")
            && !out.contains("column \"u\": type uuid")
            && out.contains("u: option<uuid>")
            && out.contains("DEFINE INDEX IF NOT EXISTS `t_u` ON TABLE `t` FIELDS `u` UNIQUE;"),
        "{out}"
    );
    let (code, out, err) = db.check(true);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("column \"p\": type pair is carried as its PostgreSQL text form"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_become_record_links_when_asked() {
    let db = PgDb::new(
        "CREATE TABLE customer (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE \"order\" (id uuid PRIMARY KEY, customer_id int REFERENCES customer, note text);
         INSERT INTO customer VALUES (1, 'Ada'), (2, 'Bob');
         INSERT INTO \"order\" VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 1, 'first'),
                                    ('00000000-0000-0000-0000-000000000001', NULL, 'none');",
    )
    .await;
    let text = db.config_text("mem://", "").replace(
        "database = \"test\"\n",
        "database = \"test\"\nlinks = true\n",
    );
    let config = Arc::new(switchyard::config::Config::parse(&text).unwrap());
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    let info = query(&run.sink, "INFO FOR TABLE `order`").await;
    assert!(
        info[0]["fields"]["customer_id"]
            .as_str()
            .is_some_and(|d| d.contains("TYPE none | record<customer>")),
        "{info:?}"
    );
    let names = |sink: Arc<SurrealSink>| async move {
        query(
            &sink,
            "SELECT VALUE [note, customer_id.name] FROM `order` ORDER BY note",
        )
        .await
    };
    assert_eq!(
        names(run.sink.clone()).await,
        vec![json!(["first", "Ada"]), json!(["none", null])]
    );
    db.exec(
        "INSERT INTO \"order\" VALUES ('ffffffff-ffff-ffff-ffff-ffffffffffff', 2, 'second');
         UPDATE customer SET name = 'Ada L.' WHERE id = 1;",
    )
    .await;
    wait_converged(&config, &run.sink).await;
    assert_eq!(
        names(run.sink.clone()).await,
        vec![
            json!(["first", "Ada L."]),
            json!(["none", null]),
            json!(["second", "Bob"])
        ]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_date_and_uuid_columns_arrive_as_datetime_and_uuid() {
    let s = Scratch::new();
    let pool = s
        .source(
            "CREATE TABLE visit (id UUID PRIMARY KEY, day DATE NOT NULL DEFAULT (date('now')), guest GUID);
             INSERT INTO visit VALUES ('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2024-02-29', x'00112233445566778899aabbccddeeff');",
        )
        .await;
    let config = s.config("mem://", "");
    let run = crate::sqlite_surreal::start(config.clone(), None).await;
    crate::sqlite_surreal::wait_converged(&pool, &config, &run.sink).await;
    sqlx::query("INSERT INTO visit (id, guest) VALUES ('ffffffffffffffffffffffffffffffff', NULL)")
        .execute(&pool)
        .await
        .unwrap();
    crate::sqlite_surreal::wait_converged(&pool, &config, &run.sink).await;
    let rows = query(
        &run.sink,
        "SELECT VALUE [<string> record::id(id), type::is_uuid(record::id(id)), type::is_datetime(day), <string> guest] \
         FROM visit WHERE day = d'2024-02-29T00:00:00Z'",
    )
    .await;
    assert_eq!(
        rows,
        vec![json!([
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            true,
            true,
            "00112233-4455-6677-8899-aabbccddeeff"
        ])]
    );
    let today = chrono::Utc::now().date_naive().to_string();
    let rows = query(
        &run.sink,
        "SELECT VALUE [<string> record::id(id), <string> day] FROM visit WHERE guest = NONE",
    )
    .await;
    assert_eq!(
        rows,
        vec![json!([
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            format!("{today}T00:00:00Z")
        ])]
    );
    // A value that is no date stops the run by name.
    sqlx::query(
        "INSERT INTO visit (id, day) VALUES ('00000000-0000-0000-0000-000000000001', 'soon')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = run.error_within(Duration::from_secs(60)).await;
    assert!(
        err.contains("column \"day\"")
            && err.contains("\"soon\"")
            && err.contains("expected a date"),
        "{err}"
    );
}

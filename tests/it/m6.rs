//! M6 as SQLite applications are really written: type rules the user
//! steers (`[tables.types]`), types read from CHECKs and defaults, CHECKs
//! carried, id defaults kept, FTS tables left out or built as `tsvector`
//! columns; into PostgreSQL and into SurrealDB, snapshot then stream.

use std::collections::BTreeSet;
use std::time::Duration;

use surrealdb::types::Value as SValue;

use crate::pg_surreal::PgDb;
use crate::pg_target::{rows, target_config, target_config_text};
use crate::support::*;

/// The issue's table as applications write it, an FTS5 index over it with
/// external content, a STRICT table and a WITHOUT ROWID table.
const APP: &str = r#"
CREATE TABLE missions(id TEXT PRIMARY KEY DEFAULT (lower(hex(randomblob(16)))),
  title TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'draft' CHECK (status IN ('draft','active','paused','completed','archived','failed')),
  active INTEGER NOT NULL DEFAULT 1, meta TEXT,
  created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE VIRTUAL TABLE missions_fts USING fts5(title, content='missions');
CREATE TRIGGER missions_ai AFTER INSERT ON missions BEGIN
  INSERT INTO missions_fts(rowid, title) VALUES (new.rowid, new.title);
END;
CREATE TABLE crew(id INTEGER PRIMARY KEY, name TEXT NOT NULL, rank INT CHECK (rank BETWEEN 1 AND 10),
  on_duty INTEGER NOT NULL DEFAULT 0 CHECK (on_duty IN (0, 1)), notes TEXT CHECK (json_valid(notes))) STRICT;
CREATE TABLE tags(name TEXT PRIMARY KEY, uses INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0)) WITHOUT ROWID;
INSERT INTO missions (id, title, status, active, meta, created_at) VALUES
  ('a1', 'rocket launch', 'active', 1, '{"stage": 2}', '2024-05-01 12:30:00'),
  ('b2', 'moon survey', 'draft', 0, NULL, '2024-05-02T08:00:00Z');
INSERT INTO missions (title) VALUES ('deep sea probe');
INSERT INTO crew (name, rank, on_duty, notes) VALUES ('ada', 3, 1, '{"shift": "night"}'), ('bob', NULL, 0, NULL);
INSERT INTO tags VALUES ('space', 2);
"#;

const RULES: &str = "\n[tables]\ntext_search = true\n\n[tables.types]\n\"missions.meta\" = \"jsonb\"\n\"missions.active\" = \"boolean\"\n";

async fn types_of(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn default_of(client: &tokio_postgres::Client, table: &str, column: &str) -> Option<String> {
    client
        .query_one(
            "SELECT column_default::text FROM information_schema.columns WHERE table_name = $1 AND column_name = $2",
            &[&table, &column],
        )
        .await
        .unwrap()
        .get(0)
}

/// The SQLSTATE of running `sql` on the target, or "ok".
async fn outcome(client: &tokio_postgres::Client, sql: &str) -> String {
    match client.batch_execute(sql).await {
        Ok(()) => "ok".into(),
        Err(e) => e
            .as_db_error()
            .map(|d| d.code().code().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m6_applications_tables_into_postgres_with_rules_checks_defaults_and_text_search() {
    let s = Scratch::new();
    let pool = s.source(APP).await;
    let target = PgDb::new("").await;
    let config = target_config(&s.config_text("mem://", RULES), &target);
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let handle =
        tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    let client = &target.client;
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(client, "missions").await.len() == 3 && rows(client, "tags").await.len() == 1
    })
    .await;

    // Types: the casts, the CHECK-read booleans and JSON, the timestamp its
    // default shows; the FTS table's tsvector column on its content table.
    assert_eq!(
        types_of(client, "missions").await,
        vec![
            "id text",
            "title text",
            "status text",
            "active boolean",
            "meta jsonb",
            "created_at timestamp with time zone",
            "missions_fts tsvector"
        ]
    );
    assert_eq!(
        types_of(client, "crew").await,
        vec![
            "id bigint",
            "name text",
            "rank bigint",
            "on_duty boolean",
            "notes jsonb"
        ]
    );
    // Defaults: the id's shape, now(), the constants; the rowid alias an identity.
    let id_default = default_of(client, "missions", "id").await.unwrap();
    assert!(id_default.contains("gen_random_uuid()"), "{id_default}");
    assert_eq!(
        default_of(client, "missions", "created_at")
            .await
            .as_deref(),
        Some("now()")
    );
    assert_eq!(
        default_of(client, "missions", "active").await.as_deref(),
        Some("true")
    );
    assert_eq!(
        default_of(client, "crew", "on_duty").await.as_deref(),
        Some("false")
    );
    let identity: String = client
        .query_one("SELECT is_identity::text FROM information_schema.columns WHERE table_name = 'crew' AND column_name = 'id'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "YES");
    // Values: SQLite's timestamp texts as one timestamp type, booleans, JSON.
    let got: BTreeSet<String> = client
        .query("SELECT id || ' ' || status || ' ' || active || ' ' || coalesce(meta::text, '-') || ' ' || (created_at AT TIME ZONE 'UTC')::text FROM missions WHERE id IN ('a1', 'b2')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([
            "a1 active true {\"stage\": 2} 2024-05-01 12:30:00".to_string(),
            "b2 draft false - 2024-05-02 08:00:00".to_string()
        ])
    );
    // The row SQLite filled by its defaults: a 32-hex id, a timestamp of now.
    let (id, age): (String, f64) = {
        let r = client
            .query_one("SELECT id, extract(epoch from now() - created_at)::float8 FROM missions WHERE title = 'deep sea probe'", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(is_hex32(&id), "{id}");
    assert!(age.abs() < 600.0, "created {age} s ago");
    // The CHECKs hold in the target; the id default gives the same shape.
    assert_eq!(
        outcome(
            client,
            "INSERT INTO missions (title, status) VALUES ('x', 'bogus')"
        )
        .await,
        "23514"
    );
    assert_eq!(
        outcome(client, "INSERT INTO crew (name, rank) VALUES ('x', 11)").await,
        "23514"
    );
    assert_eq!(
        outcome(client, "INSERT INTO tags VALUES ('x', -1)").await,
        "23514"
    );
    assert_eq!(
        outcome(
            client,
            "INSERT INTO missions (title) VALUES ('made in the target')"
        )
        .await,
        "ok"
    );
    let made: String = client
        .query_one(
            "SELECT id FROM missions WHERE title = 'made in the target'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(is_hex32(&made), "{made}");
    client
        .batch_execute("DELETE FROM missions WHERE title = 'made in the target'")
        .await
        .unwrap();
    // The FTS table and its shadow tables are not tables of the target; the
    // tsvector column answers the search FTS5 answered.
    for t in [
        "missions_fts",
        "missions_fts_data",
        "missions_fts_idx",
        "missions_fts_config",
        "missions_fts_docsize",
    ] {
        let exists: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&t])
            .await
            .unwrap()
            .get(0);
        assert_eq!(exists, None, "{t} was copied");
    }
    let search = |q: &'static str| async move {
        client
            .query("SELECT title FROM missions WHERE missions_fts @@ plainto_tsquery('simple', $1) ORDER BY title", &[&q])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(search("rocket").await, vec!["rocket launch"]);
    let fts: Vec<String> =
        sqlx::query_scalar("SELECT title FROM missions_fts WHERE missions_fts MATCH 'rocket'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(fts, vec!["rocket launch"]);

    // The stream: a row filled by SQLite's defaults, an update, a delete.
    sqlx::raw_sql(
        "INSERT INTO missions (title, meta) VALUES ('orbital rocket test', '[1, 2]');
         UPDATE missions SET status = 'completed', active = 0 WHERE id = 'a1';
         DELETE FROM missions WHERE id = 'b2';
         UPDATE crew SET on_duty = 0, notes = '{}' WHERE name = 'ada';",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_until("the changes", Duration::from_secs(60), || async {
        search("rocket").await == vec!["orbital rocket test", "rocket launch"]
            && rows(client, "missions").await.len() == 3
    })
    .await;
    let r = client
        .query_one("SELECT id, status, active, meta::text, extract(epoch from now() - created_at)::float8 FROM missions WHERE title = 'orbital rocket test'", &[])
        .await
        .unwrap();
    assert!(is_hex32(&r.get::<_, String>(0)));
    assert_eq!(r.get::<_, String>(1), "draft");
    assert!(r.get::<_, bool>(2));
    assert_eq!(r.get::<_, String>(3), "[1, 2]");
    assert!(r.get::<_, f64>(4).abs() < 600.0);
    let a1: (String, bool) = {
        let r = client
            .query_one("SELECT status, active FROM missions WHERE id = 'a1'", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(a1, ("completed".to_string(), false));

    cancel.cancel();
    let report = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The report: per table rows and casts, and what was left out.
    let missions = report
        .tables
        .iter()
        .find(|t| t.table == "missions")
        .unwrap();
    assert_eq!(missions.rows, 3);
    assert_names(
        &missions.conversions.join("\n"),
        &[
            "meta: TEXT → jsonb ([tables.types] \"missions.meta\")",
            "active: INTEGER → boolean ([tables.types] \"missions.active\")",
            "created_at: TEXT → timestamp (its default is datetime('now')",
        ],
    );
    let crew = report.tables.iter().find(|t| t.table == "crew").unwrap();
    assert_names(
        &crew.conversions.join("\n"),
        &[
            "on_duty: INTEGER → bool (CHECK (on_duty IN (0, 1))",
            "notes: TEXT → json (CHECK (json_valid(notes))",
        ],
    );
    let left_out = report.left_out.join("\n");
    assert_names(
        &left_out,
        &[
            "missions_fts: a virtual table (USING fts5)",
            "missions_fts_data: shadow table of missions_fts",
            "missions_fts_idx",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shows_each_rule_with_its_reason_and_names_a_value_that_does_not_convert() {
    let s = Scratch::new();
    let pool = s.source(APP).await;
    sqlx::raw_sql("INSERT INTO missions (id, title, meta) VALUES ('bad1', 'x', 'not json'), ('ok9', 'y', '{}');")
        .execute(&pool)
        .await
        .unwrap();
    let target = PgDb::new("").await;
    let text = target_config_text(&s.config_text("mem://", RULES), &target);
    let cfg = s.path("m6.toml");
    std::fs::write(&cfg, &text).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert_names(
        &out,
        &[
            // Each type with its reason.
            "→ boolean  ([tables.types] \"missions.active\"; DEFAULT true)",
            "created_at",
            "timestamp with time zone  (its default is datetime('now')",
            "DEFAULT now()",
            "identity: SQLite's rowid alias",
            "on_duty",
            "boolean  (CHECK (on_duty IN (0, 1)): a boolean kept as an integer",
            // The CHECKs as the target holds them.
            "CONSTRAINT \"missions_status_check\" CHECK (\"status\" IN ('draft', 'active', 'paused', 'completed', 'archived', 'failed'))",
            "CONSTRAINT \"crew_rank_check\" CHECK (\"rank\" BETWEEN 1 AND 10)",
            "\"missions_fts\" tsvector over (title), GIN index",
            // What is left out.
            "left out of the schema:",
            "missions_fts: a virtual table (USING fts5)",
            "missions_fts_config: shadow table of missions_fts",
            // The cast read against every current value; the bad one by key.
            "TEXT → json ([tables.types] \"missions.meta\"): 1 of 5 current values do not convert",
            "invalid JSON",
            "keys: (id = \"bad1\")",
            "TEXT → timestamp (its default is datetime('now'): SQLite's UTC timestamp text): every current value converts (5 rows read)",
        ],
    );
    assert!(
        !out.contains("missions_fts_data\" →"),
        "a shadow table is planned: {out}"
    );
    // With the reject file the same values are set aside, not blocking.
    let with_rejects = text.replacen(
        "[pipeline]\n",
        &format!(
            "[pipeline]\nreject_dir = \"{}\"\n",
            s.path("rejects").display()
        ),
        1,
    );
    std::fs::write(&cfg, with_rejects).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_names(&out, &["run sets these rows aside in pipeline.reject_dir"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m6_rules_apply_to_a_surrealdb_target_with_assert_for_the_check_lists() {
    let s = Scratch::new();
    let pool = s.source(APP).await;
    let config = s.config("mem://", &RULES.replace("text_search = true\n", ""));
    let r = crate::sqlite_surreal::start(config.clone(), None).await;
    let db = r.sink.clone();
    wait_until("the copy", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            // Every table: they are copied at the same time.
            let mut q = db
                .client()
                .query("SELECT * FROM missions; SELECT * FROM crew; SELECT * FROM tags;")
                .await
                .unwrap();
            let n = |q: &mut surrealdb::IndexedResults, i: usize| {
                q.take::<Vec<SValue>>(i).map(|r| r.len()).unwrap_or(0)
            };
            (n(&mut q, 0), n(&mut q, 1), n(&mut q, 2)) == (3, 2, 1)
        }
    })
    .await;
    let one = |sql: &'static str| {
        let db = db.clone();
        async move {
            let mut q = db.client().query(sql).await.unwrap();
            q.take::<SValue>(0).unwrap()
        }
    };
    // Types as SurrealQL reads them back.
    let field = |v: &SValue, name: &str| -> SValue {
        let SValue::Object(o) = v else {
            panic!("not an object: {v:?}")
        };
        o.get(name).cloned().unwrap_or(SValue::None)
    };
    let a1 = one("SELECT * FROM ONLY missions:a1").await;
    assert!(matches!(field(&a1, "active"), SValue::Bool(true)), "{a1:?}");
    assert!(
        matches!(field(&a1, "created_at"), SValue::Datetime(_)),
        "{a1:?}"
    );
    assert!(matches!(field(&a1, "meta"), SValue::Object(_)), "{a1:?}");
    let ada = one("SELECT * FROM ONLY crew:1").await;
    assert!(
        matches!(field(&ada, "on_duty"), SValue::Bool(true)),
        "{ada:?}"
    );
    // The CHECK's list is an ASSERT: a value outside it is refused.
    let mut q = db
        .client()
        .query("CREATE missions:x SET title = 'x', status = 'bogus', active = true, created_at = time::now()")
        .await
        .unwrap();
    let refused = q.take::<SValue>(0);
    assert!(refused.is_err(), "status 'bogus' was accepted: {refused:?}");
    let mut q = db
        .client()
        .query("CREATE missions:y SET title = 'y', status = 'paused', active = true, created_at = time::now(); DELETE missions:y;")
        .await
        .unwrap();
    let accepted = q.take::<SValue>(0);
    assert!(
        accepted.is_ok(),
        "a listed status was refused: {accepted:?}"
    );
    // The stream keeps to it.
    sqlx::raw_sql("UPDATE missions SET status = 'paused', active = 0 WHERE id = 'a1'")
        .execute(&pool)
        .await
        .unwrap();
    wait_until("the change", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            let mut q = db
                .client()
                .query("SELECT VALUE status FROM ONLY missions:a1")
                .await
                .unwrap();
            matches!(q.take::<SValue>(0), Ok(SValue::String(s)) if s == "paused")
        }
    })
    .await;
    let report = r.stop().await;
    assert!(
        report
            .left_out
            .iter()
            .any(|l| l.starts_with("missions_fts:")),
        "{:?}",
        report.left_out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_targets_durability_and_switchyard_commits_synchronously() {
    // The test cluster runs with fsync, full_page_writes and
    // synchronous_commit off; this database defaults to off as well.
    let s = Scratch::new();
    s.source(APP).await;
    let target = PgDb::new("").await;
    target
        .client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = off",
            target.name
        ))
        .await
        .unwrap();
    let cfg = s.path("m6.toml");
    std::fs::write(
        &cfg,
        target_config_text(&s.config_text("mem://", ""), &target),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_names(
        &out,
        &[
            "switchyard's apply sessions commit with synchronous_commit = on (this role's sessions default to off",
            "the target server runs with fsync = off",
            "full_page_writes = off",
            "keys and indexes built after the load get maintenance_work_mem = 256MB (the server's: 64MB; target.maintenance_work_mem_mb)",
        ],
    );
    // A database whose own setting is larger keeps it, and check says so.
    target
        .client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET maintenance_work_mem = '1GB'",
            target.name
        ))
        .await
        .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_names(
        &out,
        &["keys and indexes built after the load get the server's maintenance_work_mem = 1GB (target.maintenance_work_mem_mb = 256 does not raise it)"],
    );
}

//! M4: an application's SQLite database into the PostgreSQL schema the
//! team writes itself (narrower types than switchyard's, a CHECK, an extra
//! defaulted column), with the migration tool the application runs on
//! start-up: refinery's or sqlx's own migrator finds its history after the
//! load and applies only what is new.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;

use crate::pg_surreal::PgDb;
use crate::pg_target::{rows, target_config, target_config_text};
use crate::support::*;

/// The application's database: integer keys, NVARCHAR(160) titles,
/// decimals, a quantity. Row 2's title is too long for the team's
/// varchar(20), row 3's price has more decimals than numeric(8,2) keeps,
/// row 4's quantity breaks the team's CHECK.
const APP: &str = "CREATE TABLE album (album_id INTEGER PRIMARY KEY, title NVARCHAR(160) NOT NULL, price DECIMAL(10,4), qty INTEGER);
    INSERT INTO album VALUES (1, 'Short', 1.5, 3), (2, 'A title much longer than twenty', 2.0, 1),
                             (3, 'Precise', 1.234, 1), (4, 'Negative', 1.0, -1), (5, 'Fine', 9.99, 0);";

/// Eleven files whose order matters (V10 renames what V9 adds): applied
/// by name, V10 would come before V2 and fail.
fn write_refinery_files(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("V1__initial_schema.sql"),
        "CREATE TABLE album (album_id integer PRIMARY KEY, title varchar(20) NOT NULL, price numeric(8,2),
                             qty integer CHECK (qty >= 0), created_at timestamptz NOT NULL DEFAULT now());",
    )
    .unwrap();
    for n in 2..=9 {
        std::fs::write(
            dir.join(format!("V{n}__add_c{n}.sql")),
            format!("ALTER TABLE album ADD COLUMN c{n} integer DEFAULT {n};"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("V10__rename_c9.sql"),
        "ALTER TABLE album RENAME COLUMN c9 TO c9_renamed;",
    )
    .unwrap();
    std::fs::write(
        dir.join("V11__index.sql"),
        "CREATE INDEX album_title ON album (title);",
    )
    .unwrap();
}

fn schema_config(s: &Scratch, target: &PgDb, schema: &str) -> (String, std::path::PathBuf) {
    let text = s.config_text("mem://", "").replace(
        "url = \"mem://\"",
        &format!("url = \"mem://\"\nschema = \"{schema}\""),
    );
    let text = target_config_text(&text, target);
    let path = s.path("m4.toml");
    std::fs::write(&path, &text).unwrap();
    (text, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrower_columns_are_checked_per_value_and_refinery_finds_its_history() {
    let s = Scratch::new();
    let pool = s.source(APP).await;
    let target = PgDb::new("").await;
    let dir = s.path("migrations");
    write_refinery_files(&dir);
    let (text, cfg) = schema_config(&s, &target, &format!("migrations:{}", dir.display()));
    let cfg = cfg.to_str().unwrap().to_string();

    // check finds the layout, marks the narrower columns and names the
    // keys whose values do not fit, before anything is written.
    let (code, out, err) = run_cli(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}{err}");
    assert_names(
        &out,
        &[
            "refinery (V{n}__name.sql)",
            "refinery_schema_history",
            "V1__initial_schema.sql",
            "integer  (narrower: checked per value",
            "character varying(20)  (narrower: checked per value (at most 20 characters",
            "numeric(8,2)  (narrower: checked per value",
            "album_id = 2",
            "album_id = 3",
            "31 characters long",
            "1.234 has 3 decimal places",
        ],
    );
    let exists: bool = target
        .client
        .query_one("SELECT to_regclass('album') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "check must roll back the migrations it tried");

    // run stops at the first value that does not fit, naming table, key,
    // column and value.
    let (code, out, err) = run_cli(&["snapshot", "--config", &cfg]);
    assert_ne!(code, 0, "{out}{err}");
    assert_names(
        &err,
        &[
            "\"album\"",
            "album_id = 2",
            "\"title\"",
            "A title much longer than twenty",
            "character varying(20)",
        ],
    );
    sqlx::raw_sql("UPDATE album SET title = 'Shorter' WHERE album_id = 2")
        .execute(&pool)
        .await
        .unwrap();
    let (code, out, err) = run_cli(&["snapshot", "--config", &cfg]);
    assert_ne!(code, 0, "{out}{err}");
    assert_names(
        &err,
        &["album_id = 3", "\"price\"", "1.234", "would round it"],
    );
    sqlx::raw_sql("UPDATE album SET price = 1.23 WHERE album_id = 3")
        .execute(&pool)
        .await
        .unwrap();
    // The team's CHECK refuses row 4: PostgreSQL's words, with the key.
    let (code, out, err) = run_cli(&["snapshot", "--config", &cfg]);
    assert_ne!(code, 0, "{out}{err}");
    assert_names(&err, &["album", "album_qty_check"]);
    sqlx::raw_sql("UPDATE album SET qty = 0 WHERE album_id = 4")
        .execute(&pool)
        .await
        .unwrap();

    // Copied, then streamed; a streamed value too long stops the daemon.
    let config: Arc<Config> = target_config(
        &s.config_text("mem://", "").replace(
            "url = \"mem://\"",
            &format!(
                "url = \"mem://\"\nschema = \"migrations:{}\"",
                dir.display()
            ),
        ),
        &target,
    );
    let _ = text;
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(&target.client, "album").await.len() == 5
    })
    .await;
    sqlx::raw_sql("INSERT INTO album VALUES (6, 'Streamed', 0.5, 2)")
        .execute(&pool)
        .await
        .unwrap();
    wait_until("the streamed row", Duration::from_secs(60), || async {
        rows(&target.client, "album").await.len() == 6
    })
    .await;
    let (title, c5, c9): (String, i32, i32) = {
        let r = target
            .client
            .query_one(
                "SELECT title, c5, c9_renamed FROM album WHERE album_id = 6",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((title.as_str(), c5, c9), ("Streamed", 5, 9));
    sqlx::raw_sql("INSERT INTO album VALUES (7, 'Another title far too long', 0.5, 2)")
        .execute(&pool)
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the daemon stops")
        .unwrap()
        .unwrap_err()
        .report();
    assert_names(
        &err,
        &[
            "\"album\"",
            "album_id = 7",
            "\"title\"",
            "Another title far too long",
        ],
    );
    assert_eq!(rows(&target.client, "album").await.len(), 6);
    drop(cancel);

    // refinery recorded V1..V11 as refinery does; the application's own
    // refinery, started against the target with a new V12, applies V12 only.
    let history: Vec<i32> = target
        .client
        .query(
            "SELECT version FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(history, (1..=11).collect::<Vec<_>>());
    std::fs::write(
        dir.join("V12__note.sql"),
        "ALTER TABLE album ADD COLUMN note text;",
    )
    .unwrap();
    let migrations = refinery::load_sql_migrations(&dir).unwrap();
    let mut client = crate::pg_surreal::connect(&target.cluster, &target.name).await;
    let report = refinery::Runner::new(&migrations)
        .run_async(&mut client)
        .await
        .unwrap();
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    assert_eq!(applied, ["V12__note"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_migrations_are_applied_by_sqlx_and_found_by_its_migrator() {
    let s = Scratch::new();
    let _pool = s
        .source("CREATE TABLE album (album_id INTEGER PRIMARY KEY, title TEXT NOT NULL); INSERT INTO album VALUES (1, 'one'), (2, 'two');")
        .await;
    let target = PgDb::new("").await;
    let dir = s.path("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("1_init.sql"),
        "CREATE TABLE album (album_id integer PRIMARY KEY, title varchar(40) NOT NULL);",
    )
    .unwrap();
    for n in 2..=9 {
        std::fs::write(
            dir.join(format!("{n}_add_c{n}.sql")),
            format!("ALTER TABLE album ADD COLUMN c{n} integer DEFAULT {n};"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("10_rename.up.sql"),
        "ALTER TABLE album RENAME COLUMN c9 TO c9_renamed;",
    )
    .unwrap();
    std::fs::write(
        dir.join("10_rename.down.sql"),
        "ALTER TABLE album RENAME COLUMN c9_renamed TO c9;",
    )
    .unwrap();
    let (_, cfg) = schema_config(&s, &target, &format!("migrations:{}", dir.display()));
    let cfg = cfg.to_str().unwrap().to_string();
    let (code, out, err) = run_cli(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert_names(
        &out,
        &[
            "sqlx ({version}_name.sql)",
            "_sqlx_migrations",
            "every current value fits (2 rows read)",
        ],
    );
    let (code, out, err) = run_cli(&["snapshot", "--config", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(rows(&target.client, "album").await.len(), 2);
    let versions: Vec<i64> = target
        .client
        .query(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=10).collect::<Vec<i64>>());
    let (code, out, err) = run_cli(&["verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}{err}");

    // The application's own sqlx migrator with a new file applies it only.
    std::fs::write(
        dir.join("11_note.sql"),
        "ALTER TABLE album ADD COLUMN note text;",
    )
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "postgres://postgres:{}@{}:{}/{}?sslmode=disable",
            target.cluster.password, target.cluster.host, target.cluster.port, target.name
        ))
        .await
        .unwrap();
    let migrator = sqlx::migrate::Migrator::new(dir.clone()).await.unwrap();
    migrator.run(&pool).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 11);
    let note: Option<String> = sqlx::query_scalar("SELECT note FROM album WHERE album_id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(note, None);
    // A file named for another layout than the one asked for is refused.
    let (_, cfg) = schema_config(&s, &target, &format!("refinery:{}", dir.display()));
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    assert_names(&format!("{out}{err}"), &["V1__name.sql", "1_init.sql"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_a_narrower_column_does_not_hold_go_to_the_reject_file() {
    let s = Scratch::new();
    let pool = s
        .source(
            "CREATE TABLE album (album_id INTEGER PRIMARY KEY, title TEXT NOT NULL);
                 INSERT INTO album VALUES (1, 'one'), (2, 'a title far too long'), (3, 'three');",
        )
        .await;
    let target = PgDb::new("").await;
    let dir = s.path("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("V1__init.sql"),
        "CREATE TABLE album (album_id integer PRIMARY KEY, title varchar(10) NOT NULL);",
    )
    .unwrap();
    let rejects = s.path("rejects");
    let text = s
        .config_text(
            "mem://",
            &format!("reject_dir = \"{}\"\n", rejects.display()),
        )
        .replace(
            "url = \"mem://\"",
            &format!("url = \"mem://\"\nschema = \"refinery:{}\"", dir.display()),
        );
    let config = target_config(&text, &target);
    let pipeline = switchyard::connect::pipeline(&config).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let run = tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    wait_until("the copy", Duration::from_secs(60), || async {
        rows(&target.client, "album").await.len() == 2
    })
    .await;
    // An update whose new value does not fit: set aside, and the row's old
    // version leaves the target; the batch's other change goes in.
    sqlx::raw_sql("UPDATE album SET title = 'now much too long' WHERE album_id = 3; INSERT INTO album VALUES (4, 'four');")
        .execute(&pool)
        .await
        .unwrap();
    wait_until("the streamed changes", Duration::from_secs(60), || async {
        let ids: Vec<i32> = target
            .client
            .query("SELECT album_id FROM album ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        ids == [1, 4]
    })
    .await;
    assert!(!run.is_finished());
    let lines = reject_lines(&rejects.join("album.jsonl"));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["phase"], "snapshot");
    assert_eq!(lines[0]["column"], "title");
    assert_eq!(lines[0]["value"], "\"a title far too long\"");
    assert!(lines[0]["reason"]
        .as_str()
        .unwrap()
        .contains("character varying(10)"));
    assert_eq!(lines[1]["phase"], "stream");
    assert_eq!(lines[1]["key"], "(album_id = 3)");
    cancel.cancel();
    run.await.unwrap().unwrap();
    // verify reads the team's column types and expects every row but the
    // ones set aside.
    let path = s.path("v.toml");
    std::fs::write(&path, target_config_text(&text, &target)).unwrap();
    let (code, out, err) = run_cli(&["verify", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("identical"), "{out}");
}

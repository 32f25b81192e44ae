//! `verify`: identical tables are reported identical (also while a writer
//! keeps changing the source), and an injected changed value, missing row
//! and extra row are each reported with their key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard::sink::Sink;
use switchyard::source::postgres::PgSource;
use switchyard::source::Source;
use switchyard::verify::{self, DifferenceKind, Options};

use crate::pg_surreal::{start, wait_converged, PgDb};
use crate::support::*;

fn options() -> Options {
    Options {
        tables: Vec::new(),
        wait: Some(Duration::from_secs(30)),
        batch_rows: 500,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_each_injected_difference_by_key_and_not_lag_under_a_writer() {
    let db = PgDb::new(
        "CREATE TABLE acct (id int PRIMARY KEY, balance numeric(12, 2), note text);
         INSERT INTO acct SELECT g, g * 1.5, 'n' || g FROM generate_series(1, 3000) g;
         CREATE TABLE log (at timestamptz, msg text);
         ALTER TABLE log REPLICA IDENTITY FULL;
         INSERT INTO log VALUES ('2024-01-01 00:00:00+00', 'same'), ('2024-01-01 00:00:00+00', 'same'), (NULL, 'other');",
    )
    .await;
    let config = Arc::new(
        switchyard::config::Config::parse(
            &db.config_text("mem://", "")
                .replace("[target]", "heartbeat_interval_ms = 300\n\n[target]"),
        )
        .unwrap(),
    );
    let run = start(config.clone(), None).await;
    wait_converged(&config, &run.sink).await;
    let source: Arc<dyn Source> =
        Arc::new(PgSource::open(&config.source.url, &config).await.unwrap());
    let sink: Arc<dyn Sink> = run.sink.clone();

    // A writer keeps changing the source while verify runs: lag is never a difference.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = crate::pg_surreal::connect(&db.cluster, &db.name).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                client
                    .execute(
                        "UPDATE acct SET balance = balance + 1, note = $2 WHERE id = $1",
                        &[&((i % 3000 + 1) as i32), &format!("w{i}")],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let verdict = verify::verify(source.clone(), sink.clone(), &options())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 10, "the writer barely ran ({writes} updates)");
    assert!(
        verdict.identical,
        "{}",
        switchyard::commands::verify::render(&verdict)
    );
    let acct = verdict.tables.iter().find(|t| t.table == "acct").unwrap();
    assert_eq!((acct.source_rows, acct.target_rows), (3000, 3000));
    let log = verdict.tables.iter().find(|t| t.table == "log").unwrap();
    assert_eq!(
        (log.source_rows, log.target_rows),
        (3, 3),
        "identical rows count as copies"
    );

    // Inject a changed value, a missing row and an extra row in the target.
    wait_converged(&config, &run.sink).await;
    run.sink
        .client()
        .query("UPDATE acct:7 SET note = 'tampered'; DELETE acct:8; CREATE acct:9999 SET balance = 1dec, note = 'extra';")
        .await
        .unwrap()
        .check()
        .unwrap();
    let verdict = verify::verify(source.clone(), sink.clone(), &options())
        .await
        .unwrap();
    assert!(!verdict.identical);
    let acct = verdict.tables.iter().find(|t| t.table == "acct").unwrap();
    let found: Vec<(DifferenceKind, String)> = acct
        .differences
        .iter()
        .map(|d| (d.kind.clone(), d.key.clone()))
        .collect();
    assert_eq!(
        found,
        vec![
            (DifferenceKind::Different, "acct:7".to_string()),
            (DifferenceKind::Missing, "acct:8".to_string()),
            (DifferenceKind::Extra, "acct:9999".to_string())
        ],
        "{}",
        switchyard::commands::verify::render(&verdict)
    );
    let changed = &acct.differences[0];
    assert!(
        changed.target.as_deref().unwrap().contains("tampered"),
        "{changed:?}"
    );
    assert!(
        changed.source.as_deref().unwrap().contains("note: 'n7'")
            || changed.source.as_deref().unwrap().contains("note: 'w"),
        "{changed:?}"
    );
    assert!(
        verdict
            .tables
            .iter()
            .find(|t| t.table == "log")
            .unwrap()
            .identical
    );
    // Only the tables asked for.
    let only = verify::verify(
        source.clone(),
        sink.clone(),
        &Options {
            tables: vec!["log".into()],
            ..options()
        },
    )
    .await
    .unwrap();
    assert!(only.identical && only.tables.len() == 1);
    run.stop().await;
}

#[tokio::test]
async fn verify_cli_exit_status_and_json() {
    let s = Scratch::new();
    let _pool = s
        .source(
            "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, price DECIMAL(8, 2), data BLOB);
             INSERT INTO item VALUES (1, 'tea', 4.50, x'00ff'), (2, 'ünïcødé', NULL, NULL), (3, 'it''s', 0.10, x'');",
        )
        .await;
    let target = s.path("replica");
    let url = format!("surrealkv://{}", target.display());
    let cfg = s.write_config(&url, "");
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = run_cli(&["snapshot", "--config", cfg]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_cli(&["verify", "--config", cfg, "--wait", "5"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("identical"), "{out}");

    wait_unlocked(&target).await;
    let db = open_target(&url).await;
    db.query("UPDATE item:2 SET name = 'changed'")
        .await
        .unwrap()
        .check()
        .unwrap();
    drop(db);
    wait_unlocked(&target).await;
    let (code, out, err) = run_cli(&["verify", "--config", cfg, "--json", "--wait", "5"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["identical"], false);
    let d = &v["tables"][0]["differences"][0];
    assert_eq!(
        (d["kind"].as_str(), d["key"].as_str()),
        (Some("different"), Some("item:2")),
        "{v}"
    );
    assert!(
        d["source"].as_str().unwrap().contains("ünïcødé")
            && d["target"].as_str().unwrap().contains("changed"),
        "{v}"
    );

    // Cannot run: exit 2, with the reason.
    let (code, _, err) = run_cli(&["verify", "--config", cfg, "--tables", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"nope\" is not a replicated table"), "{err}");
}

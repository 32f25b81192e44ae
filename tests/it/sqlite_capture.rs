//! Capture gaps: whatever happens to the source between or during runs, the
//! target either converges to the source or switchyard stops with an error
//! that says what happened. It never streams on past lost changes.

use std::time::Duration;

use switchyard::source::sqlite::SqliteSource;
use switchyard::source::Source;

use crate::sqlite_surreal::{start, wait_converged};
use crate::support::*;

const SCHEMA: &str = r#"
CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT, touched TEXT);
CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT);
INSERT INTO a (id, v) VALUES (1, 'one'), (2, 'two');
INSERT INTO b (id, v) VALUES (1, 'uno'), (2, 'dos');
"#;

async fn exec(pool: &sqlx::SqlitePool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn failure(run: Running) -> String {
    let r = tokio::time::timeout(Duration::from_secs(30), run.handle)
        .await
        .expect("pipeline did not stop")
        .unwrap();
    match r {
        Ok(_) => panic!("the pipeline finished without an error"),
        Err(e) => e.report(),
    }
}

async fn log_len(pool: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _switchyard_changes")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How far the change log was trimmed.
async fn trimmed(pool: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT CAST(value AS INTEGER) FROM _switchyard_meta WHERE key = 'trimmed'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Writes to `a` until the daemon has trimmed the change log past every
/// entry it holds now (the newest entry stays: it keeps the sequence from
/// being reused).
async fn until_trimmed(pool: &sqlx::SqlitePool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let high = source_high_water(pool).await;
    let mut n = 100;
    while trimmed(pool).await < high {
        assert!(
            std::time::Instant::now() < deadline,
            "the change log was never trimmed"
        );
        n += 1;
        exec(
            pool,
            &format!("INSERT INTO a (id, v) VALUES ({n}, 'filler')"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(log_len(pool).await <= 2, "trimmed, yet entries remain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_rebuilt_between_runs_is_copied_again() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;

    // A migration tool rebuilds b: its triggers go with the old table, and
    // what happens to b until the next start is not captured.
    exec(&pool, "DROP TABLE b; CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO b VALUES (7, 'siete');").await;
    let run = start(config.clone(), Some(sink)).await;
    wait_converged(&pool, &config, &run.sink).await;
    exec(
        &pool,
        "INSERT INTO b VALUES (8, 'ocho'); DELETE FROM b WHERE id = 7;",
    )
    .await;
    wait_converged(&pool, &config, &run.sink).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_rebuilt_while_streaming_is_captured_again_and_copied() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    // Rebuilt as migration tools do: a new table under the old name, the
    // old one's rows gone with it; then changes to the new one.
    exec(&pool, "DROP TABLE b; CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO b VALUES (9, 'nueve');").await;
    wait_converged(&pool, &config, &run.sink).await;
    exec(
        &pool,
        "UPDATE b SET v = 'nine' WHERE id = 9; INSERT INTO b VALUES (10, 'diez');",
    )
    .await;
    wait_converged(&pool, &config, &run.sink).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_left_out_of_a_run_is_copied_again_when_it_returns() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;

    // A run without b: b's changes are trimmed from the log with the rest.
    let without_b = s.config("mem://", "\n[tables]\nexclude = [\"b\"]\n");
    let run = start(without_b.clone(), Some(sink)).await;
    exec(&pool, "UPDATE b SET v = 'changed' WHERE id = 1; DELETE FROM b WHERE id = 2; INSERT INTO b VALUES (3, 'tres');").await;
    until_trimmed(&pool).await;
    let sink = run.sink.clone();
    run.stop().await;

    let run = start(config.clone(), Some(sink)).await;
    wait_converged(&pool, &config, &run.sink).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninstalled_capture_is_not_mistaken_for_the_old_one() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    exec(&pool, "UPDATE a SET v = 'x' WHERE id = 1;").await;
    wait_converged(&pool, &config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;

    SqliteSource::open(
        &s.source_path(),
        &config,
        Default::default(),
        switchyard::source::Access::ReadWrite,
    )
    .await
    .unwrap()
    .uninstall()
    .await
    .unwrap();
    exec(&pool, "UPDATE a SET v = 'lost' WHERE id = 2;").await;
    let err = failure(start(config.clone(), Some(sink)).await).await;
    assert!(
        err.contains("another change capture") && err.contains("empty target"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restored_from_a_backup_is_refused() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    let backup = s.path("backup.sqlite");
    exec(&pool, &format!("VACUUM INTO '{}'", backup.display())).await;
    exec(
        &pool,
        "UPDATE a SET v = 'after the backup' WHERE id = 1; INSERT INTO b VALUES (5, 'cinco');",
    )
    .await;
    wait_converged(&pool, &config, &run.sink).await;
    let sink = run.sink.clone();
    run.stop().await;

    pool.close().await;
    // The last connection to close (switchyard's pool closes in the
    // background) checkpoints the WAL into the file and removes it; restoring
    // before that would let the checkpoint write the newer pages back.
    let wal = std::path::PathBuf::from(format!("{}-wal", s.source_path().display()));
    wait_until(
        "every connection to the source to close",
        Duration::from_secs(30),
        || {
            let gone = !wal.exists();
            async move { gone }
        },
    )
    .await;
    let _ = std::fs::remove_file(format!("{}-shm", s.source_path().display()));
    std::fs::copy(&backup, s.source_path()).unwrap();
    let err = failure(start(config.clone(), Some(sink)).await).await;
    assert!(err.contains("restored from a backup"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_that_trims_the_log_is_detected() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let first = start(config.clone(), None).await;
    wait_converged(&pool, &config, &first.sink).await;
    let sink_a = first.sink.clone();
    first.stop().await;

    exec(&pool, "UPDATE a SET v = 'only b sees this' WHERE id = 1;").await;
    // Another target on the same source consumes and trims the log.
    let second = start(config.clone(), None).await;
    wait_converged(&pool, &config, &second.sink).await;
    until_trimmed(&pool).await;
    second.stop().await;

    let err = failure(start(config.clone(), Some(sink_a)).await).await;
    assert!(
        err.contains("trimmed") && err.contains("another switchyard"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_trigger_that_rewrites_the_row_is_captured_as_final() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let config = s.config("mem://", "");
    let run = start(config.clone(), None).await;
    wait_converged(&pool, &config, &run.sink).await;
    // Created after switchyard's triggers, so it fires before them.
    exec(
        &pool,
        "CREATE TRIGGER app_touch AFTER UPDATE OF v ON a BEGIN UPDATE a SET touched = NEW.v || '!' WHERE id = NEW.id; END;
         CREATE TRIGGER app_cleanup AFTER INSERT ON a WHEN NEW.v = 'temporary' BEGIN DELETE FROM a WHERE id = NEW.id; END;",
    )
    .await;
    exec(
        &pool,
        "UPDATE a SET v = 'edited' WHERE id = 1; INSERT INTO a (id, v) VALUES (50, 'temporary');",
    )
    .await;
    wait_converged(&pool, &config, &run.sink).await;
    let touched: String = sqlx::query_scalar("SELECT touched FROM a WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(touched, "edited!");
    let report = run.stop().await;
    assert!(report.changes_applied >= 2);
}

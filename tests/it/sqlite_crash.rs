//! Crash safety: the daemon is killed with SIGKILL during the snapshot and
//! during streaming while an application keeps writing; after each restart
//! the target converges to the source, with nothing lost and nothing doubled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;

use crate::support::*;

const SCHEMA: &str = r#"
CREATE TABLE items (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, n INTEGER NOT NULL);
CREATE TABLE pairs (a TEXT NOT NULL, b INTEGER NOT NULL, v REAL, PRIMARY KEY (a, b)) WITHOUT ROWID;
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 40000)
INSERT INTO items (id, payload, n) SELECT i, printf('%.400c', 'p') || i, i FROM s;
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 2000)
INSERT INTO pairs (a, b, v) SELECT 'k' || (i % 37), i, i * 0.5 FROM s;
"#;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An application writing at random: inserts, updates, deletes, key changes,
/// some in multi-statement transactions.
async fn writer(pool: sqlx::SqlitePool, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = rng.below(60_000) as i64;
        let r = match rng.below(6) {
            0 => sqlx::query("INSERT OR REPLACE INTO items (id, payload, n) VALUES (?, 'new', ?)")
                .bind(id)
                .bind(rng.next() as i64)
                .execute(&pool)
                .await
                .map(|_| ()),
            1 => sqlx::query("UPDATE items SET n = n + 1, payload = payload || '.' WHERE id = ?")
                .bind(id)
                .execute(&pool)
                .await
                .map(|_| ()),
            2 => sqlx::query("DELETE FROM items WHERE id = ?")
                .bind(id)
                .execute(&pool)
                .await
                .map(|_| ()),
            3 => sqlx::query("UPDATE OR IGNORE items SET id = ? WHERE id = ?")
                .bind(id + 100_000)
                .bind(id)
                .execute(&pool)
                .await
                .map(|_| ()),
            4 => {
                let mut tx = pool.begin().await.unwrap();
                for k in 0..5 {
                    sqlx::query("INSERT OR REPLACE INTO pairs (a, b, v) VALUES (?, ?, ?)")
                        .bind(format!("k{}", rng.below(40)))
                        .bind(id + k)
                        .bind(rng.below(1000) as f64 / 7.0)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.map(|_| ())
            }
            _ => sqlx::query("DELETE FROM pairs WHERE b = ?")
                .bind(id % 2000)
                .execute(&pool)
                .await
                .map(|_| ()),
        };
        r.expect("application write");
        writes += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writes
}

/// After a crash: every change above the target's checkpoint is still in the
/// source's log (the log is trimmed only below what the target committed).
async fn assert_log_kept_above_checkpoint(
    pool: &sqlx::SqlitePool,
    target_dir: &std::path::Path,
    url: &str,
) {
    wait_unlocked(target_dir).await;
    let db = open_target(url).await;
    let cp = target_checkpoint(&db).await.unwrap_or(0);
    drop(db);
    let min: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM _switchyard_changes")
        .fetch_one(pool)
        .await
        .unwrap_or(None);
    let hw = source_high_water(pool).await;
    if hw > cp {
        let min = min.expect("changes above the checkpoint were trimmed away");
        assert!(
            min <= cp + 1,
            "log trimmed past the checkpoint: min seq {min}, checkpoint {cp}"
        );
    }
    wait_unlocked(target_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_snapshot_and_streaming_converges() {
    let s = Scratch::new();
    let pool = s.source(SCHEMA).await;
    let target = s.path("replica");
    let url = format!("surrealkv://{}", target.display());
    let cfg = s.write_config(&url, "snapshot_batch_rows = 500\nbatch_rows = 200\n");
    let cfg_s = cfg.to_str().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(pool.clone(), stop.clone(), 0x9E37_79B9_7F4A_7C15));

    let mut rng = Rng(42);
    let mut killed_in_snapshot = 0;
    let mut killed_streaming = 0;
    for round in 0..5 {
        let d = Daemon::start(
            &["run", "--config", &cfg_s],
            s.path(&format!("round{round}.log")),
        );
        if round < 2 {
            // Kill while tables are being copied.
            wait_until("the copy to start", Duration::from_secs(60), || {
                let t = d.log_text();
                async move { t.contains("change capture installed") }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        } else {
            wait_until("streaming to start", Duration::from_secs(180), || {
                let t = d.log_text();
                async move { t.contains("streaming changes") }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        }
        let log = d.log_text();
        assert!(
            !log.contains("\"ERROR\""),
            "round {round} logged an error:\n{log}"
        );
        if log.contains("streaming changes") {
            killed_streaming += 1;
        } else {
            killed_in_snapshot += 1;
        }
        d.kill();
        assert_log_kept_above_checkpoint(&pool, &target, &url).await;
    }
    assert!(
        killed_in_snapshot >= 1,
        "no kill landed during the snapshot"
    );
    assert!(killed_streaming >= 2, "too few kills during streaming");

    stop.store(true, Ordering::Relaxed);
    let writes = w.await.unwrap();
    assert!(writes > 100, "the writer barely ran ({writes} writes)");
    let hw = source_high_water(&pool).await as u64;

    let d = Daemon::start(&["run", "--config", &cfg_s], s.path("final.log"));
    wait_until(
        "the daemon to catch up with the source",
        Duration::from_secs(180),
        || {
            let cp = d.logged_checkpoint();
            async move { cp == Some(hw) }
        },
    )
    .await;
    let status = d.interrupt().await;
    assert!(status.success(), "exit status {status:?}");

    wait_unlocked(&target).await;
    let config = Config::load(&cfg).unwrap();
    let db = open_target(&url).await;
    let tables: Vec<String> = source_tables(&config)
        .await
        .iter()
        .map(|t| t.target_name.clone())
        .collect();
    let want = source_image(&pool, &config).await;
    let got = target_image(&db, &tables).await;
    assert_eq!(diff(&want, &got), None);
    assert_eq!(target_checkpoint(&db).await, Some(hw as i64));
}

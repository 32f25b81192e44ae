//! Crash safety with a PostgreSQL source: the daemon is killed with SIGKILL
//! during the snapshot and during streaming while an application writes; the
//! slot never confirms more than the target committed, and after the last
//! restart the target equals the source.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::source::postgres::PgSource;

use crate::pg_surreal::{connect, PgDb};
use crate::support::*;

pub const SCHEMA: &str = r#"
CREATE TABLE items (id bigint PRIMARY KEY, payload text NOT NULL, n bigint NOT NULL);
CREATE TABLE pairs (a text NOT NULL, b int NOT NULL, v double precision, PRIMARY KEY (a, b));
INSERT INTO items SELECT i, repeat('p', 400) || i, i FROM generate_series(1, 40000) i;
INSERT INTO pairs SELECT 'k' || (i % 37), i, i * 0.5 FROM generate_series(1, 2000) i;
"#;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> i64 {
        (self.next() % n) as i64
    }
}

pub async fn writer(client: tokio_postgres::Client, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut client = client;
    let mut rng = Rng(seed);
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = rng.below(60_000);
        let r = match rng.below(6) {
            0 => client
                .execute(
                    "INSERT INTO items VALUES ($1, 'new', $2) ON CONFLICT (id) DO UPDATE SET payload = 'replaced', n = excluded.n",
                    &[&id, &rng.below(1 << 40)],
                )
                .await
                .map(|_| ()),
            1 => client.execute("UPDATE items SET n = n + 1, payload = payload || '.' WHERE id = $1", &[&id]).await.map(|_| ()),
            2 => client.execute("DELETE FROM items WHERE id = $1", &[&id]).await.map(|_| ()),
            3 => client
                .execute(
                    "UPDATE items SET id = $1 WHERE id = $2 AND NOT EXISTS (SELECT 1 FROM items WHERE id = $1)",
                    &[&(id + 100_000), &id],
                )
                .await
                .map(|_| ()),
            4 => {
                let tx = client.transaction().await.unwrap();
                for k in 0..5 {
                    tx.execute(
                        "INSERT INTO pairs VALUES ($1, $2, $3) ON CONFLICT (a, b) DO UPDATE SET v = excluded.v",
                        &[&format!("k{}", rng.below(40)), &((id + k) as i32), &(rng.below(1000) as f64 / 7.0)],
                    )
                    .await
                    .unwrap();
                }
                tx.commit().await
            }
            _ => client.execute("DELETE FROM pairs WHERE b = $1", &[&((id % 2000) as i32)]).await.map(|_| ()),
        };
        r.expect("application write");
        writes += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writes
}

/// The slot's confirmed position is never past the target's checkpoint.
async fn assert_slot_behind_checkpoint(db: &PgDb, target_dir: &std::path::Path, url: &str) {
    wait_unlocked(target_dir).await;
    let t = open_target(url).await;
    let cp = target_checkpoint(&t).await;
    drop(t);
    wait_unlocked(target_dir).await;
    // A checkpoint `L.end` covers every transaction whose commit record
    // starts at or before L, so the flush confirmed for it is L + 1 (and the
    // slot starts at its consistent point CP with the checkpoint at CP − 1).
    if let (Some(flushed), Some(cp)) = (db.confirmed_flush().await, cp) {
        assert!(
            flushed <= cp as u64 + 1,
            "the slot confirmed {flushed}, past the target's checkpoint {cp}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_snapshot_and_streaming_converges() {
    let db = PgDb::new(SCHEMA).await;
    let s = Scratch::new();
    let target = s.path("replica");
    let url = format!("surrealkv://{}", target.display());
    let cfg = s.path("pg.toml");
    std::fs::write(
        &cfg,
        db.config_text(&url, "snapshot_batch_rows = 500\nbatch_rows = 200\n"),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(
        connect(&db.cluster, &db.name).await,
        stop.clone(),
        0x9E37_79B9_7F4A_7C15,
    ));

    let mut rng = Rng(42);
    let mut killed_in_snapshot = 0;
    let mut killed_streaming = 0;
    for round in 0..5 {
        let d = Daemon::start(
            &["run", "--config", &cfg_s],
            s.path(&format!("round{round}.log")),
        );
        if round < 2 {
            wait_until("the copy to start", Duration::from_secs(60), || {
                let t = d.log_text();
                async move { t.contains("resuming after") || t.contains("copying from scratch") }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(400) as u64)).await;
        } else {
            wait_until("streaming to start", Duration::from_secs(180), || {
                let t = d.log_text();
                async move { t.contains("logical replication started") }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(900) as u64)).await;
        }
        let log = d.log_text();
        assert!(
            !log.contains("\"ERROR\""),
            "round {round} logged an error:\n{log}"
        );
        if log.contains("logical replication started") {
            killed_streaming += 1;
        } else {
            killed_in_snapshot += 1;
        }
        d.kill();
        assert_slot_behind_checkpoint(&db, &target, &url).await;
    }
    assert!(
        killed_in_snapshot >= 1,
        "no kill landed during the snapshot"
    );
    assert!(killed_streaming >= 2, "too few kills during streaming");

    stop.store(true, Ordering::Relaxed);
    let writes = w.await.unwrap();
    assert!(writes > 100, "the writer barely ran ({writes} writes)");
    // A sentinel transaction: once the checkpoint reaches it, everything is applied.
    let tx_lsn: String = {
        let mut c = connect(&db.cluster, &db.name).await;
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO items VALUES (999999, 'sentinel', 0)", &[])
            .await
            .unwrap();
        let lsn: String = tx
            .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::text", &[])
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        lsn
    };
    let sentinel: u64 = tx_lsn.parse().unwrap();

    let d = Daemon::start(&["run", "--config", &cfg_s], s.path("final.log"));
    wait_until(
        "the daemon to apply the sentinel",
        Duration::from_secs(180),
        || {
            let cp = d.logged_checkpoint();
            async move { cp.is_some_and(|c| c >= sentinel) }
        },
    )
    .await;
    let status = d.interrupt().await;
    assert!(status.success(), "exit status {status:?}");
    assert_slot_behind_checkpoint(&db, &target, &url).await;

    wait_unlocked(&target).await;
    let config = Config::load(&cfg).unwrap();
    let source = PgSource::open(&config.source.url, &config).await.unwrap();
    let want = image_via(&source).await;
    drop(source);
    let t = open_target(&url).await;
    let tables: Vec<String> = want.keys().cloned().collect();
    let got = target_image(&t, &tables).await;
    assert_eq!(diff(&want, &got), None);
    assert!(
        want["items"].len() > 30_000,
        "the image is too small to mean anything"
    );
}

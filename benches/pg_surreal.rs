//! Benchmark: PostgreSQL → embedded SurrealDB (surrealkv://), on pgbench data.
//!
//! ```text
//!  1. pgbench -i -s SCALE      (SCALE 10: 1,000,000 pgbench_accounts rows)
//!  2. raw ceiling              COPY pgbench_accounts TO STDOUT, read and dropped → rows/s
//!  3. snapshot → discard sink  the source side alone                          → rows/s
//!     stream → discard sink    one transaction updating every account: the pipeline's
//!                              own memory on a large transaction         → changes/s, peak RSS
//!  4. snapshot → surrealkv     the whole pipeline                              → rows/s, peak RSS
//!  5. stream                   pgbench -N for SECONDS at CLIENTS clients; switchyard
//!                              applies into surrealkv; lag in bytes sampled each second;
//!                              then time to catch up (a sentinel row)   → changes/s, lag, RSS
//!  6. one transaction          UPDATE of every pgbench_accounts row       → changes/s, peak RSS
//! ```
//!
//! Run with `bash scripts/bench pg-surreal`, which starts the throwaway
//! cluster (scripts/pg-cluster). Sizes: `BENCH_PG_SCALE` (default 10),
//! `BENCH_PG_SECONDS` (default 30), `BENCH_PG_CLIENTS` (default 4),
//! `BENCH_PG_WORKERS` (`pipeline.snapshot_workers`, default: the cores).
//! `pgbench_history` has no key and is left out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use anyhow::{bail, Result};
use futures::{pin_mut, TryStreamExt};
use switchyard::config::Config;
use switchyard::pipeline::{Mode, Pipeline};
use switchyard::sink::discard::DiscardSink;
use switchyard::sink::surreal::SurrealSink;
use switchyard::source::postgres::PgSource;
use tokio_util::sync::CancellationToken;

use common::pg::{env_num, Pg};
use common::{peak_rss_mib, reset_peak_rss};

fn config_for(pg: &Pg, db: &str, slot: &str, target: &str) -> Result<Arc<Config>> {
    let text = format!(
        "[source]\nurl = \"postgres://postgres@{}:{}/{db}?sslmode=disable\"\npassword = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n[target]\nurl = \"{target}\"\nnamespace = \"bench\"\ndatabase = \"bench\"\n\n[tables]\nexclude = [\"pgbench_history\"]\n\n[pipeline]\nbatch_rows = 1000\nbatch_delay_ms = 5\nsnapshot_batch_rows = 2000\nsnapshot_workers = {workers}\n",
        pg.host,
        pg.port,
        pg.password,
        workers = env_num("BENCH_PG_WORKERS", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) as u64)
    );
    Ok(Arc::new(Config::parse(&text)?))
}

#[tokio::main]
async fn main() -> Result<()> {
    common::log_from_env();
    let pg = Pg::from_env()?;
    let scale = env_num("BENCH_PG_SCALE", 10);
    let seconds = env_num("BENCH_PG_SECONDS", 30);
    let clients = env_num("BENCH_PG_CLIENTS", 4);
    let db = format!("bench_{}", std::process::id());
    let admin = pg.client("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    println!("# switchyard benchmark: PostgreSQL → embedded SurrealDB (surrealkv), pgbench scale {scale}");
    let t = Instant::now();
    pg.pgbench(&["-i", "-q", "-s", &scale.to_string(), &db])?;
    println!("pgbench -i: {:.1} s", t.elapsed().as_secs_f64());
    let client = pg.client(&db).await?;
    let accounts: i64 = client
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await?
        .get(0);

    // Raw ceiling: COPY out, read and dropped.
    let t = Instant::now();
    let stream = client.copy_out("COPY pgbench_accounts TO STDOUT").await?;
    pin_mut!(stream);
    let mut bytes = 0usize;
    while let Some(chunk) = stream.try_next().await? {
        bytes += chunk.len();
    }
    let raw_s = t.elapsed().as_secs_f64();
    println!(
        "raw COPY pgbench_accounts TO STDOUT: {accounts} rows, {:.0} MiB in {raw_s:.2} s = {:.0} rows/s",
        bytes as f64 / 1048576.0,
        accounts as f64 / raw_s
    );

    // The source side alone: snapshot into a sink that discards.
    let dir = tempfile::tempdir()?;
    let config = config_for(&pg, &db, "bench_discard", "mem://")?;
    let source = Arc::new(PgSource::open(&config.source.url, &config).await?);
    let discard = Arc::new(DiscardSink::default());
    let t = Instant::now();
    let report = Pipeline::new(
        config.clone(),
        source.clone(),
        discard.clone(),
        Default::default(),
    )
    .run(Mode::SnapshotOnly, CancellationToken::new())
    .await?;
    let disc_s = t.elapsed().as_secs_f64();
    let rows = discard.rows_loaded.load(Ordering::Relaxed);
    println!(
        "snapshot → discard: {rows} rows ({} tables) in {disc_s:.2} s = {:.0} rows/s",
        report.tables.len(),
        rows as f64 / disc_s
    );
    // The pipeline's own memory on one large transaction: into the discard
    // sink, so that the target's memory does not count.
    reset_peak_rss();
    let cancel = CancellationToken::new();
    let pipeline = Pipeline::new(
        config.clone(),
        source.clone(),
        discard.clone(),
        Default::default(),
    );
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    let big = Instant::now();
    client
        .batch_execute("UPDATE pgbench_accounts SET abalance = abalance + 1")
        .await?;
    while discard.changes_applied.load(Ordering::Relaxed) < accounts as u64 {
        if daemon.is_finished() {
            daemon.await??;
            bail!("the pipeline stopped before the large transaction arrived");
        }
        if big.elapsed() > Duration::from_secs(1800) {
            bail!("the large transaction did not reach the discard sink within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let big_s = big.elapsed().as_secs_f64();
    cancel.cancel();
    daemon.await??;
    println!(
        "one transaction of {accounts} row updates → discard: through the pipeline {big_s:.1} s after it began = {:.0} changes/s; peak RSS {:.0} MiB",
        accounts as f64 / big_s,
        peak_rss_mib()
    );
    use switchyard::source::Source;
    source.uninstall().await?;
    drop(source);

    // The whole pipeline into surrealkv.
    let target = format!("surrealkv://{}", dir.path().join("replica").display());
    let config = config_for(&pg, &db, "bench_surreal", &target)?;
    let source = Arc::new(PgSource::open(&config.source.url, &config).await?);
    let sink = Arc::new(SurrealSink::connect(&target, false, &config).await?);
    reset_peak_rss();
    let t = Instant::now();
    let report = Pipeline::new(
        config.clone(),
        source.clone(),
        sink.clone(),
        Default::default(),
    )
    .run(Mode::SnapshotOnly, CancellationToken::new())
    .await?;
    let snap_s = t.elapsed().as_secs_f64();
    let copied: u64 = report.tables.iter().map(|r| r.rows).sum();
    println!(
        "snapshot → surrealkv: {copied} rows in {snap_s:.1} s = {:.0} rows/s; peak RSS {:.0} MiB; {:.0}% of the discard rate, {:.0}% of raw COPY",
        copied as f64 / snap_s,
        peak_rss_mib(),
        100.0 * (copied as f64 / snap_s) / (rows as f64 / disc_s),
        100.0 * (copied as f64 / snap_s) / (accounts as f64 / raw_s)
    );

    // Streaming under a pgbench write load.
    reset_peak_rss();
    let cancel = CancellationToken::new();
    let pipeline = Pipeline::new(
        config.clone(),
        source.clone(),
        sink.clone(),
        Default::default(),
    );
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    let lag_sql = "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'bench_surreal'";
    let load = {
        let (s, c, d) = (seconds.to_string(), clients.to_string(), db.clone());
        let pg2 = pg.clone();
        tokio::task::spawn_blocking(move || pg2.pgbench(&["-N", "-c", &c, "-j", "2", "-T", &s, &d]))
    };
    let started = Instant::now();
    let mut lags = Vec::new();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(r) = client.query_opt(lag_sql, &[]).await? {
            lags.push(r.get::<_, Option<i64>>(0).unwrap_or(0));
        }
    }
    let out = load.await??;
    let load_s = started.elapsed().as_secs_f64();
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps"))
        .unwrap_or("")
        .to_string();
    // A sentinel: when its row is in the target, everything before it is.
    client
        .batch_execute("UPDATE pgbench_branches SET filler = 'sentinel' WHERE bid = 1")
        .await?;
    let caught_up = Instant::now();
    loop {
        let mut r = sink
            .client()
            .query("SELECT VALUE filler FROM ONLY pgbench_branches:1")
            .await?;
        let v: Option<String> = r.take(0)?;
        if v.as_deref().map(str::trim) == Some("sentinel") {
            break;
        }
        if caught_up.elapsed() > Duration::from_secs(1800) {
            bail!("switchyard did not catch up within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up_s = caught_up.elapsed().as_secs_f64();
    let total_s = started.elapsed().as_secs_f64();
    let stream_rss = peak_rss_mib();

    // One transaction that updates every account: applied in chunks of
    // batch_rows, with memory bounded by the queues whatever its size.
    reset_peak_rss();
    let big = Instant::now();
    client
        .batch_execute("BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1; UPDATE pgbench_branches SET filler = 'after the big one' WHERE bid = 1; COMMIT;")
        .await?;
    let big_commit_s = big.elapsed().as_secs_f64();
    loop {
        let mut r = sink
            .client()
            .query("SELECT VALUE filler FROM ONLY pgbench_branches:1")
            .await?;
        let v: Option<String> = r.take(0)?;
        if v.as_deref().map(str::trim) == Some("after the big one") {
            break;
        }
        if big.elapsed() > Duration::from_secs(3600) {
            bail!("the large transaction was not applied within an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let big_s = big.elapsed().as_secs_f64();
    let big_rss = peak_rss_mib();
    cancel.cancel();
    let report = daemon.await??;
    let applied = report.changes_applied - accounts as u64 - 1;
    let max_lag = lags.iter().copied().max().unwrap_or(0);
    let avg_lag = if lags.is_empty() {
        0
    } else {
        lags.iter().sum::<i64>() / lags.len() as i64
    };
    println!("stream: pgbench -N, {clients} clients, {load_s:.0} s: {tps}");
    println!(
        "stream: {applied} changes applied in {total_s:.1} s = {:.0} changes/s (caught up {catch_up_s:.1} s after the load ended); lag while loading avg {:.1} MiB, max {:.1} MiB; peak RSS {stream_rss:.0} MiB",
        applied as f64 / total_s,
        avg_lag as f64 / 1048576.0,
        max_lag as f64 / 1048576.0,
    );
    println!(
        "one transaction of {} row updates: committed in {big_commit_s:.1} s, applied {big_s:.1} s after it began = {:.0} changes/s; peak RSS meanwhile {big_rss:.0} MiB",
        accounts + 1,
        (accounts + 1) as f64 / (big_s - big_commit_s).max(0.001)
    );
    source.uninstall().await?;
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    Ok(())
}

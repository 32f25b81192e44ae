//! Benchmark: PostgreSQL → PostgreSQL, switchyard beside PostgreSQL's own
//! logical replication and the raw `COPY TO | COPY FROM` pipe, on the same
//! cluster and the same pgbench data.
//!
//! ```text
//!  1. pgbench -i -s SCALE in the source       (SCALE 20: 2,000,000 accounts)
//!  2. raw pipe      COPY pgbench_accounts TO STDOUT → COPY … FROM STDIN      → seconds
//!  3. native        CREATE SUBSCRIPTION (copy_data), until every table is ready → seconds
//!  4. switchyard    snapshot into an empty database                          → seconds, peak RSS
//!  5. catch-up      each replica paused; pgbench -N for SECONDS; resumed; time until
//!                   a sentinel row arrives                                   → changes/s, peak RSS
//! ```
//!
//! Run with `bash scripts/bench pg-pg`. Sizes: `BENCH_PG_SCALE` (default 20),
//! `BENCH_PG_SECONDS` (default 20), `BENCH_PG_CLIENTS` (default 4).

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use anyhow::{bail, Result};
use futures::{pin_mut, SinkExt, TryStreamExt};
use switchyard::config::Config;
use switchyard::pipeline::{Mode, Pipeline};
use tokio_util::sync::CancellationToken;

use common::pg::{env_num, Pg};
use common::{peak_rss_mib, reset_peak_rss};

const TABLES: &str = "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler character(84));
     CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler character(88));
     CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler character(84));";

fn config(pg: &Pg, source: &str, target: &str, slot: &str) -> Result<Arc<Config>> {
    let text = format!(
        "[source]\nurl = \"{}\"\npassword = \"{pw}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n[target]\nurl = \"{}\"\npassword = \"{pw}\"\n\n[tables]\nexclude = [\"pgbench_history\"]\n\n[pipeline]\nbatch_rows = 1000\nbatch_delay_ms = 5\nsnapshot_batch_rows = 5000\n",
        pg.url(source),
        pg.url(target),
        pw = pg.password
    );
    Ok(Arc::new(Config::parse(&text)?))
}

async fn wait_for_row(
    c: &tokio_postgres::Client,
    aid: i32,
    balance: i32,
    limit: Duration,
) -> Result<()> {
    let t = Instant::now();
    loop {
        let row = c
            .query_opt(
                "SELECT 1 FROM pgbench_accounts WHERE aid = $1 AND abalance = $2",
                &[&aid, &balance],
            )
            .await?;
        if row.is_some() {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("the sentinel did not arrive within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let pg = Pg::from_env()?;
    let scale = env_num("BENCH_PG_SCALE", 20);
    let seconds = env_num("BENCH_PG_SECONDS", 20);
    let clients = env_num("BENCH_PG_CLIENTS", 4);
    let id = std::process::id();
    let (src, raw, native, sy) = (
        format!("pp_src_{id}"),
        format!("pp_raw_{id}"),
        format!("pp_nat_{id}"),
        format!("pp_sy_{id}"),
    );
    let admin = pg.client("postgres").await?;
    for db in [&src, &raw, &native, &sy] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
    }
    println!("# switchyard benchmark: PostgreSQL → PostgreSQL beside native logical replication, pgbench scale {scale}");
    pg.pgbench(&["-i", "-q", "-s", &scale.to_string(), &src])?;
    let source = pg.client(&src).await?;
    let accounts: i64 = source
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await?
        .get(0);

    // The raw pipe: COPY out of the source straight into COPY in.
    let target = pg.client(&raw).await?;
    target.batch_execute(TABLES).await?;
    let t = Instant::now();
    let out = source.copy_out("COPY pgbench_accounts TO STDOUT").await?;
    let sink = target.copy_in("COPY pgbench_accounts FROM STDIN").await?;
    pin_mut!(out);
    pin_mut!(sink);
    // COPY out yields a message per row: gathered into 1 MiB writes.
    let mut buf = bytes::BytesMut::with_capacity(1 << 20);
    while let Some(chunk) = out.try_next().await? {
        buf.extend_from_slice(&chunk);
        if buf.len() >= 1 << 20 {
            sink.send(buf.split().freeze()).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(buf.freeze()).await?;
    }
    sink.finish().await?;
    let raw_s = t.elapsed().as_secs_f64();
    println!("raw pipe COPY TO | COPY FROM (pgbench_accounts): {accounts} rows in {raw_s:.2} s = {:.0} rows/s", accounts as f64 / raw_s);

    // Native: a subscription that copies the data, on its own slot.
    let nat = pg.client(&native).await?;
    nat.batch_execute(TABLES).await?;
    source.batch_execute("CREATE PUBLICATION native_pub FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers").await?;
    source
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('native_{id}', 'pgoutput')"
        ))
        .await?;
    let t = Instant::now();
    nat.batch_execute(&format!(
        "CREATE SUBSCRIPTION native_sub CONNECTION 'host={} port={} dbname={src} user=postgres password={}'
         PUBLICATION native_pub WITH (create_slot = false, slot_name = 'native_{id}', copy_data = true)",
        pg.host, pg.port, pg.password
    ))
    .await?;
    loop {
        let pending: i64 = nat
            .query_one(
                "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's')",
                &[],
            )
            .await?
            .get(0);
        let ready: i64 = nat
            .query_one("SELECT count(*) FROM pg_subscription_rel", &[])
            .await?
            .get(0);
        if pending == 0 && ready == 3 {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the native subscription did not finish its copy in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let native_s = t.elapsed().as_secs_f64();
    println!("native subscription copy (3 tables, {accounts} accounts): {native_s:.2} s");

    // switchyard: the snapshot into an empty database.
    let sy_client = pg.client(&sy).await?;
    let cfg = config(&pg, &src, &sy, &format!("sy_{id}"))?;
    reset_peak_rss();
    let t = Instant::now();
    let report = Pipeline::open(cfg.clone())
        .await?
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await?;
    let sy_s = t.elapsed().as_secs_f64();
    let copied: u64 = report.tables.iter().map(|r| r.rows).sum();
    println!(
        "switchyard snapshot: {copied} rows in {sy_s:.2} s; peak RSS {:.0} MiB; native / switchyard = {:.2}, switchyard / raw pipe = {:.2} (the raw pipe carries pgbench_accounts alone)",
        peak_rss_mib(),
        native_s / sy_s,
        sy_s / raw_s
    );

    // Catch-up: each replica paused, a write load, resumed; until a sentinel arrives.
    nat.batch_execute("ALTER SUBSCRIPTION native_sub DISABLE")
        .await?;
    let load = |tag: &str| -> Result<f64> {
        let out = pg.pgbench(&[
            "-N",
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            &src,
        ])?;
        let tps = out
            .lines()
            .find(|l| l.starts_with("tps"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        println!("{tag}: pgbench -N, {clients} clients, {seconds} s: {tps:.0} tps");
        Ok(tps * seconds as f64)
    };
    let changes = load("native catch-up load")?;
    source
        .execute(
            "UPDATE pgbench_accounts SET abalance = -424242 WHERE aid = 1",
            &[],
        )
        .await?;
    let t = Instant::now();
    nat.batch_execute("ALTER SUBSCRIPTION native_sub ENABLE")
        .await?;
    wait_for_row(&nat, 1, -424242, Duration::from_secs(1800)).await?;
    let native_catch = t.elapsed().as_secs_f64();
    println!(
        "native catch-up: {changes:.0} changes in {native_catch:.2} s = {:.0} changes/s",
        changes / native_catch
    );
    nat.batch_execute("ALTER SUBSCRIPTION native_sub DISABLE")
        .await?;

    let changes = load("switchyard catch-up load")?;
    source
        .execute(
            "UPDATE pgbench_accounts SET abalance = -434343 WHERE aid = 1",
            &[],
        )
        .await?;
    reset_peak_rss();
    let t = Instant::now();
    let cancel = CancellationToken::new();
    let pipeline = Pipeline::open(cfg.clone()).await?;
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    wait_for_row(&sy_client, 1, -434343, Duration::from_secs(1800)).await?;
    let sy_catch = t.elapsed().as_secs_f64();
    cancel.cancel();
    daemon.await??;
    println!(
        "switchyard catch-up: {changes:.0} changes in {sy_catch:.2} s = {:.0} changes/s; peak RSS {:.0} MiB; switchyard / native = {:.2}",
        changes / sy_catch,
        peak_rss_mib(),
        native_catch / sy_catch
    );

    // Clean up the cluster.
    nat.batch_execute(
        "ALTER SUBSCRIPTION native_sub SET (slot_name = NONE); DROP SUBSCRIPTION native_sub",
    )
    .await?;
    source
        .batch_execute(&format!("SELECT pg_drop_replication_slot('native_{id}')"))
        .await?;
    use switchyard::source::Source;
    switchyard::source::postgres::PgSource::open(&cfg.source.url, &cfg)
        .await?
        .uninstall()
        .await?;
    drop((source, target, nat, sy_client));
    for db in [&src, &raw, &native, &sy] {
        admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await?;
    }
    Ok(())
}

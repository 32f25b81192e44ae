//! Benchmark: PostgreSQL → PostgreSQL, switchyard beside PostgreSQL's own
//! logical replication and the raw `COPY TO | COPY FROM` pipe, on the same
//! pgbench data: the source on one server, the targets on another
//! (`BENCH_PG_TARGET_PORT`, which `scripts/bench` starts), as in a
//! migration; without it, the targets are databases of the source's server,
//! where the source's replication slots keep the targets' WAL as well (every
//! contender loads slower).
//!
//! ```text
//!  1. pgbench -i -s SCALE in the source       (SCALE 30: 3,000,000 accounts), and an
//!                   empty probe table bench_probe (id bigint key, at timestamptz) for phase 6
//!  2. raw pipe      every table: COPY … TO STDOUT (FORMAT binary) → COPY … FROM STDIN
//!                   (FORMAT binary) into a table without its key, one table after
//!                   the other; then each primary key built, as pg_restore does → seconds
//!  3. native        CREATE SUBSCRIPTION (copy_data), until every table is ready → seconds
//!  4. switchyard    snapshot into an empty database                          → seconds, peak RSS
//!  5. catch-up      both replicas paused; pgbench -N for SECONDS; each resumed alone
//!                   (same backlog), time until a sentinel row arrives       → changes/s, peak RSS
//!  6. latency       each replica alone (the other paused), its backlog drained first:
//!                   WRITERS connections commit single-change transactions at a fixed
//!                   RATE for LATENCY_SECONDS (an UPDATE of one pgbench_accounts row,
//!                   every 5th an INSERT of a bench_probe row instead); the time from
//!                   each probe's COMMIT to the row being visible in the replica
//!                                                      → achieved rate, p50/p99/max ms
//! ```
//!
//! Every contender ends in the same state: pgbench_accounts, _branches and
//! _tellers with their rows and primary keys (native and switchyard also carry
//! the empty bench_probe), checked after the copy and after the catch-up. Each
//! timed copy and catch-up starts after a CHECKPOINT, so that none pays for
//! writing out the WAL of the one before.
//!
//! Run with `bash scripts/bench pg-pg`, which starts two clusters of its own,
//! the source's and the targets', with PostgreSQL's durability defaults
//! (fsync, full_page_writes and synchronous_commit on; the program prints them
//! and says when they are off). `BENCH_PG_ONE_SERVER=1` puts the targets in
//! the source's cluster instead.
//! `BENCH_PG_PAIRS` (default 3): after step 6, the raw pipe and switchyard
//! run again one right after the other, each pair into new databases, and
//! the median of the pairs' ratios is printed (the machine's speed drifts
//! between runs by more than the difference measured).
//! Sizes: `BENCH_PG_SCALE` (default 30),
//! `BENCH_PG_SECONDS` (default 60), `BENCH_PG_CLIENTS` (default 4). Latency
//! phase: `BENCH_PG_LATENCY_SECONDS` (default 20; 0 skips the phase),
//! `BENCH_PG_LATENCY_RATE` (changes/s; default half of the native catch-up rate
//! of the same run), `BENCH_PG_LATENCY_WRITERS` (default `BENCH_PG_CLIENTS`).
//! The aim: switchyard's p99 under 100 ms at half of native's catch-up rate.
//!
//! The latency of a change is the time from the writer's COMMIT returning to
//! the moment the probe row is visible in the target, both read from this
//! process's monotonic clock; the target is polled every 2 ms (so figures carry
//! up to 2 ms, plus one query, of observation error). The writers run with
//! `synchronous_commit = on` (the test cluster's default is off, which lets a
//! commit return before its WAL is flushed, and WAL senders send only flushed
//! WAL). Each transaction carries one published change, as a pgbench -N
//! transaction does in the catch-up phase (its pgbench_history row is not
//! published), so the rate's changes/s are transactions/s in both phases.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use anyhow::{bail, Result};
use futures::{pin_mut, SinkExt, TryStreamExt};
use switchyard::config::Config;
use switchyard::pipeline::Mode;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use common::pg::{env_num, Pg};
use common::{cpu_seconds, peak_rss_mib, reset_peak_rss, MachineCpu};

/// The tables every contender copies, in copy order.
const COPIED: [&str; 3] = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"];

/// The raw pipe's tables: without their keys, built after the load.
const BARE_TABLES: &str =
    "CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, abalance int, filler character(84));
     CREATE TABLE pgbench_branches (bid int NOT NULL, bbalance int, filler character(88));
     CREATE TABLE pgbench_tellers (tid int NOT NULL, bid int, tbalance int, filler character(84));";

/// The raw pipe's keys, built after its load.
const KEYS: &str = "ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid);
     ALTER TABLE pgbench_branches ADD PRIMARY KEY (bid);
     ALTER TABLE pgbench_tellers ADD PRIMARY KEY (tid);";

const TABLES: &str = "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler character(84));
     CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler character(88));
     CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler character(84));";

/// The latency phase's probe rows: created in the source before the snapshots
/// (so that both replicas carry it) and in the native subscriber's database.
const PROBE: &str =
    "CREATE TABLE bench_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())";

/// In the latency phase, every PROBE_EVERY-th transaction of a writer inserts a
/// probe row; the others update one pgbench_accounts row.
const PROBE_EVERY: u64 = 5;

/// How often the latency phase polls the replica for probe rows.
const POLL: Duration = Duration::from_millis(2);

/// The admin connections of the clusters in the benchmark (one, or the
/// source's and the targets'), each `CHECKPOINT`ed before a timed phase.
struct Admins(Vec<tokio_postgres::Client>);

impl Admins {
    /// A checkpoint on every cluster, so that no timed phase pays for
    /// writing out the WAL of the one before.
    async fn checkpoint(&self) -> Result<()> {
        for a in &self.0 {
            a.batch_execute("CHECKPOINT").await?;
        }
        Ok(())
    }
}

fn config(pg: &Pg, tpg: &Pg, source: &str, target: &str, slot: &str) -> Result<Arc<Config>> {
    let text = format!(
        "[source]\nurl = \"{}\"\npassword = \"{pw}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n[target]\nurl = \"{}\"\npassword = \"{pw}\"\n\n[tables]\nexclude = [\"pgbench_history\"]\n\n[pipeline]\nbatch_rows = 1000\nbatch_delay_ms = 5\nsnapshot_batch_rows = 5000\n{}",
        pg.url(source),
        tpg.url(target),
        // BENCH_PG_SPLIT_MB: pipeline.snapshot_split_mb (0: every table in
        // one COPY); BENCH_PG_SPLIT_PARTS: pipeline.snapshot_split_parts.
        std::env::var("BENCH_PG_SPLIT_MB")
            .map(|v| format!("snapshot_split_mb = {v}\n"))
            .unwrap_or_default()
            + &std::env::var("BENCH_PG_SPLIT_PARTS")
                .map(|v| format!("snapshot_split_parts = {v}\n"))
                .unwrap_or_default(),
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

async fn wait_for_probe(c: &tokio_postgres::Client, id: i64, limit: Duration) -> Result<()> {
    let t = Instant::now();
    while c
        .query_opt("SELECT 1 FROM bench_probe WHERE id = $1", &[&id])
        .await?
        .is_none()
    {
        if t.elapsed() > limit {
            bail!("the probe row {id} did not arrive within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until no process streams from the replication slot, so that a paused
/// replica does not compete with the measured one.
async fn wait_slot_inactive(c: &tokio_postgres::Client, slot: &str, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let active: Option<bool> = c
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name::text = $1",
                &[&slot],
            )
            .await?
            .map(|r| r.get(0));
        if active != Some(true) {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("the replication slot {slot} is still active after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// What one run of the latency phase measured.
struct Latency {
    /// Transactions (one change each) the writers committed.
    changes: u64,
    /// Changes per second the writers reached: `changes` over the time from the
    /// first scheduled transaction to the last COMMIT.
    achieved: f64,
    /// Commit-to-visible latency of each probe row in ms, sorted.
    ms: Vec<f64>,
}

/// One writer of the latency phase: `count` single-change transactions, one
/// per tick of an interval of `period` starting at `at`. Transaction k inserts
/// a probe row when k is a multiple of PROBE_EVERY (ids `first_probe`,
/// `first_probe + probe_step`, …) and otherwise updates one pgbench_accounts
/// row. Returns each probe id with the instant its COMMIT returned, and the
/// instant of the last COMMIT.
async fn probe_writer(
    c: tokio_postgres::Client,
    accounts: i64,
    first_probe: i64,
    probe_step: i64,
    count: u64,
    at: tokio::time::Instant,
    period: Duration,
) -> Result<(Vec<(i64, Instant)>, Instant)> {
    let mut tick = tokio::time::interval_at(at, period);
    // Burst: a tick that comes late fires at once and the next deadline stays
    // on the original schedule, so the offered rate holds on average (an open
    // load, as clients that do not wait for the replicas). It matters because
    // tokio's timer has a resolution of 1 ms: at more than 1,000 transactions/s
    // per writer the period is below it, and Delay (next deadline = now +
    // period after a late tick, the sleep rounded up to the next millisecond)
    // would cap a writer near 1,000/s and fall below the target whenever a
    // commit is slow. If the writers cannot keep up at all, the achieved rate
    // printed beside the target says so.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut probes = Vec::with_capacity(count.div_ceil(PROBE_EVERY) as usize);
    let mut probe = first_probe;
    let mut last = Instant::now();
    for k in 0..count {
        tick.tick().await;
        // A simple query without BEGIN is one transaction, committed before
        // the server reports ReadyForQuery, which batch_execute waits for.
        if k % PROBE_EVERY == 0 {
            c.batch_execute(&format!("INSERT INTO bench_probe (id) VALUES ({probe})"))
                .await?;
            last = Instant::now();
            probes.push((probe, last));
            probe += probe_step;
        } else {
            let aid = 2 + (first_probe + k as i64 * 7919).rem_euclid(accounts - 1);
            c.batch_execute(&format!(
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {aid}"
            ))
            .await?;
            last = Instant::now();
        }
    }
    Ok((probes, last))
}

/// The latency phase against one replica (the other one paused): `writers`
/// connections to the source commit single-change transactions at `rate`
/// changes/s in all for `seconds`; the probe rows get the ids `first`,
/// `first + 1`, …; the replica is polled every POLL for them.
#[allow(clippy::too_many_arguments)]
async fn latency(
    pg: &Pg,
    src: &str,
    replica: &tokio_postgres::Client,
    accounts: i64,
    first: i64,
    rate: f64,
    seconds: u64,
    writers: u64,
) -> Result<Latency> {
    let per_writer = ((rate * seconds as f64).round() as u64)
        .max(1)
        .div_ceil(writers);
    let changes = per_writer * writers;
    let period = Duration::from_secs_f64(writers as f64 / rate);
    let probes = (per_writer.div_ceil(PROBE_EVERY) * writers) as usize;
    let mut clients = Vec::with_capacity(writers as usize);
    for _ in 0..writers {
        let c = pg.client(src).await?;
        c.batch_execute("SET synchronous_commit = on").await?;
        clients.push(c);
    }
    let stmt = replica
        .prepare("SELECT id FROM bench_probe WHERE id >= $1")
        .await?;
    let t0 = Instant::now();
    let start = tokio::time::Instant::from_std(t0);
    let mut handles = Vec::with_capacity(writers as usize);
    for (w, c) in clients.into_iter().enumerate() {
        // The writers' schedules interleave: writer w starts w/writers of a period late.
        let at = start + period.mul_f64(w as f64 / writers as f64);
        handles.push(tokio::spawn(probe_writer(
            c,
            accounts,
            first + w as i64,
            writers as i64,
            per_writer,
            at,
            period,
        )));
    }
    // The watcher: the first instant each probe row is seen in the replica.
    // Rows below `first + low` have all been seen, so each poll reads only the
    // newest rows (they arrive about in id order).
    let mut seen: Vec<Option<Instant>> = vec![None; probes];
    let (mut low, mut count) = (0usize, 0usize);
    let mut commits: Vec<(i64, Instant)> = Vec::with_capacity(probes);
    let mut last_commit = t0;
    let mut writers_done: Option<Instant> = None;
    while count < probes {
        let rows = replica.query(&stmt, &[&(first + low as i64)]).await?;
        let now = Instant::now();
        for r in rows {
            let id: i64 = r.get(0);
            let i = (id - first) as usize;
            if i < probes && seen[i].is_none() {
                seen[i] = Some(now);
                count += 1;
            }
        }
        while low < probes && seen[low].is_some() {
            low += 1;
        }
        if count == probes {
            break;
        }
        if writers_done.is_none() && handles.iter().all(|h| h.is_finished()) {
            for h in handles.drain(..) {
                let (p, last) = h.await??;
                commits.extend(p);
                last_commit = last_commit.max(last);
            }
            writers_done = Some(Instant::now());
        }
        if let Some(done) = writers_done {
            if done.elapsed() > Duration::from_secs(600) {
                bail!(
                    "{} of {probes} probe rows did not arrive within 10 minutes after the last commit",
                    probes - count
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
    for h in handles {
        let (p, last) = h.await??;
        commits.extend(p);
        last_commit = last_commit.max(last);
    }
    if commits.len() != probes {
        bail!(
            "the writers committed {} probe rows, expected {probes}",
            commits.len()
        );
    }
    let mut ms: Vec<f64> = commits
        .iter()
        .filter_map(|(id, committed)| {
            seen[(id - first) as usize]
                .map(|s| s.saturating_duration_since(*committed).as_secs_f64() * 1e3)
        })
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(Latency {
        changes,
        achieved: changes as f64 / last_commit.duration_since(t0).as_secs_f64(),
        ms,
    })
}

fn print_latency(tag: &str, rate: f64, writers: u64, seconds: u64, l: &Latency, extra: &str) {
    println!(
        "{tag} latency: target {rate:.0} changes/s ({writers} writers, {seconds} s, one change per transaction, every {PROBE_EVERY}th a probe), achieved {:.0} changes/s ({} changes); commit-to-visible p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples){extra}",
        l.achieved,
        l.changes,
        percentile(&l.ms, 0.50),
        percentile(&l.ms, 0.99),
        l.ms.last().copied().unwrap_or(f64::NAN),
        l.ms.len()
    );
}

/// Rows in pgbench_history: one per pgbench -N transaction.
async fn history(c: &tokio_postgres::Client) -> Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM pgbench_history", &[])
        .await?
        .get(0))
}

/// The cluster's durability settings, as the output states them.
async fn durability(c: &tokio_postgres::Client) -> Result<String> {
    let mut settings = Vec::new();
    let mut off = Vec::new();
    for name in ["fsync", "full_page_writes", "synchronous_commit"] {
        let v: String = c
            .query_one("SELECT current_setting($1)", &[&name])
            .await?
            .get(0);
        if v != "on" {
            off.push(name);
        }
        settings.push(format!("{name} = {v}"));
    }
    Ok(if off.is_empty() {
        format!("durable cluster: {}", settings.join(", "))
    } else {
        format!(
            "NOT a durable cluster ({} off): figures are not those of production; run through `bash scripts/bench pg-pg`: {}",
            off.join(", "),
            settings.join(", ")
        )
    })
}

/// Checks that `target` holds what the source holds of the copied tables
/// (row counts and a checksum of every row) and their primary keys; the
/// rows in all.
async fn same_state(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    who: &str,
) -> Result<u64> {
    let mut rows = 0u64;
    for table in COPIED {
        let sum = format!(
            "SELECT count(*), coalesce(sum(hashtext(t::text)::int8), 0)::int8 FROM {table} t"
        );
        let a = source.query_one(&sum, &[]).await?;
        let b = target.query_one(&sum, &[]).await?;
        let (n, x): (i64, i64) = (a.get(0), a.get(1));
        let (m, y): (i64, i64) = (b.get(0), b.get(1));
        if (n, x) != (m, y) {
            bail!("{who}: {table} holds {m} rows (checksum {y}), the source {n} (checksum {x})");
        }
        let keyed: bool = target
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::text::regclass AND indisprimary)",
                &[&table],
            )
            .await?
            .get(0);
        if !keyed {
            bail!("{who}: {table} has no primary key in the target");
        }
        rows += n as u64;
    }
    Ok(rows)
}

/// The raw pipe into `target` (an empty database): binary COPY out of the
/// source straight into COPY in, table after table, then the keys; seconds,
/// cores busy and the rows, checked against the source.
async fn raw_pipe(
    admins: &Admins,
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
) -> Result<(f64, f64, u64, f64)> {
    target.batch_execute(BARE_TABLES).await?;
    // Each timed contender starts after a checkpoint, so that none pays for
    // writing out the WAL of the one before.
    admins.checkpoint().await?;
    let t = Instant::now();
    let cpu = MachineCpu::now();
    let own = cpu_seconds();
    for table in COPIED {
        let out = source
            .copy_out(&format!("COPY {table} TO STDOUT (FORMAT binary)"))
            .await?;
        let sink = target
            .copy_in(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
            .await?;
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
    }
    let copied = t.elapsed().as_secs_f64();
    target.batch_execute(KEYS).await?;
    let seconds = t.elapsed().as_secs_f64();
    println!(
        "raw pipe: copy {copied:.2} s, keys {:.2} s",
        seconds - copied
    );
    let cores = cpu.cores_busy_since();
    let own = cpu_seconds() - own;
    let rows = same_state(source, target, "the raw pipe").await?;
    Ok((seconds, cores, rows, own))
}

/// switchyard's snapshot with `cfg` into its empty target: seconds, cores
/// busy, the rows copied and this process's CPU seconds.
async fn sy_snapshot(admins: &Admins, cfg: &Arc<Config>) -> Result<(f64, f64, u64, f64)> {
    admins.checkpoint().await?;
    reset_peak_rss();
    let t = Instant::now();
    let cpu = MachineCpu::now();
    let own = cpu_seconds();
    let report = switchyard::connect::pipeline(cfg)
        .await?
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    let cores = cpu.cores_busy_since();
    Ok((
        seconds,
        cores,
        report.tables.iter().map(|r| r.rows).sum(),
        cpu_seconds() - own,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    common::log_from_env();
    let pg = Pg::from_env()?;
    let scale = env_num("BENCH_PG_SCALE", 30);
    let seconds = env_num("BENCH_PG_SECONDS", 60);
    let clients = env_num("BENCH_PG_CLIENTS", 4);
    let lat_seconds = env_num("BENCH_PG_LATENCY_SECONDS", 20);
    let lat_writers = env_num("BENCH_PG_LATENCY_WRITERS", clients).max(1);
    let pairs = env_num("BENCH_PG_PAIRS", 3).max(1);
    let id = std::process::id();
    let (src, raw, native, sy) = (
        format!("pp_src_{id}"),
        format!("pp_raw_{id}"),
        format!("pp_nat_{id}"),
        format!("pp_sy_{id}"),
    );
    // The targets' cluster: a server of its own where scripts/bench started
    // one (BENCH_PG_TARGET_PORT), as in a migration; else the source's.
    let tpg = match std::env::var("BENCH_PG_TARGET_PORT") {
        Ok(port) if !port.is_empty() && port != pg.port => Pg { port, ..pg.clone() },
        _ => pg.clone(),
    };
    let apart = tpg.port != pg.port;
    let admin = pg.client("postgres").await?;
    let tadmin = tpg.client("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {src}"))
        .await?;
    for db in [&raw, &native, &sy] {
        tadmin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
    }
    let admins = Admins(if apart {
        vec![pg.client("postgres").await?, tpg.client("postgres").await?]
    } else {
        vec![pg.client("postgres").await?]
    });
    println!("# switchyard benchmark: PostgreSQL → PostgreSQL beside native logical replication, pgbench scale {scale}");
    println!("# source: {}", durability(&admin).await?);
    if apart {
        println!(
            "# targets: a server of their own (port {}, as in a migration): {}",
            tpg.port,
            durability(&tadmin).await?
        );
    } else {
        println!("# targets: in the source's server (port {}): the source's replication slots keep the targets' WAL too", pg.port);
    }
    pg.pgbench(&["-i", "-q", "-s", &scale.to_string(), &src])?;
    let source = pg.client(&src).await?;
    source.batch_execute(PROBE).await?;
    let accounts: i64 = source
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await?
        .get(0);

    // The raw pipe: binary COPY out of the source straight into COPY in,
    // table after table, then the keys.
    let target = tpg.client(&raw).await?;
    let (raw_s, raw_cores, rows, raw_own) = raw_pipe(&admins, &source, &target).await?;
    println!("raw pipe, binary COPY TO | COPY FROM of every table, keys built after: {rows} rows in {raw_s:.2} s = {:.0} rows/s; machine: {raw_cores:.2} cores busy, this program {raw_own:.2} CPU s", rows as f64 / raw_s);

    // Native: a subscription that copies the data, on its own slot.
    let nat = tpg.client(&native).await?;
    nat.batch_execute(TABLES).await?;
    nat.batch_execute(PROBE).await?;
    source.batch_execute("CREATE PUBLICATION native_pub FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, bench_probe").await?;
    source
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('native_{id}', 'pgoutput')"
        ))
        .await?;
    admins.checkpoint().await?;
    let t = Instant::now();
    let cpu = MachineCpu::now();
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
        if pending == 0 && ready == 4 {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the native subscription did not finish its copy in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let native_s = t.elapsed().as_secs_f64();
    let native_cores = cpu.cores_busy_since();
    same_state(&source, &nat, "native replication").await?;
    println!("native subscription copy (3 tables and the empty bench_probe, {accounts} accounts): {native_s:.2} s; machine: {native_cores:.2} cores busy");

    // switchyard: the snapshot into an empty database.
    let sy_client = tpg.client(&sy).await?;
    let cfg = config(&pg, &tpg, &src, &sy, &format!("sy_{id}"))?;
    let (sy_s, sy_cores, copied, sy_own) = sy_snapshot(&admins, &cfg).await?;
    same_state(&source, &sy_client, "switchyard").await?;
    println!(
        "switchyard snapshot: {copied} rows in {sy_s:.2} s; machine: {sy_cores:.2} cores busy, switchyard {sy_own:.2} CPU s; peak RSS {:.0} MiB; speed switchyard / native = {:.2}, switchyard / raw pipe = {:.2} (seconds inverted; same tables, rows and keys)",
        peak_rss_mib(),
        native_s / sy_s,
        raw_s / sy_s
    );

    // Catch-up: both replicas paused (the subscription disabled, switchyard
    // not running), one write load, then each replica alone resumed until a
    // sentinel arrives: both apply the same changes.
    nat.batch_execute("ALTER SUBSCRIPTION native_sub DISABLE")
        .await?;
    let before = history(&source).await?;
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
    // Each pgbench -N transaction changes one published row (its
    // pgbench_history row is not published) and adds one history row.
    let changes = (history(&source).await? - before) as f64;
    println!("catch-up load: pgbench -N, {clients} clients, {seconds} s: {tps:.0} tps, {changes:.0} changes");
    source
        .execute(
            "UPDATE pgbench_accounts SET abalance = -424242 WHERE aid = 1",
            &[],
        )
        .await?;
    admins.checkpoint().await?;
    let t = Instant::now();
    nat.batch_execute("ALTER SUBSCRIPTION native_sub ENABLE")
        .await?;
    wait_for_row(&nat, 1, -424242, Duration::from_secs(1800)).await?;
    let native_catch = t.elapsed().as_secs_f64();
    let native_rate = changes / native_catch;
    println!(
        "native catch-up: {changes:.0} changes in {native_catch:.2} s = {native_rate:.0} changes/s"
    );
    nat.batch_execute("ALTER SUBSCRIPTION native_sub DISABLE")
        .await?;
    same_state(&source, &nat, "native replication after the catch-up").await?;

    admins.checkpoint().await?;
    reset_peak_rss();
    let t = Instant::now();
    let cancel = CancellationToken::new();
    let pipeline = switchyard::connect::pipeline(&cfg.clone()).await?;
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    wait_for_row(&sy_client, 1, -424242, Duration::from_secs(1800)).await?;
    let sy_catch = t.elapsed().as_secs_f64();
    cancel.cancel();
    daemon.await??;
    same_state(&source, &sy_client, "switchyard after the catch-up").await?;
    println!(
        "switchyard catch-up: {changes:.0} changes in {sy_catch:.2} s = {:.0} changes/s; peak RSS {:.0} MiB; rate switchyard / native = {:.2}",
        changes / sy_catch,
        peak_rss_mib(),
        (changes / sy_catch) / native_rate
    );

    // Latency at a fixed write rate, each replica alone: the other one paused
    // (its slot inactive), the measured one's backlog drained (a sentinel probe
    // row) before the writers start.
    if lat_seconds > 0 {
        let (rate, why) = match env_num("BENCH_PG_LATENCY_RATE", 0) {
            0 => (native_rate / 2.0, "half of native's catch-up rate"),
            r => (r as f64, "BENCH_PG_LATENCY_RATE"),
        };
        if rate.is_nan() || rate < 1.0 {
            bail!("no rate for the latency phase ({rate} changes/s): set BENCH_PG_LATENCY_RATE");
        }
        let limit = Duration::from_secs(1800);

        // Native: the subscription enabled again; its backlog is the switchyard catch-up load.
        wait_slot_inactive(&source, &format!("sy_{id}"), Duration::from_secs(60)).await?;
        nat.batch_execute("ALTER SUBSCRIPTION native_sub ENABLE")
            .await?;
        source
            .execute("INSERT INTO bench_probe (id) VALUES (-1)", &[])
            .await?;
        wait_for_probe(&nat, -1, limit).await?;
        let native_lat =
            latency(&pg, &src, &nat, accounts, 1, rate, lat_seconds, lat_writers).await?;
        nat.batch_execute("ALTER SUBSCRIPTION native_sub DISABLE")
            .await?;
        print_latency("native", rate, lat_writers, lat_seconds, &native_lat, "");

        // switchyard: the daemon started again; its backlog is the native latency load.
        wait_slot_inactive(&source, &format!("native_{id}"), Duration::from_secs(60)).await?;
        reset_peak_rss();
        let cancel = CancellationToken::new();
        let pipeline = switchyard::connect::pipeline(&cfg.clone()).await?;
        let c = cancel.clone();
        let daemon = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
        source
            .execute("INSERT INTO bench_probe (id) VALUES (-2)", &[])
            .await?;
        wait_for_probe(&sy_client, -2, limit).await?;
        let sy_lat = latency(
            &pg,
            &src,
            &sy_client,
            accounts,
            1i64 << 40,
            rate,
            lat_seconds,
            lat_writers,
        )
        .await;
        cancel.cancel();
        daemon.await??;
        let sy_lat = sy_lat?;
        print_latency(
            "switchyard",
            rate,
            lat_writers,
            lat_seconds,
            &sy_lat,
            &format!("; peak RSS {:.0} MiB", peak_rss_mib()),
        );
        let sy_p99 = percentile(&sy_lat.ms, 0.99);
        println!(
            "latency at {rate:.0} changes/s ({why}): switchyard / native p50 = {:.2}, p99 = {:.2}; switchyard p99 {sy_p99:.1} ms, {} the 100 ms aim",
            percentile(&sy_lat.ms, 0.50) / percentile(&native_lat.ms, 0.50),
            sy_p99 / percentile(&native_lat.ms, 0.99),
            if sy_p99 < 100.0 { "within" } else { "over" }
        );
    }

    // More pairs of the raw pipe and switchyard, one right after the other,
    // each into databases of its own: the machine's speed drifts between
    // runs by more than the difference measured, so each pair gives a ratio.
    // Last: their WAL is not in the catch-up's way (the replicas' slots,
    // created before, would have to read through it).
    let mut ratios = vec![raw_s / sy_s];
    for pair in 2..=pairs {
        let (raw_db, sy_db) = (format!("{raw}_{pair}"), format!("{sy}_{pair}"));
        for db in [&raw_db, &sy_db] {
            tadmin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await?;
        }
        let target = tpg.client(&raw_db).await?;
        let (raw_s, _, _, raw_own) = raw_pipe(&admins, &source, &target).await?;
        drop(target);
        let cfg = config(&pg, &tpg, &src, &sy_db, &format!("sy_{id}_{pair}"))?;
        let (sy_s, _, _, sy_own) = sy_snapshot(&admins, &cfg).await?;
        let sy_client = tpg.client(&sy_db).await?;
        same_state(&source, &sy_client, "switchyard").await?;
        drop(sy_client);
        println!(
            "pair {pair}: raw pipe {raw_s:.2} s ({raw_own:.2} CPU s in this program), switchyard {sy_s:.2} s ({sy_own:.2} CPU s; peak RSS {:.0} MiB): switchyard / raw pipe = {:.2}",
            peak_rss_mib(),
            raw_s / sy_s
        );
        ratios.push(raw_s / sy_s);
        use switchyard::source::Source;
        switchyard::source::postgres::PgSource::open(&cfg.source.url, &cfg)
            .await?
            .uninstall()
            .await?;
        for db in [&raw_db, &sy_db] {
            tadmin
                .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                .await?;
        }
    }
    if pairs > 1 {
        println!(
            "switchyard / raw pipe over {pairs} pairs: median {:.2}, range {:.2}–{:.2}",
            median(ratios.clone()),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max)
        );
    }

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
    for db in [&raw, &native, &sy] {
        tadmin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await?;
    }
    admin
        .batch_execute(&format!("DROP DATABASE {src} WITH (FORCE)"))
        .await?;
    Ok(())
}

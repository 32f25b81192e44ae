//! Benchmark: SQLite → embedded SurrealDB (surrealkv://).
//!
//! ```text
//!  1. generate   items (and items_1 … with BENCH_TABLES): N rows (~100 bytes
//!                each) in a fresh SQLite file
//!  2. snapshot   switchyard's pipeline copies them      → rows/s, peak RSS
//!  3. stream     a separate writer process makes U single-row updates
//!                (one transaction each); switchyard applies them
//!                                                       → changes/s, commit-to-visible p50/p99
//!  4. ceiling    the same rows inserted with the SurrealDB SDK directly,
//!                same batch size, into another surrealkv directory → rows/s
//! ```
//!
//! Run with `bash scripts/bench sqlite-surreal` (release build). Sizes:
//! `BENCH_ROWS` (default 1,000,000), `BENCH_UPDATES` (default 100,000),
//! `BENCH_TABLES` (default 1: the rows spread over that many tables of the
//! same shape; the ceiling inserts them all, table after table),
//! `BENCH_MEMORY_MB` (the target's `memory_mb`, default switchyard's),
//! `BENCH_BATCH` and `BENCH_WORKERS` (`pipeline.snapshot_batch_rows` and
//! `pipeline.snapshot_workers`, default switchyard's). The stream also
//! prints when, in it, the resident set (sampled every 100 ms) was highest.
//! The latency of a change is the time from the writer's COMMIT to the moment
//! the target's checkpoint covers it, observed by polling the checkpoint every
//! 2 ms (so figures carry up to 2 ms of observation error).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "common/mod.rs"]
mod common;

use anyhow::{bail, Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor};
use surrealdb::types::{Array, Value as SValue, Variables};
use switchyard::config::Config;
use switchyard::model::{Row, TableSchema};
use switchyard::pipeline::{Mode, Pipeline};
use switchyard::sink::surreal::{ident, record, SurrealSink};
use switchyard::sink::Sink;
use switchyard::source::sqlite::SqliteSource;
use switchyard::source::Source;
use tokio_util::sync::CancellationToken;

use common::{cpu_seconds, peak_rss_mib, reset_peak_rss, rss_anon_file_mib, rss_mib};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The name of table `t` of `tables`: `items`, then `items_1`, `items_2`, …
fn table_name(t: usize) -> String {
    if t == 0 {
        "items".to_string()
    } else {
        format!("items_{t}")
    }
}

/// `rows` rows in all, spread evenly over `tables` tables of the same shape
/// (each with ids from 1).
async fn generate(path: &Path, rows: usize, tables: usize) -> Result<()> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Off);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
    let mut tx = conn.begin().await?;
    for t in 0..tables {
        let name = table_name(t);
        let count = rows / tables + usize::from(t < rows % tables);
        tx.execute(
            format!("CREATE TABLE {name} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL, price REAL, note TEXT, created DATETIME)")
                .as_str(),
        )
        .await?;
        for chunk_start in (0..count).step_by(10_000) {
            let end = (chunk_start + 10_000).min(count);
            sqlx::query(&format!(
                "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
                 INSERT INTO {name} SELECT i, 'item-' || printf('%012d', i), i % 1000, (i % 100000) / 100.0,
                        'note ' || hex(randomblob(16)), datetime(1700000000 + i, 'unixepoch') FROM n",
            ))
            .bind((chunk_start + 1) as i64)
            .bind(end as i64)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    let avg: f64 = sqlx::query_scalar(
        "SELECT avg(8 + length(name) + 8 + 8 + length(note) + length(created)) FROM items",
    )
    .fetch_one(&mut conn)
    .await?;
    println!("generated {rows} rows in {tables} table(s), about {avg:.0} bytes of values per row");
    Ok(())
}

/// The targets' `memory_mb` (`BENCH_MEMORY_MB`, default switchyard's).
fn memory_mb() -> usize {
    env_usize(
        "BENCH_MEMORY_MB",
        switchyard::config::DEFAULT_MEMORY_MB as usize,
    )
}

/// The `[pipeline]` lines the environment gives: `snapshot_batch_rows`
/// from BENCH_BATCH (the ceiling inserts batches of the same size) and
/// `snapshot_workers` from BENCH_WORKERS; unset, switchyard's defaults.
fn pipeline_lines() -> String {
    let set = |var: &str, key: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|n| format!("{key} = {}\n", n.max(1)))
            .unwrap_or_default()
    };
    set("BENCH_BATCH", "snapshot_batch_rows") + &set("BENCH_WORKERS", "snapshot_workers")
}

fn config_for(source: &Path, target: &str) -> Result<Arc<Config>> {
    let text = format!(
        "[source]\nurl = \"sqlite://{}\"\npoll_interval_ms = 5\n\n[target]\nurl = \"{target}\"\nnamespace = \"bench\"\ndatabase = \"bench\"\nmemory_mb = {}\n\n[pipeline]\nbatch_rows = 1000\nbatch_delay_ms = 5\n{}",
        source.display(),
        memory_mb(),
        pipeline_lines()
    );
    Ok(Arc::new(Config::parse(&text)?))
}

/// The writer process: `updates` single-row UPDATEs, each its own transaction,
/// printing `seq commit_ns` for each (seq = the change-log position it got).
async fn writer(path: &Path, rows: usize, updates: usize) -> Result<()> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
    let mut out = String::with_capacity(updates * 32);
    for i in 0..updates {
        let id = (i * 7919) % rows + 1;
        let mut tx = conn.begin().await?;
        sqlx::query("UPDATE items SET qty = qty + 1, note = ? WHERE id = ?")
            .bind(format!("update {i}"))
            .bind(id as i64)
            .execute(&mut *tx)
            .await?;
        // The log entry the capture trigger just wrote (its rowid; this
        // writer is the only one).
        let seq: i64 = sqlx::query_scalar("SELECT max(seq) FROM _switchyard_changes")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        out.push_str(&format!("{seq} {}\n", now_ns()));
    }
    print!("{out}");
    Ok(())
}

async fn checkpoint(sink: &SurrealSink) -> Result<i64> {
    let mut r = sink
        .client()
        .query("SELECT VALUE commit FROM ONLY _switchyard_checkpoint:main")
        .await?;
    let v: Option<i64> = r.take(0)?;
    Ok(v.unwrap_or(0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> Result<()> {
    common::log_from_env();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--writer") {
        let path = PathBuf::from(&args[i + 1]);
        let rows: usize = args[i + 2].parse()?;
        let updates: usize = args[i + 3].parse()?;
        return writer(&path, rows, updates).await;
    }
    let rows = env_usize("BENCH_ROWS", 1_000_000);
    let updates = env_usize("BENCH_UPDATES", 100_000);
    let tables = env_usize("BENCH_TABLES", 1).max(1);
    let dir = tempfile::tempdir()?;
    let source_path = dir.path().join("source.sqlite");
    println!(
        "# switchyard benchmark: SQLite → embedded SurrealDB (surrealkv), {rows} rows in {tables} table(s), {updates} updates, target.memory_mb = {}",
        memory_mb()
    );

    let t = Instant::now();
    generate(&source_path, rows, tables).await?;
    println!("generate: {:.1} s", t.elapsed().as_secs_f64());

    // Snapshot through the real pipeline.
    let target = format!("surrealkv://{}", dir.path().join("replica").display());
    let config = config_for(&source_path, &target)?;
    reset_peak_rss();
    let base_rss = peak_rss_mib();
    let sink = Arc::new(SurrealSink::connect(&target, false, &config).await?);
    let source: Arc<dyn Source> = Arc::new(
        SqliteSource::open(
            &source_path,
            &config,
            Default::default(),
            switchyard::source::Access::ReadWrite,
        )
        .await?,
    );
    let pipeline = Pipeline::new(
        config.clone(),
        source.clone(),
        sink.clone(),
        Default::default(),
    );
    let t = Instant::now();
    let cpu = cpu_seconds();
    let report = pipeline
        .run(Mode::SnapshotOnly, CancellationToken::new())
        .await?;
    let snap_s = t.elapsed().as_secs_f64();
    let snap_cores = (cpu_seconds() - cpu) / snap_s;
    let copied: u64 = report.tables.iter().map(|r| r.rows).sum();
    if copied != rows as u64 {
        bail!("snapshot copied {copied} rows, expected {rows}");
    }
    let snap_rss = peak_rss_mib();
    println!(
        "snapshot: {copied} rows in {snap_s:.1} s = {:.0} rows/s (pipeline incl. schema and state, {} rows per transaction), {snap_cores:.2} cores busy, peak RSS {snap_rss:.0} MiB (at start {base_rss:.0} MiB)",
        copied as f64 / snap_s,
        config.pipeline.snapshot_batch_rows
    );

    // Stream: the daemon's pipeline in this process, the writer in another.
    reset_peak_rss();
    let stream_base_rss = rss_mib();
    let stream_t0 = Instant::now();
    // The resident set every 100 ms: when in the stream its peak comes.
    let mut rss_top = (stream_base_rss, 0.0f64);
    let mut rss_at = Instant::now();
    let cancel = CancellationToken::new();
    let pipeline = Pipeline::new(
        config.clone(),
        source.clone(),
        sink.clone(),
        Default::default(),
    );
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    let start_cp = checkpoint(&sink).await?;
    let exe = std::env::current_exe()?;
    let writer_proc = tokio::process::Command::new(exe)
        .arg("--writer")
        .arg(&source_path)
        .arg((rows / tables).to_string())
        .arg(updates.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the writer process")?;
    let write_started = Instant::now();
    let write_started_ns = now_ns();
    // Observe the checkpoint until the writer is done and everything is applied.
    let mut observed: Vec<(u128, i64)> = Vec::new();
    let waiter = tokio::spawn(async move { writer_proc.wait_with_output().await });
    let mut last_cp = start_cp;
    loop {
        let cp = checkpoint(&sink).await?;
        if cp != last_cp {
            observed.push((now_ns(), cp));
            last_cp = cp;
        }
        if rss_at.elapsed() >= Duration::from_millis(100) {
            rss_at = Instant::now();
            let now = rss_mib();
            if now > rss_top.0 {
                rss_top = (now, stream_t0.elapsed().as_secs_f64());
            }
        }
        if waiter.is_finished() {
            break;
        }
        if write_started.elapsed() > Duration::from_secs(3600) {
            bail!("the writer did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let output = waiter.await??;
    if !output.status.success() {
        bail!("the writer failed: {}", output.status);
    }
    let write_s = write_started.elapsed().as_secs_f64();
    let commits: Vec<(i64, u128)> = String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|l| {
            let mut p = l.split(' ');
            Some((p.next()?.parse().ok()?, p.next()?.parse().ok()?))
        })
        .collect();
    if commits.len() != updates {
        bail!(
            "the writer reported {} commits, expected {updates}",
            commits.len()
        );
    }
    let last_seq = commits.last().map(|c| c.0).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(600);
    while last_cp < last_seq {
        if Instant::now() > deadline {
            bail!("switchyard did not catch up: checkpoint {last_cp}, last change {last_seq}");
        }
        let cp = checkpoint(&sink).await?;
        if cp != last_cp {
            observed.push((now_ns(), cp));
            last_cp = cp;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let applied_ns = observed.last().map(|o| o.0).unwrap_or(write_started_ns);
    let stream_s = (applied_ns - write_started_ns) as f64 / 1e9;
    let stream_rss = peak_rss_mib();
    let (anon, file) = rss_anon_file_mib();
    let stream_total_s = stream_t0.elapsed().as_secs_f64();
    cancel.cancel();
    daemon.await??;
    // Latency of each change: first observation of a checkpoint covering it.
    let mut lat_ms = Vec::with_capacity(commits.len());
    let mut j = 0;
    for (seq, committed) in &commits {
        while j < observed.len() && observed[j].1 < *seq {
            j += 1;
        }
        if j < observed.len() {
            lat_ms.push(observed[j].0.saturating_sub(*committed) as f64 / 1e6);
        }
    }
    lat_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "stream: {updates} single-row update transactions; writer took {write_s:.1} s ({:.0} commits/s); all applied after {stream_s:.1} s = {:.0} changes/s applied",
        updates as f64 / write_s,
        updates as f64 / stream_s
    );
    println!(
        "stream: resident set sampled every 100 ms: highest {:.0} MiB, {:.1} s into the stream's {stream_total_s:.1} s",
        rss_top.0, rss_top.1
    );
    println!(
        "stream: commit-to-visible latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples); peak RSS {stream_rss:.0} MiB (at start {stream_base_rss:.0} MiB; at the end {anon:.0} MiB anonymous, {file:.0} MiB of files)",
        percentile(&lat_ms, 0.50),
        percentile(&lat_ms, 0.99),
        lat_ms.last().copied().unwrap_or(f64::NAN),
        lat_ms.len()
    );
    // Close the replica before the ceiling phase opens its own store.
    drop(sink);
    drop(source);

    // Ceiling: the same rows, straight into another surrealkv directory.
    let ceiling_target = format!("surrealkv://{}", dir.path().join("ceiling").display());
    let cconfig = config_for(&source_path, &ceiling_target)?;
    let csource = SqliteSource::open(
        &source_path,
        &cconfig,
        Default::default(),
        switchyard::source::Access::ReadWrite,
    )
    .await?;
    // Every table's rows read ahead, then inserted one batch after the
    // other: the SDK's single stream.
    let tables: Vec<Arc<TableSchema>> = csource
        .discover()
        .await?
        .tables
        .into_iter()
        .map(Arc::new)
        .collect();
    let csource = Arc::new(csource);
    let batch = cconfig.pipeline.snapshot_batch_rows;
    let mut batches: Vec<(Arc<TableSchema>, Vec<Row>)> = Vec::new();
    for table in &tables {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Row>>(1024);
        let reader = {
            let (table, csource) = (table.clone(), csource.clone());
            tokio::spawn(async move { csource.snapshot(table, batch, tx).await })
        };
        while let Some(b) = rx.recv().await {
            batches.push((table.clone(), b));
        }
        reader.await??;
    }
    reset_peak_rss();
    let preread_rss = rss_mib();
    let csink = SurrealSink::connect(&ceiling_target, false, &cconfig).await?;
    csink.prepare(&tables).await?;
    let db = csink.client();
    let t = Instant::now();
    let cpu = cpu_seconds();
    let mut n = 0usize;
    for (table, batch) in &batches {
        let sql = format!(
            "INSERT IGNORE INTO {} $rows RETURN NONE;",
            ident(&table.target_name)
        );
        let items = batch
            .iter()
            .map(|row| record(table, row).map(SValue::Object))
            .collect::<switchyard::Result<Vec<_>>>()?;
        let mut vars = Variables::new();
        vars.insert("rows", Array::from(items));
        db.query(sql.as_str()).bind(vars).await?.check()?;
        n += batch.len();
    }
    let ceil_s = t.elapsed().as_secs_f64();
    let ceil_cores = (cpu_seconds() - cpu) / ceil_s;
    let snap_rate = copied as f64 / snap_s;
    let ceil_rate = n as f64 / ceil_s;
    let ceil_rss = peak_rss_mib();
    println!(
        "ceiling: {n} rows inserted with the SDK directly, batches of {}, in {ceil_s:.1} s = {ceil_rate:.0} rows/s, {ceil_cores:.2} cores busy; peak RSS {ceil_rss:.0} MiB, of which {preread_rss:.0} MiB before the inserts (the rows read ahead)",
        batch
    );
    println!("snapshot / ceiling: {:.0}%", 100.0 * snap_rate / ceil_rate);
    Ok(())
}

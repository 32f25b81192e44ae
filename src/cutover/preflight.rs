//! "Safe to switch?": what stands in the way of a cutover, read without
//! writing anything: tables not copied, keys or indexes not built, rows set
//! aside, roles and privileges the fence needs, the reverse replica's
//! needs, and lag.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::record::Options;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::TableSchema;
use crate::sink::{Sink, TableStatus};
use crate::source::{Pending, Source};

/// The preflight a running daemon answers on `/readyz?cutover`, with the
/// default options and its own lag.
pub fn check(pipeline: Arc<crate::pipeline::Pipeline>) -> crate::observe::CutoverCheck {
    Arc::new(move || {
        let p = pipeline.clone();
        Box::pin(async move {
            let tables = p.tables().await?;
            let opts = Options {
                check: true,
                ..Options::default()
            };
            let lag = Some(p.observer().view().lag_seconds.unwrap_or(f64::INFINITY));
            problems(&p.config(), &*p.source(), &*p.sink(), &tables, &opts, lag).await
        })
    })
}

/// Every reason not to cut over now (none: go).
pub async fn problems(
    config: &Config,
    source: &dyn Source,
    sink: &dyn Sink,
    tables: &[Arc<TableSchema>],
    opts: &Options,
    daemon_lag: Option<f64>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let Some(state) = sink.state().await? else {
        out.push("the target was never replicated into: run `switchyard run` first".into());
        return Ok(out);
    };
    for t in tables {
        match state.tables.get(&t.name) {
            Some(s) if s.status == TableStatus::Done => {}
            _ => out.push(format!("table {:?} is not copied yet", t.name)),
        }
    }
    out.extend(sink.cutover_problems(tables).await?);
    if config.source_is_surreal() {
        // A marker is read no sooner than the changefeed window after it
        // was written.
        // The window, a poll, and the apply.
        let least = Duration::from_millis(
            config.source.changefeed_window_ms + config.source.poll_interval_ms + 500,
        );
        if opts.max_lag < least {
            out.push(format!(
                "--max-lag {:?}: a SurrealDB source is read source.changefeed_window_ms ({} ms) behind its clock and polled every {} ms, so no marker comes back sooner; \
                 give --max-lag at least {}s",
                opts.max_lag,
                config.source.changefeed_window_ms,
                config.source.poll_interval_ms,
                least.as_secs() + 1
            ));
        }
    }
    if let Some(dir) = &config.pipeline.reject_dir {
        let n = rejected(dir)?;
        if n > 0 {
            out.push(format!(
                "{n} row(s) were set aside in {} (values the target refuses): fix them in the source, \
                 let their next change bring them over, and remove the files",
                dir.display()
            ));
        }
    }
    out.extend(
        source
            .cutover_problems(opts.fence, opts.roles.as_deref(), tables, opts.reverse)
            .await?,
    );
    if let Some(lag) = daemon_lag {
        // Asked of the daemon itself: its own measure, less the time a
        // caught-up daemon on an idle source shows (until the next
        // heartbeat). The catch-up step measures the real lag with a marker.
        let lag = if lag.is_infinite() {
            lag
        } else {
            (lag - idle_allowance(config)?).max(0.0)
        };
        if lag.is_infinite() {
            out.push("the daemon is not streaming yet".into());
        } else if lag > opts.max_lag.as_secs_f64() {
            out.push(format!(
                "the target is {lag:.1} s behind, more than {:?}",
                opts.max_lag
            ));
        }
    } else if let Some(cp) = state.checkpoint {
        if source.stream_in_use().await? {
            if let Some(lag) = lag_seconds(config, source, &state).await? {
                if lag > opts.max_lag.as_secs_f64() {
                    out.push(format!(
                        "the target is {lag:.1} s behind, more than --max-lag {:?}",
                        opts.max_lag
                    ));
                }
            }
        } else if opts.check {
            let head = source.current_position().await?;
            match source.pending(tables, cp, head).await? {
                Pending::Waiting(n) | Pending::Unknown(n) if n > 0 => out.push(format!(
                    "{n} change(s) wait in the source and no daemon applies them: start `switchyard run` \
                     (cutover without a daemon streams them itself first)"
                )),
                _ => {}
            }
        }
    }
    if opts.reverse {
        out.extend(reverse_problems(config, tables).await);
    }
    Ok(out)
}

/// The lag the running daemon reports on its HTTP endpoint; else how long
/// ago the checkpoint moved while the source is ahead, less the time a
/// caught-up daemon may leave it alone (an idle PostgreSQL source moves it
/// with each heartbeat; a SQLite source with each poll).
async fn lag_seconds(
    config: &Config,
    source: &dyn Source,
    state: &crate::sink::SinkState,
) -> Result<Option<f64>> {
    let allowance = idle_allowance(config)?;
    if let Some(address) = &config.http.address {
        if let Ok(view) = crate::observe::fetch_status(
            address,
            config.http.token.as_ref(),
            config.tenant.as_deref(),
        )
        .await
        {
            return Ok(view.lag_seconds.map(|l| (l - allowance).max(0.0)));
        }
    }
    let Some(cp) = state.checkpoint else {
        return Ok(None);
    };
    if source.lag(cp).await?.bytes == 0 {
        return Ok(Some(0.0));
    }
    Ok(state
        .checkpoint_updated_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            let age = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds()
                as f64
                / 1000.0;
            (age - allowance).max(0.0)
        }))
}

/// How far behind a caught-up daemon on an idle source may look: an idle
/// PostgreSQL source moves the applied position with each heartbeat, a
/// SQLite source with each poll.
fn idle_allowance(config: &Config) -> Result<f64> {
    Ok(match config.source_kind()? {
        crate::config::SourceKind::Postgres { .. } => config.source.heartbeat_interval_ms,
        crate::config::SourceKind::Sqlite { .. } => config.source.poll_interval_ms,
        // The stream reads up to the changefeed window behind the clock, and
        // moves its position at most once a second when idle.
        crate::config::SourceKind::Surreal { .. } => {
            config.source.changefeed_window_ms + config.source.poll_interval_ms + 1000
        }
    } as f64
        / 1000.0)
}

/// Rows in the reject files.
fn rejected(dir: &std::path::Path) -> Result<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "jsonl") {
            let text = std::fs::read_to_string(e.path()).map_err(|err| {
                Error::definite(format!("cannot read reject file {}", e.path().display()))
                    .with_source(err)
            })?;
            n += text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        }
    }
    Ok(n)
}

/// What the reverse replica needs: the target as a source (logical WAL, a
/// role that may replicate), and the old source's tables as its target.
async fn reverse_problems(config: &Config, tables: &[Arc<TableSchema>]) -> Vec<String> {
    let pairs: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.name.clone(), t.target_name.clone()))
        .collect();
    let rc = match config.reversed(&pairs, &super::reverse::key_columns(tables)) {
        Ok(c) => c,
        Err(e) => return vec![format!("--reverse: {e}")],
    };
    let mut out = Vec::new();
    if rc.source_is_surreal() {
        for t in tables.iter().filter(|t| t.whole_row) {
            out.push(format!(
                "--reverse: table {:?} has no key: its SurrealDB records are identified by a digest of the whole row, which the way back cannot turn into a PostgreSQL row; give it a primary key",
                t.name
            ));
        }
    }
    let rejects = Arc::new(crate::reject::Rejects::default());
    let reversed = match crate::connect::source(&rc, rejects, crate::source::Access::ReadOnly).await
    {
        Ok(s) => s,
        Err(e) => {
            return vec![format!(
                "--reverse: the target cannot be a source: {}",
                e.report()
            )]
        }
    };
    match reversed.discover().await {
        Ok(d) => {
            for p in d.problems.iter().filter(|p| p.blocking) {
                out.push(format!("--reverse: in the target, {p}"));
            }
            if d.tables.len() != tables.len() {
                out.push(format!(
                    "--reverse: the target holds {} of the {} replicated tables",
                    d.tables.len(),
                    tables.len()
                ));
            }
        }
        Err(e) => out.push(format!("--reverse: {}", e.report())),
    }
    out
}

/// A daemon that holds an embedded target (which one process opens at a
/// time) is asked to stop, so that cutover can open it and stream itself.
pub async fn release_embedded_target(config: &Config) -> Result<()> {
    let Some(path) = crate::connect::embedded_path(config)? else {
        return Ok(());
    };
    let Some(pid) = crate::lockfile::holder(&path)? else {
        return Ok(());
    };
    if pid == std::process::id() {
        return Err(Error::definite(format!(
            "this process streams into the embedded target {} already; stop that stream first",
            path.display()
        )));
    }
    info!(pid, target = %path.display(), "a running daemon holds the embedded target, which one process opens at a time: stopping it (SIGTERM); cutover streams itself");
    crate::lockfile::terminate(pid)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while crate::lockfile::holder(&path)?.is_some() {
        if std::time::Instant::now() > deadline {
            return Err(Error::definite(format!(
                "switchyard process {pid} did not stop within a minute; stop it, then run cutover again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

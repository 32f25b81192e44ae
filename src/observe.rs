//! What the daemon shows of itself: the status board (phase, positions, lag,
//! per-table state, last error), the Prometheus metrics, and the HTTP
//! endpoints `/healthz`, `/readyz`, `/status` and `/metrics`.
//!
//! The pipeline writes to an [`Observer`]; the HTTP server and `switchyard
//! status` read a [`StatusView`] from it. Metrics go through the `metrics`
//! facade; [`prometheus`] installs the recorder once per process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::error::{Error, Result};
use crate::model::{Change, Position};
use crate::source::SourceLag;

/// The names of the metrics the daemon exports (the deploy/ files use them).
pub mod names {
    pub const PHASE: &str = "switchyard_phase";
    pub const LAG_BYTES: &str = "switchyard_lag_bytes";
    pub const LAG_SECONDS: &str = "switchyard_lag_seconds";
    pub const SLOT_RETAINED_BYTES: &str = "switchyard_slot_retained_bytes";
    pub const CHANGES_APPLIED: &str = "switchyard_changes_applied_total";
    pub const TRANSACTIONS_APPLIED: &str = "switchyard_transactions_applied_total";
    pub const BATCH_CHANGES: &str = "switchyard_batch_changes";
    pub const APPLY_DURATION: &str = "switchyard_apply_duration_seconds";
    pub const SNAPSHOT_ROWS: &str = "switchyard_snapshot_rows_total";
    pub const SNAPSHOT_PROGRESS: &str = "switchyard_snapshot_progress_ratio";
    pub const RETRIES: &str = "switchyard_retries_total";
    pub const ERRORS: &str = "switchyard_errors_total";
    pub const CONNECTION_UP: &str = "switchyard_connection_up";
    pub const CHECKPOINT: &str = "switchyard_checkpoint_position";
    /// Rows set aside in `pipeline.reject_dir`, by table.
    pub const ROWS_REJECTED: &str = "switchyard_rows_rejected_total";

    pub const ALL: [&str; 15] = [
        PHASE,
        LAG_BYTES,
        LAG_SECONDS,
        SLOT_RETAINED_BYTES,
        CHANGES_APPLIED,
        TRANSACTIONS_APPLIED,
        BATCH_CHANGES,
        APPLY_DURATION,
        SNAPSHOT_ROWS,
        SNAPSHOT_PROGRESS,
        RETRIES,
        ERRORS,
        CONNECTION_UP,
        CHECKPOINT,
        ROWS_REJECTED,
    ];
}

/// Where the daemon is in its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    /// Copying tables.
    Snapshot,
    /// Streaming, with changes waiting that the source sent earlier.
    CatchUp,
    /// Streaming, caught up with what the source has sent.
    Streaming,
    Stopped,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Starting,
        Phase::Snapshot,
        Phase::CatchUp,
        Phase::Streaming,
        Phase::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Snapshot => "snapshot",
            Phase::CatchUp => "catch_up",
            Phase::Streaming => "streaming",
            Phase::Stopped => "stopped",
        }
    }
}

/// One table as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableView {
    /// `copying`, `copied` (then streaming with the rest).
    pub state: String,
    /// Rows copied.
    pub rows: u64,
    /// Rows the source estimated before the copy.
    pub estimated_rows: Option<u64>,
    /// Changes applied since the daemon started.
    pub changes_applied: u64,
    /// The copy's duration and rate, once copied by this run.
    pub seconds: Option<f64>,
    pub rows_per_second: Option<f64>,
    /// Rows set aside in the table's reject file by this run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejected: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The daemon's picture of itself: what `/status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub phase: Phase,
    pub source: String,
    pub target: String,
    /// The position the target has applied (its checkpoint).
    pub checkpoint: Option<String>,
    /// The source's newest position.
    pub source_position: Option<String>,
    /// PostgreSQL: WAL bytes not applied yet; SQLite: change-log rows.
    pub lag_bytes: Option<u64>,
    /// How old the newest applied commit is while the target is behind; 0
    /// when caught up.
    pub lag_seconds: Option<f64>,
    /// PostgreSQL: WAL the slot holds back.
    pub slot_retained_bytes: Option<u64>,
    /// Set while the slot holds back more than `source.slot_warn_mb`.
    pub slot_warning: Option<String>,
    pub changes_applied: u64,
    pub tables: BTreeMap<String, TableView>,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

struct Board {
    view: StatusView,
    checkpoint: Option<Position>,
    /// When the source committed what the target applied last.
    applied_commit_time: Option<DateTime<Utc>>,
    /// When streaming started (lag before anything was applied).
    stream_started: Option<DateTime<Utc>>,
    /// Changes received and not applied yet.
    backlog: bool,
    /// The last lag sample that found nothing behind.
    caught_up_at: Option<DateTime<Utc>>,
}

/// The status board the pipeline writes and the endpoints read.
pub struct Observer {
    board: Mutex<Board>,
    rejects: Arc<crate::reject::Rejects>,
}

impl Observer {
    pub fn new(source: String, target: String, rejects: Arc<crate::reject::Rejects>) -> Arc<Self> {
        let view = StatusView {
            phase: Phase::Starting,
            source,
            target,
            checkpoint: None,
            source_position: None,
            lag_bytes: None,
            lag_seconds: None,
            slot_retained_bytes: None,
            slot_warning: None,
            changes_applied: 0,
            tables: BTreeMap::new(),
            last_error: None,
            updated_at: Utc::now(),
        };
        let o = Arc::new(Self {
            board: Mutex::new(Board {
                view,
                checkpoint: None,
                applied_commit_time: None,
                stream_started: None,
                backlog: false,
                caught_up_at: None,
            }),
            rejects,
        });
        o.publish_phase(Phase::Starting);
        // Every gauge exists from the start, so that scrapes and alert rules
        // see them before the first change.
        for side in ["source", "target"] {
            gauge!(names::CONNECTION_UP, "side" => side).set(0.0);
        }
        o
    }

    fn with<T>(&self, f: impl FnOnce(&mut Board) -> T) -> T {
        let mut b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut b);
        b.view.updated_at = Utc::now();
        out
    }

    fn publish_phase(&self, phase: Phase) {
        for p in Phase::ALL {
            gauge!(names::PHASE, "phase" => p.as_str()).set(if p == phase { 1.0 } else { 0.0 });
        }
    }

    pub fn phase(&self) -> Phase {
        self.with(|b| b.view.phase)
    }

    pub fn set_phase(&self, phase: Phase) {
        let changed = self.with(|b| {
            let changed = b.view.phase != phase;
            b.view.phase = phase;
            if matches!(phase, Phase::CatchUp | Phase::Streaming) && b.stream_started.is_none() {
                b.stream_started = Some(Utc::now());
            }
            changed
        });
        if changed {
            self.publish_phase(phase);
            info!(phase = phase.as_str(), "phase");
        }
    }

    /// Before streaming: when the target's checkpoint last moved (lag in
    /// seconds after a restart counts from there, not from the restart).
    pub fn resumed_from(&self, checkpoint_moved: DateTime<Utc>) {
        self.with(|b| b.applied_commit_time = Some(checkpoint_moved));
    }

    pub fn set_checkpoint(&self, p: Position) {
        self.with(|b| {
            b.checkpoint = Some(p);
            b.view.checkpoint = Some(p.to_string());
        });
        gauge!(names::CHECKPOINT).set(p.commit as f64);
    }

    pub fn checkpoint(&self) -> Option<Position> {
        self.with(|b| b.checkpoint)
    }

    pub fn table_copying(&self, table: &str, estimated_rows: Option<u64>) {
        self.with(|b| {
            b.view.tables.insert(
                table.to_string(),
                TableView {
                    state: "copying".into(),
                    rows: 0,
                    estimated_rows,
                    ..Default::default()
                },
            );
        });
        gauge!(names::SNAPSHOT_PROGRESS, "table" => table.to_string()).set(0.0);
    }

    pub fn table_rows(&self, table: &str, added: u64) {
        let ratio = self.with(|b| {
            let t = b.view.tables.entry(table.to_string()).or_default();
            t.rows += added;
            t.estimated_rows
                .filter(|n| *n > 0)
                .map(|n| (t.rows as f64 / n as f64).min(1.0))
        });
        counter!(names::SNAPSHOT_ROWS, "table" => table.to_string()).increment(added);
        if let Some(r) = ratio {
            gauge!(names::SNAPSHOT_PROGRESS, "table" => table.to_string()).set(r);
        }
    }

    /// A table is copied (`seconds`: by this run, how long it took).
    pub fn table_copied(&self, table: &str, rows: u64, seconds: Option<f64>) {
        self.with(|b| {
            let t = b.view.tables.entry(table.to_string()).or_default();
            t.state = "copied".into();
            t.rows = rows;
            t.seconds = seconds;
            t.rows_per_second = seconds.filter(|s| *s > 0.0).map(|s| rows as f64 / s);
        });
        gauge!(names::SNAPSHOT_PROGRESS, "table" => table.to_string()).set(1.0);
    }

    /// A batch is durable in the target.
    pub fn applied(
        &self,
        changes: &[Change],
        checkpoint: Position,
        committed_at: Option<DateTime<Utc>>,
        took: Duration,
        backlog: bool,
    ) {
        let mut transactions = 0u64;
        let mut last_commit = None;
        for c in changes {
            counter!(names::CHANGES_APPLIED, "table" => c.table.name.clone(), "op" => c.kind())
                .increment(1);
            if last_commit != Some(c.position.commit) {
                transactions += 1;
                last_commit = Some(c.position.commit);
            }
        }
        counter!(names::TRANSACTIONS_APPLIED).increment(transactions);
        if !changes.is_empty() {
            histogram!(names::BATCH_CHANGES).record(changes.len() as f64);
            histogram!(names::APPLY_DURATION).record(took.as_secs_f64());
        }
        gauge!(names::CONNECTION_UP, "side" => "target").set(1.0);
        self.with(|b| {
            b.view.changes_applied += changes.len() as u64;
            for c in changes {
                b.view
                    .tables
                    .entry(c.table.name.clone())
                    .or_default()
                    .changes_applied += 1;
            }
            if committed_at.is_some() {
                b.applied_commit_time = committed_at;
            }
            b.backlog = backlog;
        });
        self.set_checkpoint(checkpoint);
        self.set_phase(if backlog {
            Phase::CatchUp
        } else {
            Phase::Streaming
        });
    }

    /// The source's position against the applied one, read by the status task.
    pub fn source_lag(&self, lag: &SourceLag) {
        let seconds = self.with(|b| {
            b.view.source_position = Some(lag.head.clone());
            b.view.lag_bytes = Some(lag.bytes);
            b.view.slot_retained_bytes = lag.slot_retained_bytes;
            b.view.slot_warning = lag.slot_warning.clone();
            let behind = lag.bytes > 0 || b.backlog;
            let now = Utc::now();
            if !behind {
                b.caught_up_at = Some(now);
            }
            // Behind since the later of: the commit time of what was applied
            // last, and the last time nothing was behind.
            let since = match (b.applied_commit_time, b.caught_up_at) {
                (Some(a), Some(c)) => Some(a.max(c)),
                (a, c) => a.or(c).or(b.stream_started),
            };
            let seconds = match (behind, since) {
                (false, _) => 0.0,
                (true, Some(t)) => (now - t).num_milliseconds().max(0) as f64 / 1000.0,
                (true, None) => 0.0,
            };
            b.view.lag_seconds = Some(seconds);
            seconds
        });
        gauge!(names::LAG_BYTES).set(lag.bytes as f64);
        gauge!(names::LAG_SECONDS).set(seconds);
        if let Some(r) = lag.slot_retained_bytes {
            gauge!(names::SLOT_RETAINED_BYTES).set(r as f64);
        }
        gauge!(names::CONNECTION_UP, "side" => "source").set(1.0);
    }

    /// The source could not be asked for its position.
    pub fn source_unreachable(&self) {
        gauge!(names::CONNECTION_UP, "side" => "source").set(0.0);
    }

    /// An operation failed and is tried again.
    pub fn retry(operation: &str, e: &Error) {
        counter!(names::RETRIES, "operation" => operation.to_string()).increment(1);
        counter!(names::ERRORS, "kind" => kind_name(e)).increment(1);
    }

    /// The run failed.
    pub fn failed(&self, e: &Error) {
        counter!(names::ERRORS, "kind" => kind_name(e)).increment(1);
        gauge!(names::CONNECTION_UP, "side" => "target").set(0.0);
        self.with(|b| b.view.last_error = Some(e.report()));
        self.set_phase(Phase::Stopped);
    }

    pub fn stopped(&self) {
        self.set_phase(Phase::Stopped);
    }

    pub fn view(&self) -> StatusView {
        let mut v = self.with(|b| b.view.clone());
        for (table, n) in self.rejects.counts() {
            v.tables.entry(table).or_default().rejected = n;
        }
        v
    }

    /// Streaming with at most `max_lag` seconds of lag.
    pub fn ready(&self, max_lag: f64) -> bool {
        let v = self.view();
        matches!(v.phase, Phase::Streaming | Phase::CatchUp)
            && v.lag_seconds.is_some_and(|s| s <= max_lag)
    }
}

fn kind_name(e: &Error) -> &'static str {
    match e.kind() {
        crate::error::ErrorKind::Config => "config",
        crate::error::ErrorKind::Connect => "connect",
        crate::error::ErrorKind::Transient => "transient",
        crate::error::ErrorKind::Definite => "definite",
        crate::error::ErrorKind::Interrupted => "interrupted",
    }
}

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(names::APPLY_DURATION.into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(names::BATCH_CHANGES.into()),
                    &[
                        1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0,
                    ],
                )
            })
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // A second recorder (another library in the process) keeps its own;
        // ours still renders what reaches it.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Binds the HTTP address (an error names `http.address`).
pub async fn listen(address: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| {
        Error::config(format!("http.address: cannot listen on {address}")).with_source(e)
    })
}

/// The HTTP endpoints, until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    token: Option<SecretString>,
    max_lag: f64,
    observer: Arc<Observer>,
    cancel: CancellationToken,
) -> Result<()> {
    use axum::routing::get;
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let bound = address;
    prometheus();
    let state = Arc::new(HttpState {
        token,
        max_lag,
        observer,
    });
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    info!(address = %bound, "HTTP endpoints listening: /healthz /readyz /status /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(|e| Error::transient("the HTTP server failed").with_source(e))
}

struct HttpState {
    token: Option<SecretString>,
    max_lag: f64,
    observer: Arc<Observer>,
}

type Reply = (
    axum::http::StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
);

fn reply(code: u16, content_type: &'static str, body: String) -> Reply {
    (
        axum::http::StatusCode::from_u16(code).expect("a valid status"),
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body,
    )
}

/// Whether the request carries the bearer token (or none is configured).
fn authorized(state: &HttpState, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = given.strip_prefix("Bearer ") else {
        return false;
    };
    // Compared in constant time.
    let want = token.expose_secret().as_bytes();
    let given = given.trim().as_bytes();
    want.len() == given.len()
        && want
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn unauthorized() -> Reply {
    reply(
        401,
        "text/plain; charset=utf-8",
        "a bearer token is required (http.token)\n".into(),
    )
}

async fn readyz(axum::extract::State(state): axum::extract::State<Arc<HttpState>>) -> Reply {
    let v = state.observer.view();
    if state.observer.ready(state.max_lag) {
        reply(200, "text/plain; charset=utf-8", "ready\n".into())
    } else {
        let why = match v.lag_seconds {
            Some(s) if matches!(v.phase, Phase::Streaming | Phase::CatchUp) => {
                format!("not ready: lag {s:.1} s over {} s\n", state.max_lag)
            }
            _ => format!("not ready: phase {}\n", v.phase.as_str()),
        };
        reply(503, "text/plain; charset=utf-8", why)
    }
}

async fn status_handler(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
) -> Reply {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let body = serde_json::to_string_pretty(&state.observer.view()).unwrap_or_else(|_| "{}".into());
    reply(200, "application/json", body)
}

async fn metrics_text(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
) -> Reply {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    reply(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        prometheus().render(),
    )
}

/// How often the pipeline asks the source for its position while streaming.
pub const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// What `switchyard status` prints: read from the target and the source
/// directly, whether or not the daemon runs; and the daemon's own view when
/// its HTTP endpoint answers.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `not_started`, `copying`, `caught_up` or `behind`.
    pub state: String,
    pub source: String,
    pub target: String,
    pub checkpoint: Option<String>,
    pub checkpoint_updated_at: Option<String>,
    pub source_position: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub slot_retained_bytes: Option<u64>,
    pub slot_warning: Option<String>,
    pub tables: BTreeMap<String, TableStatusLine>,
    /// The running daemon's `/status`, when `http.address` is set and answers.
    pub daemon: Option<StatusView>,
    /// Why parts of the picture are missing.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableStatusLine {
    pub state: String,
    pub rows: u64,
    pub snapshot_position: String,
}

/// Gathers [`Status`] for `config`. The daemon's endpoint is asked first:
/// an embedded target is locked by a running daemon and cannot be opened
/// beside it.
pub async fn status(config: &crate::config::Config) -> Result<Status> {
    use crate::config::redact_url;
    let mut out = Status {
        state: "not_started".into(),
        source: redact_url(&config.source.url),
        target: redact_url(&config.target.url),
        checkpoint: None,
        checkpoint_updated_at: None,
        source_position: None,
        lag_bytes: None,
        lag_seconds: None,
        slot_retained_bytes: None,
        slot_warning: None,
        tables: BTreeMap::new(),
        daemon: None,
        notes: Vec::new(),
    };
    if let Some(address) = &config.http.address {
        match fetch_status(address, config.http.token.as_ref()).await {
            Ok(view) => out.daemon = Some(view),
            Err(e) => out.notes.push(format!(
                "the daemon's endpoint {address} did not answer: {e}"
            )),
        }
    }
    let sink = match crate::sink::open(config).await {
        Ok(s) => Some(s),
        Err(e) => {
            out.notes.push(format!(
                "cannot open the target ({}); a running daemon holds an embedded target",
                e.report()
            ));
            None
        }
    };
    let state = match &sink {
        Some(s) => match s.state().await {
            Ok(st) => Some(st),
            Err(e) if e.report().contains("does not exist") => Some(Default::default()),
            Err(e) => return Err(e.context("reading the target's checkpoint")),
        },
        None => None,
    };
    drop(sink);
    let Some(state) = state else {
        if let Some(d) = &out.daemon {
            out.state = d.phase.as_str().into();
        }
        return Ok(out);
    };
    for (name, t) in &state.tables {
        out.tables.insert(
            name.clone(),
            TableStatusLine {
                state: match t.status {
                    crate::sink::TableStatus::Done => "copied".into(),
                    crate::sink::TableStatus::Copying => "copying".into(),
                },
                rows: t.rows,
                snapshot_position: t.position.to_string(),
            },
        );
    }
    out.checkpoint = state.checkpoint.map(|p| p.to_string());
    out.checkpoint_updated_at = state.checkpoint_updated_at.clone();
    let Some(checkpoint) = state.checkpoint else {
        return Ok(out);
    };
    let source = crate::source::open(config).await?;
    let lag = source.lag(checkpoint).await?;
    let behind = lag.bytes > 0;
    let updated = state
        .checkpoint_updated_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    out.lag_seconds = Some(match (behind, updated) {
        (false, _) => 0.0,
        (true, Some(t)) => {
            (Utc::now() - t.with_timezone(&Utc))
                .num_milliseconds()
                .max(0) as f64
                / 1000.0
        }
        (true, None) => f64::NAN,
    })
    .filter(|s| !s.is_nan());
    out.source_position = Some(lag.head);
    out.lag_bytes = Some(lag.bytes);
    out.slot_retained_bytes = lag.slot_retained_bytes;
    out.slot_warning = lag.slot_warning.clone();
    out.state = if state
        .tables
        .values()
        .any(|t| t.status == crate::sink::TableStatus::Copying)
    {
        "copying".into()
    } else if behind {
        "behind".into()
    } else {
        "caught_up".into()
    };
    Ok(out)
}

/// GET /status from the daemon (plain HTTP/1.1 on loopback or the
/// configured address).
async fn fetch_status(
    address: &str,
    token: Option<&SecretString>,
) -> std::result::Result<StatusView, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(address);
    let mut conn = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {}\r\n", t.expose_secret()))
        .unwrap_or_default();
    let request =
        format!("GET /status HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n");
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut body))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        return Err(format!("HTTP {code}"));
    }
    serde_json::from_str(body).map_err(|e| format!("unreadable /status: {e}"))
}

impl Status {
    /// The text `switchyard status` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "state              {}", self.state);
        let _ = writeln!(s, "source             {}", self.source);
        let _ = writeln!(s, "target             {}", self.target);
        let _ = writeln!(
            s,
            "checkpoint         {} (moved {})",
            opt(&self.checkpoint),
            opt(&self.checkpoint_updated_at)
        );
        let _ = writeln!(s, "source position    {}", opt(&self.source_position));
        let _ = writeln!(
            s,
            "lag                {} bytes/rows, {} s",
            self.lag_bytes.map_or("-".into(), |b| b.to_string()),
            self.lag_seconds.map_or("-".into(), |x| format!("{x:.1}"))
        );
        if let Some(r) = self.slot_retained_bytes {
            let _ = writeln!(
                s,
                "slot retains       {:.1} MiB of WAL",
                r as f64 / (1 << 20) as f64
            );
        }
        if let Some(w) = &self.slot_warning {
            let _ = writeln!(s, "warning            {w}");
        }
        if let Some(d) = &self.daemon {
            let _ = writeln!(
                s,
                "daemon             {} ({} changes applied since start{})",
                d.phase.as_str(),
                d.changes_applied,
                d.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        if !self.tables.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<32} {:>8} {:>12}  copied at",
                "table", "state", "rows"
            );
            for (name, t) in &self.tables {
                let _ = writeln!(
                    s,
                    "{name:<32} {:>8} {:>12}  {}",
                    t.state, t.rows, t.snapshot_position
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

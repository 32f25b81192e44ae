//! What the daemon shows of itself: the status board (phase, positions, lag,
//! per-table state, last error), the Prometheus metrics, and the HTTP
//! endpoints `/healthz`, `/readyz`, `/status` and `/metrics`.
//!
//! The pipeline writes to an [`Observer`]; the HTTP server (and through it
//! `switchyard status`) reads a [`StatusView`] from it. Metrics go through
//! the `metrics` facade, named in [`crate::metric`]; [`prometheus`] installs
//! the recorder once per process.

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
use crate::metric;
use crate::model::Change;
use crate::position::Position;
use crate::source::SourceLag;

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
    /// The tenant (`ns/db` of the source) with `[[tenants]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
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
    /// When a flip between catching up and streaming was last logged.
    flip_logged: Option<std::time::Instant>,
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
    /// The cutover preflight `/readyz?cutover` asks (set by `run`).
    cutover_check: Mutex<Option<CutoverCheck>>,
    /// The tenant, labelled on every metric.
    tenant: Option<String>,
}

/// A cutover preflight: the reasons not to cut over now (none: go).
pub type CutoverCheck =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Vec<String>>> + Send + Sync>;

impl Observer {
    /// What `/readyz?cutover` asks.
    pub fn set_cutover_check(&self, check: CutoverCheck) {
        if let Ok(mut c) = self.cutover_check.lock() {
            *c = Some(check);
        }
    }

    pub fn new(
        source: String,
        target: String,
        rejects: Arc<crate::reject::Rejects>,
        tenant: Option<String>,
    ) -> Arc<Self> {
        let view = StatusView {
            tenant: tenant.clone(),
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
                flip_logged: None,
                checkpoint: None,
                applied_commit_time: None,
                stream_started: None,
                backlog: false,
                caught_up_at: None,
            }),
            rejects,
            cutover_check: Mutex::new(None),
            tenant,
        });
        o.publish_phase(Phase::Starting);
        // Every gauge exists from the start, so that scrapes and alert rules
        // see them before the first change.
        for side in ["source", "target"] {
            gauge!(metric::CONNECTION_UP, o.labels(&[("side", side)])).set(0.0);
        }
        o
    }

    /// A metric's labels, with the tenant's where there is one.
    fn labels(&self, pairs: &[(&'static str, &str)]) -> Vec<metrics::Label> {
        let mut out: Vec<metrics::Label> = pairs
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.to_string()))
            .collect();
        if let Some(t) = &self.tenant {
            out.push(metrics::Label::new("tenant", t.clone()));
        }
        out
    }

    fn with<T>(&self, f: impl FnOnce(&mut Board) -> T) -> T {
        let mut b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut b);
        b.view.updated_at = Utc::now();
        out
    }

    fn publish_phase(&self, phase: Phase) {
        for p in Phase::ALL {
            gauge!(metric::PHASE, self.labels(&[("phase", p.as_str())])).set(if p == phase {
                1.0
            } else {
                0.0
            });
        }
    }

    pub fn phase(&self) -> Phase {
        self.with(|b| b.view.phase)
    }

    /// Sets the phase. A change is logged; flips between catching up and
    /// streaming (which follow the source's every burst) at most every
    /// [`FLIP_LOG_EVERY`], the rest at debug level.
    pub fn set_phase(&self, phase: Phase) {
        let (changed, log) = self.with(|b| {
            let was = b.view.phase;
            let changed = was != phase;
            b.view.phase = phase;
            if matches!(phase, Phase::CatchUp | Phase::Streaming) && b.stream_started.is_none() {
                b.stream_started = Some(Utc::now());
            }
            let flip = matches!(
                (was, phase),
                (Phase::CatchUp, Phase::Streaming) | (Phase::Streaming, Phase::CatchUp)
            );
            let log =
                changed && (!flip || b.flip_logged.is_none_or(|t| t.elapsed() >= FLIP_LOG_EVERY));
            if log && flip {
                b.flip_logged = Some(std::time::Instant::now());
            }
            (changed, log)
        });
        if changed {
            self.publish_phase(phase);
            if log {
                info!(phase = phase.as_str(), "phase");
            } else {
                tracing::debug!(phase = phase.as_str(), "phase");
            }
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
        gauge!(metric::CHECKPOINT, self.labels(&[])).set(p.commit as f64);
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
        gauge!(metric::SNAPSHOT_PROGRESS, self.labels(&[("table", table)])).set(0.0);
    }

    pub fn table_rows(&self, table: &str, added: u64) {
        let ratio = self.with(|b| {
            let t = b.view.tables.entry(table.to_string()).or_default();
            t.rows += added;
            t.estimated_rows
                .filter(|n| *n > 0)
                .map(|n| (t.rows as f64 / n as f64).min(1.0))
        });
        counter!(metric::SNAPSHOT_ROWS, self.labels(&[("table", table)])).increment(added);
        if let Some(r) = ratio {
            gauge!(metric::SNAPSHOT_PROGRESS, self.labels(&[("table", table)])).set(r);
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
        gauge!(metric::SNAPSHOT_PROGRESS, self.labels(&[("table", table)])).set(1.0);
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
            counter!(
                metric::CHANGES_APPLIED,
                self.labels(&[("table", &c.table.name), ("op", c.kind())])
            )
            .increment(1);
            if last_commit != Some(c.position.commit) {
                transactions += 1;
                last_commit = Some(c.position.commit);
            }
        }
        counter!(metric::TRANSACTIONS_APPLIED, self.labels(&[])).increment(transactions);
        if !changes.is_empty() {
            histogram!(metric::BATCH_CHANGES, self.labels(&[])).record(changes.len() as f64);
            histogram!(metric::APPLY_DURATION, self.labels(&[])).record(took.as_secs_f64());
        }
        gauge!(metric::CONNECTION_UP, self.labels(&[("side", "target")])).set(1.0);
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
        gauge!(metric::LAG_BYTES, self.labels(&[])).set(lag.bytes as f64);
        gauge!(metric::LAG_SECONDS, self.labels(&[])).set(seconds);
        if let Some(r) = lag.slot_retained_bytes {
            gauge!(metric::SLOT_RETAINED_BYTES, self.labels(&[])).set(r as f64);
        }
        gauge!(metric::CONNECTION_UP, self.labels(&[("side", "source")])).set(1.0);
    }

    /// The source could not be asked for its position.
    pub fn source_unreachable(&self) {
        gauge!(metric::CONNECTION_UP, self.labels(&[("side", "source")])).set(0.0);
    }

    /// The run failed.
    pub fn failed(&self, e: &Error) {
        counter!(
            metric::ERRORS,
            self.labels(&[("kind", metric::error_kind(e))])
        )
        .increment(1);
        gauge!(metric::CONNECTION_UP, self.labels(&[("side", "target")])).set(0.0);
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

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(metric::APPLY_DURATION.into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(metric::BATCH_CHANGES.into()),
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
    observers: Vec<Arc<Observer>>,
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
        observers,
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
    /// One replication's, or each tenant's.
    observers: Vec<Arc<Observer>>,
}

impl HttpState {
    /// The replication's observer where there are no tenants.
    fn single(&self) -> Option<&Arc<Observer>> {
        match self.observers.as_slice() {
            [o] if o.tenant.is_none() => Some(o),
            _ => None,
        }
    }
}

/// The `tenant=ns/db` of a query string.
fn tenant_asked(uri: &axum::http::Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|p| {
        let v = p.strip_prefix("tenant=")?;
        Some(v.replace("%2F", "/").replace("%2f", "/"))
    })
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
    use subtle::ConstantTimeEq;
    bool::from(
        token
            .expose_secret()
            .as_bytes()
            .ct_eq(given.trim().as_bytes()),
    )
}

fn unauthorized() -> Reply {
    reply(
        401,
        "text/plain; charset=utf-8",
        "a bearer token is required (http.token)\n".into(),
    )
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Reply {
    if uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "cutover" || p.starts_with("cutover="))
    }) {
        return ready_for_cutover(&state, &headers).await;
    }
    // Ready when every tenant is.
    let mut why = Vec::new();
    for o in &state.observers {
        if o.ready(state.max_lag) {
            continue;
        }
        let v = o.view();
        let reason = match v.lag_seconds {
            Some(s) if matches!(v.phase, Phase::Streaming | Phase::CatchUp) => {
                format!("lag {s:.1} s over {} s", state.max_lag)
            }
            _ => format!("phase {}", v.phase.as_str()),
        };
        why.push(match &o.tenant {
            Some(t) => format!("tenant {t}: {reason}"),
            None => reason,
        });
    }
    if why.is_empty() {
        reply(200, "text/plain; charset=utf-8", "ready\n".into())
    } else {
        reply(
            503,
            "text/plain; charset=utf-8",
            format!("not ready: {}\n", why.join("; ")),
        )
    }
}

/// `/readyz?cutover`: the cutover preflight's go (200) or no-go (503);
/// the reasons only with the token, where one is configured.
async fn ready_for_cutover(state: &HttpState, headers: &axum::http::HeaderMap) -> Reply {
    let Some(observer) = state.single() else {
        return reply(
            503,
            "text/plain; charset=utf-8",
            "no-go: cutover is not available with [[tenants]]\n".into(),
        );
    };
    let check = observer.cutover_check.lock().ok().and_then(|c| c.clone());
    let Some(check) = check else {
        return reply(
            503,
            "text/plain; charset=utf-8",
            "no-go: the daemon is not streaming yet\n".into(),
        );
    };
    let reasons = match check().await {
        Ok(r) => r,
        Err(e) => vec![format!("the preflight could not run: {}", e.report())],
    };
    let detail = authorized(state, headers);
    if reasons.is_empty() {
        return reply(200, "text/plain; charset=utf-8", "go\n".into());
    }
    let body = if detail {
        format!(
            "no-go:\n{}",
            reasons
                .iter()
                .map(|r| format!("- {r}\n"))
                .collect::<String>()
        )
    } else {
        "no-go\n".into()
    };
    reply(503, "text/plain; charset=utf-8", body)
}

/// `/status`: the replication's view; with tenants each tenant's by name
/// (`{"tenants": {"ns/db": …}}`), or one with `?tenant=ns/db`.
async fn status_handler(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Reply {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let body = if let Some(o) = state.single() {
        serde_json::to_value(o.view())
    } else if let Some(t) = tenant_asked(&uri) {
        match state
            .observers
            .iter()
            .find(|o| o.tenant.as_deref() == Some(t.as_str()))
        {
            Some(o) => serde_json::to_value(o.view()),
            None => {
                return reply(
                    404,
                    "text/plain; charset=utf-8",
                    format!("no tenant {t:?}\n"),
                )
            }
        }
    } else {
        let tenants: serde_json::Map<String, serde_json::Value> = state
            .observers
            .iter()
            .filter_map(|o| {
                Some((
                    o.tenant.clone().unwrap_or_default(),
                    serde_json::to_value(o.view()).ok()?,
                ))
            })
            .collect();
        Ok(serde_json::json!({ "tenants": tenants }))
    };
    let body = body
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| "{}".into());
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

/// How often a flip between catching up and streaming is logged at most.
pub const FLIP_LOG_EVERY: Duration = Duration::from_secs(30);

/// How often the pipeline asks the source for its position while streaming.
pub const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// GET /status from the daemon's HTTP endpoint.
pub async fn fetch_status(
    address: &str,
    token: Option<&SecretString>,
    tenant: Option<&str>,
) -> std::result::Result<StatusView, String> {
    let path = match tenant {
        Some(t) => format!("/status?tenant={}", t.replace('/', "%2F")),
        None => "/status".to_string(),
    };
    use http_body_util::{BodyExt, Empty};
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut request = hyper::Request::get(path.as_str()).header(hyper::header::HOST, address);
        if let Some(t) = token {
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", t.expose_secret()),
            );
        }
        let request = request
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if code != hyper::StatusCode::OK {
            return Err(format!("HTTP {}", code.as_u16()));
        }
        serde_json::from_slice(&body).map_err(|e| format!("unreadable /status: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| "timed out".to_string())?
}

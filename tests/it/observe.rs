//! Lag, status, metrics and the HTTP endpoints, against the test PostgreSQL
//! and embedded SurrealDB.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard::metric as names;
use switchyard::model::{Change, Row, TableSchema};
use switchyard::observe;
use switchyard::pipeline::{Mode, Pipeline};
use switchyard::position::{Durable, Position};
use switchyard::sink::surreal::SurrealSink;
use switchyard::sink::{Sink, SinkState};
use switchyard::source::postgres::PgSource;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::pg_surreal::PgDb;
use crate::support::*;

/// The real SurrealDB sink, whose `apply` waits while the gate is shut: the
/// target "held back".
struct GatedSink {
    inner: Arc<SurrealSink>,
    open: watch::Receiver<bool>,
}

#[async_trait]
impl Sink for GatedSink {
    async fn prepare(&self, tables: &[Arc<TableSchema>]) -> switchyard::Result<()> {
        self.inner.prepare(tables).await
    }
    async fn state(&self) -> switchyard::Result<Option<SinkState>> {
        self.inner.state().await
    }
    async fn start(&self, position: Position, origin: &str) -> switchyard::Result<()> {
        self.inner.start(position, origin).await
    }
    async fn forget_table(&self, name: &str) -> switchyard::Result<()> {
        self.inner.forget_table(name).await
    }
    async fn begin_table(&self, table: &TableSchema) -> switchyard::Result<()> {
        self.inner.begin_table(table).await
    }
    async fn load(&self, table: &TableSchema, rows: &[Row]) -> switchyard::Result<u64> {
        self.inner.load(table, rows).await
    }
    async fn finish_table(
        &self,
        table: &TableSchema,
        position: Position,
        rows: u64,
    ) -> switchyard::Result<()> {
        self.inner.finish_table(table, position, rows).await
    }
    async fn apply(&self, changes: &[Change], checkpoint: Position) -> switchyard::Result<Durable> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.apply(changes, checkpoint).await
    }
}

/// GET `path` with an optional bearer token: status code and body.
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

const TOKEN: &str = "t0ken-for-tests";

struct Served {
    addr: String,
    sink: Arc<SurrealSink>,
    gate: watch::Sender<bool>,
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<switchyard::Result<switchyard::pipeline::Report>>,
    /// The source password.
    secret: String,
}

/// A pipeline from `db` into embedded SurrealDB behind a gate, with the HTTP
/// endpoints on a free loopback port.
/// The config text of `db` signed in as a role of its own with a password
/// that appears nowhere else (the cluster's superuser password is its name).
async fn config_with_own_role(db: &PgDb, target: &str) -> (String, String) {
    let role = format!("{}_obs", db.name);
    let secret = format!("Obs-{}-s3cret", std::process::id());
    db.exec(&format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{secret}'; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    ))
    .await;
    let text = db
        .config_text(target, "")
        .replace("postgres://postgres@", &format!("postgres://{role}@"))
        .replace(
            &format!("password = \"{}\"", db.cluster.password),
            &format!("password = \"{secret}\""),
        );
    (text, secret)
}

async fn serve(db: &PgDb, extra_source: &str) -> Served {
    let (text, secret) = config_with_own_role(db, "mem://").await;
    let text = text.replace("[target]", &format!("{extra_source}\n[target]"))
        + &format!(
            "\n[http]\naddress = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\nready_max_lag_seconds = 2\n"
        );
    let config = Arc::new(switchyard::config::Config::parse(&text).unwrap());
    let source = Arc::new(PgSource::open(&config.source.url, &config).await.unwrap());
    let sink = Arc::new(
        SurrealSink::connect("mem://", false, &config)
            .await
            .unwrap(),
    );
    let (gate, open) = watch::channel(true);
    let pipeline = Pipeline::new(
        config.clone(),
        source,
        Arc::new(GatedSink {
            inner: sink.clone(),
            open,
        }),
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cancel = CancellationToken::new();
    tokio::spawn(observe::serve(
        listener,
        config.http.token.clone(),
        config.http.ready_max_lag_seconds,
        vec![pipeline.observer()],
        cancel.clone(),
    ));
    let c = cancel.clone();
    let handle = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    Served {
        addr,
        sink,
        gate,
        cancel,
        handle,
        secret,
    }
}

async fn status_json(addr: &str) -> serde_json::Value {
    let (code, body) = http_get(addr, "/status", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_rises_while_the_target_is_held_back_and_falls_after_and_readyz_follows() {
    let db =
        PgDb::new("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
            .await;
    let s = serve(&db, "heartbeat_interval_ms = 300\nslot_warn_mb = 1").await;
    wait_until("/readyz to answer 200", Duration::from_secs(30), || async {
        http_get(&s.addr, "/readyz", None).await.0 == 200
    })
    .await;
    wait_until("the streaming phase", Duration::from_secs(30), || async {
        status_json(&s.addr).await["phase"] == "streaming"
    })
    .await;
    let v = status_json(&s.addr).await;
    assert_eq!(v["tables"]["t"]["state"], "copied", "{v}");

    // Hold the target back and write: lag in bytes and seconds rise.
    s.gate.send_replace(false);
    db.exec("INSERT INTO t SELECT g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 100) i) FROM generate_series(2, 500) g").await;
    wait_until(
        "lag over the readiness threshold",
        Duration::from_secs(30),
        || async {
            let v = status_json(&s.addr).await;
            v["lag_bytes"].as_u64().unwrap_or(0) > 1000
                && v["lag_seconds"].as_f64().unwrap_or(0.0) > 2.0
        },
    )
    .await;
    let (code, body) = http_get(&s.addr, "/readyz", None).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("lag"), "{body}");
    // About 2 MiB of WAL held back by the slot: over slot_warn_mb.
    wait_until("the slot warning", Duration::from_secs(30), || async {
        status_json(&s.addr).await["slot_warning"]
            .as_str()
            .is_some_and(|w| w.contains("slot_warn_mb"))
    })
    .await;
    let held = status_json(&s.addr).await;

    // Let it go: the lag falls back, /readyz follows.
    s.gate.send_replace(true);
    wait_until("the lag to fall", Duration::from_secs(30), || async {
        let v = status_json(&s.addr).await;
        v["lag_seconds"].as_f64().is_some_and(|x| x < 2.0)
            && v["lag_bytes"]
                .as_u64()
                .is_some_and(|b| b < held["lag_bytes"].as_u64().unwrap())
    })
    .await;
    wait_until(
        "/readyz to answer 200 again",
        Duration::from_secs(30),
        || async { http_get(&s.addr, "/readyz", None).await.0 == 200 },
    )
    .await;
    let v = status_json(&s.addr).await;
    assert_eq!(v["tables"]["t"]["changes_applied"], 499, "{v}");
    assert!(
        v["tables"]["t"]["rows_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "the copy report is in /status: {v}"
    );
    s.cancel.cancel();
    s.handle.await.unwrap().unwrap();
    let n: Option<i64> = s
        .sink
        .client()
        .query("RETURN count(SELECT id FROM t)")
        .await
        .unwrap()
        .take(0)
        .unwrap();
    assert_eq!(n, Some(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_status_and_metrics_and_no_password_shows() {
    let db = PgDb::new("CREATE TABLE t (id int PRIMARY KEY);").await;
    let s = serve(&db, "heartbeat_interval_ms = 300").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        http_get(&s.addr, "/readyz", None).await.0 == 200
    })
    .await;
    assert_eq!(http_get(&s.addr, "/healthz", None).await.0, 200);
    for path in ["/status", "/metrics"] {
        assert_eq!(
            http_get(&s.addr, path, None).await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            http_get(&s.addr, path, Some("wrong")).await.0,
            401,
            "{path} with a wrong token"
        );
        let (code, body) = http_get(&s.addr, path, Some(TOKEN)).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert!(
            !body.contains(&s.secret),
            "{path} shows the password: {body}"
        );
    }
    s.cancel.cancel();
    s.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_every_metric_the_deploy_files_name_is_exported() {
    let db =
        PgDb::new("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
            .await;
    let s = serve(&db, "heartbeat_interval_ms = 300").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        http_get(&s.addr, "/readyz", None).await.0 == 200
    })
    .await;
    db.exec("INSERT INTO t VALUES (2, 'b'); UPDATE t SET v = 'c' WHERE id = 1; DELETE FROM t WHERE id = 2;").await;
    wait_until(
        "the changes to be applied",
        Duration::from_secs(30),
        || async { status_json(&s.addr).await["changes_applied"].as_u64() == Some(3) },
    )
    .await;
    // A retry counts too: no transient failure is needed to name the metric,
    // but the scrape must parse and hold the series.
    let (code, text) = http_get(&s.addr, "/metrics", Some(TOKEN)).await;
    assert_eq!(code, 200);
    let mut exported = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            exported.insert(rest.split_whitespace().next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // name{labels} value
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("unparsable line {line:?}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        assert!(series.starts_with("switchyard_"), "{line}");
    }
    assert!(
        text.contains("switchyard_changes_applied_total{table=\"t\",op=\"insert\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("switchyard_changes_applied_total{table=\"t\",op=\"delete\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("switchyard_phase{phase=\"streaming\"} 1"),
        "{text}"
    );
    for name in names::ALL {
        // Counters of events that did not happen (retries, errors, rejects) exist
        // once they happen; everything else is there now.
        if name == names::RETRIES || name == names::ERRORS || name == names::ROWS_REJECTED {
            continue;
        }
        assert!(exported.contains(name), "{name} is not exported:\n{text}");
    }
    for name in crate::deploy_files::referenced_metrics() {
        assert!(
            names::ALL.contains(&name.as_str()),
            "the deploy files name {name}, which switchyard does not export"
        );
    }
    s.cancel.cancel();
    s.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_advances_an_idle_slot_and_status_reads_without_the_daemon() {
    let db = PgDb::new("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);").await;
    let s = serve(&db, "heartbeat_interval_ms = 200").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        http_get(&s.addr, "/readyz", None).await.0 == 200
    })
    .await;
    let first = db.confirmed_flush().await.unwrap();
    // Nothing is written to the source: only the heartbeats move its WAL.
    wait_until(
        "the idle slot to advance",
        Duration::from_secs(30),
        || async { db.confirmed_flush().await.unwrap() > first },
    )
    .await;
    s.cancel.cancel();
    s.handle.await.unwrap().unwrap();

    // `status` reads the target and the source directly (the CLI, a target
    // on disk, the daemon stopped).
    let scratch = Scratch::new();
    let target = scratch.path("replica");
    let url = format!("surrealkv://{}", target.display());
    let cfg = scratch.path("pg.toml");
    let (text, secret) = config_with_own_role(&db, &url).await;
    std::fs::write(
        &cfg,
        text.replace(
            &format!("slot = \"{}\"", db.name),
            &format!("slot = \"{}_b\"", db.name),
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["snapshot", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    db.exec("INSERT INTO t VALUES (2)").await;
    let (code, out, err) = run_cli(&["status", "--config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tables"]["t"]["state"], "copied", "{v}");
    assert_eq!(v["tables"]["t"]["rows"], 1, "{v}");
    assert_eq!(v["state"], "behind", "{v}");
    assert!(
        v["lag_bytes"].as_u64().unwrap() > 0 && v["slot_retained_bytes"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(
        v["checkpoint"].is_string() && v["source_position"].is_string(),
        "{v}"
    );
    let (code, text, err) = run_cli(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("state              behind") && text.contains("lag "),
        "{text}"
    );
    for shown in [&out, &err, &text] {
        assert!(!shown.contains(&secret), "the password shows: {shown}");
    }
}

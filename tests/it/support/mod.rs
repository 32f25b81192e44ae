//! Test support: SQLite sources in temporary directories, the daemon as a
//! child process, reading an embedded SurrealDB target, waiting on conditions.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use surrealdb::engine::any::Any;
use surrealdb::types::Value as SValue;
use surrealdb::Surreal;
use switchyard::config::Config;
use switchyard::model::TableSchema;
use switchyard::pipeline::{Mode, Pipeline, Report};
use switchyard::schema::surreal::COPIES_FIELD;
use switchyard::sink::surreal::{content, ident, record_id, SurrealSink};
use switchyard::source::sqlite::SqliteSource;
use switchyard::source::Source;
use switchyard::surreal::AsStore;
use tokio_util::sync::CancellationToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Polls `cond` until it holds or `timeout` passes; panics with `what` then.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A scratch directory with a SQLite source in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn source_path(&self) -> PathBuf {
        self.path("source.sqlite")
    }

    /// Creates the source database with `sql` and returns a pool on it.
    pub async fn source(&self, sql: &str) -> SqlitePool {
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(self.source_path())
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10)),
            )
            .await
            .expect("open source");
        sqlx::raw_sql(sql)
            .execute(&pool)
            .await
            .expect("source schema");
        pool
    }

    /// A config text for this source and `target_url`, with `extra` appended.
    pub fn config_text(&self, target_url: &str, extra: &str) -> String {
        format!(
            "[source]\nurl = \"sqlite://{}\"\npoll_interval_ms = 20\n\n[target]\nurl = \"{}\"\nnamespace = \"test\"\ndatabase = \"test\"\n\n[pipeline]\nbatch_delay_ms = 10\nretry_attempts = 3\nretry_max_delay_ms = 500\n{extra}",
            self.source_path().display(),
            target_url
        )
    }

    pub fn config(&self, target_url: &str, extra: &str) -> Arc<Config> {
        Arc::new(Config::parse(&self.config_text(target_url, extra)).expect("config"))
    }

    pub fn write_config(&self, target_url: &str, extra: &str) -> PathBuf {
        let p = self.path("switchyard.toml");
        std::fs::write(&p, self.config_text(target_url, extra)).unwrap();
        p
    }
}

/// The replicated tables as the source describes them.
pub async fn source_tables(config: &Config) -> Vec<Arc<TableSchema>> {
    let path = match config.source_kind().unwrap() {
        switchyard::config::SourceKind::Sqlite { path } => path,
        other => panic!("not a SQLite source: {other:?}"),
    };
    let src = SqliteSource::open(
        &path,
        config,
        Default::default(),
        switchyard::source::Access::ReadWrite,
    )
    .await
    .unwrap();
    let d = src.discover().await.unwrap();
    d.tables.into_iter().map(Arc::new).collect()
}

/// Every row of every table, as the target should hold it: table → (record
/// id → record), rendered with `Debug` so that values compare exactly.
pub type Image = BTreeMap<String, BTreeMap<String, String>>;

/// The SQLite source's image, converted with the sink's own row mapping
/// (through a fresh source's snapshot); row counts checked against `pool`.
pub async fn source_image(pool: &SqlitePool, config: &Config) -> Image {
    use sqlx::Row;
    let path = match config.source_kind().unwrap() {
        switchyard::config::SourceKind::Sqlite { path } => path,
        other => panic!("not a SQLite source: {other:?}"),
    };
    let src = SqliteSource::open(
        &path,
        config,
        Default::default(),
        switchyard::source::Access::ReadWrite,
    )
    .await
    .unwrap();
    let image = image_via(&src).await;
    for t in source_tables(config).await {
        let n: i64 = sqlx::query(&format!(
            "SELECT count(*) FROM \"{}\"",
            t.name.replace('"', "\"\"")
        ))
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
        assert_eq!(
            n as usize,
            image[&t.target_name].len(),
            "source rows of {}",
            t.name
        );
    }
    image
}

/// The image of every table `source` discovers, read through its own
/// snapshot (the pipeline's conversion), as the target should hold it.
pub async fn image_via(source: &dyn Source) -> Image {
    let d = source.discover().await.unwrap();
    let mut image = Image::new();
    for t in d.tables.into_iter().map(Arc::new) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let read = source.snapshot(t.clone(), 1000, tx);
        let collect = async {
            let mut objects = BTreeMap::new();
            while let Some(batch) = rx.recv().await {
                for row in batch {
                    let rid = record_id(&t, &t.key_of(&row)).unwrap();
                    let mut obj = content(&t, &row).unwrap();
                    obj.insert("id", rid.clone());
                    // A table without a key: identical rows are one record
                    // that counts them.
                    let copies: i64 = objects.get(&format!("{rid:?}")).map_or(0, |(_, n)| *n) + 1;
                    if t.whole_row {
                        obj.insert(COPIES_FIELD, copies);
                    }
                    objects.insert(format!("{rid:?}"), (obj, copies));
                }
            }
            objects
                .into_iter()
                .map(|(id, (obj, _))| (id, format!("{:?}", SValue::Object(obj))))
                .collect::<BTreeMap<_, _>>()
        };
        let (r, rows) = tokio::join!(read, collect);
        r.unwrap();
        image.insert(t.target_name.clone(), rows);
    }
    image
}

/// A pipeline running in this process (tests keep the sink to read the target).
pub struct Running {
    pub sink: Arc<SurrealSink>,
    pub handle: tokio::task::JoinHandle<switchyard::Result<Report>>,
    pub cancel: CancellationToken,
}

/// Runs `source` → `sink` (a new `mem://` target when `None`) in `Mode::Run`.
pub async fn run_pipeline(
    config: Arc<Config>,
    source: Arc<dyn Source>,
    sink: Option<Arc<SurrealSink>>,
) -> Running {
    let sink = match sink {
        Some(s) => s,
        None => Arc::new(
            SurrealSink::connect("mem://", false, &config)
                .await
                .unwrap(),
        ),
    };
    let pipeline = Pipeline::new(config, source, sink.clone(), Default::default());
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let handle = tokio::spawn(async move { pipeline.run(Mode::Run, c).await });
    Running {
        sink,
        handle,
        cancel,
    }
}

impl Running {
    /// Waits up to `timeout` for the run to stop by itself, and returns the
    /// error it stopped with.
    pub async fn error_within(self, timeout: Duration) -> String {
        tokio::time::timeout(timeout, self.handle)
            .await
            .expect("pipeline did not stop")
            .unwrap()
            .unwrap_err()
            .to_string()
    }

    /// Stops it as a signal would, and returns its report.
    pub async fn stop(self) -> Report {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("pipeline did not stop")
            .unwrap()
            .expect("pipeline failed")
    }
}

/// The target's image of the given tables.
pub async fn target_image(db: &impl AsStore, tables: &[String]) -> Image {
    let db = db.store();
    let mut image = Image::new();
    for t in tables {
        let mut resp = db
            .query(format!("SELECT * FROM {}", ident(t)))
            .await
            .unwrap();
        let rows: Vec<SValue> = match resp.take(0) {
            Ok(rows) => rows,
            // Not created yet: the pipeline may not have prepared the target
            // (nor selected its namespace and database on this connection).
            Err(e)
                if e.to_string().contains("does not exist")
                    || e.to_string().contains("Specify a namespace")
                    || e.to_string().contains("Specify a database") =>
            {
                Vec::new()
            }
            Err(e) => panic!("reading table {t} of the target: {e}"),
        };
        let mut m = BTreeMap::new();
        for r in rows {
            let SValue::Object(obj) = &r else {
                panic!("not an object: {r:?}")
            };
            let id = obj.get("id").expect("record without id").clone();
            let SValue::RecordId(rid) = id else {
                panic!("id is not a record id: {id:?}")
            };
            let prev = m.insert(format!("{rid:?}"), format!("{r:?}"));
            assert!(prev.is_none(), "duplicate record {rid:?} in {t}");
        }
        image.insert(t.clone(), m);
    }
    image
}

/// Describes the first difference between two images, or `None`.
pub fn diff(source: &Image, target: &Image) -> Option<String> {
    for (t, rows) in source {
        let Some(trows) = target.get(t) else {
            return Some(format!("table {t} missing in the target"));
        };
        for (id, row) in rows {
            match trows.get(id) {
                None => return Some(format!("{t}: {id} missing in the target")),
                Some(r) if r != row => {
                    return Some(format!("{t}: {id} differs:\n  source {row}\n  target {r}"))
                }
                _ => {}
            }
        }
        for id in trows.keys() {
            if !rows.contains_key(id) {
                return Some(format!("{t}: {id} is in the target but not in the source"));
            }
        }
    }
    None
}

/// Opens an embedded surrealkv target that no process holds.
pub async fn open_target(url: &str) -> Surreal<Any> {
    let db = surrealdb::engine::any::connect(url)
        .await
        .expect("open target");
    db.use_ns("test").use_db("test").await.expect("use ns/db");
    db
}

/// Waits until nobody holds the surrealkv directory's lock.
pub async fn wait_unlocked(dir: &Path) {
    let lock = dir.join("LOCK");
    wait_until(
        "the target's lock to be released",
        Duration::from_secs(20),
        || {
            let lock = lock.clone();
            async move {
                let Ok(f) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&lock)
                else {
                    return true;
                };
                use std::os::fd::AsRawFd;
                let fd = f.as_raw_fd();
                // SAFETY: flock on a file descriptor we own.
                let ok = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0;
                if ok {
                    unsafe { libc::flock(fd, libc::LOCK_UN) };
                }
                ok
            }
        },
    )
    .await;
}

/// The target's checkpoint (`commit`), if any.
pub async fn target_checkpoint(db: &impl AsStore) -> Option<i64> {
    let db = db.store();
    let mut resp = db
        .query("SELECT VALUE commit FROM _switchyard_checkpoint")
        .await
        .unwrap();
    let v: Vec<i64> = resp.take(0).unwrap();
    v.first().copied()
}

/// The daemon as a child process, its stderr going to a file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(args: &[&str], log: PathBuf) -> Self {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "--log-format",
                "json",
                "--log",
                "info,switchyard=debug,surrealdb=warn,surrealkv=error",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start switchyard");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT, and the exit status.
    pub async fn interrupt(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGINT:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The newest `checkpoint` field the daemon logged.
    pub fn logged_checkpoint(&self) -> Option<u64> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            // `123`, or `123.4` / `123.end` for a position inside or after a
            // PostgreSQL transaction: the commit part.
            .filter_map(|v| {
                v["fields"]["checkpoint"]
                    .as_str()
                    .and_then(|s| s.split('.').next().unwrap_or(s).parse::<u64>().ok())
            })
            .next_back()
    }
}

/// A test that fails (or times out) leaves no daemon behind: one still
/// running retrying against servers the test has stopped would outlive the
/// test run.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary to completion and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    cli_outcome(
        Command::new(BIN)
            .args(args)
            .output()
            .expect("run switchyard"),
    )
}

/// `run_cli` without blocking the runtime's thread, so that a deadline
/// around the caller can still fire; the child is killed if it does.
pub async fn run_cli_async(args: &[&str]) -> (i32, String, String) {
    cli_outcome(
        tokio::process::Command::new(BIN)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run switchyard"),
    )
}

fn cli_outcome(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The source change log's current high-water mark.
pub async fn source_high_water(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT max(seq) FROM _switchyard_changes")
        .fetch_one(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

/// Asserts that `text` (an error message, say) names every one of `parts`.
pub fn assert_names(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
}

/// The library's log in the test's captured output (shown when the test
/// fails): what the daemon did before an assertion gave up.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("switchyard=info")
        .try_init();
}

/// The lines of a reject file, parsed.
pub fn reject_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `verify` of every table (waiting up to 30 s for the target to catch up),
/// which must find them identical; the verdict.
pub async fn assert_identical(
    source: Arc<dyn switchyard::source::Source>,
    sink: Arc<dyn switchyard::sink::Sink>,
    batch_rows: usize,
) -> switchyard::verify::Verdict {
    let options = switchyard::verify::Options {
        tables: Vec::new(),
        wait: Some(Duration::from_secs(30)),
        batch_rows,
    };
    let verdict = switchyard::verify::verify(source, sink, &options)
        .await
        .unwrap();
    assert!(
        verdict.identical,
        "{}",
        switchyard::commands::verify::render(&verdict)
    );
    verdict
}

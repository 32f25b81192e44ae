//! Cutover and rollback against real PostgreSQL: a writer that keeps
//! writing as the application's role the whole time, each fence, the abort
//! paths (lag, --timeout, a killed cutover run again), the preflight's
//! go / no-go, the reverse replica over two clusters and the rollback,
//! SQLite → PostgreSQL identities and PostgreSQL → SurrealDB.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::config::Config;
use switchyard::cutover::{Direction, Options, Outcome, VerifyMode};
use switchyard::source::FenceMode;
use tokio_util::sync::CancellationToken;

use crate::pg_surreal::{Cluster, OwnCluster, PgDb};
use crate::pg_target::target_config_text;
use crate::support::*;

/// The application's schema: a serial key, a client key, an unowned
/// sequence drawn by a default.
const APP: &str = "CREATE SEQUENCE tickets START 5000;
     CREATE TABLE acct (id serial PRIMARY KEY, k bigint UNIQUE NOT NULL, v int, t bigint DEFAULT nextval('tickets'));
     INSERT INTO acct (k, v) SELECT -g, g FROM generate_series(1, 200) g;";

/// A login role for the application, with write grants on `acct` (not its
/// owner, so that a revoke fence can take them away).
async fn app_role(db: &PgDb) -> String {
    let role = format!("{}_app", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'app-pass';
         GRANT SELECT, INSERT, UPDATE, DELETE ON acct TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};"
    ))
    .await;
    role
}

async fn connect_as(cluster: &Cluster, db: &str, role: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(&cluster.host)
        .port(cluster.port)
        .user(role)
        .password("app-pass")
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// What the writer saw.
#[derive(Default, Debug)]
struct Seen {
    /// Client keys of rows the source accepted and that were not deleted.
    live: BTreeSet<i64>,
    /// Client keys refused outright (read-only, permission denied).
    refused: BTreeSet<i64>,
    accepted: u64,
    refusals: u64,
}

/// The application: inserts, updates and deletes as its own role, every
/// few milliseconds, reconnecting when its session is ended.
struct AppWriter {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    handle: tokio::task::JoinHandle<()>,
}

impl AppWriter {
    fn start(cluster: Cluster, db: String, role: String) -> AppWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s, out) = (stop.clone(), seen.clone());
        let handle = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut k: i64 = 0;
            while !s.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let c = match &client {
                    Some(c) if !c.is_closed() => c,
                    _ => {
                        client = connect_as(&cluster, &db, &role).await;
                        continue;
                    }
                };
                k += 1;
                let live: Vec<i64> = out.lock().unwrap().live.iter().copied().collect();
                let r = if k % 7 == 0 && !live.is_empty() {
                    let victim = live[(k as usize) % live.len()];
                    c.execute("DELETE FROM acct WHERE k = $1", &[&victim])
                        .await
                        .map(|n| (n == 1).then_some(("delete", victim)))
                } else if k % 5 == 0 && !live.is_empty() {
                    let victim = live[(k as usize) % live.len()];
                    c.execute("UPDATE acct SET v = v + 1 WHERE k = $1", &[&victim])
                        .await
                        .map(|_| None)
                } else {
                    c.execute("INSERT INTO acct (k, v) VALUES ($1, 1)", &[&k])
                        .await
                        .map(|_| Some(("insert", k)))
                };
                let mut o = out.lock().unwrap();
                match r {
                    Ok(done) => {
                        o.accepted += 1;
                        match done {
                            Some(("insert", key)) => {
                                o.live.insert(key);
                            }
                            Some((_, key)) => {
                                o.live.remove(&key);
                            }
                            None => {}
                        }
                    }
                    Err(e) => {
                        o.refusals += 1;
                        // Refused by the fence (read-only, no privilege):
                        // certainly not written.
                        let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                        if code == "25006" || code == "42501" {
                            o.refused.insert(k);
                        }
                        client = None;
                    }
                }
            }
        });
        AppWriter { stop, seen, handle }
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.unwrap();
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

/// The daemon: the pipeline streaming in this process.
struct Streaming {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<switchyard::Result<switchyard::pipeline::Report>>,
}

async fn stream(config: &Arc<Config>) -> Streaming {
    let pipeline = switchyard::connect::pipeline(config).await.unwrap();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let handle =
        tokio::spawn(async move { pipeline.run(switchyard::pipeline::Mode::Run, c).await });
    Streaming { cancel, handle }
}

/// Waits until the target has every table copied.
async fn copied(target: &PgDb) {
    wait_until("the copy", Duration::from_secs(60), || async {
        target
            .client
            .query_opt("SELECT 1 FROM switchyard.checkpoint", &[])
            .await
            .is_ok_and(|r| r.is_some())
            && target
                .client
                .query_one(
                    "SELECT count(*) FILTER (WHERE status <> 'done'), count(*) FROM switchyard.table_state",
                    &[],
                )
                .await
                // (Tables are recorded once their copy begins: none yet is not "all done".)
                .is_ok_and(|r| r.get::<_, i64>(0) == 0 && r.get::<_, i64>(1) > 0)
    })
    .await;
}

async fn keys(c: &tokio_postgres::Client) -> BTreeSet<i64> {
    c.query("SELECT k FROM acct", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn options(fence: FenceMode, role: &str) -> Options {
    Options {
        fence,
        roles: Some(vec![role.to_string()]),
        max_lag: Duration::from_secs(2),
        timeout: Duration::from_secs(30),
        ..Options::default()
    }
}

async fn cut(config: &Arc<Config>, opts: &Options) -> Outcome {
    switchyard::cutover::run(
        config.clone(),
        Direction::Forward,
        opts,
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

fn step<'a>(out: &'a Outcome, name: &str) -> &'a switchyard::cutover::Step {
    out.steps
        .iter()
        .find(|s| s.step == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {out:#?}"))
}

/// After a cutover: the target holds exactly the source's rows, every write
/// the source accepted, none it refused; a new row on the target gets a
/// fresh key and ticket.
async fn assert_switched(db: &PgDb, target: &PgDb, out: &Outcome, seen: &Seen) {
    assert!(out.switched, "{out:#?}");
    let (s, t) = (keys(&db.client).await, keys(&target.client).await);
    assert_eq!(s, t, "source and target differ after the cutover");
    assert!(
        seen.live.is_subset(&t),
        "accepted writes missing in the target"
    );
    assert!(seen.refused.is_disjoint(&t), "refused writes in the target");
    assert!(seen.accepted > 0 && seen.refusals > 0, "{seen:?}");
    let row = target
        .client
        .query_one(
            "INSERT INTO acct (k, v) VALUES (999999999, 0) RETURNING id, t",
            &[],
        )
        .await
        .unwrap();
    let (id, ticket): (i32, i64) = (row.get(0), row.get(1));
    let (max_id, max_t): (i32, i64) = {
        let r = db
            .client
            .query_one("SELECT max(id), max(t) FROM acct", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        id > max_id && ticket > max_t,
        "new key {id}/{ticket} after {max_id}/{max_t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_under_a_writer_with_each_fence_loses_nothing() {
    for fence in [FenceMode::ReadOnly, FenceMode::Revoke] {
        let db = PgDb::new(APP).await;
        let role = app_role(&db).await;
        let target = PgDb::new("").await;
        let config = Arc::new(
            Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
        );
        let daemon = stream(&config).await;
        copied(&target).await;
        let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
        wait_until("the writer to write", Duration::from_secs(30), || async {
            w.seen(|s| s.accepted > 50)
        })
        .await;
        let out = cut(&config, &options(fence, &role)).await;
        // The writer keeps trying through the freeze and after it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = w.stop().await;
        assert_switched(&db, &target, &out, &seen).await;
        assert!(out.freeze_ms.is_some() && out.lag_ms.is_some());
        for s in [
            "preflight",
            "catch up",
            "fence",
            "drain",
            "sequences",
            "verify",
            "switch",
            "forward replication ended",
        ] {
            assert!(step(&out, s).ok, "{fence}: {out:#?}");
        }
        // The daemon stopped at the stop marker; the slot is gone.
        let report = tokio::time::timeout(Duration::from_secs(30), daemon.handle)
            .await
            .expect("the daemon kept running after the cutover")
            .unwrap()
            .unwrap();
        assert!(report.stopped_by.is_some_and(|m| m.starts_with(&out.id)));
        assert_eq!(
            db.confirmed_flush().await,
            None,
            "the forward slot was not dropped"
        );
        // The old source stays fenced for the application.
        let c = connect_as(&db.cluster, &db.name, &role).await.unwrap();
        let err = c
            .execute("INSERT INTO acct (k, v) VALUES (-999, 0)", &[])
            .await
            .expect_err("the old source must refuse the application's writes");
        assert!(
            matches!(err.code().map(|c| c.code()), Some("25006") | Some("42501")),
            "{err}"
        );
        // Forward replication does not start again into the new primary.
        let again = stream(&config).await;
        let err = again
            .handle
            .await
            .unwrap()
            .expect_err("run must refuse")
            .report();
        assert_names(&err, &[&out.id, "run --reverse"]);
        drop(daemon.cancel);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_fence_the_writers_must_have_stopped() {
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
    );
    let daemon = stream(&config).await;
    copied(&target).await;
    // Still writing: refused, nothing fenced, the writes go on.
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    wait_until("the writer to write", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted > 20)
    })
    .await;
    let out = cut(&config, &options(FenceMode::None, &role)).await;
    assert!(!out.switched, "{out:#?}");
    assert_names(
        out.error.as_deref().unwrap_or(""),
        &["still writes", "--fence read-only"],
    );
    let before = w.seen(|s| s.accepted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.seen(|s| s.accepted) > before && w.seen(|s| s.refusals) == 0);
    // The operator stops the writers: the cutover goes through.
    let seen = w.stop().await;
    let out = cut(&config, &options(FenceMode::None, &role)).await;
    assert!(out.switched, "{out:#?}");
    assert_eq!(keys(&db.client).await, keys(&target.client).await);
    assert!(seen.live.is_subset(&keys(&target.client).await));
    daemon.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_freeze_lifts_the_fence_and_replication_goes_on() {
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&db.config_text("mem://", ""), &target)).unwrap(),
    );
    let daemon = stream(&config).await;
    copied(&target).await;
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    wait_until("the writer to write", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted > 20)
    })
    .await;

    // The freeze may last no time at all: fenced, then undone.
    let out = cut(
        &config,
        &Options {
            timeout: Duration::from_millis(1),
            ..options(FenceMode::ReadOnly, &role)
        },
    )
    .await;
    assert!(
        !out.switched && step(&out, "fence").ok && step(&out, "undo").ok,
        "{out:#?}"
    );
    assert_names(out.error.as_deref().unwrap_or(""), &["--timeout"]);
    // The writer's writes succeed again; forward replication still runs.
    let before = w.seen(|s| s.accepted);
    wait_until("writes accepted again", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted) > before + 20
    })
    .await;
    assert!(!daemon.handle.is_finished());

    // The target held back: the lag never comes under --max-lag, nothing is fenced.
    let mut blocker = crate::pg_surreal::connect(&target.cluster, &target.name).await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE acct IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let refusals = w.seen(|s| s.refusals);
    let out = cut(
        &config,
        &Options {
            max_lag: Duration::from_millis(200),
            timeout: Duration::from_secs(3),
            ..options(FenceMode::ReadOnly, &role)
        },
    )
    .await;
    assert!(
        !out.switched && out.steps.iter().all(|s| s.step != "fence"),
        "{out:#?}"
    );
    // (Seen by the preflight, or by the catch-up's marker.)
    let why = format!(
        "{} {}",
        out.error.as_deref().unwrap_or(""),
        out.reasons.join(" ")
    );
    assert_names(&why, &["--max-lag"]);
    assert_eq!(
        w.seen(|s| s.refusals),
        refusals,
        "writes were refused without a fence"
    );
    tx.rollback().await.unwrap();
    let seen = w.stop().await;
    // Released, the target catches up: every accepted write is there.
    wait_until(
        "the target to catch up",
        Duration::from_secs(60),
        || async { keys(&db.client).await == keys(&target.client).await },
    )
    .await;
    assert!(seen.live.is_subset(&keys(&target.client).await));
    assert!(!daemon.handle.is_finished());
    daemon.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_killed_after_the_fence_is_undone_by_the_next_one() {
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let target = PgDb::new("").await;
    let text = target_config_text(&db.config_text("mem://", ""), &target);
    let config = Arc::new(Config::parse(&text).unwrap());
    let s = Scratch::new();
    let path = s.path("c.toml");
    std::fs::write(&path, &text).unwrap();
    let daemon = stream(&config).await;
    copied(&target).await;
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    wait_until("the writer to write", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted > 20)
    })
    .await;
    let p = path.to_str().unwrap();
    // Connected before the cutover starts: once it has caught up, only the
    // LOCK stands between it and its drain.
    let mut blocker = crate::pg_surreal::connect(&target.cluster, &target.name).await;
    let tx = blocker.transaction().await.unwrap();
    let child = Daemon::start(
        &[
            "cutover",
            "--config",
            p,
            "--roles",
            &role,
            "--max-lag",
            "5s",
            "--timeout",
            "120s",
        ],
        s.path("cutover.log"),
    );
    // Caught up: hold the target back so that the drain waits; kill the
    // cutover once the fence is up.
    wait_until("the catch-up", Duration::from_secs(60), || async {
        child.log_text().contains("catch up")
    })
    .await;
    tx.batch_execute("LOCK TABLE acct IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    wait_until("the fence", Duration::from_secs(60), || async {
        child
            .log_text()
            .lines()
            .any(|l| l.contains("\"step\":\"fence\""))
    })
    .await;
    child.kill();
    let refused = w.seen(|s| s.refusals);
    wait_until(
        "the fence to refuse writes",
        Duration::from_secs(30),
        || async { w.seen(|s| s.refusals) > refused },
    )
    .await;
    tx.rollback().await.unwrap();
    // Run again: the interrupted one is undone, then this one switches.
    let (code, out, err) = run_cli(&[
        "cutover",
        "--config",
        p,
        "--roles",
        &role,
        "--max-lag",
        "5s",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(
        steps.contains(&"undo earlier") && steps.contains(&"switch"),
        "{out}"
    );
    let seen = w.stop().await;
    assert_eq!(keys(&db.client).await, keys(&target.client).await);
    assert!(seen.live.is_subset(&keys(&target.client).await));
    daemon.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_go_or_no_go_with_the_reason() {
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let target = PgDb::new("").await;
    let s = Scratch::new();
    let rejects = s.path("rejects");
    let text = target_config_text(&db.config_text("mem://", ""), &target).replace(
        "[pipeline]",
        &format!("[pipeline]\nreject_dir = \"{}\"", rejects.display()),
    );
    let config = Arc::new(Config::parse(&text).unwrap());
    let path = s.path("c.toml");
    std::fs::write(&path, &text).unwrap();
    let p = path.to_str().unwrap();
    let check = |extra: &[&str]| {
        let mut args = vec!["cutover", "--check", "--config", p, "--roles", &role];
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    // Never replicated into.
    let (code, out, err) = check(&[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_names(&out, &["no-go", "switchyard run"]);
    let daemon = stream(&config).await;
    copied(&target).await;
    wait_until("go", Duration::from_secs(30), || async {
        check(&[]).0 == 0
    })
    .await;
    let (_, out, _) = check(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["go"], true);
    // Nothing was written by the checks: no fence, no cutover record.
    let records: i64 = target
        .client
        .query_one("SELECT count(*) FROM switchyard.cutover", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    assert_eq!(records, 0);

    // Lagging: the target held back under a writer.
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    let mut blocker = crate::pg_surreal::connect(&target.cluster, &target.name).await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE acct IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    wait_until("no-go on lag", Duration::from_secs(60), || async {
        let (code, out, _) = check(&["--max-lag", "1s"]);
        code == 1 && out.contains("behind")
    })
    .await;
    tx.rollback().await.unwrap();
    w.stop().await;
    wait_until("go again", Duration::from_secs(60), || async {
        check(&[]).0 == 0
    })
    .await;

    // The schema incomplete: the target's primary key is gone.
    target
        .exec("ALTER TABLE acct DROP CONSTRAINT acct_pkey")
        .await;
    let (code, out, _) = check(&[]);
    assert_eq!(code, 1);
    assert_names(&out, &["acct", "no primary key"]);
    target.exec("ALTER TABLE acct ADD PRIMARY KEY (id)").await;

    // Rows set aside.
    std::fs::create_dir_all(&rejects).unwrap();
    std::fs::write(rejects.join("acct.jsonl"), "{\"table\":\"acct\"}\n").unwrap();
    let (code, out, _) = check(&[]);
    assert_eq!(code, 1);
    assert_names(&out, &["1 row(s) were set aside", "rejects"]);
    std::fs::remove_file(rejects.join("acct.jsonl")).unwrap();

    // An application role that does not exist.
    let (code, out, _) = run_cli(&[
        "cutover",
        "--check",
        "--config",
        p,
        "--roles",
        "nobody_here",
    ]);
    assert_eq!(code, 1);
    assert_names(&out, &["nobody_here"]);
    assert_eq!(check(&[]).0, 0);
    daemon.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_replica_and_rollback_across_two_clusters() {
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let (_own, other) = OwnCluster::start();
    let target = PgDb::on(other, "").await;
    let text = target_config_text(&db.config_text("mem://", ""), &target);
    let config = Arc::new(Config::parse(&text).unwrap());
    let daemon = stream(&config).await;
    copied(&target).await;
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    wait_until("the writer to write", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted > 20)
    })
    .await;
    let out = cut(
        &config,
        &Options {
            reverse: true,
            ..options(FenceMode::ReadOnly, &role)
        },
    )
    .await;
    let seen = w.stop().await;
    assert_switched(&db, &target, &out, &seen).await;
    assert!(
        step(&out, "reverse replica").ok && out.reverse.is_some(),
        "{out:#?}"
    );
    let _ = daemon.handle.await;

    // The application moves: its role on the new primary.
    target
        .exec(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'app-pass';
             GRANT SELECT, INSERT, UPDATE, DELETE ON acct TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ))
        .await;
    let reverse = Arc::new(
        switchyard::cutover::reverse::reversed(&config)
            .await
            .unwrap(),
    );
    let back = stream(&reverse).await;
    let w = AppWriter::start(target.cluster.clone(), target.name.clone(), role.clone());
    wait_until(
        "writes on the new primary",
        Duration::from_secs(30),
        || async { w.seen(|s| s.accepted > 50) },
    )
    .await;
    // They arrive on the old one.
    wait_until("the reverse replica", Duration::from_secs(60), || async {
        keys(&db.client)
            .await
            .is_superset(&w.seen(|s| s.live.iter().take(10).copied().collect()))
    })
    .await;

    // Rollback: the same cutover the other way; nothing lost; the old
    // primary takes writes again, its sequences past the new primary's.
    let out = switchyard::cutover::run(
        config.clone(),
        Direction::Rollback,
        &options(FenceMode::ReadOnly, &role),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = w.stop().await;
    assert!(
        out.switched && step(&out, "old primary writable").ok,
        "{out:#?}"
    );
    assert_eq!(keys(&db.client).await, keys(&target.client).await);
    assert!(seen.live.is_subset(&keys(&db.client).await));
    let _ = back.handle.await;
    let c = connect_as(&db.cluster, &db.name, &role).await.unwrap();
    let row = c
        .query_one(
            "INSERT INTO acct (k, v) VALUES (888888888, 0) RETURNING id, t",
            &[],
        )
        .await
        .expect("the old primary takes writes again");
    let (id, ticket): (i32, i64) = (row.get(0), row.get(1));
    let r = target
        .client
        .query_one("SELECT max(id), max(t) FROM acct", &[])
        .await
        .unwrap();
    assert!(id > r.get::<_, i32>(0) && ticket > r.get::<_, i64>(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_into_postgres_cutover_moves_identities_past_the_largest_key() {
    let s = Scratch::new();
    let pool = s
        .source(
            "CREATE TABLE item (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL);
             INSERT INTO item (name) VALUES ('a'), ('b'), ('c');",
        )
        .await;
    let target = PgDb::new("").await;
    let config = Arc::new(
        Config::parse(&target_config_text(&s.config_text("mem://", ""), &target)).unwrap(),
    );
    // No daemon: cutover streams itself.
    let first = stream(&config).await;
    copied(&target).await;
    first.cancel.cancel();
    let _ = first.handle.await;
    for i in 0..50 {
        sqlx::query("INSERT INTO item (name) VALUES (?)")
            .bind(format!("n{i}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let out = cut(
        &config,
        &Options {
            roles: None,
            verify: VerifyMode::Full,
            ..options(FenceMode::ReadOnly, "")
        },
    )
    .await;
    assert!(out.switched, "{out:#?}");
    assert_names(
        &step(&out, "sequences").detail.join(" "),
        &["item.id", "53"],
    );
    let err = sqlx::query("INSERT INTO item (name) VALUES ('late')")
        .execute(&pool)
        .await
        .expect_err("the fenced SQLite source refuses writes");
    assert_names(&err.to_string(), &["switchyard cutover", "new primary"]);
    let id: i64 = target
        .client
        .query_one("INSERT INTO item (name) VALUES ('new') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 54);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_into_surrealdb_cutover_stops_the_daemon_that_holds_the_embedded_target() {
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let s = Scratch::new();
    let store = s.path("replica");
    let url = format!("surrealkv://{}", store.display());
    let text = db.config_text(&url, "");
    let config = Arc::new(Config::parse(&text).unwrap());
    let path = s.path("c.toml");
    std::fs::write(&path, &text).unwrap();
    let mut daemon = Daemon::start(
        &["run", "--config", path.to_str().unwrap()],
        s.path("run.log"),
    );
    wait_until("the copy", Duration::from_secs(60), || async {
        daemon.log_text().contains("\"phase\":\"streaming\"")
    })
    .await;
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    wait_until("the writer to write", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted > 20)
    })
    .await;
    // The daemon holds the embedded store (one process opens it at a time):
    // cutover stops it and streams itself.
    let out = cut(&config, &options(FenceMode::ReadOnly, &role)).await;
    let seen = w.stop().await;
    assert!(out.switched, "{out:#?}\n{}", daemon.log_text());
    assert!(step(&out, "sequences").detail.is_empty());
    assert!(seen.refusals > 0);
    assert!(
        daemon
            .child
            .try_wait()
            .unwrap()
            .is_some_and(|st| st.success()),
        "the daemon did not stop cleanly"
    );
    // Read back with SurrealQL (the store closes in the background).
    let sink = loop {
        match switchyard::sink::surreal::SurrealSink::connect(&url, false, &config).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut r = sink
        .client()
        .query("SELECT count() AS n FROM acct GROUP ALL")
        .await
        .unwrap();
    let n: Option<i64> = r.take((0, "n")).unwrap();
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM acct", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, Some(rows));
    let ks: Vec<i64> = sink
        .client()
        .query("SELECT VALUE k FROM acct")
        .await
        .unwrap()
        .take(0)
        .unwrap();
    assert_eq!(
        ks.into_iter().collect::<BTreeSet<i64>>(),
        keys(&db.client).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_source_with_a_daemon_is_go_at_once() {
    // The daemon's /status shows up to a heartbeat interval of lag while
    // nothing is written; preflight allows for it (the catch-up step then
    // measures the real lag with a marker).
    let db = PgDb::new(APP).await;
    let role = app_role(&db).await;
    let target = PgDb::new("").await;
    let s = Scratch::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        "{}\n[http]\naddress = \"127.0.0.1:{port}\"\n",
        target_config_text(&db.config_text("mem://", ""), &target)
    );
    let path = s.path("c.toml");
    std::fs::write(&path, &text).unwrap();
    let p = path.to_str().unwrap().to_string();
    let daemon = Daemon::start(&["run", "--config", &p], s.path("daemon.log"));
    copied(&target).await;
    wait_until("streaming", Duration::from_secs(60), || {
        let t = daemon.log_text();
        async move { t.contains("logical replication started") }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..4 {
        let (code, out, err) = run_cli(&[
            "cutover",
            "--check",
            "--max-lag",
            "1s",
            "--config",
            &p,
            "--roles",
            &role,
        ]);
        assert_eq!(code, 0, "an idle, caught-up source must be go: {out}{err}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert!(daemon.interrupt().await.success());
}

/// Beside `acct`: a key not named `id` next to a column that is (SurrealDB
/// keeps it in `source_id`), and a composite key, with values of several
/// types.
const MORE: &str = "CREATE TABLE item (sku text PRIMARY KEY, id int NOT NULL, price numeric(10, 2), made timestamptz, tags jsonb, u uuid, ok boolean, labels text[]);
     INSERT INTO item VALUES ('a-1', 1, 9.50, '2026-01-02 03:04:05+00', '{\"x\": [1, 2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, '{a,b}'), ('b-2', 2, NULL, NULL, NULL, NULL, NULL, NULL);
     CREATE TABLE line (o int, n int, qty int NOT NULL, PRIMARY KEY (o, n));
     INSERT INTO line SELECT g / 3, g % 3, g FROM generate_series(1, 30) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_into_a_surrealdb_server_leaves_a_reverse_replica_that_copies_nothing() {
    use crate::surreal_remote::{SurrealServer, PASSWORD};
    use switchyard::sink::surreal::SurrealSink;
    let db = PgDb::new(&format!("{APP}{MORE}")).await;
    let role = app_role(&db).await;
    let s = Scratch::new();
    let server = SurrealServer::start(s.path("surreal.log")).await;
    let text = db.config_text(&server.url, "").replacen(
        "database = \"test\"\n",
        &format!("database = \"test\"\nusername = \"root\"\npassword = \"{PASSWORD}\"\n"),
        1,
    );
    let config = Arc::new(Config::parse(&text).unwrap());
    let app = SurrealSink::connect(&server.url, true, &config)
        .await
        .unwrap();
    let count = |table: &'static str| {
        let c = app.client().clone();
        async move {
            // The namespace exists once the copy has begun.
            let n: Option<i64> = c
                .query(format!(
                    "USE NS test DB test; SELECT count() AS n FROM {table} GROUP ALL"
                ))
                .await
                .ok()
                .and_then(|mut r| r.take((1, "n")).ok())
                .flatten();
            n.unwrap_or(0)
        }
    };
    let daemon = stream(&config).await;
    wait_until("the copy", Duration::from_secs(60), || async {
        count("acct").await == 200 && count("line").await == 30 && count("item").await == 2
    })
    .await;
    app.client().use_ns("test").await.unwrap();
    app.client().use_db("test").await.unwrap();
    let w = AppWriter::start(db.cluster.clone(), db.name.clone(), role.clone());
    wait_until("the writer to write", Duration::from_secs(30), || async {
        w.seen(|s| s.accepted > 20)
    })
    .await;
    let out = cut(
        &config,
        &Options {
            reverse: true,
            verify: VerifyMode::Full,
            // The debug-built server applies the writer's stream slower than
            // the others: under a loaded machine (CI's other jobs) it once
            // took more than 30 s to come within the lag.
            timeout: Duration::from_secs(90),
            ..options(FenceMode::ReadOnly, &role)
        },
    )
    .await;
    let seen = w.stop().await;
    assert!(out.switched, "{out:#?}");
    assert!(
        step(&out, "reverse replica").ok && out.reverse.is_some(),
        "{out:#?}"
    );
    assert_names(
        &step(&out, "reverse replica").detail.join(" "),
        &["changefeeds", "3 table(s)"],
    );
    let _ = daemon.handle.await;
    assert_eq!(count("acct").await as usize, 200 + seen.live.len());

    // The application moves to SurrealDB and writes there before the
    // reverse replica runs, and while it runs.
    app.client()
        .query(
            "CREATE acct:900001 SET k = 900001, v = 5, t = 1;
             UPDATE item:`a-1` SET price = 12.25dec, tags = { y: 'z' }, labels = ['p', 'q r'];
             DELETE line:[1, 0];
             CREATE line:[50, 1] SET o = 50, n = 1, qty = 7;
             CREATE item:`c-3` SET sku = 'c-3', source_id = 3, made = d'2026-03-04T05:06:07Z', u = u'b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', ok = false;",
        )
        .await
        .unwrap()
        .check()
        .unwrap();
    let reverse = Arc::new(
        switchyard::cutover::reverse::reversed(&config)
            .await
            .unwrap(),
    );
    let back = stream(&reverse).await;
    app.client()
        .query("DELETE acct WHERE k = 900001; CREATE acct:900002 SET k = 900002, v = 6; DELETE item:`b-2`;")
        .await
        .unwrap()
        .check()
        .unwrap();
    let old = &db.client;
    wait_until("the reverse replica", Duration::from_secs(60), || async {
        old.query_opt("SELECT 1 FROM acct WHERE id = 900002 AND k = 900002", &[])
            .await
            .unwrap()
            .is_some()
            && old
                .query_opt("SELECT 1 FROM item WHERE sku = 'b-2'", &[])
                .await
                .unwrap()
                .is_none()
    })
    .await;
    // Read back with SQL.
    let r = old
        .query_one(
            "SELECT id, price::text, tags::text, made = '2026-03-04 05:06:07+00', u::text, ok FROM item WHERE sku = 'c-3'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 3);
    assert_eq!(r.get::<_, Option<String>>(1), None);
    assert!(r.get::<_, bool>(3));
    assert_eq!(
        r.get::<_, String>(4),
        "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"
    );
    assert!(!r.get::<_, bool>(5));
    let r = old
        .query_one(
            "SELECT price::text, tags::text, labels::text FROM item WHERE sku = 'a-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "12.25");
    assert_eq!(r.get::<_, String>(1), "{\"y\": \"z\"}");
    assert_eq!(r.get::<_, String>(2), "{p,\"q r\"}");
    let lines: Vec<(i32, i32)> = old
        .query(
            "SELECT o, n FROM line WHERE (o, n) IN ((1, 0), (50, 1))",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(lines, vec![(50, 1)]);
    assert!(old
        .query_opt("SELECT 1 FROM acct WHERE k = 900001", &[])
        .await
        .unwrap()
        .is_none());

    // Identical, table by table, and nothing was copied back.
    let p = switchyard::connect::pipeline(&reverse).await.unwrap();
    assert_identical(p.source(), p.sink(), 100).await;

    // Rollback over it: the application's writers into SurrealDB stopped
    // (--fence none), markers through the reverse replica's stream, the old
    // primary writable again, its sequences past SurrealDB's keys.
    let no_go = switchyard::cutover::run(
        config.clone(),
        Direction::Rollback,
        &Options {
            check: true,
            roles: None,
            max_lag: Duration::from_secs(1),
            ..options(FenceMode::ReadOnly, "")
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!no_go.go, "{no_go:#?}");
    assert_names(&no_go.reasons.join("\n"), &["--fence none", "--max-lag"]);
    let out = switchyard::cutover::run(
        config.clone(),
        Direction::Rollback,
        &Options {
            roles: None,
            max_lag: Duration::from_secs(5),
            verify: VerifyMode::Full,
            ..options(FenceMode::None, "")
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        out.switched && step(&out, "old primary writable").ok,
        "{out:#?}"
    );
    assert_names(
        &step(&out, "forward replication ended").detail.join(" "),
        &[
            "stop marker",
            "changefeeds switchyard defined in the source are removed",
        ],
    );
    let report = back.handle.await.unwrap().unwrap();
    assert!(report.stopped_by.is_some(), "{report:?}");
    assert!(
        report.tables.len() == 3 && report.tables.iter().all(|t| t.already_copied),
        "{report:?}"
    );
    assert!(report.changes_applied >= 8, "{report:?}");
    let c = connect_as(&db.cluster, &db.name, &role).await.unwrap();
    let id: i32 = c
        .query_one(
            "INSERT INTO acct (k, v) VALUES (777777777, 0) RETURNING id",
            &[],
        )
        .await
        .expect("the old primary takes writes again")
        .get(0);
    assert!(id > 900002, "{id}");
}

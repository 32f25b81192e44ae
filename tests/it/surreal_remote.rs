//! The remote target: a real SurrealDB server (the official server library,
//! built by `scripts/test` from tools/surreal-server) over WebSocket, with
//! root credentials.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::sink::surreal::SurrealSink;

use crate::sqlite_surreal::{start, wait_converged};
use crate::support::*;

pub const PASSWORD: &str = "s3rver-Secret";

pub struct SurrealServer {
    child: Child,
    pub url: String,
}

impl SurrealServer {
    pub async fn start(log: std::path::PathBuf) -> SurrealServer {
        let bin = std::env::var("SWITCHYARD_TEST_SURREAL_BIN").unwrap_or_else(|_| {
            panic!("SWITCHYARD_TEST_SURREAL_BIN is not set: run the suite with `bash scripts/test`, which builds the SurrealDB server (tools/surreal-server)")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .args([
                "start",
                "--no-banner",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--user",
                "root",
                "--pass",
                PASSWORD,
                "memory",
            ])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the SurrealDB server {bin}: {e}"));
        let server = SurrealServer {
            child,
            url: format!("ws://127.0.0.1:{port}"),
        };
        wait_until(
            "the SurrealDB server to listen",
            Duration::from_secs(60),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        server
    }
}

impl Drop for SurrealServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn remote_config(s: &Scratch, url: &str, password: &str) -> String {
    s.config_text(url, "").replace(
        "database = \"test\"\n",
        &format!("database = \"test\"\nusername = \"root\"\npassword = \"{password}\"\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_into_a_surrealdb_server_over_websocket() {
    let s = Scratch::new();
    let server = SurrealServer::start(s.path("surreal.log")).await;
    let pool = s
        .source(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price DECIMAL(8, 2), doc JSON, at DATETIME);
             CREATE TABLE pairs (a TEXT NOT NULL, b INTEGER NOT NULL, v BLOB, PRIMARY KEY (a, b)) WITHOUT ROWID;
             INSERT INTO items VALUES (1, 'tea', '4.50', '{\"k\": [1, 2]}', '2024-05-01 12:00:00'), (2, NULL, NULL, NULL, NULL);
             INSERT INTO pairs VALUES ('x', 1, x'00ff'), ('y', 2, NULL);",
        )
        .await;
    let config = Arc::new(Config::parse(&remote_config(&s, &server.url, PASSWORD)).unwrap());
    let sink = Arc::new(
        SurrealSink::connect(&server.url, true, &config)
            .await
            .unwrap(),
    );
    let run = start(config.clone(), Some(sink.clone())).await;
    wait_converged(&pool, &config, &run.sink).await;
    sqlx::raw_sql("UPDATE items SET price = '5.25' WHERE id = 1; DELETE FROM pairs WHERE a = 'y'; UPDATE pairs SET b = 3 WHERE a = 'x';")
        .execute(&pool)
        .await
        .unwrap();
    wait_converged(&pool, &config, &run.sink).await;
    run.stop().await;

    // A new connection resumes from the checkpoint kept in the server.
    sqlx::raw_sql("INSERT INTO items (id, name) VALUES (3, 'while stopped');")
        .execute(&pool)
        .await
        .unwrap();
    let sink = Arc::new(
        SurrealSink::connect(&server.url, true, &config)
            .await
            .unwrap(),
    );
    let run = start(config.clone(), Some(sink)).await;
    wait_converged(&pool, &config, &run.sink).await;
    let report = run.stop().await;
    assert!(report.tables.iter().all(|t| t.already_copied), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_password_is_refused_without_showing_it() {
    let s = Scratch::new();
    let server = SurrealServer::start(s.path("surreal.log")).await;
    let _pool = s.source("CREATE TABLE t (id INTEGER PRIMARY KEY);").await;
    let cfg = s.path("remote.toml");
    std::fs::write(&cfg, remote_config(&s, &server.url, "Not-the-Passw0rd")).unwrap();
    for cmd in ["check", "run"] {
        let (code, out, err) = run_cli(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_ne!(code, 0, "{cmd}: {out}{err}");
        let all = format!("{out}{err}");
        assert!(
            all.contains("sign in") && all.contains("root"),
            "{cmd}: {all}"
        );
        assert!(
            !all.contains("Not-the-Passw0rd"),
            "{cmd}: the password leaked: {all}"
        );
    }
}

//! A live sync inside the application's own process (migration M3).
//!
//! An embedded SurrealDB store (`surrealkv://`) is opened by one process at
//! a time, so while the application runs nothing else can read it. The
//! application hands switchyard a clone of its own handle (a session of its
//! own: switchyard's namespace choice does not change the application's),
//! and the pipeline runs on the application's runtime: first a copy, then
//! every change through the tables' changefeeds, into the new server.
//!
//! ```text
//! cargo run --example surreal_live_sync -- surrealkv://data/app ws://127.0.0.1:8000 root PASSWORD
//! ```
//!
//! Here the "application" writes notes before and during the sync; once
//! `verify` says the server holds what the store holds, the application
//! would switch to the server.

use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::pipeline::{Mode, Pipeline};
use switchyard::source::surreal::SurrealSource;
use switchyard::source::Source;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, server, user, password] = args.as_slice() else {
        anyhow::bail!("usage: surreal_live_sync STORE_URL SERVER_URL USER PASSWORD");
    };

    // The application's store, opened once, by the application.
    let app = surrealdb::engine::any::connect(store.as_str()).await?;
    app.query(
        "DEFINE NAMESPACE IF NOT EXISTS app; USE NS app; DEFINE DATABASE IF NOT EXISTS main;",
    )
    .await?
    .check()?;
    app.use_ns("app").use_db("main").await?;
    app.query(
        "DEFINE TABLE IF NOT EXISTS note SCHEMAFULL;
         DEFINE FIELD IF NOT EXISTS body ON note TYPE string;
         DEFINE FIELD IF NOT EXISTS at ON note TYPE datetime;
         FOR $i IN 1..=100 { UPSERT type::record('note', $i) SET body = 'note ' + <string> $i, at = time::now(); };",
    )
    .await?
    .check()?;

    // switchyard's config: the source is the handle below, so its url only
    // names it in messages.
    let config = Arc::new(Config::parse(&format!(
        r#"
[source]
url = "{store}"
namespace = "app"
database = "main"

[target]
url = "{server}"
namespace = "app"
database = "main"
username = "{user}"
password = "{password}"
"#
    ))?);
    let source: Arc<dyn Source> = Arc::new(
        SurrealSource::from_client(app.clone(), store, &config, Default::default()).await?,
    );
    let sink: Arc<dyn switchyard::sink::Sink> =
        Arc::from(switchyard::connect::sink(&config, Default::default()).await?);
    let pipeline = Pipeline::new(
        config.clone(),
        source.clone(),
        sink.clone(),
        Default::default(),
    );
    let cancel = CancellationToken::new();
    let sync = tokio::spawn({
        let cancel = cancel.clone();
        async move { pipeline.run(Mode::Run, cancel).await }
    });

    // The application goes on: new notes, edits, deletions.
    // Like any SurrealDB application, it retries a statement SurrealDB
    // reports as a conflict that can be retried.
    for i in 101..=150 {
        for sql in [
            format!("CREATE note:{i} SET body = 'note {i}', at = time::now();"),
            format!("UPDATE note:{} SET body += ' (edited)';", i - 100),
            format!("DELETE note:{};", i - 50),
        ] {
            let mut attempts = 0;
            loop {
                match app.query(sql.as_str()).await.and_then(|r| r.check()) {
                    Ok(_) => break,
                    Err(e) if e.message().contains("can be retried") && attempts < 50 => {
                        attempts += 1
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Before switching: the server holds what the store holds.
    let options = switchyard::verify::Options {
        tables: Vec::new(),
        wait: Some(Duration::from_secs(60)),
        batch_rows: 1000,
    };
    let verdict = switchyard::verify::verify(source, sink, &options).await?;
    print!("{}", switchyard::commands::verify::render(&verdict));
    cancel.cancel();
    let report = sync.await??;
    println!(
        "changes applied while the application ran: {}",
        report.changes_applied
    );
    anyhow::ensure!(
        verdict.identical,
        "the server does not hold what the store holds"
    );
    println!("in sync: switch the application to {server}");
    Ok(())
}

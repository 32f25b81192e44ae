//! The CLI: parse arguments, load the config, set up logging, call the
//! library, map the outcome to an exit status (0 ok, 1 problem found, 2 could
//! not run).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::config::Config;
use switchyard::pipeline::{Mode, Pipeline};
use switchyard::{Error, ErrorKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Change-data-capture replication for live database migrations"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `switchyard=debug`.
    #[arg(
        long,
        env = "SWITCHYARD_LOG",
        default_value = "info,surrealdb=warn,surrealkv=error",
        global = true
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Copy the source if the target has no checkpoint, then stream changes until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy the tables not copied yet, print a per-table report, and exit.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Validate the config, connect, and print the plan; writes nothing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show where replication stands: the target's checkpoint and tables, the source's position, the lag; and the daemon's own view when its HTTP endpoint answers.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Compare source and target: row counts and checksums per chunk, then the keys that differ. Exit 0 identical, 1 differences, 2 could not run.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only these source tables (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        #[arg(long)]
        json: bool,
        /// How long to wait for the target to reach the source's position, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Remove the change capture switchyard installed in the source (SQLite: triggers and change log; PostgreSQL: slot, and the publication if switchyard creates it).
    Uninstall {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the demo shop database (SQLite) used by the quick start.
    DemoSource {
        /// Where to create it, e.g. data/shop.sqlite.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        let outcome = dispatch(cli.command).await;
        // Every SurrealDB handle is dropped by now; an embedded datastore shuts
        // itself down in the background when the last one goes. Give it the
        // moment it needs instead of cancelling it with the runtime.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        outcome
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            let (code, kind) = match e.downcast_ref::<Error>().map(Error::kind) {
                Some(ErrorKind::Definite) => (1, "definite"),
                Some(ErrorKind::Transient) => (1, "transient"),
                _ => (2, "cannot run"),
            };
            error!(kind, "{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Arc<Config>> {
    Ok(Arc::new(Config::load(path)?))
}

/// Cancels the token on SIGINT or SIGTERM; a second signal exits at once.
fn on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            if round == 0 {
                info!("signal received: finishing the batch in flight, then stopping (again to stop at once)");
                cancel.cancel();
            } else {
                warn!("second signal: stopping now; the last batch is applied again on the next start");
                std::process::exit(130);
            }
        }
    });
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = load(&config)?;
            let cancel = CancellationToken::new();
            on_signal(cancel.clone());
            if config.http.address.is_some() {
                // Before anything records a metric.
                switchyard::observe::prometheus();
            }
            let pipeline = Pipeline::open(config.clone()).await?;
            let http_stop = CancellationToken::new();
            let _http_guard = http_stop.clone().drop_guard();
            if let Some(address) = &config.http.address {
                let listener = switchyard::observe::listen(address).await?;
                let server = switchyard::observe::serve(
                    listener,
                    config.http.token.clone(),
                    config.http.ready_max_lag_seconds,
                    pipeline.observer(),
                    http_stop.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) = server.await {
                        warn!(error = %e.report(), "the HTTP endpoint stopped");
                    }
                });
            }
            match pipeline.run(Mode::Run, cancel).await {
                Ok(report) => {
                    info!(
                        changes = report.changes_applied,
                        checkpoint = report.checkpoint.as_deref().unwrap_or("-"),
                        "stopped"
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    info!("{e}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Snapshot { config, report } => {
            let config = load(&config)?;
            let cancel = CancellationToken::new();
            on_signal(cancel.clone());
            let config_rejects = config.rejects.clone();
            let pipeline = Pipeline::open(config).await?;
            let r = match pipeline.run(Mode::SnapshotOnly, cancel).await {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    info!("{e}");
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e.into()),
            };
            println!(
                "{:<24} {:>12} {:>10} {:>12}  note",
                "table", "rows", "seconds", "rows/s"
            );
            for t in &r.tables {
                let note = if t.already_copied {
                    "copied earlier".to_string()
                } else if t.rejected > 0 {
                    format!(
                        "{} rejected: {}",
                        t.rejected,
                        config_rejects
                            .path(&t.table)
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    )
                } else {
                    String::new()
                };
                println!(
                    "{:<24} {:>12} {:>10.2} {:>12.0}  {note}",
                    t.table, t.rows, t.seconds, t.rows_per_second
                );
            }
            if let Some(path) = report {
                let json = serde_json::to_string_pretty(&r)?;
                std::fs::write(&path, json)
                    .with_context(|| format!("writing the report to {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config, json } => {
            let config = load(&config)?;
            let plan = switchyard::plan::check(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.render());
            }
            Ok(if plan.blocking() > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status { config, json } => {
            let config = load(&config)?;
            let status = switchyard::observe::status(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            config,
            tables,
            json,
            wait,
        } => {
            let run = async {
                // Rows the run sets aside are not expected in the target;
                // reading the source again adds nothing to the reject files.
                let config = Arc::new(Config::load(&config)?.for_verify());
                let source: Arc<dyn switchyard::source::Source> =
                    Arc::from(switchyard::source::open(&config).await?);
                let sink: Arc<dyn switchyard::sink::Sink> =
                    Arc::from(switchyard::sink::open(&config).await?);
                let options = switchyard::verify::Options {
                    tables,
                    wait: std::time::Duration::from_secs(wait),
                    batch_rows: config.pipeline.snapshot_batch_rows,
                };
                anyhow::Ok(switchyard::verify::verify(source, sink, &options).await?)
            };
            match run.await {
                Ok(verdict) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&verdict)?);
                    } else {
                        print!("{}", verdict.render());
                    }
                    Ok(if verdict.identical {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    })
                }
                Err(e) => {
                    error!("{e:#}");
                    eprintln!("error: verify could not run: {e:#}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Uninstall { config } => {
            let config = load(&config)?;
            let source = switchyard::source::open(&config).await?;
            source.uninstall().await?;
            println!(
                "removed switchyard's change capture from {}",
                switchyard::config::redact_url(&config.source.url)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoSource { path } => {
            switchyard::sample::create_shop(&path).await?;
            println!("created the demo shop database at {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! The CLI: parse arguments, load the config, set up logging, call the
//! library, map the outcome to an exit status (0 ok, 1 problem found, 2 could
//! not run).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use switchyard::commands::{self, Exit};
use tracing::error;

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
        /// How long to wait for the target to reach the source's position, in
        /// seconds (default: 60 while a daemon applies changes; without one,
        /// pending changes end verify at once unless this is given).
        #[arg(long)]
        wait: Option<u64>,
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
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            let exit = Exit::of(&e);
            let kind = if exit == Exit::Problem {
                "stopped"
            } else {
                "cannot run"
            };
            error!(kind, "{}", e.report());
            eprintln!("error: {}", e.report());
            ExitCode::from(exit.code())
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

async fn dispatch(command: Command) -> switchyard::Result<Exit> {
    match command {
        Command::Run { config } => commands::run::run(&config).await,
        Command::Snapshot { config, report } => {
            commands::snapshot::run(&config, report.as_deref()).await
        }
        Command::Check { config, json } => commands::check::run(&config, json).await,
        Command::Status { config, json } => commands::status::run(&config, json).await,
        Command::Verify {
            config,
            tables,
            json,
            wait,
        } => match commands::verify::run(&config, tables, json, wait).await {
            // Whatever stops verify means it could not compare.
            Err(e) => {
                error!("{}", e.report());
                eprintln!("error: verify could not run: {}", e.report());
                Ok(Exit::CannotRun)
            }
            ok => ok,
        },
        Command::Uninstall { config } => commands::uninstall::run(&config).await,
        Command::DemoSource { path } => commands::demo::run(&path).await,
    }
}

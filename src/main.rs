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
        /// Run the reverse replica a `cutover --reverse` left behind (the new
        /// primary into the old one), from the same config.
        #[arg(long)]
        reverse: bool,
    },
    /// Switch the application to the target: fence the source, drain, set sequences, verify, and say "safe to switch" (exit 0); on any failure the fence is lifted (exit 1).
    Cutover {
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        opts: CutoverArgs,
    },
    /// Switch the application back to the old source over the reverse replica (after `cutover --reverse`).
    Rollback {
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        opts: CutoverArgs,
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

#[derive(clap::Args)]
struct CutoverArgs {
    /// The most lag (a marker's round trip) at which the fence goes up.
    #[arg(long, default_value = "1s", value_parser = commands::cutover::parse_duration)]
    max_lag: std::time::Duration,
    /// How the source stops taking writes: none (you stopped the writers), read-only, revoke.
    #[arg(long, default_value = "read-only")]
    fence: switchyard::source::FenceMode,
    /// The application roles to fence (default: every login role but switchyard's own and superusers).
    #[arg(long, value_delimiter = ',')]
    roles: Option<Vec<String>>,
    /// The most the write freeze may last; also the most cutover waits to catch up first.
    #[arg(long, default_value = "60s", value_parser = commands::cutover::parse_duration)]
    timeout: std::time::Duration,
    /// How the fenced source and the target are compared: none, counts, full.
    #[arg(long, default_value = "counts")]
    verify: switchyard::cutover::VerifyMode,
    /// Leave a reverse replica from the target back into the source (PostgreSQL → PostgreSQL, or PostgreSQL → a SurrealDB server).
    #[arg(long)]
    reverse: bool,
    /// Preflight only: go (exit 0) or no-go (exit 1) with the reasons; writes nothing.
    #[arg(long)]
    check: bool,
    #[arg(long)]
    json: bool,
}

impl CutoverArgs {
    fn split(self) -> (switchyard::cutover::Options, bool) {
        (
            switchyard::cutover::Options {
                max_lag: self.max_lag,
                fence: self.fence,
                roles: self.roles,
                timeout: self.timeout,
                verify: self.verify,
                reverse: self.reverse,
                check: self.check,
            },
            self.json,
        )
    }
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
        Command::Run { config, reverse } => commands::run::run(&config, reverse).await,
        Command::Cutover { config, opts } => {
            let (opts, json) = opts.split();
            commands::cutover::run(&config, switchyard::cutover::Direction::Forward, opts, json)
                .await
        }
        Command::Rollback { config, opts } => {
            let (opts, json) = opts.split();
            commands::cutover::run(
                &config,
                switchyard::cutover::Direction::Rollback,
                opts,
                json,
            )
            .await
        }
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

//! The CLI's commands, one module each; each renders its own output (text,
//! or JSON with `--json`) and says how the process should exit. `main.rs`
//! parses the arguments and calls one of them.
//!
//! Exit status: 0 success; 1 the command ran and found a problem (verify
//! found differences, check found blocking problems, a run stopped on a
//! change it cannot apply); 2 it could not run (usage, config, connection).

pub mod check;
pub mod cutover;
pub mod demo;
pub mod run;
pub mod snapshot;
pub mod status;
pub mod uninstall;
pub mod verify;

/// How a command ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done, nothing wrong found.
    Ok,
    /// 1: ran, and found a problem.
    Problem,
    /// 2: could not run.
    CannotRun,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Problem => 1,
            Exit::CannotRun => 2,
        }
    }

    /// The exit for an error a command returns: one it met while running
    /// (a change it cannot apply, retries spent) is a problem found; a bad
    /// config or an unreachable server means it could not run.
    pub fn of(e: &crate::Error) -> Exit {
        match e.kind() {
            crate::ErrorKind::Definite | crate::ErrorKind::Transient => Exit::Problem,
            _ => Exit::CannotRun,
        }
    }
}

/// Loads and validates the config file.
pub fn load(path: &std::path::Path) -> crate::Result<std::sync::Arc<crate::config::Config>> {
    Ok(std::sync::Arc::new(crate::config::Config::load(path)?))
}

/// A read-only command run for each tenant (`[[tenants]]`) in turn, with
/// the embedded stores shared: as text, each under its `heading`, or as one
/// JSON object by tenant name. Returns each tenant's result.
pub async fn per_tenant<T, F, Fut>(
    config: &crate::config::Config,
    json: bool,
    heading: impl Fn(&str, &crate::config::Config) -> String,
    render: impl Fn(&T) -> String,
    each: F,
) -> crate::Result<Vec<T>>
where
    T: serde::Serialize,
    F: Fn(crate::config::Config) -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    #[cfg(feature = "surrealdb")]
    crate::surreal::share();
    let mut all = std::collections::BTreeMap::new();
    for (name, c) in config.tenant_configs() {
        let head = heading(&name, &c);
        let r = each(c)
            .await
            .map_err(|e| e.context(format!("tenant {name}")))?;
        if !json {
            println!("{head}");
            print!("{}", render(&r));
        }
        all.insert(name, r);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).unwrap_or_else(|_| "{}".into())
        );
    }
    Ok(all.into_values().collect())
}

/// A token cancelled on SIGINT or SIGTERM; a second signal exits at once.
pub fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    use tracing::{info, warn};
    let cancel = tokio_util::sync::CancellationToken::new();
    let token = cancel.clone();
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
                token.cancel();
            } else {
                warn!("second signal: stopping now; the last batch is applied again on the next start");
                std::process::exit(130);
            }
        }
    });
    cancel
}

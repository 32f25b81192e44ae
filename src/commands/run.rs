//! `switchyard run`: copy what is not copied yet, then stream until SIGINT
//! or SIGTERM, with the HTTP endpoints where `[http]` asks for them.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Exit;
use crate::error::{ErrorKind, Result};
use crate::pipeline::Mode;

pub async fn run(config: &Path, reverse: bool) -> Result<Exit> {
    let mut config = super::load(config)?;
    if reverse {
        config = crate::cutover::reverse::reversed(&config).await?;
        info!(source = %crate::redact::redact_url(&config.source.url), target = %crate::redact::redact_url(&config.target.url), "the reverse replica: the new primary into the old one");
    }
    let cancel = super::cancel_on_signal();
    if !config.tenants.is_empty() {
        return run_tenants(&config, cancel).await;
    }
    if config.http.address.is_some() {
        // Before anything records a metric.
        crate::observe::prometheus();
    }
    let pipeline = Arc::new(crate::connect::pipeline(&config).await?);
    pipeline
        .observer()
        .set_cutover_check(crate::cutover::preflight::check(pipeline.clone()));
    let _http = http(&config, vec![pipeline.observer()]).await?;
    match pipeline.run(Mode::Run, cancel).await {
        Ok(report) => {
            if let Some(cutover) = &report.stopped_by {
                info!(cutover = %cutover, "a cutover ended forward replication: the application moves to the target");
            }
            info!(
                changes = report.changes_applied,
                checkpoint = report.checkpoint.as_deref().unwrap_or("-"),
                "stopped"
            );
            Ok(Exit::Ok)
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => {
            info!("{e}");
            Ok(Exit::Ok)
        }
        Err(e) => Err(e),
    }
}

/// Every tenant's pipeline at once; the first to fail stops the others.
async fn run_tenants(config: &crate::config::Config, cancel: CancellationToken) -> Result<Exit> {
    if config.http.address.is_some() {
        // Before anything records a metric.
        crate::observe::prometheus();
    }
    let pipelines = crate::connect::tenant_pipelines(config).await?;
    info!(
        tenants = pipelines.len(),
        "replicating each tenant into its own namespace and database"
    );
    // One endpoint for every tenant: /status by tenant, /readyz when all are
    // ready, metrics labelled `tenant`.
    let _http = http(
        config,
        pipelines.iter().map(|(_, p)| p.observer()).collect(),
    )
    .await?;
    let runs = pipelines.into_iter().map(|(name, p)| {
        let cancel = cancel.clone();
        async move {
            let r = p.run(Mode::Run, cancel.clone()).await;
            if r.is_err() {
                cancel.cancel();
            }
            (name, r)
        }
    });
    let mut failed = None;
    for (name, r) in futures::future::join_all(runs).await {
        match r {
            Ok(report) => info!(
                tenant = %name,
                changes = report.changes_applied,
                checkpoint = report.checkpoint.as_deref().unwrap_or("-"),
                "stopped"
            ),
            Err(e) if e.kind() == ErrorKind::Interrupted => info!(tenant = %name, "{e}"),
            Err(e) => {
                if failed.is_none() {
                    failed = Some(e.context(format!("tenant {name}")));
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(Exit::Ok),
    }
}

/// The `[http]` endpoints over `observers`, where configured, until the
/// returned guard is dropped.
async fn http(
    config: &crate::config::Config,
    observers: Vec<Arc<crate::observe::Observer>>,
) -> Result<Option<tokio_util::sync::DropGuard>> {
    let Some(address) = &config.http.address else {
        return Ok(None);
    };
    let stop = CancellationToken::new();
    let listener = crate::observe::listen(address).await?;
    let server = crate::observe::serve(
        listener,
        config.http.token.clone(),
        config.http.ready_max_lag_seconds,
        observers,
        stop.clone(),
    );
    tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e.report(), "the HTTP endpoint stopped");
        }
    });
    Ok(Some(stop.drop_guard()))
}

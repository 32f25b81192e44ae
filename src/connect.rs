//! Where sources and sinks meet the config: opening the configured source
//! and target. The one module that knows every kind of both; sources and
//! sinks never import each other.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, SourceKind, TargetKind};
#[cfg(not(feature = "surrealdb"))]
use crate::error::Error;
use crate::error::Result;
use crate::reject::Rejects;
use crate::sink::Sink;
use crate::source::{Access, Source};

/// Opens the configured source. `Access::ReadOnly` changes nothing in it.
pub async fn source(
    config: &Config,
    rejects: Arc<Rejects>,
    access: Access,
) -> Result<Box<dyn Source>> {
    match config.source_kind()? {
        SourceKind::Sqlite { path } => Ok(Box::new(
            crate::source::sqlite::SqliteSource::open(&path, config, rejects, access).await?,
        )),
        SourceKind::Postgres { url } => Ok(Box::new(
            crate::source::postgres::PgSource::open(&url, config).await?,
        )),
        #[cfg(feature = "surrealdb")]
        SourceKind::Surreal { endpoint, remote } => Ok(Box::new(
            crate::source::surreal::SurrealSource::open(&endpoint, remote, config, rejects).await?,
        )),
        #[cfg(not(feature = "surrealdb"))]
        SourceKind::Surreal { .. } => {
            let _ = (rejects, access);
            Err(Error::config(
                "source.url: this switchyard was built without the surrealdb feature",
            ))
        }
    }
}

/// Opens the configured target; nothing is written until the pipeline
/// prepares it.
pub async fn sink(config: &Config, rejects: Arc<Rejects>) -> Result<Box<dyn Sink>> {
    match config.target_kind()? {
        #[cfg(feature = "surrealdb")]
        TargetKind::Surreal { endpoint, remote } => Ok(Box::new(
            crate::sink::surreal::SurrealSink::connect(&endpoint, remote, config)
                .await?
                .with_rejects(rejects),
        )),
        #[cfg(not(feature = "surrealdb"))]
        TargetKind::Surreal { .. } => {
            let _ = rejects;
            Err(Error::config(
                "target.url: this switchyard was built without the surrealdb feature",
            ))
        }
        TargetKind::Postgres { url } => Ok(Box::new(
            crate::sink::postgres::PgSink::connect(&url, config, rejects).await?,
        )),
    }
}

/// For read-only commands: the target, unless it is an embedded store
/// that does not exist yet (opening it would create it); then `None`.
pub async fn existing_sink(
    config: &Config,
    rejects: Arc<Rejects>,
) -> Result<Option<Box<dyn Sink>>> {
    if let Some(path) = embedded_path(config)? {
        if !path.exists() {
            return Ok(None);
        }
    }
    sink(config, rejects).await.map(Some)
}

/// The directory of an embedded `surrealkv://` target.
pub fn embedded_path(config: &Config) -> Result<Option<PathBuf>> {
    Ok(match config.target_kind()? {
        TargetKind::Surreal { endpoint, .. } => endpoint
            .strip_prefix("surrealkv://")
            .map(|p| PathBuf::from(p.split('?').next().unwrap_or(p))),
        _ => None,
    })
}

/// The lock of an embedded target, which this process holds while it runs
/// (it tells `cutover` which process holds the target); refused where
/// another switchyard holds it.
fn target_lock(config: &Config) -> Result<Option<crate::lockfile::DaemonLock>> {
    let Some(path) = embedded_path(config)? else {
        return Ok(None);
    };
    if let Some(pid) = crate::lockfile::holder(&path)? {
        return Err(crate::error::Error::definite(format!(
            "switchyard process {pid} holds the embedded target {}; one process at a time opens it",
            path.display()
        )));
    }
    crate::lockfile::DaemonLock::acquire(&path)
}

/// One pipeline per tenant (`[[tenants]]`), named `ns/db`, sharing the
/// embedded stores; the lock of an embedded target is held by the first.
pub async fn tenant_pipelines(
    config: &crate::config::Config,
) -> Result<Vec<(String, crate::pipeline::Pipeline)>> {
    #[cfg(feature = "surrealdb")]
    crate::surreal::share();
    let mut out = Vec::new();
    let mut lock = target_lock(config)?;
    for (name, c) in config.tenant_configs() {
        let c = Arc::new(c);
        let rejects = Arc::new(Rejects::new(c.pipeline.reject_dir.clone()));
        let source = source(&c, rejects.clone(), Access::ReadWrite)
            .await
            .map_err(|e| e.context(format!("tenant {name}")))?;
        let sink = sink(&c, rejects.clone())
            .await
            .map_err(|e| e.context(format!("tenant {name}")))?;
        let p = crate::pipeline::Pipeline::new(c, Arc::from(source), Arc::from(sink), rejects)
            .holding(lock.take());
        out.push((name, p));
    }
    Ok(out)
}

/// Opens the configured source and target for a run that writes, and the
/// pipeline between them (rows that do not fit go to `pipeline.reject_dir`).
pub async fn pipeline(config: &Arc<Config>) -> Result<crate::pipeline::Pipeline> {
    let rejects = Arc::new(Rejects::new(config.pipeline.reject_dir.clone()));
    let (source, lock, sink) = if embedded_path(config)?.is_some() {
        // The embedded store is locked (and its directory made) only for a
        // source that opened.
        let source = source(config, rejects.clone(), Access::ReadWrite).await?;
        let lock = target_lock(config)?;
        (source, lock, sink(config, rejects.clone()).await?)
    } else {
        // Two servers: neither waits for the other.
        let (source, sink) = tokio::try_join!(
            source(config, rejects.clone(), Access::ReadWrite),
            sink(config, rejects.clone())
        )?;
        (source, None, sink)
    };
    Ok(
        crate::pipeline::Pipeline::new(config.clone(), Arc::from(source), Arc::from(sink), rejects)
            .holding(lock),
    )
}

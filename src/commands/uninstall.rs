//! `switchyard uninstall`: remove what switchyard installed in the source
//! (SQLite: triggers, change log, and the journal mode back to what it was;
//! PostgreSQL: the slot, and the publication where switchyard created it).

use std::path::Path;
use std::sync::Arc;

use super::Exit;
use crate::error::Result;
use crate::reject::Rejects;
use crate::source::Access;

pub async fn run(config: &Path) -> Result<Exit> {
    let config = super::load(config)?;
    #[cfg(feature = "surrealdb")]
    if !config.tenants.is_empty() {
        crate::surreal::share();
    }
    for (_, c) in config.tenant_configs() {
        let source =
            crate::connect::source(&c, Arc::new(Rejects::default()), Access::ReadWrite).await?;
        source.uninstall().await?;
    }
    println!(
        "removed switchyard's change capture from {}",
        crate::redact::redact_url(&config.source.url)
    );
    Ok(Exit::Ok)
}

//! Embedded SurrealDB stores shared within this process: a store is opened
//! by one process, and once in it. Sources and sinks of several tenants
//! each get a session of their own on the one handle.

use crate::error::Result;

/// Embedded SurrealDB stores opened once per process for every tenant
/// (`[[tenants]]`): a store is opened by one process, and once in it.
static SHARED: std::sync::Mutex<
    Option<std::collections::HashMap<String, surrealdb::Surreal<surrealdb::engine::any::Any>>>,
> = std::sync::Mutex::new(None);

/// From now on, embedded SurrealDB stores are opened once in this process
/// and shared (each user gets a session of its own).
pub fn share() {
    if let Ok(mut m) = SHARED.lock() {
        m.get_or_insert_with(Default::default);
    }
}

/// The shared handle of an embedded store, opened by `open` the first time;
/// `None` where stores are not shared.
pub async fn shared<F, Fut>(
    endpoint: &str,
    open: F,
) -> Result<Option<surrealdb::Surreal<surrealdb::engine::any::Any>>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<surrealdb::Surreal<surrealdb::engine::any::Any>>>,
{
    let known = match SHARED.lock() {
        Ok(m) => match m.as_ref() {
            None => return Ok(None),
            Some(m) => m.get(endpoint).cloned(),
        },
        Err(_) => return Ok(None),
    };
    if let Some(db) = known {
        return Ok(Some(db));
    }
    let db = open().await?;
    if let Ok(mut m) = SHARED.lock() {
        if let Some(m) = m.as_mut() {
            let kept = m.entry(endpoint.to_string()).or_insert(db);
            return Ok(Some(kept.clone()));
        }
    }
    Ok(None)
}

//! What the SurrealDB source and sink share: embedded stores opened once
//! per process (a store is opened by one process, and once in it; sources
//! and sinks of several tenants each get a session of their own on the one
//! handle), signing in, whether a namespace and database exist, and how an
//! error of the SDK becomes one of switchyard.

use secrecy::{ExposeSecret, SecretString};
use surrealdb::engine::any::Any;
use surrealdb::Surreal;

use crate::error::{Error, ErrorKind, Result};

/// An error of the SDK with what switchyard was doing: transient where the
/// connection failed or SurrealDB says the transaction can be retried (a
/// conflict with another writer), else definite.
pub fn error(context: impl std::fmt::Display, e: surrealdb::Error) -> Error {
    let kind = if e.is_connection() || is_retryable_message(e.message()) {
        ErrorKind::Transient
    } else {
        ErrorKind::Definite
    };
    Error::new(kind, context.to_string()).with_source(e)
}

fn is_retryable_message(m: &str) -> bool {
    let m = m.to_ascii_lowercase();
    m.contains("can be retried") || m.contains("transaction conflict")
}

/// The error that failed a query, with its statement's index: in a failed
/// transaction every statement reports one, and the cause is the one that
/// is not the generic "not executed" notice.
pub fn failure(resp: &mut surrealdb::IndexedResults) -> Option<(usize, surrealdb::Error)> {
    let mut errs: Vec<(usize, surrealdb::Error)> = resp.take_errors().into_iter().collect();
    if errs.is_empty() {
        return None;
    }
    errs.sort_by_key(|(i, _)| *i);
    let pick = errs
        .iter()
        .position(|(_, e)| {
            !e.message().contains("not executed") && !e.message().contains("failed transaction")
        })
        .unwrap_or(0);
    Some(errs.swap_remove(pick))
}

/// Signs in as the root user `user` where both it and `password` are given.
pub async fn sign_in(
    db: &Surreal<Any>,
    shown: &str,
    user: &Option<String>,
    password: &Option<SecretString>,
) -> Result<()> {
    if let (Some(user), Some(pass)) = (user, password) {
        db.signin(surrealdb::opt::auth::Root {
            username: user.clone(),
            password: pass.expose_secret().to_string(),
        })
        .await
        .map_err(|e| {
            Error::connect(format!(
                "SurrealDB at {shown} refused to sign in user {user:?}: {}",
                e.message()
            ))
        })?;
    }
    Ok(())
}

/// Whether `namespace` holds `database`, read without creating either
/// (`USE` would). Leaves `namespace` selected where it exists.
pub async fn database_exists(
    db: &Surreal<Any>,
    namespace: &str,
    database: &str,
) -> std::result::Result<bool, surrealdb::Error> {
    let names = |info: Option<serde_json::Value>, key: &str| -> Vec<String> {
        info.and_then(|v| v.get(key).and_then(|m| m.as_object().cloned()))
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let root: Option<serde_json::Value> = db.query("INFO FOR ROOT").await?.take(0)?;
    if !names(root, "namespaces").iter().any(|n| n == namespace) {
        return Ok(false);
    }
    // The namespace exists: selecting it creates nothing.
    db.use_ns(namespace.to_string()).await?;
    let ns: Option<serde_json::Value> = db.query("INFO FOR NS").await?.take(0)?;
    Ok(names(ns, "databases").iter().any(|d| d == database))
}

/// Embedded SurrealDB stores opened once per process for every tenant
/// (`[[tenants]]`): a store is opened by one process, and once in it.
static SHARED: std::sync::Mutex<Option<std::collections::HashMap<String, Surreal<Any>>>> =
    std::sync::Mutex::new(None);

/// From now on, embedded SurrealDB stores are opened once in this process
/// and shared (each user gets a session of its own).
pub fn share() {
    if let Ok(mut m) = SHARED.lock() {
        m.get_or_insert_with(Default::default);
    }
}

/// The shared handle of an embedded store, opened by `open` the first time;
/// `None` where stores are not shared.
pub async fn shared<F, Fut>(endpoint: &str, open: F) -> Result<Option<Surreal<Any>>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Surreal<Any>>>,
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

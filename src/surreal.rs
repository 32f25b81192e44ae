//! What the SurrealDB source and sink share: embedded stores opened once
//! per process (a store is opened by one process, and once in it; sources
//! and sinks of several tenants each get a session of their own on the one
//! handle), signing in, whether a namespace and database exist, and how an
//! error of the SDK becomes one of switchyard.
//!
//! An embedded SurrealKV store is opened with a memory budget
//! (`memory_mb`): the engine otherwise sizes its write buffers and block
//! cache from the machine's RAM (a 1 GiB write buffer on a 16–64 GiB
//! machine, a cache of half the RAM), and the SDK's `connect` takes no
//! engine settings, so such a store is built as a datastore with them and
//! handed to the SDK ([`Store::Embedded`]).

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use secrecy::{ExposeSecret, SecretString};
use surrealdb::engine::any::Any;
use surrealdb::engine::local::Db;
use surrealdb::types::Variables;
use surrealdb::{IndexedResults, Surreal};

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

/// A connection to SurrealDB: an embedded store switchyard opened with its
/// memory budget, or any other handle of the SDK (a server, a `mem://`
/// store, an application's own handle).
#[derive(Clone)]
pub enum Store {
    Embedded(Surreal<Db>),
    Any(Surreal<Any>),
}

/// A query on a [`Store`], with its variables; awaited like the SDK's.
pub struct StoreQuery<'a> {
    store: &'a Store,
    sql: String,
    vars: std::result::Result<Variables, surrealdb::Error>,
}

impl StoreQuery<'_> {
    /// Adds variables (a `Variables`, or a `(name, value)` pair), as the
    /// SDK's `bind` does.
    pub fn bind(mut self, vars: impl surrealdb::method::IntoVariables) -> Self {
        self.vars = match (self.vars, vars.into_variables()) {
            (Ok(mut a), Ok(b)) => {
                a.extend(b);
                Ok(a)
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        self
    }
}

impl<'a> IntoFuture for StoreQuery<'a> {
    type Output = std::result::Result<IndexedResults, surrealdb::Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let vars = self.vars?;
            match self.store {
                Store::Embedded(db) => db.query(self.sql).bind(vars).await,
                Store::Any(db) => db.query(self.sql).bind(vars).await,
            }
        })
    }
}

impl Store {
    pub fn query(&self, sql: impl Into<String>) -> StoreQuery<'_> {
        StoreQuery {
            store: self,
            sql: sql.into(),
            vars: Ok(Variables::new()),
        }
    }

    pub async fn use_ns(&self, ns: &str) -> std::result::Result<(), surrealdb::Error> {
        match self {
            Store::Embedded(db) => db.use_ns(ns.to_string()).await.map(|_| ()),
            Store::Any(db) => db.use_ns(ns.to_string()).await.map(|_| ()),
        }
    }

    pub async fn use_db(&self, database: &str) -> std::result::Result<(), surrealdb::Error> {
        match self {
            Store::Embedded(db) => db.use_db(database.to_string()).await.map(|_| ()),
            Store::Any(db) => db.use_db(database.to_string()).await.map(|_| ()),
        }
    }

    pub async fn use_ns_db(
        &self,
        ns: &str,
        database: &str,
    ) -> std::result::Result<(), surrealdb::Error> {
        match self {
            Store::Embedded(db) => db
                .use_ns(ns.to_string())
                .use_db(database.to_string())
                .await
                .map(|_| ()),
            Store::Any(db) => db
                .use_ns(ns.to_string())
                .use_db(database.to_string())
                .await
                .map(|_| ()),
        }
    }

    async fn sign_in_root(
        &self,
        username: String,
        password: String,
    ) -> std::result::Result<(), surrealdb::Error> {
        let root = surrealdb::opt::auth::Root { username, password };
        match self {
            Store::Embedded(db) => db.signin(root).await.map(|_| ()),
            Store::Any(db) => db.signin(root).await.map(|_| ()),
        }
    }
}

/// Anything the tests and the library API take as a SurrealDB handle.
pub trait AsStore {
    fn store(&self) -> Store;
}

impl AsStore for Store {
    fn store(&self) -> Store {
        self.clone()
    }
}

impl AsStore for Surreal<Any> {
    fn store(&self) -> Store {
        Store::Any(self.clone())
    }
}

impl AsStore for Surreal<Db> {
    fn store(&self) -> Store {
        Store::Embedded(self.clone())
    }
}

/// The engine settings of a `memory_mb` budget, in bytes: a quarter for a
/// write buffer (the engine holds up to three while it flushes: the one
/// written and two being written out) and a quarter for the block cache.
pub fn engine_budget(memory_mb: u64) -> (u64, u64) {
    let budget = memory_mb.max(crate::config::MIN_MEMORY_MB) << 20;
    (budget / 4, budget / 4)
}

/// Opens `endpoint`: a `surrealkv://` store as a datastore with the engine
/// settings of `memory_mb`, anything else with the SDK's `connect`.
pub async fn open(endpoint: &str, memory_mb: u64) -> std::result::Result<Store, String> {
    if !endpoint.starts_with("surrealkv://") {
        return surrealdb::engine::any::connect(endpoint)
            .await
            .map(Store::Any)
            .map_err(|e| e.message().to_string());
    }
    let (memtable, cache) = engine_budget(memory_mb);
    let settings = surrealdb_cnf::ConfigMap::empty()
        .with_key_value("surrealkv_max_memtable_size", memtable.to_string())
        .with_key_value("surrealkv_block_cache_capacity", cache.to_string());
    // As the SDK's own embedded connect does: maintenance tasks start once
    // the store's version is checked and it is bootstrapped; the SDK's
    // default capabilities (every function, no network).
    let capabilities = surrealdb::opt::capabilities::Capabilities::default();
    let ds = surrealdb_core::kvs::Datastore::builder()
        .with_config(settings)
        .with_capabilities(capabilities.into())
        .without_maintenance_tasks()
        .build_with_path(endpoint)
        .await
        .map_err(|e| format!("{e:#}"))?;
    ds.check_version().await.map_err(|e| format!("{e:#}"))?;
    ds.bootstrap().await.map_err(|e| format!("{e:#}"))?;
    ds.start_maintenance_tasks();
    Surreal::<Db>::unstable_from_datastore(ds, None)
        .await
        .map(Store::Embedded)
        .map_err(|e| e.message().to_string())
}

/// Signs in as the root user `user` where both it and `password` are given.
pub async fn sign_in(
    db: &Store,
    shown: &str,
    user: &Option<String>,
    password: &Option<SecretString>,
) -> Result<()> {
    if let (Some(user), Some(pass)) = (user, password) {
        db.sign_in_root(user.clone(), pass.expose_secret().to_string())
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
    db: &Store,
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
    db.use_ns(namespace).await?;
    let ns: Option<serde_json::Value> = db.query("INFO FOR NS").await?.take(0)?;
    Ok(names(ns, "databases").iter().any(|d| d == database))
}

/// Embedded SurrealDB stores opened once per process for every tenant
/// (`[[tenants]]`): a store is opened by one process, and once in it.
static SHARED: std::sync::Mutex<Option<std::collections::HashMap<String, Store>>> =
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
pub async fn shared<F, Fut>(endpoint: &str, open: F) -> Result<Option<Store>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Store>>,
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

//! switchyard: change-data-capture replication for live database migrations.
//!
//! A source takes a consistent snapshot and then streams its changes; a sink
//! creates the target schema, loads the rows and applies the changes together
//! with a checkpoint; the pipeline between them is bounded and retries what is
//! transient. See `pipeline` for the dataflow.
//!
//! Imports run one way: `commands` → `connect`, `pipeline`, `verify`,
//! `observe` → `source`, `sink` → `schema`, `pg` and the leaves (`model`,
//! `position`, `config`, `error`, `reject`, `retry`, `metric`, `redact`).
//! Sources and sinks never import each other; a module's children never
//! import their parent's items back (tests/it/layout.rs checks it).

#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
mod alloc;
pub mod commands;
pub mod config;
pub mod connect;
pub mod cutover;
pub mod error;
pub mod lockfile;
pub mod metric;
pub mod model;
pub mod observe;
pub mod pg;
pub mod pipeline;
pub mod position;
pub mod redact;
pub mod reject;
pub mod retry;
pub mod sample;
pub mod schema;
pub mod sink;
pub mod source;
#[cfg(feature = "surrealdb")]
pub mod surreal;
pub mod verify;

#[cfg(test)]
mod fuzz_tests;

pub use error::{Error, ErrorKind, Result};

//! switchyard: change-data-capture replication for live database migrations.
//!
//! A source takes a consistent snapshot and then streams its changes; a sink
//! creates the target schema, loads the rows and applies the changes together
//! with a checkpoint; the pipeline between them is bounded and retries what is
//! transient. See `pipeline` for the dataflow.

pub mod config;
pub mod error;
pub mod model;
pub mod observe;
pub mod pipeline;
pub mod plan;
pub mod reject;
pub mod sample;
pub mod schema;
pub mod sink;
pub mod source;
pub mod verify;

pub use error::{Error, ErrorKind, Result};

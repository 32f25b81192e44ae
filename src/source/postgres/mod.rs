//! PostgreSQL source: logical replication with pgoutput.

pub mod pgoutput;

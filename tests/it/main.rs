//! The one integration-test binary: real SQLite files, real embedded SurrealDB,
//! the real daemon binary where a test needs a process to kill.

mod support;

mod config_examples;
mod cutover;
mod deploy_files;
mod layout;
mod m4;
mod m6;
mod observe;
mod pg_crash;
mod pg_schema;
mod pg_surreal;
mod pg_target;
mod readonly;
mod schema_changes;
mod soak;
mod sqlite_capture;
mod sqlite_crash;
mod sqlite_surreal;
mod surreal_remote;
mod surreal_source;
mod surreal_types;
mod verify;

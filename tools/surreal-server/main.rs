//! `surreal start …`, the SurrealDB server, for switchyard's remote-target tests.

fn main() -> std::process::ExitCode {
    surrealdb_server::init(surrealdb_server::core::CommunityComposer())
}

//! The allocator of every program linking switchyard: jemalloc (feature
//! `jemalloc`, on by default). The pipeline allocates a row on the reading
//! task and frees it on the writing one; glibc's malloc spent about a
//! quarter of a snapshot into SurrealDB in locking and trimming its arenas
//! (`scripts/bench sqlite-surreal`: 25k rows/s with it, 41k with jemalloc,
//! and a lower peak RSS).
//!
//! Freed pages go back to the system a second after they were last used,
//! by jemalloc's background thread, so a daemon that copied a large table
//! does not keep the copy's high-water mark while it streams.
//! `_RJEM_MALLOC_CONF` (jemalloc's `MALLOC_CONF`) overrides these settings.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts (a C string).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

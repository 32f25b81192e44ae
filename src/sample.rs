//! The demo source the quick start replicates: a small shop in SQLite.

use std::path::Path;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Executor};

use crate::error::{Error, Result};

/// The schema and rows of the demo shop (`config/shop.sql`).
pub const SHOP_SQL: &str = include_str!("../config/shop.sql");

/// Creates the demo shop database at `path`; refuses to touch an existing file.
pub async fn create_shop(path: &Path) -> Result<()> {
    if path.exists() {
        return Err(Error::config(format!(
            "{} exists already; remove it or choose another path",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::connect(format!("cannot create directory {}", dir.display())).with_source(e)
        })?;
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .connect()
        .await?;
    conn.execute(SHOP_SQL).await?;
    Ok(())
}

//! `switchyard demo-source PATH`: the demo shop database of the quick start.

use std::path::Path;

use super::Exit;
use crate::error::Result;

pub async fn run(path: &Path) -> Result<Exit> {
    crate::sample::create_shop(path).await?;
    println!("created the demo shop database at {}", path.display());
    Ok(Exit::Ok)
}

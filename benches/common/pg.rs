//! The throwaway PostgreSQL cluster of `scripts/pg-cluster`, as the
//! PostgreSQL benchmark programs reach it.

use anyhow::{bail, Context, Result};

/// An environment variable that `scripts/bench` sets.
pub fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: run the benchmark through `bash scripts/bench …`")
    })
}

/// A number from the environment, or the default.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone)]
pub struct Pg {
    pub host: String,
    pub port: String,
    pub password: String,
    pub bin: String,
}

impl Pg {
    pub fn from_env() -> Result<Self> {
        Ok(Pg {
            host: env("SWITCHYARD_TEST_PG_HOST")?,
            port: env("SWITCHYARD_TEST_PG_PORT")?,
            password: env("SWITCHYARD_TEST_PG_PASSWORD")?,
            bin: env("SWITCHYARD_TEST_PG_BIN")?,
        })
    }

    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (c, conn) = tokio_postgres::Config::new()
            .host(&self.host)
            .port(self.port.parse()?)
            .user("postgres")
            .password(&self.password)
            .dbname(db)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        Ok(c)
    }

    /// Runs pgbench against the cluster; its standard output.
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(format!("{}/pgbench", self.bin))
            .args(["-h", &self.host, "-p", &self.port, "-U", "postgres"])
            .args(args)
            .env("PGPASSWORD", &self.password)
            .output()
            .context("running pgbench")?;
        if !out.status.success() {
            bail!(
                "pgbench {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{db}?sslmode=disable",
            self.host, self.port
        )
    }
}

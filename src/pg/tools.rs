//! PostgreSQL's own client programs (`pg_dump`, `pg_restore`): found on
//! `PATH` or in the usual install directories, of a major version at least
//! the server's, and run with the connection in the environment (the
//! password never on a command line).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::conn::{PgEndpoint, SslMode};
use crate::error::{Error, Result};

/// Where PostgreSQL installs its programs, besides `PATH`.
const INSTALL_DIRS: [&str; 4] = [
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
];

/// The major version `program --version` prints (`pg_dump (PostgreSQL) 15.20 …` → 15).
pub fn major_of(version_text: &str) -> Option<u32> {
    version_text.split_whitespace().find_map(|w| {
        w.split('.')
            .next()?
            .parse::<u32>()
            .ok()
            .filter(|_| w.contains('.'))
    })
}

fn version(path: &Path) -> Option<u32> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .ok()?;
    major_of(&String::from_utf8_lossy(&out.stdout))
}

/// Each program's candidates with their major versions, kept once found.
type Found = HashMap<String, Vec<(PathBuf, u32)>>;

/// Every `program` found, with its major version. Asked once per process
/// where something is found: each candidate answers `--version`, and a
/// snapshot asks for `pg_dump` and `pg_restore` four times. The candidates
/// answer at once. Debian's `pg_wrapper` (`/usr/bin/pg_dump`, and again as
/// `/bin/pg_dump` where `/bin` is `/usr/bin`) is not asked: it is a Perl
/// script (40–100 ms to answer, the slowest candidate by far) that runs a
/// program of `/usr/lib/postgresql/*/bin`, which are candidates themselves.
fn candidates(program: &str) -> Vec<(PathBuf, u32)> {
    static FOUND: OnceLock<Mutex<Found>> = OnceLock::new();
    let found = FOUND.get_or_init(Default::default);
    if let Some(known) = found.lock().ok().and_then(|f| f.get(program).cloned()) {
        return known;
    }
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut real: Vec<PathBuf> = Vec::new();
    for d in search_dirs() {
        let p = d.join(program);
        if !p.is_file() {
            continue;
        }
        let target = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
        if is_debian_wrapper(&target) || real.contains(&target) {
            continue;
        }
        real.push(target);
        paths.push(p);
    }
    let versions: Vec<Option<u32>> = std::thread::scope(|s| {
        let probes: Vec<_> = paths.iter().map(|p| s.spawn(|| version(p))).collect();
        probes
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let out: Vec<(PathBuf, u32)> = paths
        .into_iter()
        .zip(versions)
        .filter_map(|(p, v)| Some((p, v?)))
        .collect();
    // Nothing found is not kept: the program may be installed while the
    // daemon runs.
    if !out.is_empty() {
        if let Ok(mut f) = found.lock() {
            f.insert(program.to_string(), out.clone());
        }
    }
    out
}

/// Whether `resolved` (a candidate with its links followed) is Debian's
/// `postgresql-common` dispatcher rather than a PostgreSQL program.
fn is_debian_wrapper(resolved: &Path) -> bool {
    resolved.file_name().is_some_and(|n| n == "pg_wrapper")
}

/// `PATH`, then the install directories of every PostgreSQL version present.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for pattern in INSTALL_DIRS {
        let (head, tail) = pattern.split_once('*').expect("a pattern with *");
        // "/usr/lib/postgresql/" + "15" + "/bin"; "/usr/" + "pgsql-15" + "/bin"
        let (parent, prefix) = head.rsplit_once('/').expect("an absolute pattern");
        let parent = if parent.is_empty() { "/" } else { parent };
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                dirs.push(PathBuf::from(format!("{}{}", e.path().display(), tail)));
            }
        }
    }
    dirs
}

/// The newest `program` of major version `min_major` or later.
pub fn find(program: &str, min_major: u32) -> Result<PathBuf> {
    let found = candidates(program);
    if let Some((p, _)) = found
        .iter()
        .filter(|(_, v)| *v >= min_major)
        .max_by_key(|(_, v)| *v)
    {
        return Ok(p.clone());
    }
    let seen = if found.is_empty() {
        "none was found on PATH or in /usr/lib/postgresql/*/bin".to_string()
    } else {
        format!(
            "found only {}",
            found
                .iter()
                .map(|(p, v)| format!("{} ({v})", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(Error::config(format!(
        "{program} of PostgreSQL {min_major} or later is needed (the source server is {min_major}), and {seen}; \
         install it (Debian/Ubuntu: apt-get install postgresql-client-{min_major}; Red Hat: dnf install postgresql{min_major}) \
         or put it on PATH"
    )))
}

/// A command for `program` that connects to `ep` through libpq's
/// environment variables (the password in PGPASSWORD, not in the arguments).
pub fn command(program: &Path, ep: &PgEndpoint) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            c.env_remove(k);
        }
    }
    c.env("PGHOST", &ep.host)
        .env("PGPORT", ep.port.to_string())
        .env("PGUSER", &ep.user)
        .env("PGDATABASE", &ep.dbname)
        .env("PGAPPNAME", "switchyard")
        .env(
            "PGSSLMODE",
            match ep.sslmode {
                SslMode::Disable => "disable",
                SslMode::Prefer => "prefer",
                SslMode::Require => "require",
                SslMode::VerifyCa => "verify-ca",
                SslMode::VerifyFull => "verify-full",
            },
        )
        .kill_on_drop(true);
    if let Some(ca) = &ep.sslrootcert {
        c.env("PGSSLROOTCERT", ca);
    }
    if let Some(p) = ep.password() {
        c.env("PGPASSWORD", p);
    }
    c
}

/// Runs `cmd` to completion; its stderr (scrubbed of the password) in the
/// error when it fails.
pub async fn run(mut cmd: tokio::process::Command, ep: &PgEndpoint, what: &str) -> Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::config(format!("cannot run {what}: {e}")))?;
    let stderr = ep.scrub(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(Error::definite(format!(
            "{what} failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_from_version_text() {
        assert_eq!(
            major_of("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of("pg_restore (PostgreSQL) 17.2"), Some(17));
        assert_eq!(major_of("nothing here"), None);
    }

    #[test]
    fn debians_wrapper_is_told_from_a_program_by_where_its_link_leads() {
        let dir = std::env::temp_dir().join(format!("switchyard-tools-{}", std::process::id()));
        let (usr, bin, common) = (dir.join("usr/bin"), dir.join("bin"), dir.join("common"));
        for d in [&usr, &bin, &common] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(common.join("pg_wrapper"), "#!/usr/bin/perl\n").unwrap();
        std::os::unix::fs::symlink(common.join("pg_wrapper"), usr.join("pg_dump")).unwrap();
        let wrapper = std::fs::canonicalize(usr.join("pg_dump")).unwrap();
        assert!(is_debian_wrapper(&wrapper), "{}", wrapper.display());
        std::fs::write(bin.join("pg_dump"), "#!/bin/sh\n").unwrap();
        let program = std::fs::canonicalize(bin.join("pg_dump")).unwrap();
        assert!(!is_debian_wrapper(&program), "{}", program.display());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_program_names_the_version_and_how_to_install_it() {
        let e = find("pg_dump_that_does_not_exist", 99)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("PostgreSQL 99") && e.contains("apt-get install postgresql-client-99"),
            "{e}"
        );
    }
}

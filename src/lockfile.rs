//! A lock file beside a file that one switchyard process owns while it runs
//! (a SQLite source, an embedded SurrealDB target): `run` holds it, so a
//! second daemon on the same files is refused, and `cutover` learns that a
//! daemon streams and which process it is. The lock is the operating
//! system's (`flock`): it goes away with the process, however it ends.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file of `owned`: `<owned>.switchyard-lock`.
pub fn lock_path(owned: &Path) -> PathBuf {
    let mut name = owned.as_os_str().to_owned();
    name.push(".switchyard-lock");
    PathBuf::from(name)
}

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Takes the lock of `owned` and writes this process's id into it;
    /// `None` when another process holds it.
    pub fn acquire(owned: &Path) -> Result<Option<DaemonLock>> {
        let path = lock_path(owned);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_error(&path, "creating the directory of", e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&path, "opening", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(io_error(&path, "locking", e)),
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .and_then(|_| file.flush())
            .map_err(|e| io_error(&path, "writing", e))?;
        Ok(Some(DaemonLock { _file: file }))
    }
}

/// The process holding the lock of `owned`, if one does.
pub fn holder(owned: &Path) -> Result<Option<u32>> {
    let path = lock_path(owned);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path, "opening", e)),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            file.read_to_string(&mut text)
                .map_err(|e| io_error(&path, "reading", e))?;
            // Held but not written yet: a process that is starting.
            Ok(Some(text.trim().parse().unwrap_or(0)))
        }
        Err(TryLockError::Error(e)) => Err(io_error(&path, "locking", e)),
    }
}

/// Removes the lock file of `owned` unless a process holds it.
pub fn remove(owned: &Path) -> Result<()> {
    if holder(owned)?.is_none() {
        let path = lock_path(owned);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path, "removing", e)),
        }
    }
    Ok(())
}

/// Asks the process `pid` to stop (SIGTERM), as an operator's Ctrl-C would.
pub fn terminate(pid: u32) -> Result<()> {
    if pid == 0 {
        return Err(Error::definite(
            "the lock's holder has not written its process id yet",
        ));
    }
    // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if r != 0 {
        return Err(Error::definite(format!(
            "cannot stop switchyard process {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::definite(format!("{what} lock file {}: {e}", path.display())).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_process_and_a_second_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let owned = dir.path().join("app.sqlite");
        assert_eq!(holder(&owned).unwrap(), None);
        let lock = DaemonLock::acquire(&owned).unwrap().expect("free");
        assert_eq!(holder(&owned).unwrap(), Some(std::process::id()));
        assert!(DaemonLock::acquire(&owned).unwrap().is_none());
        drop(lock);
        assert_eq!(holder(&owned).unwrap(), None);
        remove(&owned).unwrap();
        assert!(!lock_path(&owned).exists());
    }
}

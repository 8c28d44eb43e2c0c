//! The root directory lock: one berthd per root.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

/// Holds `<root>/berthd.lock` for the life of the daemon (released when dropped or on exit).
pub struct RootLock {
    _lock: Flock<File>,
}

impl RootLock {
    /// Takes the lock, or fails naming the PID that holds it.
    pub fn acquire(root: &Path) -> anyhow::Result<Self> {
        let path = root.join("berthd.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                anyhow::bail!(
                    "another berthd (pid {}) is already using root {}",
                    holder.trim(),
                    root.display()
                );
            }
        };
        lock.set_len(0)?;
        lock.rewind()?;
        write!(lock, "{}", std::process::id())?;
        Ok(Self { _lock: lock })
    }
}

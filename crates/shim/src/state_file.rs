//! Per-task state files of an external shim: `<shim dir>/tasks/<id>.json`.
//!
//! The shim writes one when it creates a task, again when the task starts and when it exits
//! (code, time, OOM). berthd reads them when the shim itself is gone, so that an exit the
//! shim saw before dying is not lost. Written atomically (temp file, fsync, rename): a
//! reader sees the old record or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Exit, ShimError};

/// What a state file holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskRecord {
    /// Container ID.
    pub id: String,
    /// Host PID of the container's init.
    pub pid: u32,
    /// The OCI runtime binary.
    pub runtime: PathBuf,
    /// The runtime's `--root`.
    pub runtime_root: PathBuf,
    /// The bundle.
    pub bundle: PathBuf,
    /// `start` succeeded.
    pub started: bool,
    /// Set once the main process has exited.
    pub exit: Option<Exit>,
}

/// The directory of task records inside a shim directory.
pub fn tasks_dir(shim_dir: &Path) -> PathBuf {
    shim_dir.join("tasks")
}

fn record_path(tasks: &Path, id: &str) -> PathBuf {
    tasks.join(format!("{id}.json"))
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ShimError {
    let path = path.to_owned();
    move |source| ShimError::Io { action, path, source }
}

/// Writes (replaces) the record of `rec.id` under `tasks`.
pub fn write(tasks: &Path, rec: &TaskRecord) -> Result<(), ShimError> {
    let path = record_path(tasks, &rec.id);
    let tmp = tasks.join(format!(".{}.tmp", rec.id));
    let json = serde_json::to_vec(rec)
        .map_err(|source| ShimError::StateFile { path: path.clone(), source })?;
    let mut f = std::fs::File::create(&tmp).map_err(io_err("create state file", &tmp))?;
    f.write_all(&json).map_err(io_err("write state file", &tmp))?;
    // The record must survive a crash of the machine as far as a rename can promise.
    f.sync_all().map_err(io_err("sync state file", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io_err("rename state file", &path))
}

/// Removes the record of `id` (missing is fine).
pub fn remove(tasks: &Path, id: &str) -> Result<(), ShimError> {
    let path = record_path(tasks, id);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_err("remove state file", &path)(e))
        }
        _ => Ok(()),
    }
}

/// Reads every record under `tasks`, skipping temp files and unreadable records (logged).
pub fn read_all(tasks: &Path) -> Vec<TaskRecord> {
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let parsed = std::fs::read(&path).map_err(io_err("read state file", &path)).and_then(|b| {
            serde_json::from_slice::<TaskRecord>(&b)
                .map_err(|source| ShimError::StateFile { path: path.clone(), source })
        });
        match parsed {
            Ok(rec) => out.push(rec),
            Err(e) => tracing::warn!(error = %e, "skipping task state file"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn write_read_replace_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = TaskRecord {
            id: "c1".into(),
            pid: 42,
            runtime: "runc".into(),
            runtime_root: "/run/runc".into(),
            bundle: "/b".into(),
            started: false,
            exit: None,
        };
        write(dir.path(), &rec).unwrap();
        rec.started = true;
        rec.exit = Some(Exit {
            code: 3,
            at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            oom_killed: false,
            lost: false,
        });
        write(dir.path(), &rec).unwrap();
        std::fs::write(dir.path().join("garbage.json"), b"{").unwrap();
        std::fs::write(dir.path().join(".c2.tmp"), b"{}").unwrap();
        assert_eq!(read_all(dir.path()), vec![rec]);
        remove(dir.path(), "c1").unwrap();
        remove(dir.path(), "c1").unwrap();
        assert!(read_all(dir.path()).is_empty());
        assert!(read_all(&dir.path().join("missing")).is_empty());
    }
}

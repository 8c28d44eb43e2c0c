//! Small helpers: ids, timestamps, atomic file writes, process identity.

use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, RuntimeError};

/// A new 64-hex-digit id from the kernel's random source.
pub(crate) fn new_id() -> Result<String> {
    let mut buf = [0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we pass.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let errno = nix::errno::Errno::last();
            if errno == nix::errno::Errno::EINTR {
                continue;
            }
            return Err(RuntimeError::Sys { call: "getrandom", source: errno });
        }
        filled += n as usize;
    }
    Ok(hex::encode(buf))
}

/// Nanoseconds since the epoch (CRI timestamps).
pub(crate) fn now_ns() -> i64 {
    system_time_ns(SystemTime::now())
}

/// `t` as nanoseconds since the epoch (0 before it).
pub(crate) fn system_time_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Writes `data` to `path` through a temp file and a rename, so readers see the old or the
/// new content, never half of one.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(RuntimeError::io("create", &tmp))?;
    f.write_all(data).map_err(RuntimeError::io("write", &tmp))?;
    f.sync_all().map_err(RuntimeError::io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(RuntimeError::io("rename", path))
}

/// Writes `data` to `path` through a temp file and a rename, without fsync: for files in
/// the volatile state dir (tmpfs in production, gone at reboot), where a crashed process
/// must leave the old or the new file but power loss does not matter.
pub(crate) fn write_volatile(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(RuntimeError::io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(RuntimeError::io("rename", path))
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`, clock ticks since boot), or
/// `None` if there is no such process. With the pid it names one process for good.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    stat_fields(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?.0
}

/// `PF_EXITING` in the flags of `/proc/<pid>/stat`: the process is in `do_exit`.
const PF_EXITING: u64 = 0x4;

/// Whether the process `pid` that started at `start_time` still exists and is not on its
/// way out (a zombie, or exiting: the init of a PID namespace stays exiting while the
/// kernel kills the rest of its namespace). One read of `/proc/<pid>/stat`.
pub(crate) fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    let Some(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok() else {
        return false;
    };
    match stat_fields(&stat) {
        Some((Some(now), alive)) => alive && start_time.is_none_or(|t| t == now),
        _ => false,
    }
}

/// From a `/proc/<pid>/stat` text: the start time (field 22, clock ticks since boot) and
/// whether the process is neither a zombie nor exiting. `None` if unparsable.
fn stat_fields(stat: &str) -> Option<(Option<u64>, bool)> {
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    // After ")" come fields 3 (state) ... 9 (flags) ... 22 (starttime).
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let state = *fields.first()?;
    let flags: u64 = fields.get(6)?.parse().ok()?;
    let start = fields.get(19).and_then(|v| v.parse().ok());
    Some((start, !matches!(state, "Z" | "X" | "x") && flags & PF_EXITING == 0))
}

/// Removes a directory tree; a missing one is fine.
pub(crate) fn remove_dir_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::io("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exiting_and_zombie_processes_are_not_alive() {
        let stat = |state: &str, flags: u64| {
            format!("42 (sh (odd) name) {state} 1 42 42 0 -1 {flags} 0 0 0 0 1 2 3 4 20 0 1 0 99")
        };
        assert_eq!(stat_fields(&stat("S", 0x400100)), Some((Some(99), true)));
        assert_eq!(stat_fields(&stat("R", 0x400104)), Some((Some(99), false)));
        assert_eq!(stat_fields(&stat("Z", 0x400100)), Some((Some(99), false)));
        assert_eq!(stat_fields("garbage"), None);
        // Our own process is alive.
        let me = std::process::id();
        assert!(process_alive(me, process_start_time(me)));
        assert!(!process_alive(me, Some(1)));
    }

    #[test]
    fn ids_are_64_hex_and_differ() {
        let a = new_id().expect("id");
        let b = new_id().expect("id");
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn own_process_is_alive_with_its_start_time() {
        let pid = std::process::id();
        let start = process_start_time(pid);
        assert!(start.is_some());
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start.map(|s| s + 1)));
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.json");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
    }
}

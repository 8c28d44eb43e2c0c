//! What lets a restarted berthd adopt the embedded shim's tasks that outlived the previous
//! one: a small record per task (`<state_dir>/<id>/task.json`), the identity of a process
//! (PID and start time, so that a recycled PID is never taken for the container's init), and
//! pidfds, through which an adopted init (no longer our child: it was reparented when the
//! old berthd died) is watched for its exit and signalled without the risk of PID reuse.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::ShimError;

/// The record's file name inside the task's state directory.
const RECORD_FILE: &str = "task.json";
/// Its temporary name while it is written.
const RECORD_TMP: &str = ".task.json.tmp";

/// What a later berthd needs to adopt a task: how to drive its runtime, which process is
/// its init, where its OOM counter and log are.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TaskFile {
    /// The pod sandbox the container belongs to (empty if it was never bound to one).
    #[serde(default)]
    pub(crate) pod_id: String,
    /// The OCI runtime binary.
    pub(crate) runtime: PathBuf,
    /// The runtime's `--root`.
    pub(crate) runtime_root: PathBuf,
    /// Host PID of the container's init.
    pub(crate) pid: u32,
    /// Its start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot); `None` when
    /// it was gone before the record was written (it is then never adopted).
    pub(crate) start_time: Option<u64>,
    /// The container's memory cgroup directory (for OOM detection).
    pub(crate) memory_cgroup: Option<PathBuf>,
    /// The cgroup's OOM-kill count before the task was created.
    #[serde(default)]
    pub(crate) oom_baseline: u64,
    /// The CRI log file.
    pub(crate) log_path: Option<PathBuf>,
    /// The user's command runs (`start` or `run` succeeded).
    pub(crate) started: bool,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ShimError {
    let path = path.to_owned();
    move |source| ShimError::Io { action, path, source }
}

/// Writes (replaces) the record in the task directory `dir`: a temporary file renamed over
/// the old one, so a reader sees either record whole. Not fsynced: the record only matters
/// while the machine stays up (a reboot ends the container too), and a berthd crash does not
/// lose what the kernel already has.
pub(crate) fn write(dir: &Path, rec: &TaskFile) -> Result<(), ShimError> {
    let path = dir.join(RECORD_FILE);
    let tmp = dir.join(RECORD_TMP);
    let json = serde_json::to_vec(rec)
        .map_err(|source| ShimError::StateFile { path: path.clone(), source })?;
    let mut f = std::fs::File::create(&tmp).map_err(io_err("create task record", &tmp))?;
    f.write_all(&json).map_err(io_err("write task record", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io_err("rename task record", &path))
}

/// Reads the record of the task directory `dir`.
pub(crate) fn read(dir: &Path) -> Result<TaskFile, ShimError> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(io_err("read task record", &path))?;
    serde_json::from_slice(&bytes).map_err(|source| ShimError::StateFile { path, source })
}

/// The state letter (field 3) and start time (field 22) of a `/proc/<pid>/stat` text.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name (field 2) is in parentheses and may contain anything: skip past the
    // last `)`.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    // Fields 4.. follow; the start time is field 22, i.e. 18 further on.
    let start = rest.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The start time of process `pid` (`None`: no such process).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// Whether a `/proc/<pid>/stat` text is of a live process that started at `start_time`.
/// A zombie (or a dying `X`) has exited: not live.
fn is_same_live_process(stat: &str, start_time: u64) -> bool {
    parse_stat(stat)
        .is_some_and(|(state, start)| start == start_time && !matches!(state, 'Z' | 'X'))
}

/// A pidfd: a handle on one process that never names another, whatever happens to its PID.
#[derive(Debug)]
pub(crate) struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd for `pid` if it is still the live process that started at `start_time`;
    /// `Ok(None)` when that process is gone (exited, or its PID recycled). An error means
    /// the answer is unknown (e.g. a kernel before 5.3, without `pidfd_open`).
    pub(crate) fn open_if_same(pid: u32, start_time: u64) -> Result<Option<PidFd>, ShimError> {
        let Ok(raw) = libc::pid_t::try_from(pid) else { return Ok(None) };
        // SAFETY: pidfd_open(2) takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0 as libc::c_uint) };
        if fd < 0 {
            return match Errno::last() {
                Errno::ESRCH => Ok(None),
                source => Err(ShimError::Sys { call: "pidfd_open", source }),
            };
        }
        let Ok(fd) = RawFd::try_from(fd) else {
            return Err(ShimError::Sys { call: "pidfd_open", source: Errno::EBADF });
        };
        // SAFETY: the kernel just returned this descriptor (close-on-exec) and nothing else
        // owns it.
        let pidfd = PidFd(unsafe { OwnedFd::from_raw_fd(fd) });
        // The pidfd was opened first, so a matching start time read now proves it names
        // the recorded process: had the pidfd caught another holder of the PID, the recorded
        // process, holding it now, would have started since, yet it started long before.
        let same = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| is_same_live_process(&stat, start_time));
        Ok((same && !pidfd.has_exited()).then_some(pidfd))
    }

    /// Whether the process has exited (the pidfd polls readable).
    pub(crate) fn has_exited(&self) -> bool {
        let mut p = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    /// Sends `signal`. `Ok(false)`: the process had exited, there was nothing to signal
    /// (and, unlike `kill(2)` by PID, nothing else was signalled in its place). A signal
    /// that meets it exiting meanwhile is a no-op, as for a zombie.
    pub(crate) fn send_signal(&self, signal: nix::sys::signal::Signal) -> Result<bool, ShimError> {
        // The kernel accepts a signal for a zombie (ESRCH comes only once it is reaped).
        if self.has_exited() {
            return Ok(false);
        }
        // SAFETY: pidfd_send_signal(2) with our descriptor, a valid signal number, no
        // siginfo and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        match Errno::last() {
            Errno::ESRCH => Ok(false),
            source => Err(ShimError::Sys { call: "pidfd_send_signal", source }),
        }
    }

    /// Waits until the process exits (the pidfd becomes readable).
    pub(crate) async fn exited(&self) -> Result<(), ShimError> {
        let pipe_err =
            |source: std::io::Error| ShimError::Pipe { action: "watch adopted process", source };
        // A duplicate for the poller, which owns what it registers.
        let fd = self.0.try_clone().map_err(pipe_err)?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open (and the same)
        // while it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| pipe_err(e.into()))?;
        let _ready = fd.readable().await.map_err(pipe_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TaskFile {
        TaskFile {
            pod_id: "pod1".into(),
            runtime: "/usr/bin/runc".into(),
            runtime_root: "/run/berth/runtime/runc".into(),
            pid: 4242,
            start_time: Some(123_456),
            memory_cgroup: Some("/sys/fs/cgroup/memory/berth/pod-x/c1".into()),
            oom_baseline: 2,
            log_path: Some("/var/log/pods/x/c/0.log".into()),
            started: false,
        }
    }

    #[test]
    fn record_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = record();
        write(dir.path(), &rec).unwrap();
        assert_eq!(read(dir.path()).unwrap(), rec);
        rec.started = true;
        rec.start_time = None;
        rec.log_path = None;
        write(dir.path(), &rec).unwrap();
        assert_eq!(read(dir.path()).unwrap(), rec);
        // Only the record is left: the temporary file was renamed.
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(RECORD_FILE)]);
    }

    #[test]
    fn missing_or_bad_records_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(read(dir.path()), Err(ShimError::Io { .. })));
        std::fs::write(dir.path().join(RECORD_FILE), b"{\"pid\":").unwrap();
        assert!(matches!(read(dir.path()), Err(ShimError::StateFile { .. })));
    }

    #[test]
    fn stat_fields() {
        // A command name with spaces and parentheses.
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1234 56 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some(('S', 987_654)));
        assert!(is_same_live_process(stat, 987_654));
        // Recycled PID: another start time.
        assert!(!is_same_live_process(stat, 987_653));
        // Exited, not yet reaped.
        let zombie = stat.replace(")) S ", ")) Z ");
        assert!(!is_same_live_process(&zombie, 987_654));
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_itself() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        let fd = PidFd::open_if_same(me, start).unwrap().expect("we are alive");
        assert!(!fd.has_exited());
        // Signal 0 would be refused by the enum; SIGCONT is harmless to a running process.
        assert!(fd.send_signal(nix::sys::signal::Signal::SIGCONT).unwrap());
        assert!(PidFd::open_if_same(me, start + 1).unwrap().is_none());
    }

    #[tokio::test]
    async fn exit_of_a_process_not_our_child_is_seen() {
        // `sh` starts `sleep` in the background and exits: the sleep is not our child (it is
        // reparented away from us, as an adopted container is), yet its exit is seen.
        // Through the reaper: other tests of this process may run it, and it would steal
        // a `Command::output` wait.
        let mut sh = std::process::Command::new("/bin/sh");
        sh.args(["-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"]);
        let out = crate::reaper::run_captured(sh, None).await.unwrap();
        let pid: u32 = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
        let Some(start) = start_time(pid) else { return }; // already gone: nothing to test
        let Some(fd) = PidFd::open_if_same(pid, start).unwrap() else { return };
        tokio::time::timeout(std::time::Duration::from_secs(10), fd.exited())
            .await
            .expect("exit seen within 10s")
            .unwrap();
        assert!(fd.has_exited());
        assert!(!fd.send_signal(nix::sys::signal::Signal::SIGTERM).unwrap());
    }
}

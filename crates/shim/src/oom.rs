//! OOM-kill detection from a container's memory cgroup.
//!
//! Two mechanisms, as conmon-rs does: a live watcher that emits [`TaskEvent::Oom`] whenever
//! the cgroup's `oom_kill` counter rises (cgroup v1: eventfd registered through
//! `cgroup.event_control` on `memory.oom_control`; v2: inotify on `memory.events`), and a
//! synchronous read of the counter when the main process exits, before the runtime deletes
//! the cgroup, to decide whether *that* process was OOM-killed.
//!
//! The counter counts kills of any process in the cgroup, exec'd ones included. So the main
//! process counts as OOM-killed only if it died of `SIGKILL` (exit code 137) *and* the counter
//! rose during its life. Remaining edge: an exec'd process OOM-killed while the main process
//! is `SIGKILL`ed by someone else is reported as the main process's OOM kill.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::{ShimError, TaskEvent};

/// Which cgroup version the memory cgroup directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1 memory controller (`memory.oom_control`).
    V1,
    /// cgroup v2 (`memory.events`).
    V2,
}

impl CgroupVersion {
    fn counter_file(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        }
    }
}

/// The `oom_kill <n>` field of `memory.oom_control` (v1) or `memory.events` (v2).
pub fn parse_oom_kill(content: &str) -> Option<u64> {
    content.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some("oom_kill"), Some(n)) => n.parse().ok(),
            _ => None,
        }
    })
}

/// A memory cgroup whose OOM kills we count.
#[derive(Debug, Clone)]
pub struct OomCounter {
    dir: PathBuf,
    version: CgroupVersion,
    baseline: u64,
}

impl OomCounter {
    /// Detects the cgroup version of `dir` and reads the current count as the baseline.
    /// `None` when `dir` has neither file (no memory controller there).
    pub fn open(dir: &Path) -> Option<Self> {
        let version = if dir.join("memory.oom_control").exists() {
            CgroupVersion::V1
        } else if dir.join("memory.events").exists() {
            CgroupVersion::V2
        } else {
            tracing::warn!(cgroup = %dir.display(), "no memory.oom_control or memory.events; OOM detection off");
            return None;
        };
        let mut c = OomCounter { dir: dir.to_owned(), version, baseline: 0 };
        // Kernels before 4.13 have no `oom_kill` field in v1: count from zero.
        c.baseline = c.read().unwrap_or(0);
        Some(c)
    }

    /// The cgroup's version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The current `oom_kill` count (`None`: cgroup gone or field missing).
    pub fn read(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join(self.version.counter_file())).ok()?;
        parse_oom_kill(&text)
    }

    /// Whether a main process that exited with `exit_code` was OOM-killed: it died of
    /// `SIGKILL` and the counter rose since the baseline.
    pub fn main_process_oom_killed(&self, exit_code: i32) -> bool {
        exit_code == 128 + libc::SIGKILL && self.read().is_some_and(|n| n > self.baseline)
    }

    /// Starts the live watcher: a [`TaskEvent::Oom`] for `id` on every rise of the counter.
    /// Ends when the cgroup is removed (or the returned task is aborted).
    pub fn watch(
        &self,
        id: String,
        events: broadcast::Sender<TaskEvent>,
    ) -> Result<JoinHandle<()>, ShimError> {
        let counter = self.clone();
        match self.version {
            CgroupVersion::V1 => {
                let efd = register_v1(&self.dir)?;
                Ok(tokio::spawn(async move {
                    watch_loop(efd.fd, counter, id, events, |fd| {
                        fd.read().map(|_| true).map_err(std::io::Error::from)
                    })
                    .await;
                    drop(efd.control);
                }))
            }
            CgroupVersion::V2 => {
                let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                    .map_err(|source| ShimError::Sys { call: "inotify_init1", source })?;
                let file = self.dir.join("memory.events");
                inotify
                    .add_watch(&file, AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF)
                    .map_err(|source| ShimError::Sys {
                        call: "inotify_add_watch(memory.events)",
                        source,
                    })?;
                let fd = AsyncInotify(inotify);
                Ok(tokio::spawn(async move {
                    watch_loop(fd, counter, id, events, |fd| {
                        let evs = fd.0.read_events().map_err(std::io::Error::from)?;
                        // IN_IGNORED: the watch is gone (cgroup removed).
                        Ok(!evs.iter().any(|e| {
                            e.mask.contains(AddWatchFlags::IN_IGNORED)
                                || e.mask.contains(AddWatchFlags::IN_DELETE_SELF)
                        }))
                    })
                    .await;
                }))
            }
        }
    }
}

struct V1Registration {
    fd: AsyncEventFd,
    /// `memory.oom_control` must stay open while the eventfd is registered on it.
    control: File,
}

/// v1: registers an eventfd for OOM notifications of the cgroup.
fn register_v1(dir: &Path) -> Result<V1Registration, ShimError> {
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|source| ShimError::Sys { call: "eventfd", source })?;
    let control_path = dir.join("memory.oom_control");
    let control = File::open(&control_path).map_err(|source| ShimError::Io {
        action: "open",
        path: control_path.clone(),
        source,
    })?;
    let event_control = dir.join("cgroup.event_control");
    let line = format!("{} {}", efd.as_fd().as_raw_fd(), control.as_fd().as_raw_fd());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&event_control)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|source| ShimError::Io {
            action: "register OOM eventfd in",
            path: event_control.clone(),
            source,
        })?;
    Ok(V1Registration { fd: AsyncEventFd(efd), control })
}

struct AsyncEventFd(EventFd);
impl AsRawFd for AsyncEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}
impl AsyncEventFd {
    fn read(&self) -> nix::Result<u64> {
        self.0.read()
    }
}

struct AsyncInotify(Inotify);
impl AsRawFd for AsyncInotify {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Waits for notifications on `fd`; after each, rereads the counter and emits an OOM event if
/// it rose. `drain` consumes the notification and says whether to keep watching.
async fn watch_loop<T: AsRawFd>(
    fd: T,
    counter: OomCounter,
    id: String,
    events: broadcast::Sender<TaskEvent>,
    drain: impl Fn(&T) -> std::io::Result<bool>,
) {
    // SAFETY: `T` (our eventfd/inotify wrappers) owns its descriptor and always returns the
    // same one; the AsyncFd owns `T`, so the fd stays open while registered.
    let fd = match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(id, error = %e, "OOM watcher: cannot poll");
            return;
        }
    };
    let mut last = counter.baseline;
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(_) => return,
        };
        let keep = match guard.try_io(|inner| drain(inner.get_ref())) {
            Ok(Ok(keep)) => keep,
            Ok(Err(e)) => {
                tracing::debug!(id, error = %e, "OOM watcher stopped");
                return;
            }
            Err(_would_block) => continue,
        };
        // v1 also signals the eventfd when the cgroup is removed: then the read fails.
        match counter.read() {
            Some(n) if n > last => {
                last = n;
                tracing::info!(id, oom_kills = n, "OOM kill in container cgroup");
                let _ = events.send(TaskEvent::Oom { id: id.clone() });
            }
            Some(_) => {}
            None => return,
        }
        if !keep {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_oom_control() {
        assert_eq!(parse_oom_kill("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"), Some(3));
        // Pre-4.13 kernels: no field.
        assert_eq!(parse_oom_kill("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[test]
    fn parses_v2_memory_events() {
        assert_eq!(
            parse_oom_kill("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"),
            Some(1)
        );
    }

    #[test]
    fn counter_in_fake_v2_dir() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "oom 0\noom_kill 2\n").unwrap();
        let c = OomCounter::open(dir.path()).unwrap();
        assert_eq!(c.version(), CgroupVersion::V2);
        assert!(!c.main_process_oom_killed(137));
        std::fs::write(&events, "oom 1\noom_kill 3\n").unwrap();
        assert!(c.main_process_oom_killed(137));
        // Not SIGKILLed: an exec'd process was the victim.
        assert!(!c.main_process_oom_killed(0));
        assert!(!c.main_process_oom_killed(143));
    }

    #[test]
    fn no_memory_files_means_no_detection() {
        let dir = tempfile::tempdir().unwrap();
        assert!(OomCounter::open(dir.path()).is_none());
    }

    #[tokio::test]
    async fn v2_watcher_emits_on_rise() {
        let dir = tempfile::tempdir().unwrap();
        let events_file = dir.path().join("memory.events");
        std::fs::write(&events_file, "oom_kill 0\n").unwrap();
        let c = OomCounter::open(dir.path()).unwrap();
        let (tx, mut rx) = broadcast::channel(4);
        let h = c.watch("c1".into(), tx).unwrap();
        std::fs::write(&events_file, "oom_kill 1\n").unwrap();
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev, TaskEvent::Oom { id: "c1".into() });
        h.abort();
    }
}

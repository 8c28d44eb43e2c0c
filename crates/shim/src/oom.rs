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
//!
//! Two races make this inexact if taken naively, and both are closed here:
//! - A container killed at once on start (it allocates more than its limit right away) is
//!   dead before the runtime returns, so a baseline read after the start already holds its
//!   kill. The baseline is taken *before* the runtime creates the cgroup
//!   ([`OomBaseline::before_create`]): zero for a cgroup that does not exist yet.
//! - cgroup v1 signals the eventfd when the cgroup *enters* OOM, before the kernel has chosen
//!   and counted a victim, so a watcher that reads the counter right away can see no rise and
//!   miss the kill. After a notification without a rise the watcher reads again a few times
//!   over the next second; and every SIGKILLed exit (main process or exec) reads the counter
//!   once more, which is exact: the kill is counted before the victim's signal is sent. One
//!   shared high-water mark keeps a kill from being reported twice.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// Re-reads of the counter after a v1 notification that showed no rise yet: the kernel
/// signals before it picks and counts the victim.
const RECHECK_DELAYS: [Duration; 5] = [
    Duration::from_millis(1),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(800),
];

/// The OOM-kill count of a memory cgroup before its task was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomBaseline(u64);

impl OomBaseline {
    /// Reads the count of `dir` before the runtime creates (or joins) it: zero when the
    /// cgroup does not exist yet, so a kill during the start itself counts as the task's.
    pub fn before_create(dir: &Path) -> Self {
        let count = [CgroupVersion::V1, CgroupVersion::V2]
            .into_iter()
            .find_map(|v| std::fs::read_to_string(dir.join(v.counter_file())).ok())
            .and_then(|text| parse_oom_kill(&text))
            .unwrap_or(0);
        OomBaseline(count)
    }

    /// The count, to keep in a task record.
    pub(crate) fn count(self) -> u64 {
        self.0
    }

    /// A count kept in a task record.
    pub(crate) fn from_count(count: u64) -> Self {
        OomBaseline(count)
    }
}

/// A memory cgroup whose OOM kills we count.
#[derive(Debug, Clone)]
pub struct OomCounter {
    dir: PathBuf,
    version: CgroupVersion,
    baseline: u64,
    /// The highest count already reported as a [`TaskEvent::Oom`], shared by the watcher
    /// and the exit checks so that each kill is reported once.
    reported: Arc<AtomicU64>,
}

impl OomCounter {
    /// Detects the cgroup version of `dir` and reads the current count as the baseline.
    /// `None` when `dir` has neither file (no memory controller there).
    pub fn open(dir: &Path) -> Option<Self> {
        let mut c = Self::open_with(dir, 0)?;
        // Kernels before 4.13 have no `oom_kill` field in v1: count from zero.
        c.baseline = c.read().unwrap_or(0);
        c.reported.store(c.baseline, Ordering::Release);
        Some(c)
    }

    /// Opens `dir` (created since `baseline` was taken) counting from `baseline`.
    pub fn open_since(dir: &Path, baseline: OomBaseline) -> Option<Self> {
        Self::open_with(dir, baseline.0)
    }

    fn open_with(dir: &Path, baseline: u64) -> Option<Self> {
        let version = if dir.join("memory.oom_control").exists() {
            CgroupVersion::V1
        } else if dir.join("memory.events").exists() {
            CgroupVersion::V2
        } else {
            tracing::warn!(cgroup = %dir.display(), "no memory.oom_control or memory.events; OOM detection off");
            return None;
        };
        Some(OomCounter {
            dir: dir.to_owned(),
            version,
            baseline,
            reported: Arc::new(AtomicU64::new(baseline)),
        })
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
        exit_code == 128 + libc::SIGKILL && self.killed_since_baseline()
    }

    /// Whether the counter rose since the baseline: the OOM killer killed some process of
    /// the cgroup (which one, the counter does not say).
    pub fn killed_since_baseline(&self) -> bool {
        self.read().is_some_and(|n| n > self.baseline)
    }

    /// Emits a [`TaskEvent::Oom`] for `id` if the counter rose past what was reported
    /// already; says whether it did. Called by the watcher and whenever a process of the
    /// task died of `SIGKILL` (by then the kernel has counted a kill that caused it).
    pub fn report_new_kills(&self, id: &str, events: &broadcast::Sender<TaskEvent>) -> bool {
        let Some(n) = self.read() else { return false };
        if self.reported.fetch_max(n, Ordering::AcqRel) >= n {
            return false;
        }
        tracing::info!(id, oom_kills = n, "OOM kill in container cgroup");
        let _ = events.send(TaskEvent::Oom { id: id.to_owned() });
        true
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
        if counter.read().is_none() {
            return;
        }
        if !counter.report_new_kills(&id, &events) && counter.version == CgroupVersion::V1 {
            // Notified on entering OOM, before the victim is counted: look again shortly.
            let (counter, id, events) = (counter.clone(), id.clone(), events.clone());
            tokio::spawn(async move {
                for delay in RECHECK_DELAYS {
                    tokio::time::sleep(delay).await;
                    if counter.report_new_kills(&id, &events) || counter.read().is_none() {
                        return;
                    }
                }
            });
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
    fn baseline_of_a_cgroup_not_yet_made_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("ctr");
        let baseline = OomBaseline::before_create(&cg);
        assert_eq!(baseline, OomBaseline(0));
        // The runtime makes the cgroup and the task is killed at once: that kill is its own.
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(cg.join("memory.oom_control"), "oom_kill_disable 0\noom_kill 1\n").unwrap();
        let c = OomCounter::open_since(&cg, baseline).unwrap();
        assert!(c.main_process_oom_killed(137));
        // An existing cgroup's earlier kills are not.
        let c = OomCounter::open_since(&cg, OomBaseline::before_create(&cg)).unwrap();
        assert!(!c.main_process_oom_killed(137));
    }

    #[test]
    fn each_kill_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let events_file = dir.path().join("memory.events");
        std::fs::write(&events_file, "oom_kill 0\n").unwrap();
        let c = OomCounter::open(dir.path()).unwrap();
        let (tx, mut rx) = broadcast::channel(4);
        assert!(!c.report_new_kills("c1", &tx));
        std::fs::write(&events_file, "oom_kill 1\n").unwrap();
        // The watcher and an exit check both look: one event.
        assert!(c.clone().report_new_kills("c1", &tx));
        assert!(!c.report_new_kills("c1", &tx));
        assert_eq!(rx.try_recv().unwrap(), TaskEvent::Oom { id: "c1".into() });
        assert!(rx.try_recv().is_err());
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

//! The process-wide child reaper.
//!
//! berthd is a child subreaper: container processes (whose parent, `runc run -d`, exits)
//! are reparented to it. Reaping those needs `waitpid(-1)`, which would steal the exit status
//! of any child that someone else waits for by PID (`tokio::process`, `Command::output`). So
//! there is exactly one reaper per process, and every child the shim starts is spawned with
//! [`spawn`] and awaited through [`Reaper::register`].
//!
//! The reaper runs on its own thread with its own single-threaded tokio runtime, so it does
//! not depend on (or die with) whichever runtime first touched it: tests create one runtime
//! per test. It wakes on `SIGCHLD` and, in case a signal is ever missed, once a second.

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use crate::ShimError;

/// How long an exit nobody waits for is kept for a waiter that registers late.
const UNCLAIMED_TTL: Duration = Duration::from_secs(300);
/// At most this many unclaimed exits are kept (oldest dropped first).
const UNCLAIMED_MAX: usize = 4096;
/// Fallback poll interval, in case a `SIGCHLD` is lost.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A reaped process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Its PID.
    pub pid: i32,
    /// Exit code; `128 + signal` when killed by a signal.
    pub code: i32,
    /// When it was reaped (monotonic).
    pub at: Instant,
    /// When it was reaped (wall clock).
    pub wall: SystemTime,
}

/// Maps a raw `waitpid` status to an exit code: the code when the process exited,
/// `128 + signal` when a signal killed it, `None` for stop/continue reports.
pub fn exit_code(raw_status: i32) -> Option<i32> {
    if libc::WIFEXITED(raw_status) {
        Some(libc::WEXITSTATUS(raw_status))
    } else if libc::WIFSIGNALED(raw_status) {
        Some(128 + libc::WTERMSIG(raw_status))
    } else {
        None
    }
}

/// Makes this process a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so orphaned
/// descendants (container processes whose `runc` parent exited) are reparented to it rather
/// than to PID 1. Per process and idempotent; berthd calls it at startup.
pub fn become_subreaper() -> Result<(), ShimError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|source| ShimError::Sys { call: "prctl(PR_SET_CHILD_SUBREAPER)", source })
}

/// Held for reading while a child is being spawned, for writing while reaping. Rust's
/// `Command::spawn` waits for the child itself when `exec` fails; if the reaper got there
/// first, that wait would fail (std panics on it). So no reaping while a spawn is under way.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

/// Spawns `cmd` so that the reaper cannot race with `Command::spawn`'s own error handling.
/// Await the child's exit with [`Reaper::register`] (take the `Instant` before calling this);
/// never call `Child::wait`.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    // A poisoned lock only means another thread panicked while holding it; the `()` inside
    // cannot be in a bad state.
    let _guard = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
}

#[derive(Default)]
struct Tables {
    waiters: HashMap<i32, oneshot::Sender<Reaped>>,
    unclaimed: HashMap<i32, Reaped>,
    /// Insertion order of `unclaimed` (pid, reap time), for expiry.
    order: VecDeque<(i32, Instant)>,
}

impl Tables {
    fn dispatch(&mut self, reaped: Reaped) {
        if let Some(tx) = self.waiters.remove(&reaped.pid) {
            // The receiver may be gone (its waiter gave up): nothing else wants this exit.
            let _ = tx.send(reaped);
            return;
        }
        self.unclaimed.insert(reaped.pid, reaped);
        self.order.push_back((reaped.pid, reaped.at));
        self.expire(reaped.at);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(pid, at)) = self.order.front() {
            let too_many = self.order.len() > UNCLAIMED_MAX;
            let too_old = now.saturating_duration_since(at) > UNCLAIMED_TTL;
            if !too_many && !too_old {
                break;
            }
            self.order.pop_front();
            // Only drop the entry this record was made for (it may have been claimed since).
            if self.unclaimed.get(&pid).is_some_and(|r| r.at == at) {
                self.unclaimed.remove(&pid);
            }
        }
    }
}

/// The process-wide reaper; get it with [`Reaper::global`].
pub struct Reaper {
    tables: Mutex<Tables>,
    started: Result<(), std::io::ErrorKind>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The reaper, started on first use.
    pub fn global() -> Result<&'static Reaper, ShimError> {
        let reaper = REAPER.get_or_init(|| {
            let started = std::thread::Builder::new()
                .name("berth-reaper".into())
                .spawn(reaper_thread)
                .map(|_| ())
                .map_err(|e| e.kind());
            Reaper { tables: Mutex::new(Tables::default()), started }
        });
        match reaper.started {
            Ok(()) => Ok(reaper),
            Err(kind) => Err(ShimError::ReaperStart { kind }),
        }
    }

    /// Registers interest in `pid`'s exit. `not_before` is an instant taken before the process
    /// was spawned: an unclaimed exit of the same PID reaped earlier belongs to a previous
    /// process that had the PID, and is ignored.
    pub fn register(&self, pid: i32, not_before: Instant) -> oneshot::Receiver<Reaped> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.lock();
        match t.unclaimed.remove(&pid) {
            Some(r) if r.at >= not_before => {
                let _ = tx.send(r);
            }
            _ => {
                t.waiters.insert(pid, tx);
            }
        }
        rx
    }

    /// Forgets a registration (the waiter gave up).
    pub fn unregister(&self, pid: i32) {
        self.lock().waiters.remove(&pid);
    }

    /// Runs `f(pid)` only while `pid` is a child registered with [`Reaper::register`] whose
    /// exit has not been reaped yet, so the PID cannot name a recycled process: reaping
    /// waits meanwhile. Returns `None` when the process has already been reaped (or was
    /// never registered). `f` must be quick (a `kill(2)`, a `/proc` read): reaping and
    /// spawning wait for it.
    pub fn with_unreaped<T>(&self, pid: i32, f: impl FnOnce(i32) -> T) -> Option<T> {
        // `reap_all` holds the write side across waitpid and dispatch, so while we hold the
        // read side a registered waiter still present means the PID is not reaped.
        let _no_reaping = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
        if !self.lock().waiters.contains_key(&pid) {
            return None;
        }
        Some(f(pid))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // The tables stay consistent even if a holder panicked (every update is one call).
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps every exited child, without blocking.
    fn reap_all(&self) {
        let _spawning = SPAWN_LOCK.write().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid only writes the status integer we pass a valid pointer to.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == 0 {
                return; // children exist, none has exited
            }
            if pid < 0 {
                match nix::errno::Errno::last() {
                    nix::errno::Errno::EINTR => continue,
                    // ECHILD: no children at all.
                    _ => return,
                }
            }
            let Some(code) = exit_code(status) else {
                continue;
            };
            let reaped = Reaped { pid, code, at: Instant::now(), wall: SystemTime::now() };
            tracing::trace!(pid, code, "reaped");
            self.lock().dispatch(reaped);
        }
    }
}

fn reaper_thread() {
    let Some(reaper) = REAPER.get().or_else(|| {
        // `global` stores the reaper right after spawning us; wait for it.
        for _ in 0..1000 {
            std::thread::sleep(Duration::from_millis(1));
            if let Some(r) = REAPER.get() {
                return Some(r);
            }
        }
        None
    }) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let Ok(runtime) = runtime else {
        tracing::warn!("reaper: no tokio runtime; polling for exits");
        loop {
            reaper.reap_all();
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Install the handler before the first sweep so no exit falls between the two.
        let mut sigchld = signal(SignalKind::child());
        if let Err(e) = &sigchld {
            tracing::warn!(error = %e, "reaper: cannot listen for SIGCHLD; polling for exits");
        }
        loop {
            reaper.reap_all();
            match &mut sigchld {
                Ok(s) => {
                    let _ = tokio::time::timeout(POLL_INTERVAL, s.recv()).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
}

/// What [`run_captured`] collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Exit code (`128 + signal` when killed).
    pub code: i32,
    /// Standard output (capped).
    pub stdout: Vec<u8>,
    /// Standard error (capped).
    pub stderr: Vec<u8>,
}

/// Cap on what [`run_captured`] keeps of each stream.
pub const CAPTURE_CAP: usize = 4 << 20;

/// Runs `cmd` to completion through the reaper (stdin `/dev/null`, stdout and stderr
/// captured up to [`CAPTURE_CAP`] each). Other crates of berthd that run helper binaries
/// should use this instead of `tokio::process`, whose waits race with the reaper. With a
/// `timeout`, the command is killed (`SIGKILL`) when it expires.
pub async fn run_captured(cmd: Command, timeout: Option<Duration>) -> Result<Captured, ShimError> {
    crate::command::run_piped(cmd, None, timeout).await
}

/// Awaits a registered child's exit; after `timeout`, kills it with `SIGKILL` and reports
/// [`ShimError::Timeout`] once it is reaped.
pub(crate) async fn wait_or_kill(
    reaper: &Reaper,
    pid: i32,
    mut exited: oneshot::Receiver<Reaped>,
    timeout: Option<Duration>,
    display: &str,
) -> Result<Reaped, ShimError> {
    let Some(after) = timeout else {
        return exited.await.map_err(|_| ShimError::ReaperLost { pid });
    };
    match tokio::time::timeout(after, &mut exited).await {
        Ok(r) => r.map_err(|_| ShimError::ReaperLost { pid }),
        Err(_) => {
            match exited.try_recv() {
                // It exited just as the time ran out.
                Ok(r) => return Ok(r),
                // Not reaped yet, so the PID still names our child (a zombie at worst).
                Err(_) => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), exited).await.is_err() {
                reaper.unregister(pid);
            }
            Err(ShimError::Timeout { command: display.to_owned(), after })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_of_normal_exit() {
        assert_eq!(exit_code(0), Some(0));
        assert_eq!(exit_code(3 << 8), Some(3));
        assert_eq!(exit_code(255 << 8), Some(255));
    }

    #[test]
    fn exit_code_of_signal_is_128_plus_signal() {
        assert_eq!(exit_code(libc::SIGKILL), Some(137));
        assert_eq!(exit_code(libc::SIGTERM), Some(143));
        // Core dump flag set.
        assert_eq!(exit_code(0x80 | libc::SIGSEGV), Some(139));
        // Real-time signals have no nix `Signal` value; they must still map.
        assert_eq!(exit_code(libc::SIGRTMIN() + 1), Some(128 + libc::SIGRTMIN() + 1));
    }

    #[test]
    fn exit_code_ignores_stop_and_continue() {
        // Stopped by SIGSTOP: 0x7f in the low byte, signal in the next.
        assert_eq!(exit_code((libc::SIGSTOP << 8) | 0x7f), None);
        // Continued.
        assert_eq!(exit_code(0xffff), None);
    }

    fn reaped(pid: i32, at: Instant) -> Reaped {
        Reaped { pid, code: 0, at, wall: SystemTime::now() }
    }

    #[test]
    fn unclaimed_exit_is_delivered_to_late_waiter_only_if_fresh() {
        let reaper = Reaper { tables: Mutex::new(Tables::default()), started: Ok(()) };
        let t0 = Instant::now();
        reaper.lock().dispatch(reaped(42, t0));
        // A waiter whose process was spawned after the exit must not get it (PID reuse).
        let mut rx = reaper.register(42, t0 + Duration::from_millis(1));
        assert!(rx.try_recv().is_err());
        reaper.unregister(42);
        reaper.lock().dispatch(reaped(43, t0 + Duration::from_millis(5)));
        let mut rx = reaper.register(43, t0);
        assert_eq!(rx.try_recv().map(|r| r.pid), Ok(43));
    }

    #[test]
    fn registered_waiter_gets_exit() {
        let reaper = Reaper { tables: Mutex::new(Tables::default()), started: Ok(()) };
        let t0 = Instant::now();
        let mut rx = reaper.register(7, t0);
        reaper.lock().dispatch(reaped(7, t0));
        assert_eq!(rx.try_recv().map(|r| r.pid), Ok(7));
        assert!(reaper.lock().unclaimed.is_empty());
    }

    #[test]
    fn unclaimed_is_bounded_and_expires() {
        let mut t = Tables::default();
        let t0 = Instant::now();
        for pid in 0..(UNCLAIMED_MAX as i32 + 10) {
            t.dispatch(reaped(pid, t0));
        }
        assert!(t.unclaimed.len() <= UNCLAIMED_MAX);
        assert!(!t.unclaimed.contains_key(&0));
        t.dispatch(reaped(-5, t0 + UNCLAIMED_TTL + Duration::from_secs(1)));
        assert_eq!(t.unclaimed.len(), 1);
    }

    #[tokio::test]
    async fn run_captured_collects_output_and_code() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_captured(cmd, Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(out, Captured { code: 3, stdout: b"out\n".to_vec(), stderr: b"err\n".to_vec() });
    }

    #[tokio::test]
    async fn run_captured_kills_on_timeout() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = run_captured(cmd, Some(Duration::from_millis(200))).await.unwrap_err();
        assert!(matches!(err, ShimError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn run_captured_reports_missing_program() {
        let cmd = Command::new("/nonexistent/program");
        let err = run_captured(cmd, None).await.unwrap_err();
        assert!(matches!(err, ShimError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn signaled_child_maps_to_128_plus_signal() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "kill -9 $$"]);
        let out = run_captured(cmd, Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(out.code, 137);
    }
}

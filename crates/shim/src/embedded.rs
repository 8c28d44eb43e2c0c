//! [`EmbeddedShim`]: the shim running inside berthd.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::adopt::{self, PidFd, TaskFile};
use crate::attach::{self, AttachIo};
use crate::console::{ConsoleSocket, master_reader};
use crate::log::{LogWriter, Stream, copy_stream};
use crate::oom::{OomBaseline, OomCounter};
use crate::pipe::pipe;
use crate::reaper::{Reaped, Reaper, spawn, wait_or_kill};
use crate::runtime_cmd::{
    RUNTIME_TIMEOUT, RuntimeCmd, display_command, is_not_exist, is_not_running,
};
use crate::task::Task;
use crate::{CreateTask, ExecOutput, Exit, RecoveredTask, Shim, ShimError, TaskEvent, TaskState};

/// How long the exit monitor waits for the log copiers to reach EOF before publishing an
/// exit. Grandchildren that inherited stdout can keep the pipe open indefinitely.
const LOG_DRAIN_BOUND: Duration = Duration::from_secs(2);
/// How long to wait for the pty master once the runtime has exited (it sent it before).
const CONSOLE_BOUND: Duration = Duration::from_secs(5);
/// How long `delete` waits for the killed main process's exit to be published.
const DELETE_EXIT_BOUND: Duration = Duration::from_secs(10);
/// How often an adopted task whose pidfd cannot be polled is checked for its exit.
const ADOPTED_POLL: Duration = Duration::from_secs(1);
/// Capacity of the event broadcast channel; slow subscribers see `Lagged`.
const EVENT_CAPACITY: usize = 1024;

/// The shim embedded in berthd: runs the OCI runtime binary directly, reaps through the
/// process-wide reaper, keeps task records in memory and, for a berthd that restarts, a
/// small record of each task in its state directory (see `adopt`).
pub struct EmbeddedShim {
    state_dir: PathBuf,
    /// Write each task's `task.json` and adopt them after a restart. Off inside the
    /// external shim, which keeps state files of its own.
    keep_records: bool,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// Pod sandbox of each container, from [`Shim::bind_container`], for the records.
    pods: Mutex<HashMap<String, String>>,
    /// IDs whose `create` is under way.
    creating: Mutex<HashSet<String>>,
    events: broadcast::Sender<TaskEvent>,
    /// Ourselves, so that create/delete can run in a spawned task that finishes even if the
    /// caller's future is dropped (the kubelet timed out and will retry).
    me: Weak<EmbeddedShim>,
}

impl std::fmt::Debug for EmbeddedShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedShim").field("state_dir", &self.state_dir).finish_non_exhaustive()
    }
}

/// Checks that `id` is usable as a directory name and runtime container name.
pub fn validate_id(id: &str) -> Result<(), ShimError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'));
    if ok { Ok(()) } else { Err(ShimError::InvalidId { id: id.to_owned() }) }
}

/// Removes an ID from the `creating` set when a create ends, however it ends.
struct Reservation<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a single map operation: a panic cannot leave it torn.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ShimError {
    let path = path.to_owned();
    move |source| ShimError::Io { action, path, source }
}

impl EmbeddedShim {
    /// A shim keeping per-task files under `state_dir` (created if missing). Also makes the
    /// process a child subreaper and starts the reaper.
    pub fn new(state_dir: PathBuf) -> Result<Arc<Self>, ShimError> {
        Self::build(state_dir, EVENT_CAPACITY, true)
    }

    /// [`EmbeddedShim::new`] with room for `capacity` events per subscriber. The external
    /// shim serves one pod, whose few events one subscriber drains at once, and pays for
    /// every slot (all are allocated up front) in each pod's memory.
    /// It keeps no task records of its own: the external shim's state files serve.
    pub(crate) fn with_event_capacity(
        state_dir: PathBuf,
        capacity: usize,
    ) -> Result<Arc<Self>, ShimError> {
        Self::build(state_dir, capacity, false)
    }

    fn build(
        state_dir: PathBuf,
        capacity: usize,
        keep_records: bool,
    ) -> Result<Arc<Self>, ShimError> {
        std::fs::create_dir_all(&state_dir).map_err(io_err("create directory", &state_dir))?;
        crate::reaper::become_subreaper()?;
        Reaper::global()?;
        let (events, _) = broadcast::channel(capacity);
        Ok(Arc::new_cyclic(|me| EmbeddedShim {
            state_dir,
            keep_records,
            tasks: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            events,
            me: me.clone(),
        }))
    }

    /// Force-deletes a container this shim has no record of (left by a previous berthd),
    /// ignoring "does not exist".
    pub async fn delete_orphan(
        &self,
        runtime: &Path,
        runtime_root: &Path,
        id: &str,
    ) -> Result<(), ShimError> {
        validate_id(id)?;
        let rt = RuntimeCmd::new(runtime.to_owned(), runtime_root.to_owned());
        runtime_delete(&rt, id).await?;
        remove_dir(&self.state_dir.join(id));
        Ok(())
    }

    fn task(&self, id: &str) -> Result<Arc<Task>, ShimError> {
        lock(&self.tasks).get(id).cloned().ok_or_else(|| ShimError::NotFound { id: id.to_owned() })
    }

    fn this(&self) -> Arc<EmbeddedShim> {
        // `new` is the only constructor and hands out an Arc, so while `&self` lives the
        // Arc does too.
        self.me.upgrade().unwrap_or_else(|| unreachable!("EmbeddedShim outside its Arc"))
    }

    fn reserve(&self, id: &str) -> Result<Reservation<'_>, ShimError> {
        let tasks = lock(&self.tasks);
        let mut creating = lock(&self.creating);
        if tasks.contains_key(id) || !creating.insert(id.to_owned()) {
            return Err(ShimError::AlreadyExists { id: id.to_owned() });
        }
        Ok(Reservation { set: &self.creating, id: id.to_owned() })
    }

    async fn create_inner(&self, t: CreateTask) -> Result<u32, ShimError> {
        validate_id(&t.id)?;
        let _reservation = self.reserve(&t.id)?;
        let id = t.id.clone();
        let dir = self.state_dir.join(&id);
        // Until the runtime runs, a failure (an unusable log file, no pipe) must not leave
        // the directory behind: nothing would ever remove it. One that was there before us
        // (a task of a previous berthd) is not ours to remove.
        let mut made_dir = MadeDir((!dir.exists()).then(|| dir.clone()));
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let pid_file = dir.join("init.pid");
        let create_log = dir.join("create.log");
        for stale in [&pid_file, &create_log] {
            let _ = std::fs::remove_file(stale);
        }
        let runtime = RuntimeCmd::new(t.runtime.clone(), t.runtime_root.clone());
        let log = t.log_path.as_deref().map(LogWriter::open).transpose()?.map(Arc::new);

        // stdio: runc passes its own stdio on to the container process; with a terminal, the
        // container gets a pty instead and we get its master through the console socket.
        let console = if t.tty { Some(ConsoleSocket::bind(&self.state_dir)?) } else { None };
        let mut cmd = runtime.base(Some(&create_log));
        let sub = if t.start { "run" } else { "create" };
        cmd.arg(sub);
        if t.start {
            cmd.arg("--detach");
        }
        cmd.arg("--bundle").arg(&t.bundle).arg("--pid-file").arg(&pid_file);
        if let Some(console) = &console {
            cmd.arg("--console-socket").arg(console.connect_path());
        }
        cmd.arg(&id);
        let mut stdin_keep: Option<OwnedFd> = None;
        if console.is_some() {
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        } else if t.stdin {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| ShimError::Pipe { action: "create stdin pipe", source: e.into() })?;
            cmd.stdin(Stdio::from(r));
            stdin_keep = Some(w);
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut readers = Vec::new();
        if console.is_some() {
            // stdio is /dev/null already.
        } else {
            // Read even without a log file: attach sessions see it.
            let (out_rx, out_tx) = pipe("create stdout pipe")?;
            let (err_rx, err_tx) = pipe("create stderr pipe")?;
            cmd.stdout(Stdio::from(out_tx)).stderr(Stdio::from(err_tx));
            readers.push((out_rx, Stream::Stdout));
            readers.push((err_rx, Stream::Stderr));
        }
        let output = attach::output();
        let display = display_command(&cmd);
        // Before the runtime makes the cgroup: a kill during the start is the task's own.
        let oom_baseline = t.memory_cgroup.as_deref().map(OomBaseline::before_create);
        let reaper = Reaper::global()?;
        let before = Instant::now();
        let child = spawn(&mut cmd)
            .map_err(|source| ShimError::Spawn { program: t.runtime.clone(), source })?;
        // From here on a failure cleans up after the runtime too: the undo does.
        made_dir.keep();
        let mut undo = CreateUndo::new(&runtime, &id, &dir);
        // Close our copies of the write ends: from now on only the container holds them, so
        // the copiers see EOF when it (and its children) are gone.
        drop(cmd);
        let runc_pid = child.id() as i32;
        let runc_exited = reaper.register(runc_pid, before);

        let mut copiers: Vec<JoinHandle<()>> = readers
            .into_iter()
            .map(|(rx, stream)| {
                tokio::spawn(copy_stream(rx, stream, log.clone(), Some(output.clone())))
            })
            .collect();
        undo.copiers.extend(copiers.iter().map(JoinHandle::abort_handle));

        let reaped = match wait_or_kill(
            reaper,
            runc_pid,
            runc_exited,
            Some(RUNTIME_TIMEOUT),
            &display,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return Err(undo.fail(e).await),
        };
        if reaped.code != 0 {
            let text = std::fs::read_to_string(&create_log).unwrap_or_default();
            let err = runtime.failed(sub, &id, reaped.code, &text);
            // Clean up a half-created container, but never one that existed before us.
            if text.contains("already exists") {
                undo.not_ours();
            }
            return Err(undo.fail(err).await);
        }
        let pid = match read_pid_file(&pid_file) {
            Ok(pid) => pid,
            Err(e) => return Err(undo.fail(e).await),
        };
        let mut pty = None;
        if let Some(console) = &console {
            let master = match console.receive_master(CONSOLE_BOUND).await {
                Ok(m) => {
                    // A second descriptor for attach sessions' stdin and resizes.
                    pty = m.try_clone().ok();
                    master_reader(m)
                }
                Err(e) => Err(e),
            };
            match master {
                // Without a log file the output is still read (and dropped), or the
                // container would block once the pty buffer fills.
                Ok(rx) => {
                    let copier = tokio::spawn(copy_stream(
                        rx,
                        Stream::Stdout,
                        log.clone(),
                        Some(output.clone()),
                    ));
                    undo.copiers.push(copier.abort_handle());
                    copiers.push(copier);
                }
                Err(e) => return Err(undo.fail(e).await),
            }
        }
        // The init was created after `before`, so an older unclaimed exit of the same PID is
        // not its own.
        let init_exited = reaper.register(pid as i32, before);
        let record = if self.keep_records {
            let rec = TaskFile {
                pod_id: lock(&self.pods).get(&id).cloned().unwrap_or_default(),
                runtime: t.runtime.clone(),
                runtime_root: t.runtime_root.clone(),
                pid,
                // Read while the reaper holds the init's exit back: the PID is still its own.
                start_time: reaper.with_unreaped(pid as i32, |_| adopt::start_time(pid)).flatten(),
                memory_cgroup: t.memory_cgroup.clone(),
                oom_baseline: oom_baseline.map_or(0, OomBaseline::count),
                log_path: t.log_path.clone(),
                started: t.start,
            };
            if let Err(e) = adopt::write(&dir, &rec) {
                // Without it a restarted berthd could neither drive nor watch the task.
                return Err(undo.fail(e).await);
            }
            Some(rec)
        } else {
            None
        };

        // Nothing fails from here on: the task is made.
        undo.commit();
        let mut background: Vec<_> = copiers.iter().map(|h| h.abort_handle()).collect();
        let oom = t
            .memory_cgroup
            .as_deref()
            .zip(oom_baseline)
            .and_then(|(dir, baseline)| OomCounter::open_since(dir, baseline));
        if let Some(oom) = &oom {
            match oom.watch(id.clone(), self.events.clone()) {
                Ok(h) => background.push(h.abort_handle()),
                Err(e) => tracing::warn!(id, error = %e, "no live OOM notifications"),
            }
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        let stdin = Arc::new(Mutex::new(stdin_keep));
        let attach_io = AttachIo {
            stdin: stdin.clone(),
            pty,
            stdin_once: t.stdin_once,
            stdin_closed: Default::default(),
            output,
            exit: exit_rx.clone(),
        };
        match attach::serve(&t.bundle, attach_io) {
            Ok(h) => background.push(h.abort_handle()),
            Err(e) => tracing::warn!(id, error = %e, "no attach socket"),
        }
        tokio::spawn(monitor_exit(
            id.clone(),
            pid,
            init_exited,
            oom.clone(),
            copiers,
            exit_tx,
            self.events.clone(),
        ));
        let task = Arc::new(Task {
            runtime,
            dir,
            pid,
            started: AtomicBool::new(t.start),
            exit: exit_rx,
            log,
            oom,
            stdin,
            background: Mutex::new(background),
            record,
            pidfd: None,
        });
        lock(&self.tasks).insert(id.clone(), task);
        tracing::debug!(id, pid, started = t.start, "task created");
        Ok(pid)
    }

    async fn delete_inner(&self, id: &str) -> Result<(), ShimError> {
        lock(&self.pods).remove(id);
        let Ok(task) = self.task(id) else {
            return Ok(());
        };
        runtime_delete(&task.runtime, id).await?;
        // The runtime killed the main process; publish its exit before forgetting the task.
        let mut exit = task.exit.clone();
        if tokio::time::timeout(DELETE_EXIT_BOUND, exit.wait_for(Option::is_some)).await.is_err() {
            tracing::warn!(id, pid = task.pid, "no exit seen after delete");
        }
        task.stop_background();
        {
            let mut tasks = lock(&self.tasks);
            if tasks.get(id).is_some_and(|t| Arc::ptr_eq(t, &task)) {
                tasks.remove(id);
            }
        }
        remove_dir(&task.dir);
        tracing::debug!(id, "task deleted");
        Ok(())
    }

    /// After a berthd restart: adopts every task a previous berthd left in the state
    /// directory (see `adopt`). A task whose init still runs is driven and watched as
    /// before, except that its exit code cannot be known; one whose init is gone comes back
    /// exited (see [`adopted_exit`]) and stays until it is deleted. A directory without a
    /// record (a create cut short before it was written) is removed: the runtime's recovery
    /// deletes whatever container the runtime made for it.
    fn adopt_all(&self) -> Result<Vec<RecoveredTask>, ShimError> {
        if !self.keep_records {
            return Ok(Vec::new());
        }
        let entries = std::fs::read_dir(&self.state_dir)
            .map_err(io_err("read directory", &self.state_dir))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            if validate_id(id).is_err()
                || !entry.file_type().is_ok_and(|t| t.is_dir())
                || lock(&self.tasks).contains_key(id)
            {
                continue;
            }
            let dir = entry.path();
            let rec = match adopt::read(&dir) {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::info!(id, error = %e, "removing task state without a usable record");
                    remove_dir(&dir);
                    continue;
                }
            };
            match self.adopt(id, dir, rec) {
                Ok(task) => out.push(task),
                // Left as it is: the runtime falls back to what it recorded (the pid).
                Err(e) => tracing::warn!(id, error = %e, "cannot adopt task"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Adopts one task from its record.
    fn adopt(&self, id: &str, dir: PathBuf, rec: TaskFile) -> Result<RecoveredTask, ShimError> {
        let (pid, pod_id) = (rec.pid, rec.pod_id.clone());
        let pidfd = match rec.start_time {
            Some(start) => PidFd::open_if_same(pid, start)?.map(Arc::new),
            None => None,
        };
        let oom = rec
            .memory_cgroup
            .as_deref()
            .and_then(|d| OomCounter::open_since(d, OomBaseline::from_count(rec.oom_baseline)));
        let (exit_tx, exit_rx) = watch::channel(None);
        let mut background = Vec::new();
        let (state, log) = match &pidfd {
            Some(pidfd) => {
                // Its stdout and stderr were pipes to the previous berthd, whose read ends
                // died with it: what the container writes from now on is lost (EPIPE, or
                // SIGPIPE for a writer that does not ignore it). The log writer is kept only
                // so that a rotation still gets a fresh file.
                let log = rec.log_path.as_deref().and_then(|p| match LogWriter::open(p) {
                    Ok(w) => Some(Arc::new(w)),
                    Err(e) => {
                        tracing::warn!(id, error = %e, "adopted task: cannot open its log");
                        None
                    }
                });
                if let Some(oom) = &oom {
                    match oom.watch(id.to_owned(), self.events.clone()) {
                        Ok(h) => background.push(h.abort_handle()),
                        Err(e) => tracing::warn!(id, error = %e, "no live OOM notifications"),
                    }
                }
                tokio::spawn(monitor_adopted_exit(
                    id.to_owned(),
                    pid,
                    pidfd.clone(),
                    oom.clone(),
                    exit_tx,
                    self.events.clone(),
                ));
                let state = if rec.started {
                    TaskState::Running { pid }
                } else {
                    TaskState::Created { pid }
                };
                (state, log)
            }
            None => {
                // Gone while no berthd watched. No event: the caller (the runtime's
                // recovery) takes the exit from the state returned.
                let exit = adopted_exit(oom.as_ref());
                exit_tx.send_replace(Some(exit));
                (TaskState::Exited(exit), None)
            }
        };
        let task = Arc::new(Task {
            runtime: RuntimeCmd::new(rec.runtime.clone(), rec.runtime_root.clone()),
            dir,
            pid,
            started: AtomicBool::new(rec.started),
            exit: exit_rx,
            log,
            oom,
            stdin: Arc::new(Mutex::new(None)),
            background: Mutex::new(background),
            record: Some(rec),
            pidfd,
        });
        lock(&self.tasks).insert(id.to_owned(), task);
        tracing::info!(id, pid, ?state, "adopted task");
        Ok(RecoveredTask { id: id.to_owned(), pod_id, state })
    }
}

/// A task directory made by a create still under way: removed when dropped, unless kept.
struct MadeDir(Option<PathBuf>);

impl MadeDir {
    /// Leaves the directory alone from now on.
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for MadeDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_dir(&dir);
        }
    }
}

/// The undo of a create once the runtime has run (the shim's small journal: the steps
/// are fixed): stop the output copiers, `<runtime> delete` the container and remove the
/// task's state directory. Run on failure by [`CreateUndo::fail`], disarmed by
/// [`CreateUndo::commit`]; it is async, so dropping it armed (a panic) only logs what is
/// left.
struct CreateUndo<'a> {
    runtime: &'a RuntimeCmd,
    id: &'a str,
    dir: &'a Path,
    /// The copiers of the container's output, stopped first.
    copiers: Vec<tokio::task::AbortHandle>,
    /// Whether the runtime's container (and the state dir) are ours to remove: not when
    /// the runtime refused because the container existed before us.
    ours: bool,
    armed: bool,
}

impl<'a> CreateUndo<'a> {
    fn new(runtime: &'a RuntimeCmd, id: &'a str, dir: &'a Path) -> Self {
        Self { runtime, id, dir, copiers: Vec::new(), ours: true, armed: true }
    }

    /// The container existed before this create: leave it and its state alone.
    fn not_ours(&mut self) {
        self.ours = false;
    }

    /// The create succeeded.
    fn commit(mut self) {
        self.armed = false;
    }

    /// The create failed with `error`: undoes it, newest step first, and returns `error`.
    /// A failed `<runtime> delete` is logged; the container it leaves is deleted by the
    /// runtime's startup repair (an OCI container without a record).
    async fn fail(mut self, error: ShimError) -> ShimError {
        self.armed = false;
        self.copiers.iter().for_each(|h| h.abort());
        if self.ours {
            if let Err(e) = runtime_delete(self.runtime, self.id).await {
                tracing::warn!(id = self.id, error = %e, "undo of a failed create: runtime delete failed; left for repair");
            }
            remove_dir(self.dir);
        }
        error
    }
}

impl Drop for CreateUndo<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.copiers.iter().for_each(|h| h.abort());
            tracing::error!(
                id = self.id,
                "create abandoned: its runtime container and state are left for repair"
            );
        }
    }
}

/// Sends `signal` to the task's init ourselves when that does exactly what `<runtime> kill`
/// would, saving a runtime process start (a Go binary: ~20 ms on a busy node). That is when
/// - the task was never started: its init (`runc init`, waiting to exec the user's
///   command) is the only process of the container, so it is "all" of them;
/// - only the init is to be signalled (`all` unset) with anything but SIGKILL (newer runc
///   turns a SIGKILL of a container sharing a PID namespace into a kill of all);
/// - SIGKILL of all, and the init is PID 1 of its own PID namespace: the kernel kills the
///   rest of the namespace, i.e. of the container, when it dies.
///
/// Otherwise (SIGKILL of all in a shared PID namespace) `Ok(None)`: let the runtime walk
/// the cgroup. `Ok(Some(false))`: the init was already reaped, there was nothing to
/// signal. The PID is only signalled while the reaper holds its exit back, so it cannot
/// name a recycled process.
fn signal_directly(task: &Task, signal: i32, all: bool) -> Result<Option<bool>, ShimError> {
    let Ok(sig) = nix::sys::signal::Signal::try_from(signal) else {
        return Ok(None); // real-time signals: leave them to the runtime
    };
    let started = task.started.load(Ordering::Acquire);
    let reaper = Reaper::global()?;
    let Ok(pid) = i32::try_from(task.pid) else { return Ok(None) };
    let sent = reaper.with_unreaped(pid, |pid| {
        if !init_signal_suffices(started, sig, all, pid) {
            return Ok(false);
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            // ESRCH cannot happen for an unreaped child, but would mean "gone" all the same.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(true),
            Err(source) => Err(ShimError::Sys { call: "kill", source }),
        }
    });
    match sent {
        None => Ok(Some(false)),
        Some(Ok(true)) => Ok(Some(true)),
        Some(Ok(false)) => Ok(None),
        Some(Err(e)) => Err(e),
    }
}

/// Whether signalling the init `pid` alone does what `<runtime> kill` would (see
/// [`signal_directly`]).
fn init_signal_suffices(started: bool, sig: nix::sys::signal::Signal, all: bool, pid: i32) -> bool {
    let kill = nix::sys::signal::Signal::SIGKILL;
    let same_as_runtime = !started || (!all && sig != kill);
    same_as_runtime || (sig == kill && is_pid_namespace_init(pid))
}

/// [`signal_directly`] for an adopted task, whose exit the reaper never holds back (it is
/// not our child): the same choice, the signal sent through the task's pidfd, which cannot
/// name a recycled process. (Should the PID be recycled by the time the namespace check
/// reads `/proc`, the pidfd finds the task's process gone whatever the check said.)
fn signal_adopted(
    task: &Task,
    pidfd: &PidFd,
    signal: i32,
    all: bool,
) -> Result<Option<bool>, ShimError> {
    let Ok(sig) = nix::sys::signal::Signal::try_from(signal) else { return Ok(None) };
    let Ok(pid) = i32::try_from(task.pid) else { return Ok(None) };
    if !init_signal_suffices(task.started.load(Ordering::Acquire), sig, all, pid) {
        return Ok(None);
    }
    pidfd.send_signal(sig).map(Some)
}

/// Whether `pid` is PID 1 of its own PID namespace (the last `NSpid` field of its status is
/// 1). Any doubt (no `NSpid` line: a kernel before 4.1) answers no.
fn is_pid_namespace_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .is_some_and(|status| nspid_is_namespace_init(&status))
}

/// The `NSpid:` line of a `/proc/<pid>/status` text ends in 1, and lists more than one
/// namespace (a process in the initial namespace is never "its own" namespace's init).
fn nspid_is_namespace_init(status: &str) -> bool {
    status.lines().find_map(|l| l.strip_prefix("NSpid:")).is_some_and(|ids| {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        ids.len() > 1 && ids.last() == Some(&"1")
    })
}

/// `<runtime> delete --force <id>`, where "does not exist" is success.
pub(crate) async fn runtime_delete(runtime: &RuntimeCmd, id: &str) -> Result<(), ShimError> {
    match runtime.run(id, "delete", &[OsStr::new("--force"), OsStr::new(id)]).await {
        Ok(_) => Ok(()),
        Err(ShimError::RuntimeFailed { stderr, .. }) if is_not_exist(&stderr) => Ok(()),
        Err(e) => Err(e),
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing task state");
    }
}

fn read_pid_file(path: &Path) -> Result<u32, ShimError> {
    let content = std::fs::read_to_string(path).map_err(io_err("read pid file", path))?;
    match content.trim().parse::<u32>() {
        Ok(pid) if pid > 1 && pid <= i32::MAX as u32 => Ok(pid),
        _ => Err(ShimError::BadPidFile { path: path.to_owned(), content }),
    }
}

/// Waits for the main process's exit, drains the logs, then publishes the exit.
async fn monitor_exit(
    id: String,
    pid: u32,
    init_exited: oneshot::Receiver<Reaped>,
    oom: Option<OomCounter>,
    copiers: Vec<JoinHandle<()>>,
    exit_tx: watch::Sender<Option<Exit>>,
    events: broadcast::Sender<TaskEvent>,
) {
    let (code, at) = match init_exited.await {
        Ok(r) => (r.code, r.wall),
        Err(_) => {
            // Only if another registration for the PID replaced ours; treat as unknown.
            tracing::error!(id, pid, "lost track of the container's exit");
            (255, std::time::SystemTime::now())
        }
    };
    // Read the OOM counter now, before anyone runs `delete` and the cgroup disappears.
    let oom_killed = oom.as_ref().is_some_and(|c| {
        let killed = c.main_process_oom_killed(code);
        if killed {
            // The watcher may not have seen it yet (v1 notifies before the kill is counted).
            c.report_new_kills(&id, &events);
        }
        killed
    });
    let drained = tokio::time::timeout(LOG_DRAIN_BOUND, async {
        for h in copiers {
            let _ = h.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!(id, "output still open after exit (background process?); not waiting");
    }
    let exit = Exit { code, at, oom_killed, lost: false };
    tracing::debug!(id, pid, code, oom_killed, "task exited");
    exit_tx.send_replace(Some(exit));
    let _ = events.send(TaskEvent::Exited { id, exit });
}

/// The exit of an adopted task whose init is gone. Not our child, it was reaped by someone
/// else, so its code is unknown: 255 and `lost` (the runtime reports the reason `Unknown`).
/// Except when the cgroup's OOM-kill counter rose since the task was created: then it is
/// reported as the init's OOM kill (137, `oom_killed`, not `lost`). The counter does not
/// say which process the OOM killer chose, but an OOM kill in the container and an init
/// that died unseen go together far more often than not, and `OOMKilled` (telling the user
/// to raise the limit) serves better than `Unknown`. The edge of `oom.rs`, wider here: an
/// exec'd process OOM-killed and an init that then ended by itself also reads as the init's
/// OOM kill.
fn adopted_exit(oom: Option<&OomCounter>) -> Exit {
    let at = std::time::SystemTime::now();
    if oom.is_some_and(OomCounter::killed_since_baseline) {
        Exit { code: 128 + libc::SIGKILL, at, oom_killed: true, lost: false }
    } else {
        Exit { code: 255, at, oom_killed: false, lost: true }
    }
}

/// [`monitor_exit`] for an adopted task: waits on its pidfd, then publishes
/// [`adopted_exit`].
async fn monitor_adopted_exit(
    id: String,
    pid: u32,
    pidfd: Arc<PidFd>,
    oom: Option<OomCounter>,
    exit_tx: watch::Sender<Option<Exit>>,
    events: broadcast::Sender<TaskEvent>,
) {
    if let Err(e) = pidfd.exited().await {
        // No poller for it (out of descriptors?): ask the pidfd now and then instead.
        tracing::warn!(id, pid, error = %e, "cannot poll the adopted task's pidfd; polling");
        while !pidfd.has_exited() {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    }
    // Before anyone runs `delete` and the cgroup disappears.
    let exit = adopted_exit(oom.as_ref());
    if exit.oom_killed
        && let Some(oom) = &oom
    {
        oom.report_new_kills(&id, &events);
    }
    tracing::info!(
        id,
        pid,
        code = exit.code,
        oom_killed = exit.oom_killed,
        "adopted task exited (its exit code is unknown)"
    );
    exit_tx.send_replace(Some(exit));
    let _ = events.send(TaskEvent::Exited { id, exit });
}

impl EmbeddedShim {
    /// [`Shim::exec_sync`] with the process as OCI JSON, checked cheaply and handed to the
    /// runtime as it is: what the external shim serves (see `exec::check_process_json`).
    pub(crate) async fn exec_sync_json(
        &self,
        id: &str,
        process_json: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ShimError> {
        let task = self.task(id)?;
        if task.exit().is_some() {
            return Err(ShimError::NotRunning { id: id.to_owned() });
        }
        crate::exec::check_process_json(id, process_json)?;
        let out = crate::exec::exec_sync_json(&task.runtime, &task.dir, id, process_json, timeout)
            .await?;
        self.note_exec_exit(&task, id, &out);
        Ok(out)
    }

    /// An exec'd process that died of SIGKILL may be an OOM victim the watcher has not
    /// reported yet: by now the kernel has counted the kill.
    fn note_exec_exit(&self, task: &Task, id: &str, out: &ExecOutput) {
        if out.exit_code == 128 + libc::SIGKILL
            && let Some(oom) = &task.oom
        {
            oom.report_new_kills(id, &self.events);
        }
    }
}

impl Shim for EmbeddedShim {
    async fn create(&self, task: CreateTask) -> Result<u32, ShimError> {
        let me = self.this();
        // Runs to completion even if the caller gives up, so no half-made task is left.
        match tokio::spawn(async move { me.create_inner(task).await }).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn start(&self, id: &str) -> Result<(), ShimError> {
        let task = self.task(id)?;
        if task.exit().is_some() {
            return Err(ShimError::NotRunning { id: id.to_owned() });
        }
        task.runtime.run(id, "start", &[OsStr::new(id)]).await?;
        task.started.store(true, Ordering::Release);
        if let Some(rec) = &task.record
            && let Err(e) = adopt::write(&task.dir, &TaskFile { started: true, ..rec.clone() })
        {
            // It did start: failing the call would be false. A restarted berthd would adopt
            // the task as created, whose SIGKILL of all processes reaches only the init.
            tracing::warn!(id, error = %e, "cannot record the task's start");
        }
        Ok(())
    }

    async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), ShimError> {
        let task = self.task(id)?;
        if task.exit().is_some() {
            return Ok(());
        }
        let direct = match &task.pidfd {
            Some(pidfd) => signal_adopted(&task, pidfd, signal, all)?,
            None => signal_directly(&task, signal, all)?,
        };
        if let Some(done) = direct {
            tracing::trace!(id, signal, all, signalled = done, "signalled the init directly");
            return Ok(());
        }
        let sig = signal.to_string();
        let mut args: Vec<&OsStr> = Vec::with_capacity(3);
        if all {
            args.push(OsStr::new("--all"));
        }
        args.push(OsStr::new(id));
        args.push(OsStr::new(&sig));
        match task.runtime.run(id, "kill", &args).await {
            Ok(_) => Ok(()),
            // It exited meanwhile: nothing left to signal.
            Err(ShimError::RuntimeFailed { stderr, .. })
                if is_not_running(&stderr) || task.exit().is_some() =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Exit>, ShimError> {
        let task = self.task(id)?;
        let mut rx = task.exit.clone();
        match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(exit)) => Ok(*exit),
            // The monitor is gone without publishing (it panicked).
            Ok(Err(_)) => Err(ShimError::ReaperLost { pid: task.pid as i32 }),
            Err(_) => Ok(None),
        }
    }

    async fn state(&self, id: &str) -> Result<TaskState, ShimError> {
        Ok(self.task(id)?.state())
    }

    async fn delete(&self, id: &str) -> Result<(), ShimError> {
        let me = self.this();
        let id = id.to_owned();
        match tokio::spawn(async move { me.delete_inner(&id).await }).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn exec_sync(
        &self,
        id: &str,
        process: oci_spec::runtime::Process,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ShimError> {
        let task = self.task(id)?;
        if task.exit().is_some() {
            return Err(ShimError::NotRunning { id: id.to_owned() });
        }
        let out = crate::exec::exec_sync(&task.runtime, &task.dir, id, &process, timeout).await?;
        self.note_exec_exit(&task, id, &out);
        Ok(out)
    }

    async fn reopen_log(&self, id: &str) -> Result<(), ShimError> {
        match &self.task(id)?.log {
            Some(log) => log.reopen(),
            None => Ok(()),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    fn bind_container(&self, container_id: &str, pod_id: &str) {
        if self.keep_records {
            lock(&self.pods).insert(container_id.to_owned(), pod_id.to_owned());
        }
    }

    async fn reattach(&self) -> Result<Vec<RecoveredTask>, ShimError> {
        self.adopt_all()
    }

    async fn release_pod(&self, pod_id: &str) -> Result<(), ShimError> {
        lock(&self.pods).retain(|_, p| p != pod_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["abc", "a-b_c.d", "0123456789abcdef", "x+y"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", ".hidden", "é"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        assert!(validate_id(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn namespace_init_from_nspid() {
        let status = |nspid: &str| format!("Name:\tsh\nPid:\t42\nNSpid:\t{nspid}\nPPid:\t1\n");
        assert!(nspid_is_namespace_init(&status("4242\t1")));
        assert!(nspid_is_namespace_init(&status("4242\t17\t1")));
        // Shares a pod's namespace, where pod-init is PID 1.
        assert!(!nspid_is_namespace_init(&status("4242\t7")));
        // Host PID namespace.
        assert!(!nspid_is_namespace_init(&status("1")));
        assert!(!nspid_is_namespace_init(&status("4242")));
        assert!(!nspid_is_namespace_init("Name:\tsh\nPid:\t42\n"));
    }

    #[test]
    fn pid_file_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("init.pid");
        std::fs::write(&p, "1234").unwrap();
        assert_eq!(read_pid_file(&p).unwrap(), 1234);
        std::fs::write(&p, "12x").unwrap();
        assert!(matches!(read_pid_file(&p), Err(ShimError::BadPidFile { .. })));
        std::fs::write(&p, "0").unwrap();
        assert!(read_pid_file(&p).is_err());
        assert!(matches!(read_pid_file(&dir.path().join("missing")), Err(ShimError::Io { .. })));
    }
}

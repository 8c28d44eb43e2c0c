//! A [`Shim`] double for the runtime's unit tests: tasks live in memory, nothing is run.
//! A task "runs" from `create` (with `start`) or `start` until it is killed (it exits with
//! `128 + signal`, unless scripted to ignore a signal) or a test makes it exit
//! ([`FakeShim::exit`]). Failures are scripted per call ([`FakeShim::fail_next`]), and what
//! survives a "berthd restart" is scripted too ([`FakeShim::set_reattach`]).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use berth_shim::{
    CreateTask, ExecOutput, Exit, RecoveredTask, Shim, ShimError, TaskEvent, TaskState,
};
use tokio::sync::{broadcast, watch};

/// A call that can be scripted to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Call {
    Create,
    Start,
    Kill,
    Delete,
}

struct FakeTask {
    pid: u32,
    started: bool,
    exit: watch::Sender<Option<Exit>>,
}

/// See the module docs.
pub(crate) struct FakeShim {
    tasks: Mutex<HashMap<String, FakeTask>>,
    failures: Mutex<HashMap<Call, ShimError>>,
    ignored_signals: Mutex<Vec<i32>>,
    reattach: Mutex<Vec<RecoveredTask>>,
    /// Every call, in order (`"create <id>"`, `"kill <id> 15"`, ...).
    calls: Mutex<Vec<String>>,
    events: broadcast::Sender<TaskEvent>,
    next_pid: Mutex<u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeShim {
    pub(crate) fn new() -> Self {
        Self {
            tasks: Mutex::default(),
            failures: Mutex::default(),
            ignored_signals: Mutex::default(),
            reattach: Mutex::default(),
            calls: Mutex::default(),
            events: broadcast::channel(64).0,
            // Far above any real pid_max: never the pid of a live process.
            next_pid: Mutex::new(1 << 30),
        }
    }

    /// The next `call` fails with `error`.
    pub(crate) fn fail_next(&self, call: Call, error: ShimError) {
        lock(&self.failures).insert(call, error);
    }

    /// Tasks ignore `signal` (a container that traps SIGTERM).
    pub(crate) fn ignore_signal(&self, signal: i32) {
        lock(&self.ignored_signals).push(signal);
    }

    /// What [`Shim::reattach`] returns (a shim that outlived berthd).
    pub(crate) fn set_reattach(&self, tasks: Vec<RecoveredTask>) {
        *lock(&self.reattach) = tasks;
    }

    /// The calls made so far.
    pub(crate) fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// Whether the shim holds a task `id`.
    pub(crate) fn has_task(&self, id: &str) -> bool {
        lock(&self.tasks).contains_key(id)
    }

    /// Makes task `id` exit with `code` and reports it, as a container that ends by itself.
    pub(crate) fn exit(&self, id: &str, code: i32) {
        let tasks = lock(&self.tasks);
        if let Some(task) = tasks.get(id) {
            Self::finish(&self.events, id, task, code);
        }
    }

    fn finish(events: &broadcast::Sender<TaskEvent>, id: &str, task: &FakeTask, code: i32) {
        if task.exit.borrow().is_some() {
            return;
        }
        let exit = Exit { code, at: SystemTime::now(), oom_killed: false, lost: false };
        task.exit.send_replace(Some(exit));
        let _ = events.send(TaskEvent::Exited { id: id.to_owned(), exit });
    }

    fn record(&self, call: String) {
        lock(&self.calls).push(call);
    }

    fn scripted(&self, call: Call) -> Result<(), ShimError> {
        lock(&self.failures).remove(&call).map_or(Ok(()), Err)
    }

    fn not_found(id: &str) -> ShimError {
        ShimError::NotFound { id: id.to_owned() }
    }
}

impl Shim for FakeShim {
    async fn create(&self, task: CreateTask) -> Result<u32, ShimError> {
        self.record(format!("create {}", task.id));
        self.scripted(Call::Create)?;
        let mut tasks = lock(&self.tasks);
        if tasks.contains_key(&task.id) {
            return Err(ShimError::AlreadyExists { id: task.id });
        }
        let pid = {
            let mut next = lock(&self.next_pid);
            *next += 1;
            *next
        };
        let exit = watch::channel(None).0;
        tasks.insert(task.id, FakeTask { pid, started: task.start, exit });
        Ok(pid)
    }

    async fn start(&self, id: &str) -> Result<(), ShimError> {
        self.record(format!("start {id}"));
        self.scripted(Call::Start)?;
        let mut tasks = lock(&self.tasks);
        let task = tasks.get_mut(id).ok_or_else(|| Self::not_found(id))?;
        task.started = true;
        Ok(())
    }

    async fn kill(&self, id: &str, signal: i32, _all: bool) -> Result<(), ShimError> {
        self.record(format!("kill {id} {signal}"));
        self.scripted(Call::Kill)?;
        let tasks = lock(&self.tasks);
        let task = tasks.get(id).ok_or_else(|| Self::not_found(id))?;
        if !lock(&self.ignored_signals).contains(&signal) {
            Self::finish(&self.events, id, task, 128 + signal);
        }
        Ok(())
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Exit>, ShimError> {
        let mut rx = lock(&self.tasks).get(id).ok_or_else(|| Self::not_found(id))?.exit.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        Ok(match waited {
            Ok(Ok(exit)) => *exit,
            _ => None,
        })
    }

    async fn state(&self, id: &str) -> Result<TaskState, ShimError> {
        let tasks = lock(&self.tasks);
        let task = tasks.get(id).ok_or_else(|| Self::not_found(id))?;
        let exit = *task.exit.borrow();
        Ok(match exit {
            Some(exit) => TaskState::Exited(exit),
            None if task.started => TaskState::Running { pid: task.pid },
            None => TaskState::Created { pid: task.pid },
        })
    }

    async fn delete(&self, id: &str) -> Result<(), ShimError> {
        self.record(format!("delete {id}"));
        self.scripted(Call::Delete)?;
        lock(&self.tasks).remove(id);
        Ok(())
    }

    async fn exec_sync(
        &self,
        id: &str,
        _process: oci_spec::runtime::Process,
        _timeout: Option<Duration>,
    ) -> Result<ExecOutput, ShimError> {
        lock(&self.tasks).get(id).ok_or_else(|| Self::not_found(id))?;
        Ok(ExecOutput { stdout: Vec::new(), stderr: Vec::new(), exit_code: 0, timed_out: false })
    }

    async fn reopen_log(&self, id: &str) -> Result<(), ShimError> {
        lock(&self.tasks).get(id).map(|_| ()).ok_or_else(|| Self::not_found(id))
    }

    fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    async fn reattach(&self) -> Result<Vec<RecoveredTask>, ShimError> {
        let tasks = std::mem::take(&mut *lock(&self.reattach));
        // The reattached tasks are the shim's again: it can signal and delete them.
        let mut known = lock(&self.tasks);
        for t in &tasks {
            let (pid, started, exit) = match &t.state {
                TaskState::Created { pid } => (*pid, false, None),
                TaskState::Running { pid } => (*pid, true, None),
                TaskState::Exited(exit) => (0, true, Some(*exit)),
            };
            known.insert(t.id.clone(), FakeTask { pid, started, exit: watch::channel(exit).0 });
        }
        Ok(tasks)
    }
}

//! [`ExternalShim`]: berthd's side of the external shim, one `berth-shim` process per pod.
//!
//! Containers are routed to their pod's shim by a map filled with
//! [`ExternalShim::bind_container`] (the bundle path does not name the pod, and adding a
//! field to `CreateTask` would break its users). The first `create` for a pod starts its
//! shim. A per-pod watcher holds a `subscribe` connection: it forwards the shim's events and
//! notices the shim's death (connection closed, socket refusing), after which the pod's
//! tasks are reported exited with the exit recorded in their state file, or code 255 when
//! none was recorded.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::AbortHandle;

use super::proto::{self, request, response};
use super::server::private_dir;
use super::wire::{
    create_request, error_from, event_from, exec_from, exit_from, lost_exit, millis, read_frame,
    request, status_from, wire_err, write_frame,
};
use super::{PID_FILE, SOCKET_NAME};
use crate::reaper::{Reaped, Reaper, spawn};
use crate::runtime_cmd::{RUNTIME_TIMEOUT, RuntimeCmd};
use crate::state_file::{self, TaskRecord};
use crate::{CreateTask, ExecOutput, Exit, Shim, ShimError, TaskEvent, TaskState, validate_id};

/// How long a new shim gets to answer its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to sleep between pings of a starting shim when it sends no readiness byte.
const START_POLL: Duration = Duration::from_millis(5);
/// How long to wait for a shim to exit after it answered `shutdown`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to a request's own timeout: a shim that answers nothing for this long is hung.
const CALL_SLACK: Duration = Duration::from_secs(30);
/// Capacity of the event broadcast channel.
const EVENT_CAPACITY: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a handful of map operations: a panic cannot leave one torn.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A task found after a berthd restart by [`ExternalShim::connect_existing`] or the embedded
/// shim's [`Shim::reattach`](crate::Shim::reattach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTask {
    /// Container ID.
    pub id: String,
    /// The pod sandbox whose shim runs it (embedded shim: the pod it was bound to, maybe
    /// empty).
    pub pod_id: String,
    /// Its state; `Exited` with code 255 when its shim died without recording an exit.
    pub state: TaskState,
}

/// A task whose shim is gone: the exit reported for it, and how to delete its container.
#[derive(Debug, Clone)]
struct LostTask {
    exit: Exit,
    /// `None` when the task's record was never written (the shim died during `create`).
    runtime: Option<RuntimeCmd>,
}

/// berthd's view of one pod's shim.
struct PodShim {
    pod_id: String,
    dir: PathBuf,
    socket: PathBuf,
    /// The shim process is gone.
    dead: AtomicBool,
    /// `shutdown_pod_shim` is under way: a closed subscription is expected.
    closing: AtomicBool,
    /// Tasks this shim runs (created through us or listed at recovery).
    tasks: Mutex<HashSet<String>>,
    /// Tasks whose exit has been published as an event.
    exit_published: Mutex<HashSet<String>>,
    /// Tasks of a dead shim (this one or a predecessor for the same pod).
    lost: Mutex<HashMap<String, LostTask>>,
    watcher: Mutex<Option<AbortHandle>>,
    events: broadcast::Sender<TaskEvent>,
    /// The reaper's news of the shim's exit, when we started it (it is our child); a shim
    /// left by a previous berthd is watched by pid instead.
    exited: Mutex<Option<oneshot::Receiver<Reaped>>>,
}

/// The answer to a call, or the news that the shim is gone.
enum Reply {
    Resp(response::Kind),
    Gone,
}

/// What a task call came to.
enum Outcome {
    Reply(response::Kind),
    Lost(LostTask),
}

fn is_gone(e: &std::io::Error) -> bool {
    // Nobody listens on the socket file (refused), or the shim removed it (not found).
    matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound)
}

impl PodShim {
    fn new(root: &Path, pod_id: &str, events: broadcast::Sender<TaskEvent>) -> Arc<Self> {
        let dir = root.join(pod_id);
        Arc::new(PodShim {
            pod_id: pod_id.to_owned(),
            socket: dir.join(SOCKET_NAME),
            dir,
            dead: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            tasks: Mutex::new(HashSet::new()),
            exit_published: Mutex::new(HashSet::new()),
            lost: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
            events,
            exited: Mutex::new(None),
        })
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// `Ok(Some)`: the task's shim is gone, here is its exit; `Ok(None)`: ask the shim.
    fn lost(&self, id: &str) -> Result<Option<LostTask>, ShimError> {
        if let Some(l) = lock(&self.lost).get(id) {
            return Ok(Some(l.clone()));
        }
        if self.is_dead() {
            return Err(ShimError::NotFound { id: id.to_owned() });
        }
        Ok(None)
    }

    fn publish(&self, ev: TaskEvent) {
        if let TaskEvent::Exited { id, .. } = &ev
            && !lock(&self.exit_published).insert(id.clone())
        {
            return;
        }
        let _ = self.events.send(ev);
    }

    /// The shim is gone: every task of it becomes lost, with the exit its state file
    /// recorded or code 255; exits not yet published are published.
    fn declare_dead(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(w) = lock(&self.watcher).take() {
            w.abort();
        }
        let mut newly = Vec::new();
        {
            let mut lost = lock(&self.lost);
            let mut records: HashMap<String, TaskRecord> =
                state_file::read_all(&state_file::tasks_dir(&self.dir))
                    .into_iter()
                    .map(|r| (r.id.clone(), r))
                    .collect();
            let mut ids: HashSet<String> = lock(&self.tasks).drain().collect();
            ids.extend(records.keys().cloned());
            for id in ids {
                let rec = records.remove(&id);
                let task = LostTask {
                    exit: rec.as_ref().and_then(|r| r.exit).unwrap_or_else(lost_exit),
                    runtime: rec.map(|r| RuntimeCmd::new(r.runtime, r.runtime_root)),
                };
                newly.push((id.clone(), task.exit));
                lost.insert(id, task);
            }
        }
        if !self.closing.load(Ordering::Acquire) {
            tracing::warn!(pod_id = self.pod_id, tasks = newly.len(), "pod shim is gone");
        }
        for (id, exit) in newly {
            self.publish(TaskEvent::Exited { id, exit });
        }
    }

    async fn connect(&self) -> Result<UnixStream, std::io::Error> {
        let at = crate::sock_path::SocketPath::new(&self.socket)?;
        UnixStream::connect(at.as_path()).await
    }

    /// One request, one answer, bounded by `timeout`.
    async fn call(&self, req: request::Kind, timeout: Duration) -> Result<Reply, ShimError> {
        match tokio::time::timeout(timeout, self.call_unbounded(req)).await {
            Ok(r) => r,
            Err(_) => Err(ShimError::Timeout {
                command: format!("shim call to pod {}", self.pod_id),
                after: timeout,
            }),
        }
    }

    async fn call_unbounded(&self, req: request::Kind) -> Result<Reply, ShimError> {
        if self.is_dead() {
            return Ok(Reply::Gone);
        }
        let mut conn = match self.connect().await {
            Ok(c) => c,
            Err(e) if is_gone(&e) => {
                self.declare_dead();
                return Ok(Reply::Gone);
            }
            Err(e) => return Err(wire_err("connect", &self.socket)(e)),
        };
        write_frame(&mut conn, &request(req), &self.socket).await?;
        match read_frame::<_, proto::Response>(&mut conn, &self.socket).await {
            Ok(Some(proto::Response { kind: Some(kind) })) => Ok(Reply::Resp(kind)),
            Ok(Some(_)) => Err(ShimError::UnexpectedResponse { expected: "a response" }),
            // Closed without an answer: the shim died under us, or dropped the connection.
            Ok(None) | Err(ShimError::Wire { .. }) if !self.alive().await => {
                self.declare_dead();
                Ok(Reply::Gone)
            }
            Ok(None) => Err(wire_err("read frame", &self.socket)(ErrorKind::UnexpectedEof.into())),
            Err(e) => Err(e),
        }
    }

    /// Whether the shim answers a ping; only "refused"/"no socket" count as dead (a
    /// transient error must not make us report running containers as exited).
    async fn alive(&self) -> bool {
        match self.ping().await {
            Ok(_) => true,
            Err(ShimError::Wire { source, .. }) => !is_gone(&source),
            Err(_) => true,
        }
    }

    async fn ping(&self) -> Result<proto::PingResponse, ShimError> {
        let mut conn = self.connect().await.map_err(wire_err("connect", &self.socket))?;
        write_frame(&mut conn, &request(request::Kind::Ping(proto::Empty {})), &self.socket)
            .await?;
        match read_frame::<_, proto::Response>(&mut conn, &self.socket).await? {
            Some(proto::Response { kind: Some(response::Kind::Ping(p)) }) => Ok(p),
            Some(_) => Err(ShimError::UnexpectedResponse { expected: "ping" }),
            None => Err(wire_err("read frame", &self.socket)(ErrorKind::UnexpectedEof.into())),
        }
    }

    /// Opens a subscription: `Ok(None)` when the shim is gone.
    async fn subscribe(&self) -> Result<Option<UnixStream>, ShimError> {
        let mut conn = match self.connect().await {
            Ok(c) => c,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(wire_err("connect", &self.socket)(e)),
        };
        let req = request(request::Kind::Subscribe(proto::Empty {}));
        write_frame(&mut conn, &req, &self.socket).await?;
        match read_frame::<_, proto::Response>(&mut conn, &self.socket).await? {
            Some(proto::Response { kind: Some(response::Kind::Ok(_)) }) => Ok(Some(conn)),
            Some(_) => Err(ShimError::UnexpectedResponse { expected: "subscription ok" }),
            None => Ok(None),
        }
    }

    /// Lists the shim's tasks.
    async fn list(&self) -> Result<Option<Vec<proto::TaskStatus>>, ShimError> {
        match self.call(request::Kind::ListTasks(proto::Empty {}), CALL_SLACK).await? {
            Reply::Resp(response::Kind::ListTasks(l)) => Ok(Some(l.tasks)),
            Reply::Resp(response::Kind::Error(e)) => Err(error_from(e, &self.pod_id)),
            Reply::Resp(_) => Err(ShimError::UnexpectedResponse { expected: "task list" }),
            Reply::Gone => Ok(None),
        }
    }

    /// Publishes the exits of listed tasks not published yet (after a gap in the events).
    async fn resync(&self) {
        if let Ok(Some(tasks)) = self.list().await {
            for t in tasks {
                if let Ok(TaskState::Exited(exit)) = status_from(&t) {
                    self.publish(TaskEvent::Exited { id: t.id, exit });
                }
            }
        }
    }
}

/// Forwards a pod shim's events until the shim is gone or shut down. `ready` fires once the
/// first subscription is in place (so a task list taken after it misses no exit).
async fn watch_pod(pod: Arc<PodShim>, ready: oneshot::Sender<Result<(), ShimError>>) {
    let mut ready = Some(ready);
    let mut failures = 0u32;
    loop {
        if pod.closing.load(Ordering::Acquire) || pod.is_dead() {
            return;
        }
        let conn = match pod.subscribe().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                pod.declare_dead();
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(ShimError::ShimGone { pod_id: pod.pod_id.clone() }));
                }
                return;
            }
            Err(e) => {
                failures += 1;
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                } else if failures % 50 == 1 {
                    tracing::warn!(pod_id = pod.pod_id, error = %e, "shim subscription failed");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        failures = 0;
        match ready.take() {
            Some(r) => {
                let _ = r.send(Ok(()));
            }
            // A resubscription: exits may have happened in the gap.
            None => pod.resync().await,
        }
        let (mut rd, _wr) = conn.into_split();
        loop {
            match read_frame::<_, proto::Response>(&mut rd, &pod.socket).await {
                Ok(Some(proto::Response { kind: Some(response::Kind::Event(ev)) })) => {
                    if let Some(ev) = event_from(ev) {
                        pod.publish(ev);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if pod.closing.load(Ordering::Acquire) {
            return;
        }
        if !pod.alive().await {
            pod.declare_dead();
            return;
        }
    }
}

/// The shim that runs each pod's containers in a `berth-shim` process of their own, which
/// outlives berthd.
pub struct ExternalShim {
    /// `<state>/shims`: one directory per pod.
    root: PathBuf,
    binary: PathBuf,
    pods: Mutex<HashMap<String, Arc<PodShim>>>,
    /// Container ID -> pod ID.
    containers: Mutex<HashMap<String, String>>,
    /// Serialises shim starts (one shim per pod, even under concurrent creates).
    starting: tokio::sync::Mutex<()>,
    events: broadcast::Sender<TaskEvent>,
}

impl std::fmt::Debug for ExternalShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalShim")
            .field("root", &self.root)
            .field("binary", &self.binary)
            .finish_non_exhaustive()
    }
}

impl Drop for ExternalShim {
    fn drop(&mut self) {
        // The shims live on; only our watchers stop (a new client reconnects to them).
        for pod in lock(&self.pods).values() {
            if let Some(w) = lock(&pod.watcher).take() {
                w.abort();
            }
        }
    }
}

impl ExternalShim {
    /// A client keeping one shim directory per pod under `root` (berthd passes
    /// `<state>/shims`; created 0700), starting shims from `binary` (`berth-shim`). Starts
    /// the process-wide reaper (the shims are our children until we exit). Call
    /// [`ExternalShim::connect_existing`] next to pick up shims of a previous berthd.
    pub fn new(root: PathBuf, binary: PathBuf) -> Result<Arc<Self>, ShimError> {
        private_dir(&root)?;
        Reaper::global()?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(Arc::new(ExternalShim {
            root,
            binary,
            pods: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
            events,
        }))
    }

    /// Where berthd finds `berth-shim` unless configured: next to its own executable.
    pub fn default_binary() -> Option<PathBuf> {
        Some(std::env::current_exe().ok()?.with_file_name("berth-shim"))
    }

    /// Records that `container_id` belongs to `pod_id`; required before `create`.
    pub fn bind_container(&self, container_id: &str, pod_id: &str) {
        lock(&self.containers).insert(container_id.to_owned(), pod_id.to_owned());
    }

    /// The pod a container is bound to.
    pub fn pod_of(&self, container_id: &str) -> Option<String> {
        lock(&self.containers).get(container_id).cloned()
    }

    /// The PID of a pod's shim process, from its pid file.
    pub fn shim_pid(&self, pod_id: &str) -> Option<u32> {
        let s = std::fs::read_to_string(self.root.join(pod_id).join(PID_FILE)).ok()?;
        s.trim().parse().ok()
    }

    /// Starts the pod's shim unless it runs already (also replaces a dead one).
    pub async fn ensure_pod_shim(&self, pod_id: &str) -> Result<(), ShimError> {
        self.pod(pod_id).await.map(|_| ())
    }

    async fn pod(&self, pod_id: &str) -> Result<Arc<PodShim>, ShimError> {
        validate_id(pod_id)?;
        let live = |me: &Self| lock(&me.pods).get(pod_id).filter(|p| !p.is_dead()).cloned();
        if let Some(p) = live(self) {
            return Ok(p);
        }
        let _starting = self.starting.lock().await;
        if let Some(p) = live(self) {
            return Ok(p);
        }
        let pod = PodShim::new(&self.root, pod_id, self.events.clone());
        // A dead predecessor's lost tasks stay answerable (and deletable).
        if let Some(old) = lock(&self.pods).get(pod_id) {
            lock(&pod.lost).extend(lock(&old.lost).drain());
            lock(&pod.exit_published).extend(lock(&old.exit_published).iter().cloned());
        }
        // A shim left by a previous berthd that we were not told about: use it.
        if pod.ping().await.is_err() {
            self.spawn_shim(&pod).await?;
        }
        self.watch(&pod).await?;
        lock(&self.pods).insert(pod_id.to_owned(), pod.clone());
        Ok(pod)
    }

    async fn spawn_shim(&self, pod: &PodShim) -> Result<(), ShimError> {
        private_dir(&pod.dir)?;
        let log_path = pod.dir.join("shim.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|source| ShimError::Io {
                action: "open shim log",
                path: log_path.clone(),
                source,
            })?;
        // The shim writes one byte to its stdout once it listens: we wait on that instead of
        // sleeping between pings.
        let (ready_rx, ready_tx) = crate::pipe::pipe("shim readiness pipe")?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--dir")
            .arg(&pod.dir)
            .arg("--pod")
            .arg(&pod.pod_id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(ready_tx))
            .stderr(Stdio::from(log));
        let reaper = Reaper::global()?;
        let before = Instant::now();
        let child = spawn(&mut cmd)
            .map_err(|source| ShimError::Spawn { program: self.binary.clone(), source })?;
        drop(cmd);
        let pid = child.id() as i32;
        // The shim is our child until we die; the reaper reaps it when it exits.
        let mut exited = reaper.register(pid, before);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ready = Some(ready_rx);
        loop {
            if let Ok(r) = exited.try_recv() {
                return Err(ShimError::ShimStart {
                    pod_id: pod.pod_id.clone(),
                    detail: format!("exited with code {}: {}", r.code, log_tail(&log_path)),
                });
            }
            if pod.ping().await.is_ok() {
                tracing::debug!(pod_id = pod.pod_id, pid, "pod shim started");
                *lock(&pod.exited) = Some(exited);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(ShimError::ShimStart {
                    pod_id: pod.pod_id.clone(),
                    detail: format!("no answer within {START_TIMEOUT:?}: {}", log_tail(&log_path)),
                });
            }
            // Wake at the shim's byte, or after a short sleep (a shim that never sends it
            // is still found by the pings; after EOF only they are left).
            match ready.as_mut() {
                Some(rx) => {
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        r = tokio::io::AsyncReadExt::read(rx, &mut byte) => {
                            if !matches!(r, Ok(1)) {
                                ready = None;
                            }
                        }
                        _ = tokio::time::sleep(START_POLL) => {}
                    }
                }
                None => tokio::time::sleep(START_POLL).await,
            }
        }
    }

    /// Starts the pod's event watcher and waits until its subscription is in place.
    async fn watch(&self, pod: &Arc<PodShim>) -> Result<(), ShimError> {
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(watch_pod(pod.clone(), tx));
        *lock(&pod.watcher) = Some(handle.abort_handle());
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(ShimError::ShimGone { pod_id: pod.pod_id.clone() }),
        }
    }

    /// After a berthd restart: finds every pod shim directory under the root, reconnects to
    /// the live shims and returns all their tasks; tasks of dead shims are returned (and
    /// kept) as exited, with their recorded exit or code 255. Containers are bound to their
    /// pods. Pods already known to this client are skipped.
    pub async fn connect_existing(&self) -> Result<Vec<RecoveredTask>, ShimError> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| ShimError::Io {
            action: "read shim directory",
            path: self.root.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pod_id) = name.to_str() else { continue };
            if validate_id(pod_id).is_err()
                || !entry.file_type().is_ok_and(|t| t.is_dir())
                || lock(&self.pods).contains_key(pod_id)
            {
                continue;
            }
            out.extend(self.recover_pod(pod_id).await?);
        }
        Ok(out)
    }

    async fn recover_pod(&self, pod_id: &str) -> Result<Vec<RecoveredTask>, ShimError> {
        let _starting = self.starting.lock().await;
        let pod = PodShim::new(&self.root, pod_id, self.events.clone());
        let mut out = Vec::new();
        let alive = match pod.ping().await {
            Ok(_) => true,
            Err(ShimError::Wire { source, .. }) if is_gone(&source) => false,
            Err(e) => return Err(e),
        };
        let listed = if alive {
            // Subscribe first, then list: an exit between the two is in one or the other.
            match self.watch(&pod).await {
                Ok(()) => pod.list().await?,
                Err(ShimError::ShimGone { .. }) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        match listed {
            Some(tasks) => {
                for t in tasks {
                    let state = status_from(&t)?;
                    if matches!(state, TaskState::Exited(_)) {
                        // Already over before we came back: recovery reads it from `state`.
                        lock(&pod.exit_published).insert(t.id.clone());
                    }
                    lock(&pod.tasks).insert(t.id.clone());
                    out.push(RecoveredTask { id: t.id, pod_id: pod_id.to_owned(), state });
                }
            }
            None => {
                for rec in state_file::read_all(&state_file::tasks_dir(&pod.dir)) {
                    lock(&pod.tasks).insert(rec.id.clone());
                }
                // Nobody subscribes yet: these exits reach the runtime through the result.
                let ids: Vec<String> = lock(&pod.tasks).iter().cloned().collect();
                lock(&pod.exit_published).extend(ids);
                pod.declare_dead();
                for (id, t) in lock(&pod.lost).iter() {
                    out.push(RecoveredTask {
                        id: id.clone(),
                        pod_id: pod_id.to_owned(),
                        state: TaskState::Exited(t.exit),
                    });
                }
                out.sort_by(|a, b| a.id.cmp(&b.id));
            }
        }
        {
            let mut containers = lock(&self.containers);
            for t in &out {
                containers.insert(t.id.clone(), pod_id.to_owned());
            }
        }
        lock(&self.pods).insert(pod_id.to_owned(), pod);
        Ok(out)
    }

    /// The pod is being removed: its shim deletes whatever tasks it still has (`runc delete
    /// --force`) and exits; tasks of a dead shim are deleted here; the pod's shim directory
    /// is removed. Idempotent.
    pub async fn shutdown_pod_shim(&self, pod_id: &str) -> Result<(), ShimError> {
        validate_id(pod_id)?;
        let pod = lock(&self.pods).get(pod_id).cloned();
        let pod = pod.unwrap_or_else(|| PodShim::new(&self.root, pod_id, self.events.clone()));
        pod.closing.store(true, Ordering::Release);
        let pid = self.shim_pid(pod_id);
        let req = request::Kind::Shutdown(proto::ShutdownRequest { force: true });
        let t0 = Instant::now();
        match pod.call(req, RUNTIME_TIMEOUT + CALL_SLACK).await {
            Ok(Reply::Resp(response::Kind::Ok(_))) => {
                let t_call = t0.elapsed();
                let exited = lock(&pod.exited).take();
                match (exited, pid) {
                    // Our child: the reaper says when it is gone, no polling.
                    (Some(exited), _) => {
                        if tokio::time::timeout(EXIT_TIMEOUT, exited).await.is_err() {
                            tracing::warn!(pod_id, "pod shim did not exit after shutdown");
                        }
                    }
                    (None, Some(pid)) => wait_gone(pid).await,
                    (None, None) => {}
                }
                tracing::debug!(pod_id, call = ?t_call, gone = ?t0.elapsed(), "pod shim shutdown timings");
            }
            Ok(Reply::Gone) => {}
            Ok(Reply::Resp(response::Kind::Error(e))) => {
                pod.closing.store(false, Ordering::Release);
                return Err(error_from(e, pod_id));
            }
            Ok(Reply::Resp(_)) => {
                pod.closing.store(false, Ordering::Release);
                return Err(ShimError::UnexpectedResponse { expected: "ok" });
            }
            Err(e) => {
                pod.closing.store(false, Ordering::Release);
                return Err(e);
            }
        }
        // Gone now. Not `declare_dead`: the shim deleted its tasks (their exits were
        // published); only tasks of an earlier, dead shim are left to delete here.
        pod.dead.store(true, Ordering::Release);
        if let Some(w) = lock(&pod.watcher).take() {
            w.abort();
        }
        let lost: Vec<(String, LostTask)> = lock(&pod.lost).drain().collect();
        for (id, t) in lost {
            if let Some(rt) = &t.runtime {
                crate::embedded::runtime_delete(rt, &id).await?;
            }
        }
        lock(&self.pods).remove(pod_id);
        lock(&self.containers).retain(|_, p| p != pod_id);
        match std::fs::remove_dir_all(&pod.dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(ShimError::Io {
                action: "remove shim directory",
                path: pod.dir.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn route(&self, id: &str) -> Result<Arc<PodShim>, ShimError> {
        let not_found = || ShimError::NotFound { id: id.to_owned() };
        let pod_id = lock(&self.containers).get(id).cloned().ok_or_else(not_found)?;
        lock(&self.pods).get(&pod_id).cloned().ok_or_else(not_found)
    }

    async fn task_call(
        &self,
        id: &str,
        req: request::Kind,
        timeout: Duration,
    ) -> Result<Outcome, ShimError> {
        let pod = self.route(id)?;
        if let Some(l) = pod.lost(id)? {
            return Ok(Outcome::Lost(l));
        }
        match pod.call(req, timeout).await? {
            Reply::Resp(response::Kind::Error(e)) => Err(error_from(e, &pod.pod_id)),
            Reply::Resp(k) => Ok(Outcome::Reply(k)),
            Reply::Gone => match pod.lost(id)? {
                Some(l) => Ok(Outcome::Lost(l)),
                None => Err(ShimError::ShimGone { pod_id: pod.pod_id.clone() }),
            },
        }
    }

    /// Forgets a deleted task.
    fn forget(&self, id: &str) {
        if let Some(pod_id) = lock(&self.containers).remove(id)
            && let Some(pod) = lock(&self.pods).get(&pod_id).cloned()
        {
            lock(&pod.tasks).remove(id);
            lock(&pod.lost).remove(id);
            lock(&pod.exit_published).remove(id);
        }
    }
}

/// The last lines of a shim's log, for start errors.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("; ")
}

/// Waits until process `pid` is gone (or [`EXIT_TIMEOUT`] passes).
async fn wait_gone(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while Instant::now() < deadline {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(pid, "pod shim did not exit after shutdown");
}

fn unexpected(expected: &'static str) -> ShimError {
    ShimError::UnexpectedResponse { expected }
}

impl Shim for ExternalShim {
    async fn create(&self, task: CreateTask) -> Result<u32, ShimError> {
        validate_id(&task.id)?;
        let pod_id =
            self.pod_of(&task.id).ok_or_else(|| ShimError::PodNotBound { id: task.id.clone() })?;
        let pod = self.pod(&pod_id).await?;
        if lock(&pod.lost).contains_key(&task.id) {
            return Err(ShimError::AlreadyExists { id: task.id });
        }
        let id = task.id.clone();
        // Known before the answer: if the shim dies during create, the task is reported lost.
        let fresh = lock(&pod.tasks).insert(id.clone());
        let req = request::Kind::Create(create_request(&task));
        let result = match pod.call(req, RUNTIME_TIMEOUT + CALL_SLACK).await {
            Ok(Reply::Resp(response::Kind::Create(c))) => Ok(c.pid),
            Ok(Reply::Resp(response::Kind::Error(e))) => Err(error_from(e, &pod_id)),
            Ok(Reply::Resp(_)) => Err(unexpected("create")),
            Ok(Reply::Gone) => Err(ShimError::ShimGone { pod_id: pod_id.clone() }),
            Err(e) => Err(e),
        };
        if result.is_err() && fresh && !pod.is_dead() {
            lock(&pod.tasks).remove(&id);
        }
        result
    }

    async fn start(&self, id: &str) -> Result<(), ShimError> {
        let req = request::Kind::Start(proto::TaskRequest { id: id.to_owned() });
        match self.task_call(id, req, RUNTIME_TIMEOUT + CALL_SLACK).await? {
            Outcome::Reply(response::Kind::Ok(_)) => Ok(()),
            Outcome::Reply(_) => Err(unexpected("ok")),
            Outcome::Lost(_) => Err(ShimError::NotRunning { id: id.to_owned() }),
        }
    }

    async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), ShimError> {
        let req = request::Kind::Kill(proto::KillRequest { id: id.to_owned(), signal, all });
        match self.task_call(id, req, RUNTIME_TIMEOUT + CALL_SLACK).await? {
            Outcome::Reply(response::Kind::Ok(_)) | Outcome::Lost(_) => Ok(()),
            Outcome::Reply(_) => Err(unexpected("ok")),
        }
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Exit>, ShimError> {
        let req = request::Kind::Wait(proto::WaitRequest {
            id: id.to_owned(),
            timeout_ms: millis(timeout),
        });
        match self.task_call(id, req, timeout.saturating_add(CALL_SLACK)).await? {
            Outcome::Reply(response::Kind::Wait(w)) => Ok(w.exit.as_ref().map(exit_from)),
            Outcome::Reply(_) => Err(unexpected("wait")),
            Outcome::Lost(l) => Ok(Some(l.exit)),
        }
    }

    async fn state(&self, id: &str) -> Result<TaskState, ShimError> {
        let req = request::Kind::State(proto::TaskRequest { id: id.to_owned() });
        match self.task_call(id, req, CALL_SLACK).await? {
            Outcome::Reply(response::Kind::State(s)) => status_from(&s),
            Outcome::Reply(_) => Err(unexpected("state")),
            Outcome::Lost(l) => Ok(TaskState::Exited(l.exit)),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), ShimError> {
        let req = request::Kind::Delete(proto::TaskRequest { id: id.to_owned() });
        match self.task_call(id, req, RUNTIME_TIMEOUT + CALL_SLACK).await {
            Ok(Outcome::Reply(response::Kind::Ok(_))) => {}
            Ok(Outcome::Reply(_)) => return Err(unexpected("ok")),
            Ok(Outcome::Lost(l)) => {
                // Its shim is gone: delete the container ourselves.
                if let Some(rt) = &l.runtime {
                    crate::embedded::runtime_delete(rt, id).await?;
                }
                if let Ok(pod) = self.route(id) {
                    state_file::remove(&state_file::tasks_dir(&pod.dir), id)?;
                }
            }
            // Unknown task: delete is idempotent.
            Err(ShimError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.forget(id);
        Ok(())
    }

    async fn exec_sync(
        &self,
        id: &str,
        process: oci_spec::runtime::Process,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ShimError> {
        let process_json = serde_json::to_vec(&process)
            .map_err(|source| ShimError::ProcessJson { id: id.to_owned(), source })?;
        let req = request::Kind::ExecSync(proto::ExecSyncRequest {
            id: id.to_owned(),
            process_json,
            timeout_ms: timeout.map(millis).unwrap_or(0),
        });
        // Without a timeout the exec may legitimately run for ever.
        let bound = timeout.map_or(Duration::MAX, |t| {
            t.saturating_add(RUNTIME_TIMEOUT).saturating_add(CALL_SLACK)
        });
        match self.task_call(id, req, bound).await? {
            Outcome::Reply(response::Kind::ExecSync(o)) => Ok(exec_from(o)),
            Outcome::Reply(_) => Err(unexpected("exec_sync")),
            Outcome::Lost(_) => Err(ShimError::NotRunning { id: id.to_owned() }),
        }
    }

    async fn reopen_log(&self, id: &str) -> Result<(), ShimError> {
        let req = request::Kind::ReopenLog(proto::TaskRequest { id: id.to_owned() });
        match self.task_call(id, req, CALL_SLACK).await? {
            Outcome::Reply(response::Kind::Ok(_)) | Outcome::Lost(_) => Ok(()),
            Outcome::Reply(_) => Err(unexpected("ok")),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    fn bind_container(&self, container_id: &str, pod_id: &str) {
        ExternalShim::bind_container(self, container_id, pod_id);
    }

    async fn release_pod(&self, pod_id: &str) -> Result<(), ShimError> {
        self.shutdown_pod_shim(pod_id).await
    }

    async fn reattach(&self) -> Result<Vec<RecoveredTask>, ShimError> {
        self.connect_existing().await
    }
}

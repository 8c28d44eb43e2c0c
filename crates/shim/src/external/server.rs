//! The server side of the external shim: what the `berth-shim` process runs.
//!
//! It wraps an [`EmbeddedShim`] (the shim process is a child subreaper with its own reaper),
//! keeps a state file per task (see [`crate::state_file`]) and answers one request per
//! connection on `<dir>/shim.sock`; a `subscribe` connection instead receives an `ok` frame
//! and then one frame per event.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use super::proto::{self, request, response};
use super::wire::{
    create_task, error_response, event_msg, exec_msg, exit_msg, ok_response, read_frame,
    status_msg, write_frame,
};
use super::{PID_FILE, SOCKET_NAME};
use crate::state_file::{self, TaskRecord};
use crate::{EmbeddedShim, Exit, Shim, ShimError, TaskEvent, TaskState};

/// Capacity of the event channels: the embedded shim's (drained at once by
/// `record_events`) and the one that re-publishes events to `subscribe` connections. A pod's
/// shim sees a handful of events (an exit and maybe an OOM per container); on lag
/// `record_events` asks the tasks for their states, and a lagging subscriber is disconnected
/// and resubscribes and lists the tasks (see [`subscription`]). Every slot is allocated and
/// written up front, so this is resident memory of every shim (1024 slots: ~70 KB each).
const EVENT_CAPACITY: usize = 64;

/// What the shim process serves.
#[derive(Debug)]
pub struct ServerConfig {
    /// The shim's directory (`<state>/shims/<pod id>`), made 0700.
    pub dir: PathBuf,
    /// The pod sandbox it serves.
    pub pod_id: String,
    /// Where to write one byte once the socket listens (berthd waits on a pipe for it
    /// instead of polling); closed right after.
    pub ready: Option<std::os::fd::OwnedFd>,
}

/// Task records and exits seen, under one lock so that an exit seen before its task's record
/// was written still lands in the record.
#[derive(Default)]
struct Records {
    tasks: HashMap<String, TaskRecord>,
    exits: HashMap<String, Exit>,
}

struct Server {
    shim: Arc<EmbeddedShim>,
    pod_id: String,
    socket: PathBuf,
    tasks_dir: PathBuf,
    records: Mutex<Records>,
    /// Events re-published after their exit was recorded, for `subscribe` connections.
    events: broadcast::Sender<TaskEvent>,
    shutdown: watch::Sender<bool>,
}

fn lock(m: &Mutex<Records>) -> std::sync::MutexGuard<'_, Records> {
    // Every critical section leaves the maps consistent (single inserts/removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ShimError {
    let path = path.to_owned();
    move |source| ShimError::Io { action, path, source }
}

/// Creates `dir` with mode 0700 (and tightens it if it existed): the socket inside must be
/// reachable only by root.
pub(crate) fn private_dir(dir: &Path) -> Result<(), ShimError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create directory", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod directory", dir))
}

/// Writes `content` to `path` atomically (temp file + rename).
pub(crate) fn write_atomic(path: &Path, content: &[u8]) -> Result<(), ShimError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))
}

/// Runs the shim server until a `shutdown` request is answered. Call inside a tokio
/// (current-thread) runtime; makes the process a child subreaper.
pub async fn serve(cfg: ServerConfig) -> Result<(), ShimError> {
    private_dir(&cfg.dir)?;
    let tasks_dir = state_file::tasks_dir(&cfg.dir);
    private_dir(&tasks_dir)?;
    let shim = EmbeddedShim::with_event_capacity(cfg.dir.join("run"), EVENT_CAPACITY)?;
    let socket = cfg.dir.join(SOCKET_NAME);
    // A socket file left by a dead predecessor would make bind fail; nobody listens on it.
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("remove stale socket", &socket)(e));
        }
        _ => {}
    }
    let bind_at =
        crate::sock_path::SocketPath::new(&socket).map_err(io_err("bind socket", &socket))?;
    let listener = UnixListener::bind(bind_at.as_path()).map_err(io_err("bind socket", &socket))?;
    drop(bind_at);
    let (events, _) = broadcast::channel(EVENT_CAPACITY);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let server = Arc::new(Server {
        shim: shim.clone(),
        pod_id: cfg.pod_id.clone(),
        socket: socket.clone(),
        tasks_dir,
        records: Mutex::new(Records::default()),
        events,
        shutdown,
    });
    tokio::spawn(record_events(server.clone(), shim.subscribe()));
    let pid_file = cfg.dir.join(PID_FILE);
    write_atomic(&pid_file, std::process::id().to_string().as_bytes())?;
    if let Some(ready) = cfg.ready {
        // Best effort: a starter that stopped waiting polls the socket instead.
        let _ = std::io::Write::write_all(&mut std::fs::File::from(ready), b"R");
    }

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    tokio::spawn(handle(server.clone(), conn));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("berth-shim: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown_rx.wait_for(|s| *s) => break,
        }
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

/// Records exits in the state files, then re-publishes every event to subscribers.
async fn record_events(server: Arc<Server>, mut rx: broadcast::Receiver<TaskEvent>) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                if let TaskEvent::Exited { id, exit } = &ev {
                    server.record_exit(id, *exit);
                }
                let _ = server.events.send(ev);
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Some exits were not seen as events: take them from the tasks themselves.
                let ids: Vec<String> = lock(&server.records).tasks.keys().cloned().collect();
                for id in ids {
                    if let Ok(TaskState::Exited(exit)) = server.shim.state(&id).await {
                        server.record_exit(&id, exit);
                        let _ = server.events.send(TaskEvent::Exited { id, exit });
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Server {
    fn record_exit(&self, id: &str, exit: Exit) {
        let mut r = lock(&self.records);
        r.exits.insert(id.to_owned(), exit);
        if let Some(rec) = r.tasks.get_mut(id)
            && rec.exit.is_none()
        {
            rec.exit = Some(exit);
            if let Err(e) = state_file::write(&self.tasks_dir, rec) {
                eprintln!("berth-shim: recording exit of {id}: {e}");
            }
        }
    }

    async fn create(&self, r: proto::CreateRequest) -> Result<proto::Response, ShimError> {
        let task = create_task(r);
        let (id, started) = (task.id.clone(), task.start);
        let (runtime, runtime_root, bundle) =
            (task.runtime.clone(), task.runtime_root.clone(), task.bundle.clone());
        let pid = self.shim.create(task).await?;
        let mut records = lock(&self.records);
        let exit = records.exits.get(&id).copied();
        let rec = TaskRecord { id: id.clone(), pid, runtime, runtime_root, bundle, started, exit };
        let written = state_file::write(&self.tasks_dir, &rec);
        records.tasks.insert(id, rec);
        // Without its record berthd could not learn this task's exit after a crash: report it.
        written?;
        Ok(proto::Response { kind: Some(response::Kind::Create(proto::CreateResponse { pid })) })
    }

    async fn start(&self, id: &str) -> Result<proto::Response, ShimError> {
        self.shim.start(id).await?;
        let mut records = lock(&self.records);
        if let Some(rec) = records.tasks.get_mut(id) {
            rec.started = true;
            state_file::write(&self.tasks_dir, rec)?;
        }
        Ok(ok_response())
    }

    async fn delete(&self, id: &str) -> Result<proto::Response, ShimError> {
        self.shim.delete(id).await?;
        let mut records = lock(&self.records);
        records.tasks.remove(id);
        records.exits.remove(id);
        state_file::remove(&self.tasks_dir, id)?;
        Ok(ok_response())
    }

    async fn list(&self) -> proto::Response {
        let ids: Vec<String> = lock(&self.records).tasks.keys().cloned().collect();
        let mut tasks = Vec::with_capacity(ids.len());
        for id in ids {
            // Deleted meanwhile: not listed.
            if let Ok(s) = self.shim.state(&id).await {
                tasks.push(status_msg(&id, &s));
            }
        }
        proto::Response {
            kind: Some(response::Kind::ListTasks(proto::ListTasksResponse { tasks })),
        }
    }

    async fn shutdown(&self, force: bool) -> Result<proto::Response, ShimError> {
        let ids: Vec<String> = lock(&self.records).tasks.keys().cloned().collect();
        if !ids.is_empty() && !force {
            return Err(ShimError::ShimBusy { pod_id: self.pod_id.clone() });
        }
        for id in ids {
            self.delete(&id).await?;
        }
        Ok(ok_response())
    }

    async fn dispatch(&self, kind: request::Kind) -> Result<proto::Response, ShimError> {
        use request::Kind as K;
        use response::Kind as R;
        let resp = |k: R| proto::Response { kind: Some(k) };
        match kind {
            K::Create(r) => self.create(r).await,
            K::Start(r) => self.start(&r.id).await,
            K::Kill(r) => {
                self.shim.kill(&r.id, r.signal, r.all).await?;
                Ok(ok_response())
            }
            K::Wait(r) => {
                let exit = self.shim.wait(&r.id, Duration::from_millis(r.timeout_ms)).await?;
                Ok(resp(R::Wait(proto::WaitResponse { exit: exit.as_ref().map(exit_msg) })))
            }
            K::State(r) => {
                let s = self.shim.state(&r.id).await?;
                Ok(resp(R::State(status_msg(&r.id, &s))))
            }
            K::Delete(r) => self.delete(&r.id).await,
            K::ExecSync(r) => {
                let timeout = (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms));
                // berthd's bytes go to the runtime as they are (checked, not re-encoded).
                let out = self.shim.exec_sync_json(&r.id, &r.process_json, timeout).await?;
                Ok(resp(R::ExecSync(exec_msg(out))))
            }
            K::ReopenLog(r) => {
                self.shim.reopen_log(&r.id).await?;
                Ok(ok_response())
            }
            K::ListTasks(_) => Ok(self.list().await),
            K::Shutdown(r) => self.shutdown(r.force).await,
            K::Ping(_) => Ok(resp(R::Ping(proto::PingResponse {
                pid: std::process::id(),
                pod_id: self.pod_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }))),
            // Handled by the caller (it keeps the connection).
            K::Subscribe(_) => Err(ShimError::BadRequest { detail: "subscribe out of place" }),
        }
    }
}

/// Serves one connection: one request and its answer, or a subscription.
async fn handle(server: Arc<Server>, mut conn: UnixStream) {
    let path = server.socket.clone();
    let req: proto::Request = match read_frame(&mut conn, &path).await {
        Ok(Some(r)) => r,
        // The client went away, or sent garbage: nothing to answer to.
        Ok(None) | Err(_) => return,
    };
    let Some(kind) = req.kind else {
        let e = ShimError::BadRequest { detail: "empty request" };
        let _ = write_frame(&mut conn, &error_response(&e), &path).await;
        return;
    };
    if let request::Kind::Subscribe(_) = kind {
        subscription(&server, conn).await;
        return;
    }
    let is_shutdown = matches!(kind, request::Kind::Shutdown(_));
    let resp = match server.dispatch(kind).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    let ok = !matches!(resp.kind, Some(response::Kind::Error(_)));
    // The client may have given up (timed out): its task is done anyway.
    let _ = write_frame(&mut conn, &resp, &path).await;
    if is_shutdown && ok {
        server.shutdown.send_replace(true);
    }
}

/// Streams events to a subscriber until it disconnects. On lag the connection is closed, so
/// the client resubscribes and lists the tasks, rather than silently missing an exit.
async fn subscription(server: &Server, conn: UnixStream) {
    let path = server.socket.clone();
    let mut rx = server.events.subscribe();
    let (mut rd, mut wr) = conn.into_split();
    if write_frame(&mut wr, &ok_response(), &path).await.is_err() {
        return;
    }
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    let frame = proto::Response {
                        kind: Some(response::Kind::Event(event_msg(&ev))),
                    };
                    if write_frame(&mut wr, &frame, &path).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            // The client sends nothing after subscribing: a read returns only at its close.
            _ = tokio::io::AsyncReadExt::read(&mut rd, &mut probe) => return,
        }
    }
}

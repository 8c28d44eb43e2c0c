//! berth-runtime: the pod sandbox and container lifecycle. [`Runtime`] takes the kubelet's CRI
//! requests (`k8s_cri::v1` types) and returns CRI responses or errors classified by
//! [`ErrorClass`]; it never speaks gRPC itself.
//!
//! A pod sandbox is a directory under `<state>/pods/<id>` with pinned network/IPC/UTS
//! namespaces (no pause process), the shared `/etc/hosts`, `resolv.conf`, `hostname` and a
//! `/dev/shm` tmpfs, and optionally a tiny init process holding a shared PID namespace. A
//! container is an OCI bundle under `<state>/containers/<id>` run through the [`Shim`].
//!
//! Modules: `store` (redb tables), `records` (what is stored), `names` (name reservation),
//! `state` (state machines), `sandbox`/`container`/`exec`/`stats` (one file per RPC family),
//! `filters`, `events`, `cgroups`, `pod_files`, `shm`, `pod_init`, `recovery`, `repair`,
//! `journal` (the undo journal of a create). Under test, `fake_shim` and `tests` build a
//! whole `Runtime` on temp dirs.

// Unsafe code only in the modules allowed by name below.
#![deny(unsafe_code)]

mod cgroups;
mod container;
mod encoded;
mod error;
mod events;
mod exec;
#[cfg(test)]
mod fake_shim;
mod filters;
mod gc_users;
mod handlers;
mod journal;
pub mod names;
mod net_runner;
mod network;
mod oom_score;
mod pod_files;
mod pod_init;
mod records;
mod recovery;
mod repair;
mod sandbox;
mod sandbox_list;
mod shm;
pub mod state;
mod stats;
mod store;
mod stream;
// unsafe: getrandom(2) for ids.
#[allow(unsafe_code)]
mod util;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use berth_image::ImageStore;
use berth_shim::{AnyShim, Shim, TaskEvent};
use berth_snapshot::Snapshotter;
use k8s_cri::v1::ContainerEventResponse;
use tokio::sync::broadcast;

pub use encoded::{Encoded, ListLayout};
pub use error::{ErrorClass, Result, RuntimeError};
pub use net_runner::ReaperCommandRunner;
pub use records::{ContainerMeta, ContainerStatus, ProcessRef, SandboxMeta, SandboxStatus};
pub use recovery::RecoveryReport;
pub use stream::{AttachTarget, PodNetwork, StreamExec};

use crate::events::Events;
use crate::names::Names;
use crate::state::{ContainerState, SandboxState};
use crate::store::Store;

/// How many task deletes run at once in the background.
const BACKGROUND_DELETES: usize = 4;

/// Where cgroupfs is mounted on a normal host: [`RuntimeConfig::cgroup_root`]'s value.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How the runtime is set up (from `berth.toml`).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The volatile state directory (`/run/berth`): pods, bundles, runtime state.
    pub state_dir: PathBuf,
    /// The handler used when a pod names none.
    pub default_handler: String,
    /// Runtime handlers: name → OCI runtime binary (a bare name is looked up in `PATH`).
    pub handlers: BTreeMap<String, PathBuf>,
    /// Where relative Localhost seccomp profiles are found.
    pub seccomp_profile_root: PathBuf,
    /// Parent cgroup of pods whose config names none; each pod gets `<this>/pod-<id>`.
    pub cgroup_parent: String,
    /// The program run as `<program> pod-init <pod dir>` for shared-PID pods (berthd itself).
    pub pod_init_program: PathBuf,
    /// Where cgroupfs is mounted ([`DEFAULT_CGROUP_ROOT`]): stats, OOM detection, pod cgroup
    /// removal and the startup repair read and remove cgroups under it (tests point it at a
    /// temp dir). It is a cgroup v2 host when this is a cgroup2 mount.
    pub cgroup_root: PathBuf,
}

/// A pod sandbox in the index.
pub(crate) struct SandboxEntry {
    pub(crate) meta: SandboxMeta,
    status: RwLock<SandboxStatus>,
    /// Serialises lifecycle operations on this pod: stop and remove take it for writing,
    /// CreateContainer for reading (creates in one pod run in parallel, but never while the
    /// pod is being stopped or removed).
    pub(crate) op: tokio::sync::RwLock<()>,
    /// Serialises status writes, so the database and memory agree on the last one.
    persist: Mutex<()>,
    /// List cache: this pod's ListPodSandbox entry, encoded once (see `encoded`).
    pub(crate) listed: OnceLock<encoded::Prefab>,
}

impl SandboxEntry {
    fn new(meta: SandboxMeta, status: SandboxStatus) -> Arc<Self> {
        Arc::new(Self {
            meta,
            status: RwLock::new(status),
            op: tokio::sync::RwLock::new(()),
            persist: Mutex::new(()),
            listed: OnceLock::new(),
        })
    }

    /// A copy of the current status.
    pub(crate) fn status(&self) -> SandboxStatus {
        self.status.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A container in the index.
pub(crate) struct ContainerEntry {
    pub(crate) meta: ContainerMeta,
    status: RwLock<ContainerStatus>,
    /// Serialises lifecycle operations (start, stop, remove) on this container.
    pub(crate) op: tokio::sync::Mutex<()>,
    persist: Mutex<()>,
    /// Set once the container's task is deleted (the shim's record, the OCI runtime's state
    /// and cgroup). The delete starts in the background when the exit is recorded; removal
    /// and pod stop wait for it, or run it themselves if it has not started (see
    /// `container::delete_task`). Never set twice, so the runtime deletes once.
    pub(crate) task_deleted: tokio::sync::OnceCell<()>,
    /// List cache: this container's ListContainers entry, encoded once (see `encoded`).
    pub(crate) listed: OnceLock<encoded::Prefab>,
}

impl ContainerEntry {
    fn new(meta: ContainerMeta, status: ContainerStatus) -> Arc<Self> {
        Arc::new(Self {
            meta,
            status: RwLock::new(status),
            op: tokio::sync::Mutex::new(()),
            persist: Mutex::new(()),
            task_deleted: tokio::sync::OnceCell::new(),
            listed: OnceLock::new(),
        })
    }

    /// A copy of the current status.
    pub(crate) fn status(&self) -> ContainerStatus {
        self.status.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The current state alone (no copy of the status' strings: lists read only this).
    pub(crate) fn state(&self) -> ContainerState {
        self.status.read().unwrap_or_else(PoisonError::into_inner).state
    }
}

/// The containers in memory, by id and by pod, kept together under one lock so the two
/// views always agree. The per-pod view keeps pod-wide work (publishing an event, stopping
/// or removing a pod) proportional to the pod's containers, not to all of them.
#[derive(Default)]
struct ContainerIndex {
    by_id: HashMap<String, Arc<ContainerEntry>>,
    by_pod: HashMap<String, HashMap<String, Arc<ContainerEntry>>>,
}

/// Runs blocking work (a database commit with its fsync, an unmount) without stalling the
/// async worker threads: on a multi-threaded runtime the worker hands its other tasks to
/// another thread first; elsewhere (current-thread tests) it simply runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The pod and container runtime. Generic over the shim so tests can use a double; berthd
/// uses [`AnyShim`] (the embedded shim or external `berth-shim` processes, as configured).
pub struct Runtime<S: Shim = AnyShim> {
    config: RuntimeConfig,
    store: Store,
    images: Arc<ImageStore>,
    snapshots: Arc<Snapshotter>,
    shim: Arc<S>,
    sandboxes: RwLock<HashMap<String, Arc<SandboxEntry>>>,
    containers: RwLock<ContainerIndex>,
    names: Names,
    events: Events,
    cgroup_v2: bool,
    /// Drops the limits whose cgroup controller the host lacks.
    resource_fit: cgroups::ResourceFit,
    /// The lowest `oom_score_adj` a container may get (see `oom_score`).
    oom_score_floor: Option<i32>,
    /// Pod networking; without it pods get a network namespace with loopback only.
    network: Option<Arc<berth_net::NetworkManager>>,
    /// Bounds the task deletes run in the background after exits: each starts the OCI
    /// runtime binary, and a pod stop can make hundreds at once.
    background_deletes: Arc<tokio::sync::Semaphore>,
    /// The handlers that ran a probe container ([`Runtime::probe_handlers`]); until the
    /// probe has run, every configured handler counts.
    usable_handlers: OnceLock<std::collections::BTreeSet<String>>,
}

impl<S: Shim + 'static> Runtime<S> {
    /// Opens the runtime: loads the records and re-reserves their names. What a previous
    /// berthd left running is settled by [`Runtime::recover`], which must be awaited next,
    /// before serving (it reattaches to the shim's tasks, releases the network of pods that
    /// no longer exist and repairs orphans). Starts listening to the shim's events. Must be
    /// called inside a tokio runtime. Without `network`, pods get loopback only.
    pub fn open(
        config: RuntimeConfig,
        db: Arc<redb::Database>,
        images: Arc<ImageStore>,
        snapshots: Arc<Snapshotter>,
        shim: Arc<S>,
        network: Option<Arc<berth_net::NetworkManager>>,
    ) -> Result<Arc<Self>> {
        for dir in ["pods", "containers", "runtime"] {
            let path = config.state_dir.join(dir);
            std::fs::create_dir_all(&path).map_err(RuntimeError::io("create directory", &path))?;
        }
        let store = Store::open(db)?;
        // Subscribe before anything can start, so no exit is missed.
        let task_events = shim.subscribe();
        let cgroup_v2 = cgroups::is_v2(&config.cgroup_root);
        let resource_fit = cgroups::ResourceFit::detect(&config.cgroup_root, cgroup_v2);
        let runtime = Arc::new(Self {
            config,
            store,
            images,
            snapshots,
            shim,
            sandboxes: RwLock::new(HashMap::new()),
            containers: RwLock::new(ContainerIndex::default()),
            names: Names::default(),
            events: Events::new(),
            cgroup_v2,
            resource_fit,
            oom_score_floor: oom_score::floor(),
            network,
            background_deletes: Arc::new(tokio::sync::Semaphore::new(BACKGROUND_DELETES)),
            usable_handlers: OnceLock::new(),
        });
        runtime.load_records()?;
        runtime.refresh_gauges();
        tokio::spawn(event_loop(Arc::downgrade(&runtime), task_events));
        Ok(runtime)
    }

    /// Names of the configured runtime handlers that can run containers here (for
    /// `Status`; see [`Runtime::probe_handlers`]).
    pub fn handlers(&self) -> Vec<String> {
        let usable = self.usable_handlers.get();
        self.config
            .handlers
            .keys()
            .filter(|name| usable.is_none_or(|u| u.contains(*name)))
            .cloned()
            .collect()
    }

    /// Subscribes to container lifecycle events (`GetContainerEvents`).
    pub fn subscribe_events(&self) -> broadcast::Receiver<ContainerEventResponse> {
        self.events.subscribe()
    }

    pub(crate) fn sandbox(&self, id: &str) -> Option<Arc<SandboxEntry>> {
        self.sandboxes.read().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    pub(crate) fn container(&self, id: &str) -> Option<Arc<ContainerEntry>> {
        self.containers.read().unwrap_or_else(PoisonError::into_inner).by_id.get(id).cloned()
    }

    pub(crate) fn all_sandboxes(&self) -> Vec<Arc<SandboxEntry>> {
        self.sandboxes.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    pub(crate) fn all_containers(&self) -> Vec<Arc<ContainerEntry>> {
        self.containers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<ContainerEntry>> {
        self.containers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_pod
            .get(sandbox_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Looks a sandbox up by id or unique id prefix (crictl sends prefixes).
    pub(crate) fn find_sandbox(&self, id: &str) -> Option<Arc<SandboxEntry>> {
        if id.is_empty() {
            return None;
        }
        let map = self.sandboxes.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get(id) {
            return Some(e.clone());
        }
        let mut matches = map.values().filter(|e| e.meta.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(e), None) => Some(e.clone()),
            _ => None,
        }
    }

    /// Looks a container up by id or unique id prefix.
    pub(crate) fn find_container(&self, id: &str) -> Option<Arc<ContainerEntry>> {
        if id.is_empty() {
            return None;
        }
        let index = self.containers.read().unwrap_or_else(PoisonError::into_inner);
        let map = &index.by_id;
        if let Some(e) = map.get(id) {
            return Some(e.clone());
        }
        let mut matches = map.values().filter(|e| e.meta.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(e), None) => Some(e.clone()),
            _ => None,
        }
    }

    pub(crate) fn insert_sandbox(&self, entry: Arc<SandboxEntry>) {
        self.sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry.meta.id.clone(), entry);
    }

    pub(crate) fn insert_container(&self, entry: Arc<ContainerEntry>) {
        let mut index = self.containers.write().unwrap_or_else(PoisonError::into_inner);
        index
            .by_pod
            .entry(entry.meta.sandbox_id.clone())
            .or_default()
            .insert(entry.meta.id.clone(), entry.clone());
        index.by_id.insert(entry.meta.id.clone(), entry);
    }

    pub(crate) fn forget_sandbox(&self, id: &str) {
        self.sandboxes.write().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    pub(crate) fn forget_container(&self, id: &str) {
        let mut index = self.containers.write().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = index.by_id.remove(id) else { return };
        if let Some(pod) = index.by_pod.get_mut(&entry.meta.sandbox_id) {
            pod.remove(id);
            if pod.is_empty() {
                index.by_pod.remove(&entry.meta.sandbox_id);
            }
        }
    }

    /// Applies `change` to a container's status and persists it; `change` returns false to
    /// leave it as it is. Returns the new status if it changed. Readers are never blocked by
    /// the database write: they read the in-memory copy, swapped after the write.
    pub(crate) fn update_container(
        &self,
        entry: &ContainerEntry,
        change: impl FnOnce(&mut ContainerStatus) -> bool,
    ) -> Result<Option<ContainerStatus>> {
        let _persist = entry.persist.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = entry.status();
        if !change(&mut next) {
            return Ok(None);
        }
        blocking(|| self.store.put_container_status(&entry.meta.id, &next))?;
        *entry.status.write().unwrap_or_else(PoisonError::into_inner) = next.clone();
        Ok(Some(next))
    }

    /// Sets a sandbox's state and persists it.
    pub(crate) fn set_sandbox_state(
        &self,
        entry: &SandboxEntry,
        state: SandboxState,
    ) -> Result<()> {
        let _persist = entry.persist.lock().unwrap_or_else(PoisonError::into_inner);
        let next = SandboxStatus { state };
        blocking(|| self.store.put_sandbox_status(&entry.meta.id, &next))?;
        *entry.status.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// Recomputes the `berth_containers` and `berth_pod_sandboxes` gauges.
    pub(crate) fn refresh_gauges(&self) {
        let m = berth_metrics::metrics();
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for c in self.containers.read().unwrap_or_else(PoisonError::into_inner).by_id.values() {
            *counts.entry(c.state().name()).or_default() += 1;
        }
        for state in [
            ContainerState::Created,
            ContainerState::Running,
            ContainerState::Exited,
            ContainerState::Unknown,
        ] {
            let name = state.name();
            m.containers.with_label_values(&[name]).set(counts.get(name).copied().unwrap_or(0));
        }
        let (mut ready, mut not_ready) = (0, 0);
        for s in self.all_sandboxes() {
            match s.status().state {
                SandboxState::Ready => ready += 1,
                SandboxState::NotReady => not_ready += 1,
            }
        }
        m.sandboxes.with_label_values(&["ready"]).set(ready);
        m.sandboxes.with_label_values(&["notready"]).set(not_ready);
    }

    /// Records the exit of a container's main process (from the shim's events or a stop),
    /// once: a second report for the same container is ignored.
    pub(crate) fn record_exit(&self, id: &str, exit: berth_shim::Exit) {
        let Some(entry) = self.container(id) else { return };
        let finished = util::system_time_ns(exit.at);
        let result = self.update_container(&entry, |s| {
            if !s.state.can_exit() {
                return false;
            }
            if s.started_at == 0 && s.state == ContainerState::Running {
                s.started_at = finished;
            }
            s.state = ContainerState::Exited;
            s.finished_at = finished;
            s.exit_code = exit.code;
            if exit.lost {
                s.message = "the container's shim died without recording its exit".into();
            }
            s.reason = if exit.oom_killed {
                "OOMKilled"
            } else if exit.lost {
                "Unknown"
            } else if exit.code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .to_string();
            true
        });
        match result {
            Ok(Some(_)) => {
                tracing::info!(container_id = %id, code = exit.code, oom = exit.oom_killed, "container exited");
                if exit.oom_killed {
                    berth_metrics::metrics().oom_kills.inc();
                }
                if exit.lost {
                    self.kill_lost_process(&entry);
                }
                self.refresh_gauges();
                self.publish(&entry, k8s_cri::v1::ContainerEventType::ContainerStoppedEvent);
                // As containerd's exit handler: the task goes now, not at RemoveContainer,
                // which the kubelet may call much later.
                self.spawn_task_delete(entry);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(container_id = %id, error = %e, "cannot record container exit")
            }
        }
    }

    /// Deletes an exited container's task in the background (see
    /// [`ContainerEntry::task_deleted`]); a failure is logged, and removal tries again.
    pub(crate) fn spawn_task_delete(&self, entry: Arc<ContainerEntry>) {
        if entry.task_deleted.initialized() {
            return;
        }
        // Outside a tokio runtime (some unit tests) there is no background: removal does it.
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let (shim, limit) = (self.shim.clone(), self.background_deletes.clone());
        handle.spawn(async move {
            // Waiting here, not inside the delete: a removal that comes meanwhile runs the
            // delete itself instead of queueing behind other pods' deletes.
            let Ok(_permit) = limit.acquire_owned().await else { return };
            if let Err(e) = container::delete_task(shim.as_ref(), &entry).await {
                tracing::warn!(container_id = %entry.meta.id, error = %e, "cannot delete the task of an exited container; removal will retry");
            }
        });
    }

    /// Publishes a lifecycle event for `entry` with its pod's status and containers.
    pub(crate) fn publish(&self, entry: &ContainerEntry, kind: k8s_cri::v1::ContainerEventType) {
        // Building an event costs the pod's statuses: skip it when nobody listens.
        if !self.events.has_subscribers() {
            return;
        }
        let sandbox = self.sandbox(&entry.meta.sandbox_id);
        let pod_sandbox_status = sandbox.as_ref().map(|s| self.cri_sandbox_status(s));
        let mut containers_statuses: Vec<_> = self
            .containers_of(&entry.meta.sandbox_id)
            .iter()
            .map(|c| self.cri_container_status(c))
            .collect();
        if kind == k8s_cri::v1::ContainerEventType::ContainerDeletedEvent {
            containers_statuses.retain(|c| c.id != entry.meta.id);
        }
        self.events.publish(ContainerEventResponse {
            container_id: entry.meta.id.clone(),
            container_event_type: kind as i32,
            created_at: util::now_ns(),
            pod_sandbox_status,
            containers_statuses,
        });
    }
}

/// Turns the shim's task events into status updates. Holds only a weak reference, so the
/// runtime can be dropped (tests).
async fn event_loop<S: Shim + 'static>(
    runtime: std::sync::Weak<Runtime<S>>,
    mut rx: broadcast::Receiver<TaskEvent>,
) {
    loop {
        let event = rx.recv().await;
        let Some(rt) = runtime.upgrade() else { return };
        match event {
            Ok(TaskEvent::Exited { id, exit }) => rt.record_exit(&id, exit),
            Ok(TaskEvent::Oom { id }) => {
                tracing::info!(container_id = %id, "OOM kill in container cgroup")
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "missed shim events; re-reading task states");
                rt.resync_exits().await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl<S: Shim + 'static> Runtime<S> {
    /// After missed events: asks the shim about every container we think is alive.
    async fn resync_exits(&self) {
        for c in self.all_containers() {
            if !matches!(c.status().state, ContainerState::Running | ContainerState::Created) {
                continue;
            }
            if let Ok(berth_shim::TaskState::Exited(exit)) = self.shim.state(&c.meta.id).await {
                self.record_exit(&c.meta.id, exit);
            }
        }
    }
}

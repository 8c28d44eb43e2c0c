//! Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus,
//! ListPodSandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_net::{NamespaceKind, PinRequest};
use berth_shim::Shim;
use futures::stream::{self, StreamExt};
use k8s_cri::v1::{
    LinuxPodSandboxStatus, Namespace, NamespaceMode, NamespaceOption, PodIp, PodSandbox,
    PodSandboxConfig, PodSandboxFilter, PodSandboxNetworkStatus, PodSandboxStatus as CriStatus,
    PodSandboxStatusResponse, RunPodSandboxRequest,
};

use crate::error::{Result, RuntimeError};
use crate::journal::Journal;
use crate::names::sandbox_name;
use crate::records::{ProcessRef, SandboxMeta, SandboxStatus};
use crate::state::SandboxState;
use crate::util::{new_id, now_ns, remove_dir_all};
use crate::{Runtime, SandboxEntry, cgroups, pod_files, pod_init, shm};

/// How many of a pod's containers are stopped or removed at once.
const POD_PARALLELISM: usize = 8;

/// The pod's namespace options (all POD when the kubelet sent none).
pub(crate) fn namespace_options(config: &PodSandboxConfig) -> NamespaceOption {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

/// What [`Runtime::make_local_parts`] made (its undos are in its journal).
struct LocalParts {
    files: pod_files::PodFiles,
    shm: Option<PathBuf>,
    init: Option<ProcessRef>,
}

impl<S: Shim + 'static> Runtime<S> {
    /// Resolves a runtime handler name ("" → the default) to its name and binary.
    pub(crate) fn handler(&self, name: &str) -> Result<(String, PathBuf)> {
        let name = if name.is_empty() { self.config.default_handler.as_str() } else { name };
        self.config
            .handlers
            .get(name)
            .map(|bin| (name.to_owned(), bin.clone()))
            .ok_or_else(|| RuntimeError::UnknownHandler(name.to_owned()))
    }

    /// RunPodSandbox: validates, then creates the pod's directory, namespaces, files, shm and
    /// (PID mode POD) init process. Returns the new pod's id.
    pub async fn run_pod_sandbox(self: &Arc<Self>, req: RunPodSandboxRequest) -> Result<String> {
        let config = req.config.ok_or(RuntimeError::Missing("config"))?;
        let meta = config.metadata.as_ref().ok_or(RuntimeError::Missing("config.metadata"))?;
        for (field, value) in [
            ("config.metadata.name", &meta.name),
            ("config.metadata.namespace", &meta.namespace),
            ("config.metadata.uid", &meta.uid),
        ] {
            if value.is_empty() {
                return Err(RuntimeError::Missing(field));
            }
        }
        let (handler, _) = self.handler(&req.runtime_handler)?;
        berth_oci::validate_pod_paths(&config).map_err(RuntimeError::PodConfig)?;
        let sysctls = berth_oci::validate_sysctls(&config).map_err(RuntimeError::Sysctls)?;
        let ns = namespace_options(&config);
        if ns.pid == NamespaceMode::Target as i32 {
            return Err(RuntimeError::Invalid {
                field: "namespace_options.pid",
                reason: "TARGET is only valid for containers".into(),
            });
        }
        if ns.userns_options.as_ref().is_some_and(|u| u.mode != NamespaceMode::Node as i32) {
            return Err(RuntimeError::Invalid {
                field: "namespace_options.userns_options",
                reason: "user namespaces are not supported yet".into(),
            });
        }
        let name = sandbox_name(meta);
        let id = new_id()?;
        if let Err(holder) = self.names.reserve(&name, &id) {
            // The kubelet's retry of a create that finished after its deadline gets the pod.
            if self.names.claim(&name, &holder) {
                return Ok(holder);
            }
            return Err(RuntimeError::NameReserved { name, holder });
        }
        // Finish the work even if the kubelet gives up on this call (this future is then
        // dropped); the finished pod waits, unclaimed, for the kubelet's retry.
        let this = self.clone();
        let task_name = name.clone();
        let task_id = id.clone();
        let result = tokio::spawn(async move {
            let pending = this.names.pending(&task_name, &task_id);
            let result = this
                .create_sandbox(task_id.clone(), task_name.clone(), handler, config, sysctls, ns)
                .await;
            if result.is_ok() {
                pending.finish();
            }
            result
        })
        .await
        .map_err(|e| RuntimeError::TaskFailed(e.to_string()))
        .and_then(|r| r);
        match result {
            Ok(()) => {
                self.names.delivered(&name, &id);
                Ok(id)
            }
            Err(e) => {
                self.names.release(&name, &id);
                Err(e)
            }
        }
    }

    async fn create_sandbox(
        &self,
        id: String,
        name: String,
        handler: String,
        config: PodSandboxConfig,
        sysctls: Vec<(String, String)>,
        ns: NamespaceOption,
    ) -> Result<()> {
        let mut journal = Journal::new(id.clone());
        let t0 = std::time::Instant::now();
        let built = self.build_sandbox(&id, name, handler, config, sysctls, ns, &mut journal).await;
        let t_build = t0.elapsed();
        let status = SandboxStatus { state: SandboxState::Ready };
        // The record last: a crash before it leaves nothing a record owns (see `repair`).
        let stored = built.and_then(|meta| {
            crate::blocking(|| self.store.create_sandbox(&meta, &status))?;
            Ok(meta)
        });
        match stored {
            Ok(meta) => {
                journal.commit();
                tracing::debug!(pod_id = %id, build = ?t_build, total = ?t0.elapsed(), "run timings");
                tracing::info!(pod_id = %id, name = %meta.name, "pod sandbox ready");
                self.insert_sandbox(SandboxEntry::new(meta, status));
                self.refresh_gauges();
                Ok(())
            }
            Err(e) => {
                journal.rollback().await;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_sandbox<'a>(
        &'a self,
        id: &str,
        name: String,
        handler: String,
        config: PodSandboxConfig,
        sysctls: Vec<(String, String)>,
        ns: NamespaceOption,
        journal: &mut Journal<'a>,
    ) -> Result<SandboxMeta> {
        let host_network = ns.network == NamespaceMode::Node as i32;
        let host_ipc = ns.ipc == NamespaceMode::Node as i32;
        let dir = self.config.state_dir.join("pods").join(id);
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("create directory", &dir))?;
        let undo_dir = dir.clone();
        journal.push("pod directory", move || async move { remove_dir_all(&undo_dir) });

        let hostname = if host_network {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .map_err(|source| RuntimeError::Sys { call: "gethostname", source })?
        } else if !config.hostname.is_empty() {
            config.hostname.clone()
        } else {
            config.metadata.as_ref().map(|m| m.name.chars().take(63).collect()).unwrap_or_default()
        };

        let mut kinds = Vec::new();
        if !host_network {
            kinds.extend([NamespaceKind::Net, NamespaceKind::Uts]);
        }
        if !host_ipc {
            kinds.push(NamespaceKind::Ipc);
        }
        let ns_dir = dir.join("ns");
        // Before pinning: a pin that fails halfway leaves the others pinned. (A pod that
        // shares all of the host's namespaces pins none.)
        if !kinds.is_empty() {
            let undo_ns = ns_dir.clone();
            journal.push("namespace pins", move || async move {
                berth_net::unpin_all(&undo_ns).map_err(RuntimeError::Net)
            });
        }
        let request = PinRequest { dir: ns_dir, kinds, hostname: hostname.clone() };
        let t0 = std::time::Instant::now();
        let pinned = tokio::task::spawn_blocking(move || berth_net::pin_namespaces(&request))
            .await
            .map_err(|e| RuntimeError::TaskFailed(e.to_string()))?
            .map_err(RuntimeError::Net)?;
        let t_pins = t0.elapsed();

        // The network (netlink, IPAM) and the pod's own pieces (files, shm, pod init: an
        // exec) wait on different things, so they are made at the same time.
        // Host-network pods have no netns of their own and get no pod network. Each side
        // journals what it makes; a failure of either undoes both (the network first, as
        // it lives in the pinned netns).
        let mut network_journal = Journal::new(id);
        if let Some(netns) = pinned.net.clone() {
            // Before the setup: one that fails halfway has made something to tear down.
            let pod_id = id.to_owned();
            network_journal.push("pod network", move || async move {
                self.teardown_pod_network(&pod_id, Some(&netns)).await
            });
        }
        let network = async {
            let r = match &pinned.net {
                Some(netns) => self.setup_pod_network(id, &config, netns).await,
                None => Ok(()),
            };
            (r, t0.elapsed())
        };
        let mut local_journal = Journal::new(id);
        let pieces = async {
            let r = self
                .make_local_parts(
                    &dir,
                    &hostname,
                    host_network,
                    host_ipc,
                    &config,
                    &ns,
                    &mut local_journal,
                )
                .await;
            (r, t0.elapsed())
        };
        let ((network, t_network), (pieces, t_local)) = tokio::join!(network, pieces);
        tracing::debug!(pod_id = %id, pins = ?t_pins, network = ?t_network, local = ?t_local, "pod setup timings");
        journal.append(local_journal);
        journal.append(network_journal);
        network?;
        let LocalParts { files, shm: shm_dir, init: pod_init } = pieces?;

        let kubelet_parent =
            config.linux.as_ref().map(|l| l.cgroup_parent.clone()).unwrap_or_default();
        let (cgroup_parent, owns_cgroup) = if kubelet_parent.is_empty() {
            (format!("{}/pod-{id}", self.config.cgroup_parent.trim_end_matches('/')), true)
        } else {
            (kubelet_parent, false)
        };

        Ok(SandboxMeta {
            id: id.to_owned(),
            name,
            created_at: now_ns(),
            runtime_handler: handler,
            dir,
            cgroup_parent,
            owns_cgroup,
            netns: pinned.net,
            ipcns: pinned.ipc,
            utsns: pinned.uts,
            shm: shm_dir,
            hosts: files.hosts,
            resolv_conf: files.resolv_conf,
            hostname_file: files.hostname,
            hostname,
            sysctls,
            pid_mode: ns.pid,
            pod_init,
            config,
        })
    }

    /// The pod's files, its shm mount and, for a pod-wide PID namespace, its init process;
    /// the undo of what was made lands in `journal` even when a later step fails.
    #[allow(clippy::too_many_arguments)]
    async fn make_local_parts<'a>(
        &self,
        dir: &Path,
        hostname: &str,
        host_network: bool,
        host_ipc: bool,
        config: &PodSandboxConfig,
        ns: &NamespaceOption,
        journal: &mut Journal<'a>,
    ) -> Result<LocalParts> {
        // The files live in the pod directory, whose undo removes them.
        let files = pod_files::write(dir, hostname, host_network, config.dns_config.as_ref())?;
        let mut shm = None;
        if !host_ipc {
            let target = dir.join("shm");
            shm::mount_shm(&target)?;
            let undo = target.clone();
            journal.push("pod shm", move || async move { shm::unmount_shm(&undo) });
            shm = Some(target);
        }
        let mut init = None;
        if ns.pid == NamespaceMode::Pod as i32 {
            let process = pod_init::start(&self.config.pod_init_program, dir).await?;
            journal.push_infallible("pod init", move || pod_init::kill(&process));
            init = Some(process);
        }
        Ok(LocalParts { files, shm, init })
    }

    /// StopPodSandbox: kills every container of the pod, the pod init, and unmounts the
    /// shm. Namespaces stay pinned until removal (as containerd does). Idempotent: stopping
    /// an unknown pod succeeds, since the CRI says a stop must not fail once everything is
    /// reclaimed (the kubelet stops pods it knows only by id, e.g. after a removal).
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let Some(entry) = self.find_sandbox(id) else {
            tracing::debug!(pod_id = id, "stop of an unknown pod sandbox: nothing to do");
            return Ok(());
        };
        let _op = entry.op.write().await;
        self.stop_sandbox_locked(&entry).await
    }

    async fn stop_sandbox_locked(&self, entry: &SandboxEntry) -> Result<()> {
        let containers = self.containers_of(&entry.meta.id);
        // Several at once: each waits mostly on the runtime binary and the kernel. A stopped
        // pod has no container tasks left: their deletes, started in the background at the
        // exits, are waited for (or run here).
        let results: Vec<Result<()>> = stream::iter(containers.into_iter().map(|c| async move {
            let _cop = c.op.lock().await;
            self.stop_container_locked(&c, 0).await?;
            // A failed delete does not keep the pod from stopping: removal retries it.
            if let Err(e) = crate::container::delete_task(self.shim.as_ref(), &c).await {
                tracing::warn!(container_id = %c.meta.id, error = %e, "cannot delete the task of a stopped container");
            }
            Ok(())
        }))
        .buffer_unordered(POD_PARALLELISM)
        .collect()
        .await;
        results.into_iter().collect::<Result<()>>()?;
        if let Some(init) = &entry.meta.pod_init {
            pod_init::kill(init);
        }
        // Idempotent, so a stopped pod is retried here (and by remove) until it succeeds; a
        // failure keeps the record and still leaves the pod stopped.
        let network = self.teardown_pod_network(&entry.meta.id, entry.meta.netns.as_deref()).await;
        if let Some(shm) = &entry.meta.shm {
            shm::unmount_shm(shm)?;
        }
        if entry.status().state != SandboxState::NotReady {
            self.set_sandbox_state(entry, SandboxState::NotReady)?;
            tracing::info!(pod_id = %entry.meta.id, "pod sandbox stopped");
            self.refresh_gauges();
        }
        network
    }

    /// RemovePodSandbox: stops it, removes its containers, namespaces, files and cgroup.
    /// Removing an unknown pod succeeds (the kubelet retries removals).
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let Some(entry) = self.find_sandbox(id) else {
            return Ok(());
        };
        let _op = entry.op.write().await;
        if self.sandbox(&entry.meta.id).is_none() {
            return Ok(()); // removed while we waited
        }
        let t0 = std::time::Instant::now();
        self.stop_sandbox_locked(&entry).await?;
        let containers = self.containers_of(&entry.meta.id);
        let results: Vec<Result<()>> = stream::iter(containers.into_iter().map(|c| async move {
            let _cop = c.op.lock().await;
            self.remove_container_locked(&c).await
        }))
        .buffer_unordered(POD_PARALLELISM)
        .collect()
        .await;
        results.into_iter().collect::<Result<()>>()?;
        // The external shim's process for this pod exits now that its containers are gone.
        let t_containers = t0.elapsed();
        self.shim.release_pod(&entry.meta.id).await.map_err(RuntimeError::Shim)?;
        let t_shim = t0.elapsed();
        let meta = &entry.meta;
        berth_net::unpin_all(&meta.dir.join("ns")).map_err(RuntimeError::Net)?;
        if let Some(shm) = &meta.shm {
            shm::unmount_shm(shm)?;
        }
        remove_dir_all(&meta.dir)?;
        if meta.owns_cgroup {
            cgroups::remove(&self.config.cgroup_root, &meta.cgroup_parent);
        }
        crate::blocking(|| self.store.delete_sandbox(&meta.id))?;
        self.forget_sandbox(&meta.id);
        self.names.release(&meta.name, &meta.id);
        self.refresh_gauges();
        tracing::debug!(pod_id = %meta.id, containers = ?t_containers, shim = ?t_shim, total = ?t0.elapsed(), "pod remove timings");
        tracing::info!(pod_id = %meta.id, "pod sandbox removed");
        Ok(())
    }

    /// The CRI status of a sandbox.
    pub(crate) fn cri_sandbox_status(&self, entry: &SandboxEntry) -> CriStatus {
        let meta = &entry.meta;
        let state = entry.status().state;
        // A stopped pod's address is on its way back to the pool (see teardown_pod_network).
        let (ip, additional) = match state {
            SandboxState::Ready => self.pod_ips(meta),
            SandboxState::NotReady => (String::new(), Vec::new()),
        };
        CriStatus {
            id: meta.id.clone(),
            metadata: meta.config.metadata.clone(),
            state: state.to_cri() as i32,
            created_at: meta.created_at,
            network: Some(PodSandboxNetworkStatus {
                ip,
                additional_ips: additional.into_iter().map(|ip| PodIp { ip }).collect(),
            }),
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace { options: Some(namespace_options(&meta.config)) }),
            }),
            labels: meta.config.labels.clone(),
            annotations: meta.config.annotations.clone(),
            runtime_handler: meta.runtime_handler.clone(),
        }
    }

    /// PodSandboxStatus (with its containers' statuses, and with `verbose` the `info` JSON).
    pub fn pod_sandbox_status(&self, id: &str, verbose: bool) -> Result<PodSandboxStatusResponse> {
        let entry =
            self.find_sandbox(id).ok_or_else(|| RuntimeError::SandboxNotFound(id.to_owned()))?;
        let status = self.cri_sandbox_status(&entry);
        let containers_statuses = self
            .containers_of(&entry.meta.id)
            .iter()
            .map(|c| self.cri_container_status(c))
            .collect();
        let mut info = HashMap::new();
        if verbose {
            let m = &entry.meta;
            let value = serde_json::json!({
                "id": m.id,
                "name": m.name,
                "runtimeHandler": m.runtime_handler,
                "cgroupParent": m.cgroup_parent,
                "hostname": m.hostname,
                "netns": m.netns,
                "ipcns": m.ipcns,
                "utsns": m.utsns,
                "shm": m.shm,
                "podInitPid": m.pod_init.map(|p| p.pid),
                "sysctls": m.sysctls,
            });
            info.insert("info".to_string(), value.to_string());
        }
        Ok(PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses,
            timestamp: now_ns(),
        })
    }

    /// ListPodSandbox.
    pub fn list_pod_sandbox(&self, filter: Option<&PodSandboxFilter>) -> Vec<PodSandbox> {
        self.filtered_sandboxes(filter)
            .into_iter()
            .map(|(e, state)| PodSandbox {
                id: e.meta.id.clone(),
                metadata: e.meta.config.metadata.clone(),
                state,
                created_at: e.meta.created_at,
                labels: e.meta.config.labels.clone(),
                annotations: e.meta.config.annotations.clone(),
                runtime_handler: e.meta.runtime_handler.clone(),
            })
            .collect()
    }
}

//! Containers: CreateContainer, StartContainer, StopContainer, RemoveContainer,
//! ContainerStatus, ListContainers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_oci::{ContainerSpecInput, PodContext};
use berth_shim::{CreateTask, Exit, Shim, ShimError};
use k8s_cri::v1::{
    Container, ContainerConfig, ContainerEventType, ContainerFilter, ContainerResources,
    ContainerStatus as CriStatus, ContainerStatusResponse, CreateContainerRequest, ImageSpec,
    ListContainersResponse, NamespaceMode,
};

use crate::encoded::{Encoded, Prefab};
use crate::error::{Result, RuntimeError};
use crate::filters::{id_matches, labels_match};
use crate::journal::Journal;
use crate::names::container_name;
use crate::oom_score;
use crate::records::{ContainerMeta, ContainerStatus, ProcessRef};
use crate::state::ContainerState;
use crate::util::{
    new_id, now_ns, process_alive, process_start_time, remove_dir_all, write_volatile,
};
use crate::{ContainerEntry, Runtime, SandboxEntry, blocking, cgroups};

/// How long to wait for a container to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// Parses an image `StopSignal` (`SIGQUIT`, `QUIT`, `3`); `None` if unknown.
pub(crate) fn parse_signal(text: &str) -> Option<i32> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Ok(n) = t.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<nix::sys::signal::Signal>().ok().map(|s| s as i32)
}

/// Deletes `entry`'s task once: the shim's delete (which runs `<runtime> delete`), then, for
/// a task left by a previous berthd that the shim does not know, `<runtime> delete` here.
/// Concurrent callers share one delete (the first runs it, the others wait for it); after a
/// success it is never run again; after a failure the next caller retries.
pub(crate) async fn delete_task<S: Shim>(shim: &S, entry: &ContainerEntry) -> Result<()> {
    entry
        .task_deleted
        .get_or_try_init(|| async {
            match shim.delete(&entry.meta.id).await {
                Ok(()) | Err(ShimError::NotFound { .. }) => {}
                Err(e) => return Err(RuntimeError::Shim(e)),
            }
            runtime_delete_orphan(entry).await;
            Ok(())
        })
        .await
        .map(|_| ())
}

/// `<runtime> delete --force <id>` if the runtime still has state for the container (a task
/// left by a previous berthd), ignoring "does not exist".
pub(crate) async fn runtime_delete_orphan(entry: &ContainerEntry) {
    let state_dir = entry.meta.runtime_root.join(&entry.meta.id);
    if !state_dir.exists() {
        return;
    }
    let mut cmd = std::process::Command::new(&entry.meta.runtime);
    cmd.arg("--root")
        .arg(&entry.meta.runtime_root)
        .arg("delete")
        .arg("--force")
        .arg(&entry.meta.id);
    match berth_shim::run_captured(cmd, Some(Duration::from_secs(30))).await {
        Ok(out) if out.code != 0 => tracing::debug!(
            container_id = %entry.meta.id,
            stderr = %String::from_utf8_lossy(&out.stderr),
            "runtime delete of leftover task failed"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(container_id = %entry.meta.id, error = %e, "cannot run runtime delete")
        }
    }
}

impl<S: Shim + 'static> Runtime<S> {
    /// The pod's contribution to a container spec.
    fn pod_context(&self, sandbox: &SandboxEntry, config: &ContainerConfig) -> Result<PodContext> {
        let m = &sandbox.meta;
        let ctr_ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let pod_pid = m.pid_mode;
        let (pidns, host_pid) = if pod_pid == NamespaceMode::Node as i32 {
            (None, true)
        } else if ctr_ns.pid == NamespaceMode::Target as i32 {
            let target = self
                .container(&ctr_ns.target_id)
                .ok_or_else(|| RuntimeError::ContainerNotFound(ctr_ns.target_id.clone()))?;
            let pid = target.status().process.map(|p| p.pid).ok_or(RuntimeError::WrongState {
                id: ctr_ns.target_id.clone(),
                state: "not running",
                action: "share its PID namespace",
            })?;
            (Some(PathBuf::from(format!("/proc/{pid}/ns/pid"))), false)
        } else if pod_pid == NamespaceMode::Pod as i32 {
            let init = m.pod_init.ok_or(RuntimeError::SandboxNotReady(m.id.clone()))?;
            if !process_alive(init.pid, init.start_time) {
                return Err(RuntimeError::SandboxNotReady(m.id.clone()));
            }
            (Some(PathBuf::from(format!("/proc/{}/ns/pid", init.pid))), false)
        } else {
            (None, false)
        };
        Ok(PodContext {
            netns: m.netns.clone(),
            ipcns: m.ipcns.clone(),
            utsns: m.utsns.clone(),
            pidns,
            host_pid,
            shm: m.shm.clone(),
            hosts: Some(m.hosts.clone()),
            resolv_conf: Some(m.resolv_conf.clone()),
            hostname_file: Some(m.hostname_file.clone()),
            hostname: m.hostname.clone(),
            sysctls: m.sysctls.clone(),
        })
    }

    /// CreateContainer: validates, reserves the name, mounts the rootfs and writes the bundle
    /// (the task is made by StartContainer, as containerd does). A retry of a create whose
    /// config is identical to the one holding the name gets that container's id (the kubelet
    /// timed out on the first call).
    pub async fn create_container(self: &Arc<Self>, req: CreateContainerRequest) -> Result<String> {
        if req.pod_sandbox_id.is_empty() {
            return Err(RuntimeError::Missing("pod_sandbox_id"));
        }
        let config = req.config.ok_or(RuntimeError::Missing("config"))?;
        let cmeta = config.metadata.as_ref().ok_or(RuntimeError::Missing("config.metadata"))?;
        if cmeta.name.is_empty() {
            return Err(RuntimeError::Missing("config.metadata.name"));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or(RuntimeError::Missing("config.image.image"))?;
        let sandbox = self
            .find_sandbox(&req.pod_sandbox_id)
            .ok_or_else(|| RuntimeError::SandboxNotFound(req.pod_sandbox_id.clone()))?;
        berth_oci::validate_container_config(&config).map_err(RuntimeError::ContainerConfig)?;
        // The log path within the pod's directory, checked before anything is made.
        berth_oci::container_log_path(&sandbox.meta.config.log_directory, &config.log_path)
            .map_err(RuntimeError::ContainerConfig)?;
        if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            cgroups::check_cpuset_online(r)?;
        }
        let image = self
            .images
            .get(&image_name)
            .map_err(RuntimeError::Image)?
            .ok_or_else(|| RuntimeError::ImageNotFound(image_name.clone()))?;
        let pod_meta = sandbox.meta.config.metadata.clone().unwrap_or_default();
        let name = container_name(cmeta, &pod_meta);
        let id = new_id()?;
        if let Err(holder) = self.names.reserve(&name, &id) {
            if let Some(existing) = self.container(&holder)
                && existing.meta.config == config
                && existing.meta.sandbox_id == sandbox.meta.id
            {
                return Ok(holder);
            }
            return Err(RuntimeError::NameReserved { name, holder });
        }
        let this = self.clone();
        let (task_id, task_name) = (id.clone(), name.clone());
        let result = tokio::spawn(async move {
            // Released on failure even when the caller is gone; on success the name stays
            // held and the kubelet's retry finds the container by name (below).
            let pending = this.names.pending(&task_name, &task_id);
            let _pod = sandbox.op.read().await;
            if !sandbox.status().state.can_create_containers()
                || this.sandbox(&sandbox.meta.id).is_none()
            {
                return Err(RuntimeError::SandboxNotReady(sandbox.meta.id.clone()));
            }
            let mut journal = Journal::new(task_id.clone());
            match this
                .build_container(&task_id, task_name, &sandbox, config, image, &mut journal)
                .await
            {
                Ok(entry) => {
                    journal.commit();
                    this.insert_container(entry.clone());
                    this.refresh_gauges();
                    this.publish(&entry, ContainerEventType::ContainerCreatedEvent);
                    pending.keep();
                    Ok(())
                }
                Err(e) => {
                    journal.rollback().await;
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| RuntimeError::TaskFailed(e.to_string()))
        .and_then(|r| r);
        match result {
            Ok(()) => Ok(id),
            Err(e) => {
                self.names.release(&name, &id);
                Err(e)
            }
        }
    }

    async fn build_container<'a>(
        &'a self,
        id: &str,
        name: String,
        sandbox: &SandboxEntry,
        config: ContainerConfig,
        image: berth_image::Image,
        journal: &mut Journal<'a>,
    ) -> Result<Arc<ContainerEntry>> {
        let (handler, runtime) = self.handler(&sandbox.meta.runtime_handler)?;
        let image_config: oci_spec::image::ImageConfiguration =
            serde_json::from_str(&image.config_json)
                .map_err(|source| RuntimeError::ImageConfig { image: image.id.clone(), source })?;
        let pod = self.pod_context(sandbox, &config)?;

        let bundle = self.config.state_dir.join("containers").join(id);
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(RuntimeError::io("create directory", &rootfs))?;
        let undo_bundle = bundle.clone();
        journal.push("bundle", move || async move { remove_dir_all(&undo_bundle) });
        let t0 = std::time::Instant::now();
        // Always writable, even for readOnlyRootFilesystem: the OCI runtime must be able to
        // make the mount points the spec needs (`/proc`, `/dev`, volume targets) in images
        // that lack them; the spec's `root.readonly` has it remount the rootfs read-only
        // once they are made, as with containerd.
        {
            let snapshots = self.snapshots.clone();
            let (key, chain, target) = (id.to_owned(), image.chain_id.clone(), rootfs.clone());
            tokio::task::spawn_blocking(move || {
                snapshots.prepare_rootfs(&key, &chain, &target, false)
            })
            .await
            .map_err(|e| RuntimeError::TaskFailed(e.to_string()))?
            .map_err(RuntimeError::Snapshot)?;
        }
        let (undo_key, undo_rootfs) = (id.to_owned(), rootfs.clone());
        journal.push("rootfs", move || async move {
            self.snapshots.remove_rootfs(&undo_key, &undo_rootfs).map_err(RuntimeError::Snapshot)
        });
        let t_rootfs = t0.elapsed();

        let cgroups_path = format!("{}/{id}", sandbox.meta.cgroup_parent.trim_end_matches('/'));
        let mut spec = berth_oci::container_spec(&ContainerSpecInput {
            sandbox: &sandbox.meta.config,
            container: &config,
            image_config: &image_config,
            rootfs: rootfs.clone(),
            pod: &pod,
            cgroups_path: cgroups_path.clone(),
            seccomp_profile_root: self.config.seccomp_profile_root.clone(),
            sandbox_id: &sandbox.meta.id,
            cgroup_v2: self.cgroup_v2,
        })
        .map_err(RuntimeError::ContainerConfig)?;
        if let Some(res) = spec.linux_mut().as_mut().and_then(|l| l.resources_mut().as_mut()) {
            self.resource_fit.apply(res, id);
        }
        if let Some(process) = spec.process_mut()
            && let Some(requested) = process.oom_score_adj()
        {
            let allowed = oom_score::clamp(requested, self.oom_score_floor);
            if allowed != requested {
                tracing::debug!(requested, allowed, "oom_score_adj raised to berthd's own");
                process.set_oom_score_adj(Some(allowed));
            }
        }
        // Compact, and not fsynced: the bundle lives in the volatile state dir and is only
        // read by the runtime right below; a crash before the record is written leaves an
        // orphan bundle that recovery removes anyway.
        let spec_json = serde_json::to_vec(&spec)
            .map_err(|source| RuntimeError::Serialize { what: "OCI spec", source })?;
        write_volatile(&bundle.join("config.json"), &spec_json)?;
        let t_spec = t0.elapsed();

        let log_path =
            berth_oci::container_log_path(&sandbox.meta.config.log_directory, &config.log_path)
                .map_err(RuntimeError::ContainerConfig)?;
        if let Some(parent) = log_path.as_deref().and_then(|p| p.parent()) {
            std::fs::create_dir_all(parent)
                .map_err(RuntimeError::io("create directory", parent))?;
        }

        let stop_signal = image_config
            .config()
            .as_ref()
            .and_then(|c| c.stop_signal().as_deref().and_then(parse_signal))
            .unwrap_or(libc::SIGTERM);
        let runtime_root = self.config.state_dir.join("runtime").join(&handler);

        let meta = ContainerMeta {
            id: id.to_owned(),
            sandbox_id: sandbox.meta.id.clone(),
            name,
            created_at: now_ns(),
            config,
            image_id: image.id.clone(),
            chain_id: image.chain_id.clone(),
            bundle,
            log_path,
            cgroups_path,
            runtime_handler: handler,
            runtime,
            runtime_root,
            stop_signal,
        };
        // No runtime process yet: as containerd, the task is made (and started in the same
        // runtime call) by StartContainer.
        let status = ContainerStatus { state: ContainerState::Created, ..Default::default() };
        blocking(|| self.store.create_container(&meta, &status))?;
        tracing::debug!(container_id = %id, rootfs = ?t_rootfs, spec = ?t_spec, total = ?t0.elapsed(), "create timings");
        tracing::info!(container_id = %id, pod_id = %meta.sandbox_id, name = %meta.name, "container created");
        Ok(ContainerEntry::new(meta, status))
    }

    fn get_container(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        self.find_container(id).ok_or_else(|| RuntimeError::ContainerNotFound(id.to_owned()))
    }

    /// StartContainer: created → running. The task is created and started by one runtime
    /// call (`run --detach`), in the pod's shim.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let entry = self.get_container(id)?;
        let sandbox = self
            .sandbox(&entry.meta.sandbox_id)
            .ok_or_else(|| RuntimeError::SandboxNotFound(entry.meta.sandbox_id.clone()))?;
        // The pod's lock first, as everywhere: its namespaces stay while the task is made.
        let _pod = sandbox.op.read().await;
        let _op = entry.op.lock().await;
        let status = entry.status();
        if !status.state.can_start() {
            return Err(RuntimeError::WrongState {
                id: entry.meta.id.clone(),
                state: status.state.name(),
                action: "start",
            });
        }
        if !sandbox.status().state.can_create_containers() {
            return Err(RuntimeError::SandboxNotReady(sandbox.meta.id.clone()));
        }
        let t0 = std::time::Instant::now();
        let started = if status.awaits_task() {
            self.run_task(&entry).await.map(Some)
        } else {
            // Created by a berthd from before the create/start split: its init waits.
            self.shim.start(&entry.meta.id).await.map(|()| None)
        };
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                // As containerd: a container that failed to start is exited with StartError.
                let message = e.to_string();
                self.update_container(&entry, |s| {
                    if !s.state.can_exit() {
                        return false;
                    }
                    s.state = ContainerState::Exited;
                    s.finished_at = now_ns();
                    s.exit_code = 128;
                    s.reason = "StartError".into();
                    s.message = message;
                    true
                })?;
                self.refresh_gauges();
                // Nothing will run in it any more: free the runtime's state (and a runtime
                // init still waiting to start) now.
                self.spawn_task_delete(entry.clone());
                return Err(RuntimeError::Shim(e));
            }
        };
        let t_task = t0.elapsed();
        let started = now_ns();
        let process = pid.map(|pid| ProcessRef { pid, start_time: process_start_time(pid) });
        // The process may already have exited (and been recorded): keep that, but note the
        // start time.
        self.update_container(&entry, |s| {
            match s.state {
                ContainerState::Created => s.state = ContainerState::Running,
                ContainerState::Exited if s.started_at == 0 => {}
                _ => return false,
            }
            s.started_at = started;
            if process.is_some() {
                s.process = process;
            }
            true
        })?;
        tracing::debug!(container_id = %entry.meta.id, task = ?t_task, total = ?t0.elapsed(), "start timings");
        tracing::info!(container_id = %entry.meta.id, "container started");
        self.refresh_gauges();
        self.publish(&entry, ContainerEventType::ContainerStartedEvent);
        Ok(())
    }

    /// Creates and starts the container's task: one `<runtime> run --detach`. Returns the
    /// PID of its main process.
    async fn run_task(&self, entry: &ContainerEntry) -> std::result::Result<u32, ShimError> {
        let m = &entry.meta;
        // What a crash in the middle of an earlier start left in the runtime is gone:
        // recovery deletes it before berthd serves.
        // The external shim runs a pod's containers in that pod's shim process.
        self.shim.bind_container(&m.id, &m.sandbox_id);
        self.shim
            .create(CreateTask {
                id: m.id.clone(),
                bundle: m.bundle.clone(),
                runtime: m.runtime.clone(),
                runtime_root: m.runtime_root.clone(),
                log_path: m.log_path.clone(),
                memory_cgroup: Some(cgroups::memory_dir(
                    &self.config.cgroup_root,
                    &m.cgroups_path,
                    self.cgroup_v2,
                )),
                tty: m.config.tty,
                stdin: m.config.stdin,
                stdin_once: m.config.stdin_once,
                start: true,
            })
            .await
    }

    /// StopContainer: the stop signal, up to `timeout` seconds, then SIGKILL. Idempotent:
    /// stopping an unknown (e.g. already removed) container succeeds, as the CRI asks.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        let Some(entry) = self.find_container(id) else {
            tracing::debug!(container_id = id, "stop of an unknown container: nothing to do");
            return Ok(());
        };
        let _op = entry.op.lock().await;
        self.stop_container_locked(&entry, timeout).await
    }

    /// Stops a container whose op lock the caller holds.
    pub(crate) async fn stop_container_locked(
        &self,
        entry: &ContainerEntry,
        timeout: i64,
    ) -> Result<()> {
        let status = entry.status();
        if !status.state.can_stop() {
            return Ok(());
        }
        let id = &entry.meta.id;
        if timeout > 0 {
            match self.shim.kill(id, entry.meta.stop_signal, false).await {
                Ok(()) => {
                    if self.wait_recorded(entry, Duration::from_secs(timeout as u64)).await? {
                        return Ok(());
                    }
                    tracing::info!(container_id = %id, timeout, "container ignored its stop signal; killing it");
                }
                Err(ShimError::NotFound { .. }) => return self.stop_unknown(entry, &status).await,
                Err(ShimError::NotRunning { .. }) => {}
                Err(e) => return Err(RuntimeError::Shim(e)),
            }
        }
        match self.shim.kill(id, libc::SIGKILL, true).await {
            Ok(()) | Err(ShimError::NotRunning { .. }) => {}
            Err(ShimError::NotFound { .. }) => return self.stop_unknown(entry, &status).await,
            Err(e) => return Err(RuntimeError::Shim(e)),
        }
        if self.wait_recorded(entry, KILL_WAIT).await? {
            return Ok(());
        }
        Err(RuntimeError::Shim(ShimError::Timeout {
            command: format!("kill -9 container {id}"),
            after: KILL_WAIT,
        }))
    }

    /// Waits up to `timeout` for the container's exit and records it. True once the exit is
    /// recorded, here or by the event loop (whose background delete may already have made
    /// the shim forget the task).
    async fn wait_recorded(&self, entry: &ContainerEntry, timeout: Duration) -> Result<bool> {
        match self.shim.wait(&entry.meta.id, timeout).await {
            Ok(Some(exit)) => {
                self.record_exit(&entry.meta.id, exit);
                Ok(true)
            }
            Ok(None) | Err(ShimError::NotFound { .. }) => Ok(!entry.status().state.can_stop()),
            Err(e) => Err(RuntimeError::Shim(e)),
        }
    }

    /// The shim does not know the task: either its exit was recorded and its task deleted
    /// meanwhile (nothing to do), or it was left by a previous berthd (stop it by pid).
    async fn stop_unknown(&self, entry: &ContainerEntry, status: &ContainerStatus) -> Result<()> {
        if !entry.status().state.can_stop() {
            return Ok(());
        }
        self.stop_unmanaged(entry, status).await
    }

    /// Stops a container the shim does not know (its berthd was restarted): SIGKILL by pid,
    /// then record it exited.
    async fn stop_unmanaged(&self, entry: &ContainerEntry, status: &ContainerStatus) -> Result<()> {
        if let Some(p) = status.process
            && process_alive(p.pid, p.start_time)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let deadline = tokio::time::Instant::now() + KILL_WAIT;
            while process_alive(p.pid, p.start_time) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.record_exit(
            &entry.meta.id,
            Exit { code: 137, at: std::time::SystemTime::now(), oom_killed: false, lost: false },
        );
        Ok(())
    }

    /// RemoveContainer: stops it if needed, deletes the task, rootfs and bundle. The log
    /// file stays (the kubelet owns it). Removing an unknown container succeeds.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let Some(entry) = self.find_container(id) else { return Ok(()) };
        let _op = entry.op.lock().await;
        if self.container(&entry.meta.id).is_none() {
            return Ok(());
        }
        self.remove_container_locked(&entry).await
    }

    pub(crate) async fn remove_container_locked(&self, entry: &ContainerEntry) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.stop_container_locked(entry, 0).await?;
        let id = &entry.meta.id;
        // The task delete normally runs in the background since the exit (or is under way:
        // then we wait). The unmount (an overlay unmount syncs the upper filesystem) and
        // rm -rf go on the blocking pool, so pod removal can run several containers' at once.
        let files = async {
            let (snapshots, task_id, bundle) =
                (self.snapshots.clone(), id.clone(), entry.meta.bundle.clone());
            tokio::task::spawn_blocking(move || {
                snapshots
                    .remove_rootfs(&task_id, &bundle.join("rootfs"))
                    .map_err(RuntimeError::Snapshot)?;
                remove_dir_all(&bundle)
            })
            .await
            .map_err(|e| RuntimeError::TaskFailed(e.to_string()))?
        };
        let (task, files) = if self.nothing_left_running(entry) {
            // Nothing uses the rootfs any more: it can go while the runtime deletes.
            tokio::join!(
                async {
                    let r = delete_task(self.shim.as_ref(), entry).await;
                    (r, t0.elapsed())
                },
                files
            )
        } else {
            // Processes of the container may outlive its init (shared PID namespace) until
            // the runtime's delete kills them: they may still use the rootfs.
            let r = delete_task(self.shim.as_ref(), entry).await;
            let t_task = t0.elapsed();
            r?;
            ((Ok(()), t_task), files.await)
        };
        let (task, t_task) = task;
        task?;
        files?;
        let t_files = t0.elapsed();
        // Last, so that a crash or a failure above leaves the record for a retry (which
        // finds what is already gone gone, and is fine with it).
        let (store, task_id) = (self.store.clone(), id.clone());
        tokio::task::spawn_blocking(move || store.delete_container(&task_id))
            .await
            .map_err(|e| RuntimeError::TaskFailed(e.to_string()))??;
        self.forget_container(id);
        self.names.release(&entry.meta.name, id);
        self.refresh_gauges();
        self.publish(entry, ContainerEventType::ContainerDeletedEvent);
        tracing::debug!(container_id = %id, task = ?t_task, files = ?t_files, total = ?t0.elapsed(), "remove timings");
        tracing::info!(container_id = %id, "container removed");
        Ok(())
    }

    /// Whether none of the container's processes can be left once its exit is recorded:
    /// it had a PID namespace of its own (the kernel kills and reaps the rest of a
    /// namespace before its init can be reaped), and its init is gone. Mirrors the PID
    /// namespace choice of `pod_context`.
    fn nothing_left_running(&self, entry: &ContainerEntry) -> bool {
        let Some(sandbox) = self.sandbox(&entry.meta.sandbox_id) else { return false };
        let pod_pid = sandbox.meta.pid_mode;
        let ctr_pid = entry
            .meta
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .map_or(NamespaceMode::Pod as i32, |n| n.pid);
        let own_namespace = pod_pid != NamespaceMode::Node as i32
            && pod_pid != NamespaceMode::Pod as i32
            && ctr_pid != NamespaceMode::Target as i32;
        let status = entry.status();
        own_namespace
            && status.state == ContainerState::Exited
            && !status.process.is_some_and(|p| process_alive(p.pid, p.start_time))
    }

    fn image_spec(&self, entry: &ContainerEntry) -> ImageSpec {
        let mut spec = entry.meta.config.image.clone().unwrap_or_default();
        if spec.user_specified_image.is_empty() {
            spec.user_specified_image = spec.image.clone();
        }
        spec
    }

    /// The CRI status of a container.
    pub(crate) fn cri_container_status(&self, entry: &ContainerEntry) -> CriStatus {
        let s = entry.status();
        let m = &entry.meta;
        let resources = s
            .resources
            .clone()
            .or_else(|| m.config.linux.as_ref().and_then(|l| l.resources.clone()))
            .map(|linux| ContainerResources { linux: Some(linux), windows: None });
        CriStatus {
            id: m.id.clone(),
            metadata: m.config.metadata.clone(),
            state: s.state.to_cri() as i32,
            created_at: m.created_at,
            started_at: s.started_at,
            finished_at: s.finished_at,
            exit_code: s.exit_code,
            image: Some(self.image_spec(entry)),
            image_ref: m.image_id.clone(),
            reason: s.reason.clone(),
            message: s.message.clone(),
            labels: m.config.labels.clone(),
            annotations: m.config.annotations.clone(),
            mounts: m.config.mounts.clone(),
            log_path: m
                .log_path
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            resources,
            image_id: m.image_id.clone(),
            user: None,
        }
    }

    /// ContainerStatus (with `verbose`, an `info` JSON holding the pid, spec, sandbox id and
    /// runtime handler).
    pub fn container_status(&self, id: &str, verbose: bool) -> Result<ContainerStatusResponse> {
        let entry = self.get_container(id)?;
        let status = self.cri_container_status(&entry);
        let mut info = HashMap::new();
        if verbose {
            let spec: serde_json::Value = std::fs::read(entry.meta.bundle.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            let s = entry.status();
            let value = serde_json::json!({
                "sandboxID": entry.meta.sandbox_id,
                "pid": s.process.map(|p| p.pid),
                "runtimeHandler": entry.meta.runtime_handler,
                "runtime": entry.meta.runtime,
                "cgroupsPath": entry.meta.cgroups_path,
                "bundle": entry.meta.bundle,
                "spec": spec,
            });
            info.insert("info".to_string(), value.to_string());
        }
        Ok(ContainerStatusResponse { status: Some(status), info })
    }

    /// ListContainers, as structs (the gRPC service sends [`Runtime::list_containers_encoded`]).
    pub fn list_containers(&self, filter: Option<&ContainerFilter>) -> Vec<Container> {
        self.listed_containers(filter)
            .map(|(e, state)| Container { state, ..self.cri_container(&e) })
            .collect()
    }

    /// ListContainers, encoded: each container's entry is encoded once and reused, so a
    /// call costs a copy of its bytes (see `encoded`).
    pub fn list_containers_encoded(
        &self,
        filter: Option<&ContainerFilter>,
    ) -> Encoded<ListContainersResponse> {
        let entries: Vec<_> = self.listed_containers(filter).collect();
        let prefabs: Vec<_> = entries
            .iter()
            .map(|(e, state)| (e.listed.get_or_init(|| self.container_prefab(e)), *state))
            .collect();
        Encoded::from_entries(&prefabs)
    }

    /// A container's list entry without its state, encoded.
    fn container_prefab(&self, e: &ContainerEntry) -> Prefab {
        let c = self.cri_container(e);
        let head = Container {
            id: c.id,
            pod_sandbox_id: c.pod_sandbox_id,
            metadata: c.metadata,
            image: c.image,
            image_ref: c.image_ref,
            ..Default::default()
        };
        let tail = Container {
            created_at: c.created_at,
            labels: c.labels,
            annotations: c.annotations,
            image_id: c.image_id,
            ..Default::default()
        };
        Prefab::new(&head, &tail)
    }

    /// The containers passing `filter`, with their CRI state.
    fn listed_containers(
        &self,
        filter: Option<&ContainerFilter>,
    ) -> impl Iterator<Item = (Arc<ContainerEntry>, i32)> {
        self.all_containers().into_iter().filter_map(move |e| {
            let state = e.state().to_cri() as i32;
            if let Some(f) = filter
                && (!id_matches(&f.id, &e.meta.id)
                    || !id_matches(&f.pod_sandbox_id, &e.meta.sandbox_id)
                    || f.state.as_ref().is_some_and(|s| s.state != state)
                    || !labels_match(&f.label_selector, &e.meta.config.labels))
            {
                return None;
            }
            Some((e, state))
        })
    }

    /// A container's list entry, in its created state (the state is filled in per call).
    fn cri_container(&self, e: &ContainerEntry) -> Container {
        Container {
            id: e.meta.id.clone(),
            pod_sandbox_id: e.meta.sandbox_id.clone(),
            metadata: e.meta.config.metadata.clone(),
            image: Some(self.image_spec(e)),
            image_ref: e.meta.image_id.clone(),
            state: 0,
            created_at: e.meta.created_at,
            labels: e.meta.config.labels.clone(),
            annotations: e.meta.config.annotations.clone(),
            image_id: e.meta.image_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_parse() {
        assert_eq!(parse_signal("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("quit"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGRTMIN+3"), None);
        assert_eq!(parse_signal("nonsense"), None);
        assert_eq!(parse_signal(""), None);
    }
}

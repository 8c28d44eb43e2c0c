//! Startup after a berthd restart (clean or crash), in two steps.
//!
//! [`Runtime::load_records`] (inside `open`) loads the records and re-reserves their names.
//! [`Runtime::recover`] then settles what happened while berthd was down:
//!
//! - it releases the network of pods that have no record (a crash between network setup
//!   and the sandbox record, or during removal).
//! - it asks the shim to reattach ([`Shim::reattach`]): the external shim reconnects to every
//!   live `berth-shim` and lists its tasks, with the exits (code, time, OOM) its shims
//!   recorded meanwhile; a dead shim's tasks come back exited (`lost` when their code died
//!   with it). Live containers stay running and are driven through their shim as before.
//! - the embedded shim adopts the tasks it recorded: a container whose process still lives
//!   stays running and is driven (exec, stop, ...) as before, but its processes are no longer
//!   berthd's children, so its exit code will be lost (code 255, reason `Unknown`, when the
//!   exit is seen) and so is its output. One whose process is gone comes back exited the
//!   same way, as containerd reports a lost exit (or OOM-killed, when its cgroup says so).
//! - a container the shim returns nothing for (an embedded task a berthd without records
//!   made, or one that cannot be adopted) stays running while its process lives and is
//!   stopped by pid ([`Runtime::stop_container`] falls back to it); once its process is
//!   gone it is recorded exited with code 255 and reason `Unknown`.
//! - records that point at missing resources are reconciled: a ready pod whose namespace
//!   pins or init process are gone (e.g. after a reboot emptied the state dir) becomes
//!   NotReady; a container whose pod record is gone is removed.
//! - finally `repair` removes what no record owns (see `repair.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use berth_shim::{RecoveredTask, Shim, TaskState};
use k8s_cri::v1::NamespaceMode;

use crate::error::Result;
use crate::records::{ContainerStatus, ProcessRef, SandboxStatus};
use crate::state::{ContainerState, SandboxState};
use crate::util::{now_ns, process_alive, process_start_time};
use crate::{ContainerEntry, Runtime, SandboxEntry};

/// Exit code recorded for a container whose exit berthd missed (containerd uses 255 too).
const LOST_EXIT_CODE: i32 = 255;

/// What recovery did, for the log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Containers reattached alive (running or created) through their shim.
    pub reattached: usize,
    /// Containers whose exit while berthd was down was recorded (real code or lost).
    pub exited: usize,
    /// Pods set NotReady because their namespaces or init process are gone.
    pub pods_not_ready: usize,
    /// Orphans removed by the startup repair (tasks, bundles, mounts, pins, cgroups, ...).
    pub orphans_removed: usize,
}

impl<S: Shim + 'static> Runtime<S> {
    /// Loads the records and re-reserves their names; nothing is touched on the system.
    pub(crate) fn load_records(&self) -> Result<()> {
        for (meta, status) in self.store.load_sandboxes()? {
            let status = status.unwrap_or(SandboxStatus { state: SandboxState::NotReady });
            if let Err(holder) = self.names.reserve(&meta.name, &meta.id) {
                tracing::warn!(pod_id = %meta.id, %holder, "duplicate pod name in the store");
            }
            self.insert_sandbox(SandboxEntry::new(meta, status));
        }
        for (meta, status) in self.store.load_containers()? {
            let status = status.unwrap_or_default();
            if let Err(holder) = self.names.reserve(&meta.name, &meta.id) {
                tracing::warn!(container_id = %meta.id, %holder, "duplicate container name in the store");
            }
            self.shim.bind_container(&meta.id, &meta.sandbox_id);
            self.insert_container(ContainerEntry::new(meta, status));
        }
        Ok(())
    }

    /// Settles the state a previous berthd left (see the module docs): reattaches to live
    /// tasks, records the exits that happened while berthd was down, reconciles records
    /// whose resources are gone and removes orphans. Call once after `open`, before serving
    /// CRI calls. Failures on single objects are logged, not returned: a broken record must
    /// not keep the node's runtime down.
    pub async fn recover(self: &Arc<Self>) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        // Pods whose record is gone keep no network (each is logged; the report does not
        // count them).
        self.release_vanished_networks().await;
        let tasks: HashMap<String, RecoveredTask> = match self.shim.reattach().await {
            Ok(tasks) => tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot reattach to the shims' tasks");
                HashMap::new()
            }
        };
        for entry in self.all_containers() {
            match self.reconcile_container(&entry, tasks.get(&entry.meta.id)) {
                Ok(Settled::Alive) => report.reattached += 1,
                Ok(Settled::Exited) => report.exited += 1,
                Ok(Settled::Unchanged) => {}
                Err(e) => {
                    tracing::error!(container_id = %entry.meta.id, error = %e, "cannot reconcile container")
                }
            }
        }
        // Exited containers keep no task: delete what their runtime still has (an exit while
        // berthd was down, or a background delete that berthd's stop interrupted). In the
        // background: removal waits for it, nothing else needs it.
        for entry in self.all_containers() {
            match entry.state() {
                ContainerState::Exited => self.spawn_task_delete(entry),
                // Never started, but a StartContainer the crash interrupted may have left
                // the runtime's container, even running: remove it, so the record's
                // "created" is true and a retried start can use the id.
                _ if entry.status().awaits_task() && !tasks.contains_key(&entry.meta.id) => {
                    crate::container::runtime_delete_orphan(&entry).await
                }
                _ => {}
            }
        }
        for entry in self.all_sandboxes() {
            match self.reconcile_sandbox(&entry) {
                Ok(true) => report.pods_not_ready += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(pod_id = %entry.meta.id, error = %e, "cannot reconcile pod sandbox")
                }
            }
        }
        // A container whose pod record is gone can never be listed with its pod again.
        for entry in self.all_containers() {
            if self.sandbox(&entry.meta.sandbox_id).is_none() {
                tracing::warn!(container_id = %entry.meta.id, pod_id = %entry.meta.sandbox_id, "container of a missing pod; removing it");
                let _op = entry.op.lock().await;
                match self.remove_container_locked(&entry).await {
                    Ok(()) => report.orphans_removed += 1,
                    Err(e) => {
                        tracing::error!(container_id = %entry.meta.id, error = %e, "cannot remove container of a missing pod")
                    }
                }
            }
        }
        // Tasks nobody recorded: a create interrupted after the shim made the task.
        for (id, task) in &tasks {
            if self.container(id).is_none() {
                tracing::info!(container_id = %id, pod_id = %task.pod_id, "deleting task without a container record");
                match self.shim.delete(id).await {
                    Ok(()) => report.orphans_removed += 1,
                    Err(e) => {
                        tracing::warn!(container_id = %id, error = %e, "cannot delete orphan task")
                    }
                }
            }
        }
        report.orphans_removed += self.repair().await;
        self.refresh_gauges();
        tracing::info!(
            reattached = report.reattached,
            exited = report.exited,
            pods_not_ready = report.pods_not_ready,
            orphans_removed = report.orphans_removed,
            "recovery finished"
        );
        Ok(report)
    }

    /// Brings one container's record in line with its task.
    fn reconcile_container(
        &self,
        entry: &ContainerEntry,
        task: Option<&RecoveredTask>,
    ) -> Result<Settled> {
        let status = entry.status();
        if !matches!(status.state, ContainerState::Running | ContainerState::Created) {
            return Ok(Settled::Unchanged);
        }
        let id = &entry.meta.id;
        match task.map(|t| &t.state) {
            Some(TaskState::Exited(exit)) => {
                tracing::info!(container_id = %id, code = exit.code, oom = exit.oom_killed, lost = exit.lost, "container exited while berthd was down");
                self.record_exit(id, *exit);
                Ok(Settled::Exited)
            }
            Some(&TaskState::Running { pid }) | Some(&TaskState::Created { pid }) => {
                let running = matches!(task.map(|t| &t.state), Some(TaskState::Running { .. }));
                let started = now_ns();
                self.update_container(entry, |s| {
                    let mut changed = false;
                    if s.process.map(|p| p.pid) != Some(pid) {
                        s.process = Some(ProcessRef { pid, start_time: process_start_time(pid) });
                        changed = true;
                    }
                    // berthd died between the shim's start and writing the new state.
                    if running && s.state == ContainerState::Created {
                        s.state = ContainerState::Running;
                        s.started_at = started;
                        changed = true;
                    }
                    changed
                })?;
                tracing::info!(container_id = %id, pid, "reattached to container");
                Ok(Settled::Alive)
            }
            // Created and never started: no process was recorded because none ran.
            None if status.awaits_task() => Ok(Settled::Unchanged),
            None => {
                let alive = status.process.is_some_and(|p| process_alive(p.pid, p.start_time));
                if alive {
                    // Not adopted by the shim, yet outlived berthd: stop falls back to its pid.
                    return Ok(Settled::Unchanged);
                }
                self.update_container(entry, |s| {
                    *s = ContainerStatus {
                        state: ContainerState::Exited,
                        finished_at: now_ns(),
                        exit_code: LOST_EXIT_CODE,
                        reason: "Unknown".into(),
                        message: "container process lost while berthd was down".into(),
                        ..s.clone()
                    };
                    true
                })?;
                tracing::info!(container_id = %id, "container process lost while berthd was down");
                Ok(Settled::Exited)
            }
        }
    }

    /// A lost exit means the container's shim died, not necessarily the container: its
    /// process, reparented to init, may still run. Kill it, so that "exited" is true and the
    /// kubelet's replacement does not run next to it. (Killing the init of a PID namespace
    /// kills the namespace.) Usually it is gone already (an adopted task's exit was seen, or
    /// the shim found it gone): then its PID names nothing, or another process, which must
    /// not be killed, so only the process with the recorded start time is.
    pub(crate) fn kill_lost_process(&self, entry: &ContainerEntry) {
        if let Some(p) = entry.status().process
            && p.start_time.is_some()
            && process_alive(p.pid, p.start_time)
            && let Ok(pid) = i32::try_from(p.pid)
        {
            tracing::warn!(container_id = %entry.meta.id, pid, "killing the process of a container whose shim died");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// A ready pod whose pinned namespaces, shm or init process are gone cannot run
    /// containers any more: NotReady (the kubelet then recreates it). Returns whether it
    /// changed.
    fn reconcile_sandbox(&self, entry: &SandboxEntry) -> Result<bool> {
        if entry.status().state != SandboxState::Ready {
            return Ok(false);
        }
        let m = &entry.meta;
        let pins_gone = [&m.netns, &m.ipcns, &m.utsns]
            .into_iter()
            .flatten()
            .any(|p| !crate::repair::is_mount_point(p));
        let shm_gone = m.shm.as_ref().is_some_and(|p| !crate::repair::is_mount_point(p));
        let init_gone = m.pid_mode == NamespaceMode::Pod as i32
            && m.pod_init.is_none_or(|p| !process_alive(p.pid, p.start_time));
        if !(pins_gone || shm_gone || init_gone || !m.dir.is_dir()) {
            return Ok(false);
        }
        tracing::warn!(pod_id = %m.id, pins_gone, shm_gone, init_gone, "pod sandbox lost its resources; marking it NotReady");
        self.set_sandbox_state(entry, SandboxState::NotReady)?;
        Ok(true)
    }
}

/// What reconciling one container came to.
enum Settled {
    /// Its task lives (reattached).
    Alive,
    /// Its exit was recorded now.
    Exited,
    /// Nothing to do.
    Unchanged,
}

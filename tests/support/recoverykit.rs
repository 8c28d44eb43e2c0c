//! Helpers for the restart-recovery tests (`recovery.rs`): a daemon on a chosen shim with a
//! cgroup parent of its own, crash-restarts, and a leak check of everything a pod or
//! container can leave behind. Included with `#[path]` next to `podkit.rs`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use berth_e2e::Options;
use k8s_cri::v1::*;

use crate::podkit::Env;

/// A daemon (shim `shim`) whose pods live under a cgroup parent no other test uses.
pub struct RecoveryEnv {
    /// The pod/container test environment.
    pub env: Env,
    /// `[runtime] cgroup_parent` of the daemon (e.g. `/berth-e2e-123-0`).
    pub cgroup_parent: String,
}

impl RecoveryEnv {
    /// Starts a registry and berthd with `shim`, pushes and pulls busybox.
    pub async fn start(shim: &str) -> Result<Self> {
        Self::start_with_shim_binary(shim, None).await
    }

    /// [`RecoveryEnv::start`] with `[runtime] shim_binary`.
    pub async fn start_with_shim_binary(shim: &str, shim_binary: Option<PathBuf>) -> Result<Self> {
        let cgroup_parent = berth_e2e::cgroups::unique_parent();
        let env = Env::start_with(Options {
            shim: Some(shim.to_string()),
            cgroup_parent: Some(cgroup_parent.clone()),
            shim_binary,
            ..Default::default()
        })
        .await?;
        Ok(Self { env, cgroup_parent })
    }

    /// `kill -9` berthd, then start it again (waits until recovery has finished).
    pub async fn crash_and_restart(&mut self) -> Result<()> {
        self.env.d.kill9();
        self.env.d.start_again().await?;
        let log = || format!("berthd log:\n{}", self.env.d.log_tail(40));
        self.env.rt = self.env.d.runtime().await.with_context(log)?;
        Ok(())
    }

    /// Removes every pod and container berthd lists.
    pub async fn remove_everything(&mut self) -> Result<()> {
        let rt = &mut self.env.rt;
        let ctrs = rt.list_containers(ListContainersRequest { filter: None }).await?.into_inner();
        for c in ctrs.containers {
            rt.remove_container(RemoveContainerRequest { container_id: c.id }).await?;
        }
        let pods = rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?.into_inner();
        for p in pods.items {
            rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: p.id.clone() }).await?;
            rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: p.id }).await?;
        }
        Ok(())
    }

    /// Everything left behind that belongs to no pod or container: mounts under the test
    /// dir, shim processes and task state, namespace pins, bundles, pod dirs, OCI runtime
    /// state, writable snapshot layers, cgroups under the daemon's cgroup parent. Empty when
    /// clean.
    pub fn leaks(&self) -> Vec<String> {
        let d = &self.env.d;
        let mut out = Vec::new();
        for m in berth_e2e::mounts::mounts_under(d.dir()) {
            out.push(format!("mount {}", m.display()));
        }
        let state = d.state();
        for sub in ["pods", "containers", "shim", "shims", "runtime/runc", "runtime/crun"] {
            for e in entries(&state.join(sub)) {
                out.push(format!("{sub}/{}", e.display()));
            }
        }
        for e in entries(&d.root().join("snapshots/active")) {
            out.push(format!("active snapshot {}", e.display()));
        }
        for pid in shim_processes(d.dir()) {
            out.push(format!("shim process {pid}"));
        }
        for dir in cgroup_dirs(&self.cgroup_parent) {
            for e in entries(&dir).into_iter().filter(|e| e.is_dir()) {
                out.push(format!("cgroup {}", e.display()));
            }
        }
        out
    }

    /// The host pid of a container's init, from its verbose status.
    pub async fn pid_of(&mut self, ctr: &str) -> Result<i32> {
        let (_, info) = self.env.verbose_status(ctr).await?;
        Ok(info["pid"].as_i64().context("no pid")? as i32)
    }

    /// The pid of pod `pod`'s `berth-shim`.
    pub fn shim_pid(&self, pod: &str) -> Result<i32> {
        let path = self.env.d.state().join("shims").join(pod).join("shim.pid");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        Ok(text.trim().parse()?)
    }
}

/// The entries of `dir` (none when it is missing).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// Live (non-zombie) `berth-shim` processes whose arguments mention `dir`.
pub fn shim_processes(dir: &Path) -> Vec<i32> {
    let marker = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in entries(Path::new("/proc")) {
        let Some(pid) = e.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let zombie = std::fs::read_to_string(e.join("stat"))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
            .unwrap_or(true);
        if cmdline.contains("berth-shim") && cmdline.contains(&marker) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// `<hierarchy>/<parent>` for every cgroup hierarchy that has it.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    berth_e2e::cgroups::dirs_of(parent)
}

/// Removes the (empty) cgroup parent directories the test's daemon made.
pub fn remove_cgroup_parent(parent: &str) {
    for dir in cgroup_dirs(parent) {
        let _ = std::fs::remove_dir(dir);
    }
}

/// `(Rss, Pss)` of process `pid` in kB, from `/proc/<pid>/smaps_rollup`.
pub fn rss_pss_kb(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(k).map(|v| v.trim().trim_end_matches(" kB").trim().to_string())
            })
            .and_then(|v| v.parse().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// A small pseudo-random number (no `rand` dependency): nanoseconds of the clock, mixed.
pub fn random(bound: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    if bound == 0 { 0 } else { mixed % bound }
}

//! ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats: read from the
//! cgroup files and the writable layer.

use berth_shim::Shim;
use k8s_cri::v1::{
    ContainerAttributes, ContainerStats, ContainerStatsFilter, CpuUsage, FilesystemIdentifier,
    FilesystemUsage, LinuxPodSandboxStats, MemoryUsage, PodSandboxAttributes, PodSandboxStats,
    PodSandboxStatsFilter, UInt64Value,
};

use crate::error::{Result, RuntimeError};
use crate::filters::{id_matches, labels_match};
use crate::state::ContainerState;
use crate::util::now_ns;
use crate::{ContainerEntry, Runtime, SandboxEntry, cgroups};

fn value(v: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value: v })
}

impl<S: Shim + 'static> Runtime<S> {
    fn cpu(&self, cgroups_path: &str, ts: i64) -> Option<CpuUsage> {
        cgroups::cpu_usage_ns(&self.config.cgroup_root, cgroups_path, self.cgroup_v2).map(|ns| {
            CpuUsage { timestamp: ts, usage_core_nano_seconds: value(ns), usage_nano_cores: None }
        })
    }

    fn memory(&self, cgroups_path: &str, ts: i64) -> Option<MemoryUsage> {
        cgroups::memory_usage(&self.config.cgroup_root, cgroups_path, self.cgroup_v2).map(
            |(usage, ws)| MemoryUsage {
                timestamp: ts,
                working_set_bytes: value(ws),
                usage_bytes: value(usage),
                ..Default::default()
            },
        )
    }

    fn stats_of(&self, entry: &ContainerEntry) -> ContainerStats {
        let ts = now_ns();
        let m = &entry.meta;
        let alive =
            matches!(entry.status().state, ContainerState::Running | ContainerState::Created);
        let writable_layer = self.snapshots.rootfs_usage(&m.id).ok().map(|u| FilesystemUsage {
            timestamp: ts,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: self.snapshots.root().to_string_lossy().into_owned(),
            }),
            used_bytes: value(u.bytes),
            inodes_used: value(u.inodes),
        });
        ContainerStats {
            attributes: Some(ContainerAttributes {
                id: m.id.clone(),
                metadata: m.config.metadata.clone(),
                labels: m.config.labels.clone(),
                annotations: m.config.annotations.clone(),
            }),
            cpu: if alive { self.cpu(&m.cgroups_path, ts) } else { None },
            memory: if alive { self.memory(&m.cgroups_path, ts) } else { None },
            writable_layer,
            swap: None,
        }
    }

    /// ContainerStats.
    pub fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let entry = self
            .find_container(id)
            .ok_or_else(|| RuntimeError::ContainerNotFound(id.to_owned()))?;
        Ok(self.stats_of(&entry))
    }

    /// ListContainerStats.
    pub fn list_container_stats(
        &self,
        filter: Option<&ContainerStatsFilter>,
    ) -> Vec<ContainerStats> {
        self.all_containers()
            .into_iter()
            .filter(|e| {
                filter.is_none_or(|f| {
                    id_matches(&f.id, &e.meta.id)
                        && id_matches(&f.pod_sandbox_id, &e.meta.sandbox_id)
                        && labels_match(&f.label_selector, &e.meta.config.labels)
                })
            })
            .map(|e| self.stats_of(&e))
            .collect()
    }

    fn pod_stats_of(&self, entry: &SandboxEntry) -> PodSandboxStats {
        let ts = now_ns();
        let m = &entry.meta;
        let containers: Vec<ContainerStats> =
            self.containers_of(&m.id).iter().map(|c| self.stats_of(c)).collect();
        PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: m.id.clone(),
                metadata: m.config.metadata.clone(),
                labels: m.config.labels.clone(),
                annotations: m.config.annotations.clone(),
            }),
            linux: Some(LinuxPodSandboxStats {
                cpu: self.cpu(&m.cgroup_parent, ts),
                memory: self.memory(&m.cgroup_parent, ts),
                network: None,
                process: None,
                containers,
            }),
            windows: None,
        }
    }

    /// PodSandboxStats.
    pub fn pod_sandbox_stats(&self, id: &str) -> Result<PodSandboxStats> {
        let entry =
            self.find_sandbox(id).ok_or_else(|| RuntimeError::SandboxNotFound(id.to_owned()))?;
        Ok(self.pod_stats_of(&entry))
    }

    /// ListPodSandboxStats.
    pub fn list_pod_sandbox_stats(
        &self,
        filter: Option<&PodSandboxStatsFilter>,
    ) -> Vec<PodSandboxStats> {
        self.all_sandboxes()
            .into_iter()
            .filter(|e| {
                filter.is_none_or(|f| {
                    id_matches(&f.id, &e.meta.id)
                        && labels_match(&f.label_selector, &e.meta.config.labels)
                })
            })
            .map(|e| self.pod_stats_of(&e))
            .collect()
    }
}

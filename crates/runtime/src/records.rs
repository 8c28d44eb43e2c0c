//! The records the runtime keeps per pod sandbox and container: an immutable metadata
//! record (what was asked for and what was made) and a small mutable status, stored apart.

use std::path::PathBuf;

use k8s_cri::v1::{ContainerConfig, LinuxContainerResources, PodSandboxConfig};
use serde::{Deserialize, Serialize};

use crate::state::{ContainerState, SandboxState};

/// CRI protobuf messages are stored as hex of their protobuf encoding: exact round trips of
/// labels, annotations and every field the kubelet sent, without serde support in prost.
mod proto {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<M: prost::Message, S: Serializer>(m: &M, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(m.encode_to_vec()))
    }

    pub fn deserialize<'de, M: prost::Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<M, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        M::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

/// Optional protobuf message, same encoding.
mod proto_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<M: prost::Message, S: Serializer>(
        m: &Option<M>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_some(&hex::encode(m.encode_to_vec())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, M: prost::Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<M>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        M::decode(bytes.as_slice()).map(Some).map_err(serde::de::Error::custom)
    }
}

/// A process we started, named for good by its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Host pid.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: Option<u64>,
}

/// What a pod sandbox is: written once when it is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxMeta {
    /// 64 hex digits.
    pub id: String,
    /// The reserved name `<name>_<namespace>_<uid>_<attempt>`.
    pub name: String,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
    /// The runtime handler (resolved: never empty).
    pub runtime_handler: String,
    /// The config as the kubelet sent it.
    #[serde(with = "proto")]
    pub config: PodSandboxConfig,
    /// `<state>/pods/<id>`.
    pub dir: PathBuf,
    /// The cgroup parent of the pod's containers (cgroupfs path).
    pub cgroup_parent: String,
    /// Whether berth created `cgroup_parent` (and removes it with the pod).
    pub owns_cgroup: bool,
    /// Pinned namespaces (`None`: the host's).
    pub netns: Option<PathBuf>,
    /// IPC namespace pin.
    pub ipcns: Option<PathBuf>,
    /// UTS namespace pin.
    pub utsns: Option<PathBuf>,
    /// The pod's `/dev/shm` tmpfs mount point (`None` with host IPC).
    pub shm: Option<PathBuf>,
    /// `/etc/hosts` for the containers.
    pub hosts: PathBuf,
    /// `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    /// `/etc/hostname`.
    pub hostname_file: PathBuf,
    /// The pod's hostname.
    pub hostname: String,
    /// Validated sysctls.
    pub sysctls: Vec<(String, String)>,
    /// The PID namespace mode (CRI `NamespaceMode`).
    pub pid_mode: i32,
    /// The pod's init process (PID mode POD).
    pub pod_init: Option<ProcessRef>,
}

/// A pod sandbox's mutable status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// Ready or not.
    pub state: SandboxState,
}

/// What a container is: written once when it is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerMeta {
    /// 64 hex digits.
    pub id: String,
    /// Its pod.
    pub sandbox_id: String,
    /// The reserved name `<name>_<pod name>_<namespace>_<uid>_<attempt>`.
    pub name: String,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
    /// The config as the kubelet sent it.
    #[serde(with = "proto")]
    pub config: ContainerConfig,
    /// The image id (`sha256:...`).
    pub image_id: String,
    /// The chain id of the image's top layer (what the rootfs is built on).
    #[serde(default)]
    pub chain_id: String,
    /// The bundle directory (`<state>/containers/<id>`).
    pub bundle: PathBuf,
    /// The CRI log file, if any.
    pub log_path: Option<PathBuf>,
    /// `cgroupsPath` of the spec.
    pub cgroups_path: String,
    /// The runtime handler.
    pub runtime_handler: String,
    /// The OCI runtime binary.
    pub runtime: PathBuf,
    /// The runtime's `--root`.
    pub runtime_root: PathBuf,
    /// The signal that asks it to stop (image `StopSignal`, default SIGTERM).
    pub stop_signal: i32,
}

/// A container's mutable status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// Where it is in its life.
    pub state: ContainerState,
    /// Its main process (from start on; a container created by an older berthd has its
    /// runtime init here from create on).
    pub process: Option<ProcessRef>,
    /// Start time, ns (0: not started).
    pub started_at: i64,
    /// Exit time, ns (0: not exited).
    pub finished_at: i64,
    /// Exit code.
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, ...
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Resources set by UpdateContainerResources (`None`: as created).
    #[serde(with = "proto_opt", default)]
    pub resources: Option<LinuxContainerResources>,
}

impl ContainerStatus {
    /// Created, and no runtime process made for it yet: StartContainer makes its task.
    pub(crate) fn awaits_task(&self) -> bool {
        self.state == ContainerState::Created && self.process.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::PodSandboxMetadata;

    #[test]
    fn configs_round_trip_through_json() {
        let mut config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "p".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 2,
            }),
            ..Default::default()
        };
        config.labels.insert("a".into(), "b".into());
        let meta = SandboxMeta {
            id: "x".into(),
            name: "p_n_u_2".into(),
            created_at: 1,
            runtime_handler: "runc".into(),
            config: config.clone(),
            dir: "/d".into(),
            cgroup_parent: "/berth/pod-x".into(),
            owns_cgroup: true,
            netns: None,
            ipcns: None,
            utsns: None,
            shm: None,
            hosts: "/h".into(),
            resolv_conf: "/r".into(),
            hostname_file: "/n".into(),
            hostname: "p".into(),
            sysctls: vec![],
            pid_mode: 1,
            pod_init: None,
        };
        let json = serde_json::to_vec(&meta).expect("ser");
        let back: SandboxMeta = serde_json::from_slice(&json).expect("de");
        assert_eq!(back.config, config);
        let status = ContainerStatus {
            resources: Some(LinuxContainerResources { cpu_shares: 5, ..Default::default() }),
            ..Default::default()
        };
        let json = serde_json::to_vec(&status).expect("ser");
        let back: ContainerStatus = serde_json::from_slice(&json).expect("de");
        assert_eq!(back.resources.map(|r| r.cpu_shares), Some(5));
    }
}

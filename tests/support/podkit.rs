//! Helpers for the pod and container tests (`pods.rs`, `containers.rs`): one daemon and one
//! registry with the busybox fixture pulled, and builders for pod and container configs.
//! Included by those test files with `#[path]`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_e2e::{Berthd, Options, Registry, fixtures, image_spec};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

/// A daemon with the busybox image pulled, a registry, and a log directory.
pub struct Env {
    /// The daemon (dropped after the test: stops, unmounts).
    pub d: Berthd,
    /// The registry (kept alive for the daemon).
    pub reg: Registry,
    /// The runtime client.
    pub rt: RuntimeServiceClient<Channel>,
    /// The busybox image reference as pulled.
    pub image: String,
    /// The image id.
    pub image_id: String,
    /// Pod log directories live here.
    pub logs: tempfile::TempDir,
}

impl Env {
    /// Starts a registry and berthd, pushes and pulls busybox.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// [`Env::start`] with `options` for the daemon's config.
    pub async fn start_with(options: Options) -> Result<Self> {
        let reg = Registry::start().await?;
        let pushed = fixtures::push_busybox(&reg).await?;
        let d = Berthd::start_with(options).await?;
        let image = pushed.reference();
        let resp = d
            .images()
            .await?
            .pull_image(PullImageRequest { image: Some(image_spec(&image)), ..Default::default() })
            .await
            .context("pull busybox")?
            .into_inner();
        let rt = d.runtime().await?;
        let logs = tempfile::Builder::new().prefix("berth-logs").tempdir_in("/tmp")?;
        Ok(Self { d, reg, rt, image, image_id: resp.image_ref, logs })
    }

    /// The log directory for pod `name`.
    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.logs.path().join(name)
    }

    /// A pod config named `name` (uid `<name>-uid`, namespace `default`), PID mode CONTAINER
    /// like the kubelet's default, logs under [`Env::log_dir`].
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        pod_config(name, &self.log_dir(name))
    }

    /// RunPodSandbox with `config`.
    pub async fn run_pod(&mut self, config: PodSandboxConfig) -> Result<String> {
        Ok(self
            .rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id)
    }

    /// A container config running busybox with `args` as its command.
    pub fn container_config(&self, name: &str, args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(image_spec(&self.image)),
            command: args.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}/0.log"),
            ..Default::default()
        }
    }

    /// CreateContainer in `pod`.
    pub async fn create(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        Ok(self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    /// CreateContainer + StartContainer.
    pub async fn run(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        let id = self.create(pod, pod_config, config).await?;
        self.rt.start_container(StartContainerRequest { container_id: id.clone() }).await?;
        Ok(id)
    }

    /// ContainerStatus.
    pub async fn status(&mut self, id: &str) -> Result<ContainerStatus> {
        self.rt
            .container_status(ContainerStatusRequest { container_id: id.into(), verbose: false })
            .await?
            .into_inner()
            .status
            .context("no status")
    }

    /// Verbose ContainerStatus: the status and the decoded `info` JSON (pid, spec, ...).
    pub async fn verbose_status(
        &mut self,
        id: &str,
    ) -> Result<(ContainerStatus, serde_json::Value)> {
        let r = self
            .rt
            .container_status(ContainerStatusRequest { container_id: id.into(), verbose: true })
            .await?
            .into_inner();
        let info = r.info.get("info").context("no verbose info")?;
        Ok((r.status.context("no status")?, serde_json::from_str(info)?))
    }

    /// Waits until the container has exited; returns its status.
    pub async fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(id).await?;
            if s.state == ContainerState::ContainerExited as i32 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("container {id} did not exit within {timeout:?}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// ExecSync.
    pub async fn exec(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<ExecSyncResponse, tonic::Status> {
        self.rt
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// StopPodSandbox + RemovePodSandbox.
    pub async fn remove_pod(&mut self, id: &str) -> Result<()> {
        self.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.into() }).await?;
        self.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.into() }).await?;
        Ok(())
    }

    /// The daemon's state dir.
    pub fn state(&self) -> PathBuf {
        self.d.state()
    }
}

/// A pod config (see [`Env::pod_config`]).
pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        labels: [("app".to_string(), name.to_string())].into(),
        annotations: [("berth.test/annotation".to_string(), "value with spaces".to_string())]
            .into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sets the pod's namespace options.
pub fn with_namespaces(mut config: PodSandboxConfig, ns: NamespaceOption) -> PodSandboxConfig {
    let linux = config.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    sc.namespace_options = Some(ns);
    config
}

/// Reads the CRI log file and returns (stream, tag, content) per line.
pub fn read_log(path: &Path) -> Result<Vec<(String, String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(ts), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("bad log line {line:?}");
        };
        if !ts.contains('T') {
            bail!("bad timestamp in {line:?}");
        }
        out.push((stream.to_string(), tag.to_string(), parts.next().unwrap_or("").to_string()));
    }
    Ok(out)
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

/// Whether the test must be skipped here (root needed); says so on stderr (`SKIPPED`).
pub fn skip() -> bool {
    if !berth_e2e::is_root() {
        berth_e2e::report_skip("needs root");
        return true;
    }
    false
}

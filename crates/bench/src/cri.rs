//! A CRI client over a unix socket, the configs the scenarios create, and a best-effort sweep
//! of everything the bench created.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, ContainerMetadata, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, ListContainersRequest,
    ListPodSandboxRequest, PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata,
    PullImageRequest, RemoveContainerRequest, RemovePodSandboxRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::stats::Samples;

/// Label on every pod and container the bench creates, so a sweep finds leftovers.
pub const BENCH_LABEL: &str = "berth-bench";
/// Label carrying the id of one bench run.
pub const RUN_LABEL: &str = "berth-bench/run";

/// The container command: a shell that exits on SIGTERM. A plain `sleep` would be PID 1 of
/// its PID namespace and, having no handler, ignore SIGTERM: StopContainer would then always
/// wait out its timeout.
pub fn sleeper_args() -> Vec<String> {
    ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM INT; /bin/busybox sleep 3600 & wait"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Both CRI services on one connection (HTTP/2 multiplexes concurrent calls).
#[derive(Clone)]
pub struct Cri {
    /// RuntimeService.
    pub rt: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub img: ImageServiceClient<Channel>,
    /// The connection both clients share, for calls outside the generated clients.
    pub channel: Channel,
}

impl Cri {
    /// Connects to `endpoint` (`unix:///path` or a plain path); every call times out after
    /// `timeout`.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self> {
        let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
        // The URI is a placeholder: the connector dials the unix socket.
        let channel = Endpoint::try_from("http://[::]:50051")?
            .timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .with_context(|| format!("connecting to {endpoint}"))?;
        Ok(Self {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel.clone()),
            channel,
        })
    }

    /// Removes `image`, ignoring errors: absent is what the callers want (NotFound
    /// included).
    pub async fn remove_image_quietly(&mut self, image: &str) {
        let req = k8s_cri::v1::RemoveImageRequest { image: Some(image_spec(image)) };
        let _ = self.img.remove_image(req).await;
    }

    /// Pulls `image` unless the runtime already has it.
    pub async fn ensure_image(&mut self, image: &str) -> Result<()> {
        let req = PullImageRequest { image: Some(image_spec(image)), ..Default::default() };
        self.img.pull_image(req).await.with_context(|| format!("PullImage {image}"))?;
        Ok(())
    }

    /// Stops and removes pod `id` (which removes its containers), ignoring errors: used on
    /// error paths, where the first error is the one worth reporting.
    pub async fn remove_pod_quietly(&mut self, id: &str) {
        let _ = self.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.into() }).await;
        let _ =
            self.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.into() }).await;
    }

    /// Removes every container and pod labelled by the bench (of run `run`, or of any run).
    /// Returns how many pods it removed.
    pub async fn sweep(&mut self, run: Option<&str>) -> Result<usize> {
        let mut sel = HashMap::from([(BENCH_LABEL.to_string(), "1".to_string())]);
        if let Some(r) = run {
            sel.insert(RUN_LABEL.into(), r.into());
        }
        let containers = self
            .rt
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter { label_selector: sel.clone(), ..Default::default() }),
            })
            .await
            .context("ListContainers")?
            .into_inner()
            .containers;
        for c in containers {
            let _ = self
                .rt
                .stop_container(StopContainerRequest { container_id: c.id.clone(), timeout: 0 })
                .await;
            let _ = self.rt.remove_container(RemoveContainerRequest { container_id: c.id }).await;
        }
        let pods = self
            .rt
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter { label_selector: sel, ..Default::default() }),
            })
            .await
            .context("ListPodSandbox")?
            .into_inner()
            .items;
        let n = pods.len();
        for p in pods {
            self.remove_pod_quietly(&p.id).await;
        }
        Ok(n)
    }
}

/// An image spec for `image`.
pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.to_string(), ..Default::default() }
}

fn labels(run: &str) -> HashMap<String, String> {
    HashMap::from([
        (BENCH_LABEL.to_string(), "1".to_string()),
        (RUN_LABEL.to_string(), run.to_string()),
    ])
}

/// A pod config with a unique name and uid (`name` must be unique within the run).
pub fn pod_config(run: &str, name: &str, cgroup_parent: Option<&str>) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("{name}-{run}"),
            uid: uuid::Uuid::new_v4().to_string(),
            namespace: "berth-bench".into(),
            attempt: 0,
        }),
        hostname: "bench".into(),
        labels: labels(run),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.unwrap_or_default().to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config running `args` from `image`.
pub fn container_config(run: &str, name: &str, image: &str, args: Vec<String>) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(image_spec(image)),
        args,
        labels: labels(run),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext::default()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Awaits `call`, recording its duration under `name` when it succeeds.
pub async fn timed<T, F>(samples: &mut Samples, name: &str, call: F) -> Result<T>
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let start = Instant::now();
    let r = call.await.with_context(|| name.to_string())?;
    samples.record(name, start.elapsed());
    Ok(r.into_inner())
}

/// A fresh id for one bench run, short enough for pod names.
pub fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

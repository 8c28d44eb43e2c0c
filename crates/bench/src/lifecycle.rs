//! The pod lifecycle scenario: the nine calls a kubelet makes for a one-container pod, first
//! one pod at a time, then `concurrency` pods at once.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_cri::v1::{
    ContainerState, ContainerStatusRequest, CreateContainerRequest, ListContainersRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};

use crate::cri::{Cri, container_config, pod_config, sleeper_args, timed};
use crate::report::Report;
use crate::stats::Samples;

/// The calls in the order one cycle makes them; also the table order.
pub const CALLS: &[&str] = &[
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "ContainerStatus",
    "ListContainers",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
    "cycle",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Cycles per phase.
    pub iterations: usize,
    /// Pods in flight in the concurrent phase.
    pub concurrency: usize,
    /// Unmeasured cycles first (caches, first pull of the pause image...).
    pub warmup: usize,
    /// The container image.
    pub image: String,
    /// StopContainer's grace period in seconds.
    pub stop_timeout: i64,
    /// `linux.cgroup_parent` of the pods.
    pub cgroup_parent: Option<String>,
}

/// Runs the scenario, adding its figures to `report`.
pub async fn run(cri: &Cri, run: &str, p: &Params, report: &mut Report) -> Result<()> {
    let mut c = cri.clone();
    c.ensure_image(&p.image).await?;
    for i in 0..p.warmup {
        cycle(cri.clone(), run, format!("warm{i}"), p).await?;
    }

    let mut seq = Samples::default();
    let start = Instant::now();
    for i in 0..p.iterations {
        seq.merge(cycle(cri.clone(), run, format!("seq{i}"), p).await?);
    }
    let seq_wall = start.elapsed();
    report.push_latencies("lifecycle seq", &seq, CALLS);
    report.push("lifecycle seq pods/s", pods_per_sec(p.iterations, seq_wall), "pods/s");

    let mut conc = Samples::default();
    let start = Instant::now();
    let mut results = futures::stream::iter(0..p.iterations)
        .map(|i| cycle(cri.clone(), run, format!("conc{i}"), p))
        .buffer_unordered(p.concurrency.max(1));
    let mut first_err = None;
    while let Some(r) = results.next().await {
        match r {
            Ok(s) => conc.merge(s),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let conc_wall = start.elapsed();
    if let Some(e) = first_err {
        return Err(e);
    }
    let prefix = format!("lifecycle c={}", p.concurrency);
    report.push_latencies(&prefix, &conc, CALLS);
    report.push(format!("{prefix} pods/s"), pods_per_sec(p.iterations, conc_wall), "pods/s");
    Ok(())
}

fn pods_per_sec(n: usize, wall: Duration) -> f64 {
    let s = wall.as_secs_f64();
    if s > 0.0 { crate::report::round3(n as f64 / s) } else { f64::NAN }
}

/// One pod from RunPodSandbox to RemovePodSandbox; on error, removes what it created.
async fn cycle(mut cri: Cri, run: &str, name: String, p: &Params) -> Result<Samples> {
    let mut samples = Samples::default();
    let mut pod_id = None;
    let r = cycle_inner(&mut cri, run, &name, p, &mut samples, &mut pod_id).await;
    if r.is_err()
        && let Some(id) = pod_id
    {
        cri.remove_pod_quietly(&id).await;
    }
    r.map(|()| samples)
}

async fn cycle_inner(
    cri: &mut Cri,
    run: &str,
    name: &str,
    p: &Params,
    s: &mut Samples,
    pod_id: &mut Option<String>,
) -> Result<()> {
    let start = Instant::now();
    let pod_cfg = pod_config(run, name, p.cgroup_parent.as_deref());
    let req =
        RunPodSandboxRequest { config: Some(pod_cfg.clone()), runtime_handler: String::new() };
    let id = timed(s, "RunPodSandbox", cri.rt.run_pod_sandbox(req)).await?.pod_sandbox_id;
    *pod_id = Some(id.clone());

    let req = CreateContainerRequest {
        pod_sandbox_id: id.clone(),
        config: Some(container_config(run, "sleeper", &p.image, sleeper_args())),
        sandbox_config: Some(pod_cfg),
    };
    let cid = timed(s, "CreateContainer", cri.rt.create_container(req)).await?.container_id;
    let req = StartContainerRequest { container_id: cid.clone() };
    timed(s, "StartContainer", cri.rt.start_container(req)).await?;
    let req = ContainerStatusRequest { container_id: cid.clone(), verbose: false };
    let st = timed(s, "ContainerStatus", cri.rt.container_status(req)).await?;
    let state = st.status.map(|x| x.state).unwrap_or_default();
    if state != ContainerState::ContainerRunning as i32 {
        bail!("container {cid} not running after StartContainer (state {state})");
    }
    timed(s, "ListContainers", cri.rt.list_containers(ListContainersRequest::default())).await?;
    let req = StopContainerRequest { container_id: cid.clone(), timeout: p.stop_timeout };
    timed(s, "StopContainer", cri.rt.stop_container(req)).await?;
    let req = RemoveContainerRequest { container_id: cid };
    timed(s, "RemoveContainer", cri.rt.remove_container(req)).await?;
    let req = StopPodSandboxRequest { pod_sandbox_id: id.clone() };
    timed(s, "StopPodSandbox", cri.rt.stop_pod_sandbox(req)).await?;
    let req = RemovePodSandboxRequest { pod_sandbox_id: id };
    timed(s, "RemovePodSandbox", cri.rt.remove_pod_sandbox(req)).await?;
    *pod_id = None;
    s.record("cycle", start.elapsed());
    Ok(())
}

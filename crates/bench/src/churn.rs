//! The churn scenario: does a CRI call get slower once many containers have come and gone?
//! With a few live pods, it measures the calls the kubelet makes all the time (lists,
//! statuses) and a container and pod create/remove; then creates and removes N containers;
//! then measures again. The report has both rounds and the after/before ratio of each p50,
//! which should stay near 1: nothing may be kept per removed container.

use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use k8s_cri::v1::{
    ContainerStatusRequest, CreateContainerRequest, ListContainersRequest, ListPodSandboxRequest,
    PodSandboxConfig, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};

use crate::cri::{Cri, container_config, pod_config, sleeper_args, timed};
use crate::report::{Report, round3};
use crate::stats::{Samples, Summary};

/// Calls measured in each round, in report order.
const CALLS: [&str; 8] = [
    "ListContainers",
    "ListPodSandbox",
    "ContainerStatus",
    "PodSandboxStatus",
    "CreateContainer",
    "RemoveContainer",
    "RunPodSandbox",
    "RemovePodSandbox",
];

/// Containers per churn pod (the kubelet's pods hold a few; a hundred keeps pods few).
const CHURN_PER_POD: usize = 100;

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Containers created and removed between the two rounds.
    pub churn: usize,
    /// Live pods, one running container each, present throughout.
    pub live_pods: usize,
    /// Samples of each read call per round (lists, statuses).
    pub calls: usize,
    /// Create/remove cycles per round (containers, pods).
    pub cycles: usize,
    /// Creates in flight while churning.
    pub concurrency: usize,
    /// The container image.
    pub image: String,
    /// `linux.cgroup_parent` of the pods.
    pub cgroup_parent: Option<String>,
}

/// A pod of the run: its id and config (CreateContainer sends the config along).
type Pod = (String, PodSandboxConfig);

/// Runs the scenario, always removing what it created.
pub async fn run(cri: &Cri, run: &str, p: &Params, report: &mut Report) -> Result<()> {
    let r = measure(cri, run, p, report).await;
    let swept = cri.clone().sweep(Some(run)).await;
    r.and(swept.map(|_| ()))
}

async fn measure(cri: &Cri, run: &str, p: &Params, report: &mut Report) -> Result<()> {
    let mut c = cri.clone();
    c.ensure_image(&p.image).await?;
    let mut live = Vec::with_capacity(p.live_pods.max(1));
    let mut live_containers = Vec::new();
    for i in 0..p.live_pods.max(1) {
        let pod = run_pod(&mut c, run, &format!("live{i}"), p).await?;
        let id = create(&mut c, run, &pod, &format!("live{i}"), p).await?;
        c.rt.start_container(StartContainerRequest { container_id: id.clone() }).await?;
        live_containers.push(id);
        live.push(pod);
    }

    let before = round(&mut c, run, "before", &live, &live_containers[0], p).await?;
    let start = Instant::now();
    churn(cri, run, p).await?;
    report.push_ms(format!("churn {} containers created+removed", p.churn), start.elapsed());
    let after = round(&mut c, run, "after", &live, &live_containers[0], p).await?;

    let prefix = format!("churn {}", p.churn);
    report.push_latencies(&format!("{prefix} before"), &before, &CALLS);
    report.push_latencies(&format!("{prefix} after"), &after, &CALLS);
    for call in CALLS {
        if let (Some(b), Some(a)) = (Summary::of(before.get(call)), Summary::of(after.get(call)))
            && !b.p50.is_zero()
        {
            let ratio = a.p50.as_secs_f64() / b.p50.as_secs_f64();
            report.push(format!("{prefix} {call} p50 after/before"), round3(ratio), "x");
        }
    }
    Ok(())
}

async fn run_pod(c: &mut Cri, run: &str, name: &str, p: &Params) -> Result<Pod> {
    let cfg = pod_config(run, name, p.cgroup_parent.as_deref());
    let req = RunPodSandboxRequest { config: Some(cfg.clone()), runtime_handler: String::new() };
    let id = c.rt.run_pod_sandbox(req).await?.into_inner().pod_sandbox_id;
    Ok((id, cfg))
}

async fn create(c: &mut Cri, run: &str, pod: &Pod, name: &str, p: &Params) -> Result<String> {
    let req = CreateContainerRequest {
        pod_sandbox_id: pod.0.clone(),
        config: Some(container_config(run, name, &p.image, sleeper_args())),
        sandbox_config: Some(pod.1.clone()),
    };
    Ok(c.rt.create_container(req).await?.into_inner().container_id)
}

/// One round of measurements; `tag` keeps names unique between rounds.
async fn round(
    c: &mut Cri,
    run: &str,
    tag: &str,
    live: &[Pod],
    live_container: &str,
    p: &Params,
) -> Result<Samples> {
    let mut s = Samples::default();
    for _ in 0..p.calls.max(1) {
        timed(&mut s, CALLS[0], c.rt.list_containers(ListContainersRequest::default())).await?;
        timed(&mut s, CALLS[1], c.rt.list_pod_sandbox(ListPodSandboxRequest::default())).await?;
        let req = ContainerStatusRequest { container_id: live_container.into(), verbose: false };
        timed(&mut s, CALLS[2], c.rt.container_status(req)).await?;
        let req = PodSandboxStatusRequest { pod_sandbox_id: live[0].0.clone(), verbose: false };
        timed(&mut s, CALLS[3], c.rt.pod_sandbox_status(req)).await?;
    }
    for i in 0..p.cycles.max(1) {
        let pod = &live[i % live.len()];
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(container_config(run, &format!("{tag}{i}"), &p.image, sleeper_args())),
            sandbox_config: Some(pod.1.clone()),
        };
        let id = timed(&mut s, CALLS[4], c.rt.create_container(req)).await?.container_id;
        timed(&mut s, CALLS[5], c.rt.remove_container(RemoveContainerRequest { container_id: id }))
            .await?;

        let cfg = pod_config(run, &format!("{tag}-pod{i}"), p.cgroup_parent.as_deref());
        let req = RunPodSandboxRequest { config: Some(cfg), runtime_handler: String::new() };
        let id = timed(&mut s, CALLS[6], c.rt.run_pod_sandbox(req)).await?.pod_sandbox_id;
        c.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
        timed(
            &mut s,
            CALLS[7],
            c.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }),
        )
        .await?;
    }
    Ok(s)
}

/// Creates `p.churn` containers (not started: the cost under test is what the runtime keeps
/// of them, not runc's) over a few pods, then removes them and the pods.
async fn churn(cri: &Cri, run: &str, p: &Params) -> Result<()> {
    let mut c = cri.clone();
    let npods = p.churn.div_ceil(CHURN_PER_POD).max(1);
    let mut pods = Vec::with_capacity(npods);
    for i in 0..npods {
        pods.push(run_pod(&mut c, run, &format!("churn{i}"), p).await?);
    }
    let pods = &pods;
    let mut creates = futures::stream::iter(0..p.churn)
        .map(|i| {
            let mut c = cri.clone();
            async move {
                let id = create(&mut c, run, &pods[i % npods], &format!("churn{i}"), p).await?;
                c.rt.remove_container(RemoveContainerRequest { container_id: id }).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(p.concurrency.max(1));
    while let Some(r) = creates.next().await {
        r?;
    }
    for (id, _) in pods {
        c.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
        c.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
    }
    Ok(())
}

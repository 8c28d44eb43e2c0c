//! The list-at-scale scenario: many containers in a few pods, then ListContainers and
//! ListPodSandbox latency. The cost of a list should grow with what exists, not with history.

use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use k8s_cri::v1::{
    CreateContainerRequest, ListContainersRequest, ListContainersResponse, ListPodSandboxRequest,
    PodSandboxConfig, RunPodSandboxRequest, StartContainerRequest,
};
use prost::Message as _;

use crate::cri::{Cri, container_config, pod_config, sleeper_args, timed};
use crate::report::Report;
use crate::stats::Samples;
use crate::{daemon_cpu, list_probe};

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Containers in total.
    pub containers: usize,
    /// Pods they are spread over.
    pub pods: usize,
    /// List calls measured per list.
    pub calls: usize,
    /// Start the containers (else only created).
    pub start: bool,
    /// Creates in flight.
    pub concurrency: usize,
    /// The daemon's PID, to report its CPU time per ListContainers call.
    pub daemon_pid: Option<u32>,
    /// Leave what was created in place.
    pub keep: bool,
    /// Create nothing; measure over what exists.
    pub existing: bool,
    /// The container image.
    pub image: String,
    /// `linux.cgroup_parent` of the pods.
    pub cgroup_parent: Option<String>,
}

/// Runs the scenario, removing what it created unless told to keep it.
pub async fn run(cri: &Cri, run: &str, p: &Params, report: &mut Report) -> Result<()> {
    if p.existing {
        // Nothing of this run exists: nothing to sweep.
        return measure(cri, p, report).await;
    }
    let r = match create(cri, run, p, report).await {
        Ok(()) => measure(cri, p, report).await,
        Err(e) => Err(e),
    };
    if p.keep && r.is_ok() {
        println!("kept the containers of run {run}; `berth-bench cleanup` removes them");
        return r;
    }
    let mut c = cri.clone();
    let start = Instant::now();
    let swept = c.sweep(Some(run)).await;
    report.push_ms("list-scale cleanup (all pods)", start.elapsed());
    r.and(swept.map(|_| ()))
}

/// Creates the pods and containers (and starts them if asked); reports creates per second.
async fn create(cri: &Cri, run: &str, p: &Params, report: &mut Report) -> Result<()> {
    let mut c = cri.clone();
    c.ensure_image(&p.image).await?;
    let npods = p.pods.max(1);
    let mut pods: Vec<(String, PodSandboxConfig)> = Vec::with_capacity(npods);
    for i in 0..npods {
        let cfg = pod_config(run, &format!("scale{i}"), p.cgroup_parent.as_deref());
        let req =
            RunPodSandboxRequest { config: Some(cfg.clone()), runtime_handler: String::new() };
        let id = c.rt.run_pod_sandbox(req).await?.into_inner().pod_sandbox_id;
        pods.push((id, cfg));
    }

    let start = Instant::now();
    let pods = &pods;
    let mut creates = futures::stream::iter(0..p.containers)
        .map(|i| {
            let mut c = cri.clone();
            async move {
                let (pod_id, pod_cfg) = &pods[i % npods];
                let req = CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(container_config(run, &format!("c{i}"), &p.image, sleeper_args())),
                    sandbox_config: Some(pod_cfg.clone()),
                };
                let id = c.rt.create_container(req).await?.into_inner().container_id;
                if p.start {
                    c.rt.start_container(StartContainerRequest { container_id: id }).await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(p.concurrency.max(1));
    while let Some(r) = creates.next().await {
        r?;
    }
    let wall = start.elapsed().as_secs_f64();
    let verb = if p.start { "created+started" } else { "created" };
    if wall > 0.0 {
        report.push(
            format!("list-scale containers {verb}/s"),
            crate::report::round3(p.containers as f64 / wall),
            "1/s",
        );
    }
    Ok(())
}

/// Times the list calls over what exists.
async fn measure(cri: &Cri, p: &Params, report: &mut Report) -> Result<()> {
    let mut c = cri.clone();
    let npods = p.pods.max(1);
    let mut s = Samples::default();
    for _ in 0..p.calls.max(1) {
        let n =
            timed(&mut s, "ListContainers", c.rt.list_containers(ListContainersRequest::default()))
                .await?
                .containers
                .len();
        anyhow::ensure!(
            n >= p.containers,
            "ListContainers returned {n} < {} containers",
            p.containers
        );
        timed(&mut s, "ListPodSandbox", c.rt.list_pod_sandbox(ListPodSandboxRequest::default()))
            .await?;
        // The same call as the runtime serves it: request, answer and transfer, without the
        // client's protobuf decode (~1 ms for 1000 containers with their labels here).
        let t = Instant::now();
        let raw = list_probe::raw_list(cri.channel.clone()).await?;
        s.record("ListContainers undecoded", t.elapsed());
        let n = ListContainersResponse::decode(raw)?.containers.len();
        anyhow::ensure!(n >= p.containers, "undecoded ListContainers held {n} containers");
    }
    let prefix = format!("list-scale {}c/{}p", p.containers, npods);
    report.push_latencies(
        &prefix,
        &s,
        &["ListContainers", "ListContainers undecoded", "ListPodSandbox"],
    );
    if let Some(pid) = p.daemon_pid {
        let calls = p.calls.max(1);
        let before = daemon_cpu::cpu_ns(pid)?;
        for _ in 0..calls {
            c.rt.list_containers(ListContainersRequest::default()).await?;
        }
        let per_call = daemon_cpu::cpu_ns(pid)?.saturating_sub(before) as f64 / calls as f64;
        report.push(
            format!("{prefix} ListContainers daemon CPU per call"),
            crate::report::round3(per_call / 1e6),
            "ms",
        );
    }
    Ok(())
}

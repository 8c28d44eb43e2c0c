//! End-to-end soak: a few thousand random CRI lifecycle calls, valid ones and some the
//! kubelet would never send, against one berthd. Every call gets an answer that is not a
//! crash (`Internal`/`Unknown`), berthd keeps serving, and once everything is removed its
//! memory comes back near where it started and nothing is left behind.
//!
//! Bounded in calls and time; the seed is printed so a failure can be replayed with
//! `BERTH_SOAK_SEED=<n>`.

#[path = "support/podkit.rs"]
mod podkit;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_cri::v1::*;
use podkit::{Env, skip};
use tonic::Code;

/// Calls in one run, and the time they may take at most.
const CALLS: usize = 2000;
const BUDGET: Duration = Duration::from_secs(120);
/// How many pods and containers live at once, at most.
const MAX_PODS: usize = 6;
const MAX_CONTAINERS: usize = 12;
/// How far above its idle RSS berthd may stay after the soak, once everything is removed.
const RSS_SLACK_KIB: u64 = 32 << 10;

/// xorshift64*: enough randomness for picking calls, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() { None } else { Some(&items[self.below(items.len())]) }
    }
}

/// berthd's resident set in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// What the soak keeps track of.
#[derive(Default)]
struct World {
    pods: Vec<String>,
    /// (container id, pod id).
    containers: Vec<(String, String)>,
    serial: usize,
    /// gRPC codes seen, for the report.
    codes: std::collections::BTreeMap<String, usize>,
}

impl World {
    fn note<T>(&mut self, what: &str, r: &Result<T, tonic::Status>) -> Result<()> {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
        if let Err(s) = r {
            ensure!(
                !matches!(s.code(), Code::Internal | Code::Unknown | Code::Unavailable),
                "{what}: {s:?}"
            );
        }
        Ok(())
    }
}

/// One random call.
async fn step(env: &mut Env, w: &mut World, rng: &mut Rng) -> Result<()> {
    w.serial += 1;
    let n = w.serial;
    match rng.below(12) {
        0 | 1 if w.pods.len() < MAX_PODS => {
            let name = format!("soak{n}");
            let r = env
                .rt
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(env.pod_config(&name)),
                    runtime_handler: String::new(),
                })
                .await;
            w.note("RunPodSandbox", &r)?;
            if let Ok(r) = r {
                w.pods.push(r.into_inner().pod_sandbox_id);
            }
        }
        2 | 3 if w.containers.len() < MAX_CONTAINERS => {
            let Some(pod) = rng.pick(&w.pods).cloned() else { return Ok(()) };
            let args: &[&str] = match rng.below(3) {
                0 => &["/bin/sleep", "1000"],
                1 => &["/bin/sh", "-c", "echo soak; exit 3"],
                _ => &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"],
            };
            let name = format!("c{n}");
            let config = env.container_config(&name, args);
            let sandbox_config = env.pod_config(&format!("any{n}"));
            let r = env
                .rt
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })
                .await;
            w.note("CreateContainer", &r)?;
            if let Ok(r) = r {
                let id = r.into_inner().container_id;
                if rng.below(4) != 0 {
                    let r = env
                        .rt
                        .start_container(StartContainerRequest { container_id: id.clone() })
                        .await;
                    w.note("StartContainer", &r)?;
                }
                w.containers.push((id, pod));
            }
        }
        4 => {
            let Some((id, _)) = rng.pick(&w.containers).cloned() else { return Ok(()) };
            let r = env
                .rt
                .stop_container(StopContainerRequest {
                    container_id: id,
                    timeout: rng.below(2) as i64,
                })
                .await;
            w.note("StopContainer", &r)?;
        }
        5 => {
            if w.containers.is_empty() {
                return Ok(());
            }
            let (id, _) = w.containers.swap_remove(rng.below(w.containers.len()));
            let r = env.rt.remove_container(RemoveContainerRequest { container_id: id }).await;
            w.note("RemoveContainer", &r)?;
        }
        6 => {
            let Some((id, _)) = rng.pick(&w.containers).cloned() else { return Ok(()) };
            let r = env
                .rt
                .exec_sync(ExecSyncRequest {
                    container_id: id,
                    cmd: vec!["/bin/echo".into(), "hi".into()],
                    timeout: 5,
                })
                .await;
            w.note("ExecSync", &r)?;
        }
        7 => {
            let Some((id, _)) = rng.pick(&w.containers).cloned() else { return Ok(()) };
            let r = env
                .rt
                .container_status(ContainerStatusRequest { container_id: id, verbose: true })
                .await;
            w.note("ContainerStatus", &r)?;
            let r = env.rt.list_containers(ListContainersRequest { filter: None }).await;
            w.note("ListContainers", &r)?;
        }
        8 => {
            let Some(pod) = rng.pick(&w.pods).cloned() else { return Ok(()) };
            let r = env.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod }).await;
            w.note("StopPodSandbox", &r)?;
        }
        9 => {
            if w.pods.is_empty() {
                return Ok(());
            }
            let pod = w.pods.swap_remove(rng.below(w.pods.len()));
            let r = env
                .rt
                .stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
                .await;
            w.note("StopPodSandbox", &r)?;
            let r = env
                .rt
                .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.clone() })
                .await;
            w.note("RemovePodSandbox", &r)?;
            w.containers.retain(|(_, p)| *p != pod);
        }
        10 => {
            // Requests the kubelet would not send: unknown ids, a missing image, a name taken.
            let r = env
                .rt
                .container_status(ContainerStatusRequest {
                    container_id: format!("{:064x}", rng.next()),
                    verbose: false,
                })
                .await;
            w.note("ContainerStatus(unknown)", &r)?;
            if let Some(pod) = rng.pick(&w.pods).cloned() {
                let mut config = env.container_config(&format!("bad{n}"), &["/bin/true"]);
                config.image = Some(berth_e2e::image_spec("127.0.0.1:1/nowhere/none:1"));
                let r = env
                    .rt
                    .create_container(CreateContainerRequest {
                        pod_sandbox_id: pod,
                        config: Some(config),
                        sandbox_config: Some(env.pod_config("bad")),
                    })
                    .await;
                w.note("CreateContainer(missing image)", &r)?;
            }
        }
        _ => {
            let r = env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await;
            w.note("ListPodSandbox", &r)?;
            let r =
                env.rt.list_pod_sandbox_stats(ListPodSandboxStatsRequest { filter: None }).await;
            w.note("ListPodSandboxStats", &r)?;
        }
    }
    Ok(())
}

/// Removes every pod berthd lists (which removes their containers).
async fn remove_all(env: &mut Env) -> Result<()> {
    let pods = env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?;
    for p in pods.into_inner().items {
        env.remove_pod(&p.id).await?;
    }
    Ok(())
}

#[tokio::test]
async fn random_lifecycle_calls_keep_berthd_serving_and_small() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let seed =
        std::env::var("BERTH_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        }) | 1;
    eprintln!("soak seed {seed} (replay with BERTH_SOAK_SEED={seed})");
    let mut rng = Rng(seed);
    let mut env = Env::start().await?;
    let pid = env.d.pid().context("berthd pid")?;

    // Idle after one warm-up round: a pod with a container, exec'd into, removed.
    let pod = env.run_pod(env.pod_config("warmup")).await?;
    let config = env.pod_config("warmup");
    let ctr = env.run(&pod, &config, env.container_config("c", &["/bin/sleep", "1000"])).await?;
    env.exec(&ctr, &["/bin/true"], 5).await?;
    env.remove_pod(&pod).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(pid)?;

    let mut world = World::default();
    let started = Instant::now();
    let mut calls = 0;
    while calls < CALLS && started.elapsed() < BUDGET {
        step(&mut env, &mut world, &mut rng).await.with_context(|| format!("seed {seed}"))?;
        calls += 1;
    }
    let peak = rss_kib(pid)?;
    // Still serving promptly.
    let listed = tokio::time::timeout(
        Duration::from_secs(1),
        env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
    )
    .await
    .context("ListPodSandbox took over a second after the soak")??;
    eprintln!(
        "soak: {calls} calls in {:?}, {} pods live, codes {:?}",
        started.elapsed(),
        listed.into_inner().items.len(),
        world.codes
    );
    remove_all(&mut env).await?;

    // Freed heap goes back to the kernel a few seconds after a burst (berthd's scavenger).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rss = rss_kib(pid)?;
    while rss > idle + RSS_SLACK_KIB && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss = rss_kib(pid)?;
    }
    eprintln!("berthd RSS: idle {idle} KiB, after the calls {peak} KiB, after removal {rss} KiB");
    ensure!(
        rss <= idle + RSS_SLACK_KIB,
        "berthd kept {rss} KiB after everything was removed (idle {idle} KiB, seed {seed})"
    );
    let mounts = berth_e2e::mounts::mounts_under(env.d.dir());
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    Ok(())
}

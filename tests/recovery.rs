//! End-to-end: containers outlive berthd. With external shims, pods survive a `kill -9` of
//! berthd and answer ExecSync and stats afterwards; exits and OOM kills that happen while
//! berthd is down are reported exactly; a killed shim is detected; and berthd killed at
//! random points of a lifecycle loop comes back consistent, leaking nothing. With the
//! embedded shim, a restarted berthd adopts the containers still running (ExecSync, stats,
//! stop, exits noticed; exit codes lost) and reports those that ended meanwhile.

#[path = "support/podkit.rs"]
mod podkit;
#[path = "support/recoverykit.rs"]
mod recoverykit;

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use podkit::skip;
use recoverykit::{RecoveryEnv, alive, random, remove_cgroup_parent};

/// A container config whose memory limit its command exceeds at once.
fn oom_config(env: &podkit::Env) -> ContainerConfig {
    // `tail` of an endless file without newlines buffers without bound.
    let mut config =
        env.container_config("hog", &["/bin/sh", "-c", "sleep 2; exec tail /dev/zero"]);
    config.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            memory_swap_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

#[tokio::test]
async fn external_shim_containers_survive_berthd_kill9() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut r = RecoveryEnv::start("external").await?;
    let pod_config = r.env.pod_config("survive");
    let pod = r.env.run_pod(pod_config.clone()).await?;
    let live = {
        let c = r.env.container_config("live", &["/bin/sleep", "1000"]);
        r.env.run(&pod, &pod_config, c).await?
    };
    let quitter = {
        let c = r.env.container_config("quitter", &["/bin/sh", "-c", "sleep 2; exit 7"]);
        r.env.run(&pod, &pod_config, c).await?
    };
    let hog = {
        let c = oom_config(&r.env);
        r.env.run(&pod, &pod_config, c).await?
    };
    let (quitter_pid, hog_pid, live_pid) =
        (r.pid_of(&quitter).await?, r.pid_of(&hog).await?, r.pid_of(&live).await?);
    let shim = r.shim_pid(&pod)?;

    r.env.d.kill9();
    // Both exit while berthd is down.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (alive(quitter_pid) || alive(hog_pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive(quitter_pid) && !alive(hog_pid), "containers did not exit");
    assert!(alive(shim), "the pod's shim died with berthd");
    assert!(alive(live_pid), "the container died with berthd");
    r.env.d.start_again().await?;
    r.env.rt = r.env.d.runtime().await?;

    let s = r.env.status(&live).await?;
    assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
    let s = r.env.status(&quitter).await?;
    assert_eq!(s.state, ContainerState::ContainerExited as i32, "{s:?}");
    assert_eq!((s.exit_code, s.reason.as_str()), (7, "Error"), "{s:?}");
    assert!(s.finished_at > s.started_at, "{s:?}");
    let s = r.env.status(&hog).await?;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"), "{s:?}");

    // The live one still answers exec and stats through its shim.
    let out = r.env.exec(&live, &["/bin/echo", "still here"], 10).await?;
    assert_eq!((out.exit_code, out.stdout.as_slice()), (0, b"still here\n".as_slice()));
    let stats = r
        .env
        .rt
        .container_stats(ContainerStatsRequest { container_id: live.clone() })
        .await?
        .into_inner()
        .stats
        .expect("stats");
    assert!(stats.memory.and_then(|m| m.working_set_bytes).is_some_and(|v| v.value > 0));
    assert!(stats.cpu.is_some());
    // And it can be stopped (the exit arrives through the resumed event stream).
    r.env
        .rt
        .stop_container(StopContainerRequest { container_id: live.clone(), timeout: 1 })
        .await?;
    let s = r.env.status(&live).await?;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert!(!alive(live_pid));

    // A clean restart too.
    r.env.d.restart().await?;
    r.env.rt = r.env.d.runtime().await?;
    assert_eq!(r.env.status(&quitter).await?.exit_code, 7);

    r.env.remove_pod(&pod).await?;
    assert!(!alive(shim), "shim still running after its pod was removed");
    let leaks = r.leaks();
    assert!(leaks.is_empty(), "leaked: {leaks:#?}");
    remove_cgroup_parent(&r.cgroup_parent);
    Ok(())
}

#[tokio::test]
async fn killed_shim_is_detected() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut r = RecoveryEnv::start("external").await?;
    // While berthd runs.
    let pod_config = r.env.pod_config("shimkill");
    let pod = r.env.run_pod(pod_config.clone()).await?;
    let ctr = {
        let c = r.env.container_config("c", &["/bin/sleep", "1000"]);
        r.env.run(&pod, &pod_config, c).await?
    };
    let pid = r.pid_of(&ctr).await?;
    let shim = r.shim_pid(&pod)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL)?;
    let s = r.env.wait_exited(&ctr, Duration::from_secs(20)).await?;
    assert_eq!((s.exit_code, s.reason.as_str()), (255, "Unknown"), "{s:?}");
    assert!(podkit::eventually(Duration::from_secs(5), || !alive(pid)).await, "container runs on");
    // The pod still takes new containers (a new shim).
    let again = {
        let c = r.env.container_config("again", &["/bin/sleep", "1000"]);
        r.env.run(&pod, &pod_config, c).await?
    };
    assert_eq!(r.env.exec(&again, &["/bin/true"], 10).await?.exit_code, 0);

    // While berthd is down.
    let pod2_config = r.env.pod_config("shimkill2");
    let pod2 = r.env.run_pod(pod2_config.clone()).await?;
    let ctr2 = {
        let c = r.env.container_config("c", &["/bin/sleep", "1000"]);
        r.env.run(&pod2, &pod2_config, c).await?
    };
    let pid2 = r.pid_of(&ctr2).await?;
    let shim2 = r.shim_pid(&pod2)?;
    r.env.d.kill9();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim2), nix::sys::signal::Signal::SIGKILL)?;
    r.env.d.start_again().await?;
    r.env.rt = r.env.d.runtime().await?;
    let s = r.env.status(&ctr2).await?;
    assert_eq!(s.state, ContainerState::ContainerExited as i32, "{s:?}");
    assert_eq!((s.exit_code, s.reason.as_str()), (255, "Unknown"), "{s:?}");
    assert!(podkit::eventually(Duration::from_secs(5), || !alive(pid2)).await);
    assert_eq!(r.env.status(&again).await?.state, ContainerState::ContainerRunning as i32);

    r.remove_everything().await?;
    let leaks = r.leaks();
    assert!(leaks.is_empty(), "leaked: {leaks:#?}");
    remove_cgroup_parent(&r.cgroup_parent);
    Ok(())
}

#[tokio::test]
async fn embedded_shim_restart_keeps_live_containers_stoppable() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut r = RecoveryEnv::start("embedded").await?;
    let pod_config = r.env.pod_config("embedded");
    let pod = r.env.run_pod(pod_config.clone()).await?;
    let configs = [
        r.env.container_config("c", &["/bin/sleep", "1000"]),
        // Ends while the restarted berthd runs.
        r.env.container_config("later", &["/bin/sleep", "1000"]),
        // These two end while berthd is down.
        r.env.container_config("gone", &["/bin/sleep", "1000"]),
        oom_config(&r.env),
    ];
    let mut started = Vec::new();
    for config in configs {
        let id = r.env.run(&pod, &pod_config, config).await?;
        started.push((id.clone(), r.pid_of(&id).await?));
    }
    let [(ctr, pid), (later, later_pid), (gone, gone_pid), (hog, hog_pid)] =
        <[(String, i32); 4]>::try_from(started).expect("four containers");

    r.env.d.kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gone_pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    assert!(
        podkit::eventually(Duration::from_secs(60), || !alive(gone_pid) && !alive(hog_pid)).await,
        "containers did not exit"
    );
    assert!(alive(pid) && alive(later_pid), "a container died with berthd");
    r.env.d.start_again().await?;
    r.env.rt = r.env.d.runtime().await?;

    // Adopted: its exit code will be lost, but it runs and answers exec and stats.
    assert_eq!(r.env.status(&ctr).await?.state, ContainerState::ContainerRunning as i32);
    let out = r.env.exec(&ctr, &["/bin/echo", "hi"], 10).await?;
    assert_eq!((out.exit_code, out.stdout.as_slice()), (0, b"hi\n".as_slice()));
    let stats = r
        .env
        .rt
        .container_stats(ContainerStatsRequest { container_id: ctr.clone() })
        .await?
        .into_inner()
        .stats
        .expect("stats");
    assert!(stats.memory.and_then(|m| m.working_set_bytes).is_some_and(|v| v.value > 0));
    assert!(stats.cpu.is_some());
    // Exits while berthd was down: the code is lost; an OOM kill is still told.
    let s = r.env.status(&gone).await?;
    assert_eq!(s.state, ContainerState::ContainerExited as i32, "{s:?}");
    assert_eq!((s.exit_code, s.reason.as_str()), (255, "Unknown"), "{s:?}");
    let s = r.env.status(&hog).await?;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"), "{s:?}");
    // An adopted container's exit is noticed, though no StopContainer asked for it.
    assert_eq!(r.env.status(&later).await?.state, ContainerState::ContainerRunning as i32);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(later_pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let s = r.env.wait_exited(&later, Duration::from_secs(10)).await?;
    assert_eq!((s.exit_code, s.reason.as_str()), (255, "Unknown"), "{s:?}");

    r.env.rt.stop_container(StopContainerRequest { container_id: ctr.clone(), timeout: 0 }).await?;
    assert_eq!(r.env.status(&ctr).await?.state, ContainerState::ContainerExited as i32);
    assert!(!alive(pid));
    r.remove_everything().await?;
    let leaks = r.leaks();
    assert!(leaks.is_empty(), "leaked: {leaks:#?}");
    remove_cgroup_parent(&r.cgroup_parent);
    Ok(())
}

/// CreateContainer makes no runtime process; StartContainer's `runc run` does. A crash
/// after that runc but before berthd recorded the start leaves a "created" record and a
/// running runtime container of the same id: recovery must remove the latter (so "created"
/// is true and nothing runs unaccounted for), and the kubelet's retried start must work.
#[tokio::test]
async fn start_interrupted_by_a_crash_is_undone_and_can_be_retried() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    for shim in ["embedded", "external"] {
        let mut r = RecoveryEnv::start(shim).await?;
        let pod_config = r.env.pod_config("interrupted");
        let pod = r.env.run_pod(pod_config.clone()).await?;
        let c = r.env.container_config("c", &["/bin/sleep", "1000"]);
        let ctr = r.env.create(&pod, &pod_config, c).await?;
        // What the interrupted start had got to: the runtime's container, running.
        let state = r.env.d.state();
        let runtime_root = state.join("runtime/runc");
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runtime_root)
            .args(["run", "--detach", "--bundle"])
            .arg(state.join("containers").join(&ctr))
            .arg(&ctr)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        assert!(out.success(), "{shim}: runc run");
        let runc_state = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runtime_root)
            .args(["state", &ctr])
            .output()?;
        let pid = serde_json::from_slice::<serde_json::Value>(&runc_state.stdout)?["pid"]
            .as_i64()
            .expect("pid") as i32;
        assert!(alive(pid));

        r.crash_and_restart().await?;
        assert!(
            podkit::eventually(Duration::from_secs(10), || !alive(pid)).await,
            "{shim}: the interrupted start's process still runs"
        );
        assert!(!runtime_root.join(&ctr).exists(), "{shim}: runtime state left");
        let s = r.env.status(&ctr).await?;
        assert_eq!(s.state, ContainerState::ContainerCreated as i32, "{shim}: {s:?}");
        r.env.rt.start_container(StartContainerRequest { container_id: ctr.clone() }).await?;
        assert_eq!(r.env.status(&ctr).await?.state, ContainerState::ContainerRunning as i32);
        assert!(alive(r.pid_of(&ctr).await?), "{shim}");
        r.remove_everything().await?;
        let leaks = r.leaks();
        assert!(leaks.is_empty(), "{shim}: leaked: {leaks:#?}");
        remove_cgroup_parent(&r.cgroup_parent);
    }
    Ok(())
}

#[tokio::test]
async fn cri_calls_answer_unavailable_or_ok_while_recovering() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut r = RecoveryEnv::start("external").await?;
    let pod_config = r.env.pod_config("gate");
    let pod = r.env.run_pod(pod_config.clone()).await?;
    let c = r.env.container_config("c", &["/bin/sleep", "1000"]);
    r.env.run(&pod, &pod_config, c).await?;
    r.env.d.kill9();
    r.env.d.start_again_unready().await?;
    // Recovery is quick; whatever the first answer is, it is never a half-true one: either
    // Unavailable (still recovering) or the recovered state.
    let mut rt = r.env.d.runtime().await?;
    let mut saw_unavailable = false;
    loop {
        match rt.list_containers(ListContainersRequest { filter: None }).await {
            Ok(list) => {
                let list = list.into_inner().containers;
                assert_eq!(list.len(), 1);
                assert_eq!(list[0].state, ContainerState::ContainerRunning as i32);
                break;
            }
            Err(s) if s.code() == tonic::Code::Unavailable => saw_unavailable = true,
            Err(s) => panic!("unexpected {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("saw Unavailable during recovery: {saw_unavailable}");
    r.env.rt = rt;
    r.remove_everything().await?;
    let leaks = r.leaks();
    assert!(leaks.is_empty(), "leaked: {leaks:#?}");
    remove_cgroup_parent(&r.cgroup_parent);
    Ok(())
}

/// One round of the lifecycle the crash interrupts.
async fn lifecycle_round(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    pod_config: PodSandboxConfig,
    ctr_config: ContainerConfig,
) -> anyhow::Result<()> {
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let ctr = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ctr_config),
            sandbox_config: Some(pod_config),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: ctr.clone() }).await?;
    rt.stop_container(StopContainerRequest { container_id: ctr.clone(), timeout: 0 }).await?;
    rt.remove_container(RemoveContainerRequest { container_id: ctr }).await?;
    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await?;
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await?;
    Ok(())
}

#[tokio::test]
async fn kill9_at_random_points_of_the_lifecycle_leaves_a_consistent_state() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    kill9_at_random_points("external").await
}

/// The same with the embedded shim, whose restarted berthd adopts what it finds.
#[tokio::test]
async fn embedded_shim_kill9_at_random_points_leaves_a_consistent_state() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    kill9_at_random_points("embedded").await
}

async fn kill9_at_random_points(shim: &str) -> anyhow::Result<()> {
    const ROUNDS: usize = 8;
    let mut r = RecoveryEnv::start(shim).await?;
    for round in 0..ROUNDS {
        let name = format!("fault{round}");
        let pod_config = r.env.pod_config(&name);
        let ctr_config = r.env.container_config("c", &["/bin/sleep", "1000"]);
        let mut rt = r.env.d.runtime().await?;
        let (pc, cc) = (pod_config.clone(), ctr_config.clone());
        let work = tokio::spawn(async move {
            loop {
                if lifecycle_round(&mut rt, pc.clone(), cc.clone()).await.is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(random(2500))).await;
        r.crash_and_restart().await?;
        work.abort();
        let _ = work.await;

        // Every listed object's resources exist.
        let state = r.env.d.state();
        let pods =
            r.env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?.into_inner();
        // (A NotReady pod or an exited container may be half removed: a crash inside
        // RemovePodSandbox/RemoveContainer, finished by the kubelet's retry.)
        for p in &pods.items {
            if p.state == PodSandboxState::SandboxReady as i32 {
                assert!(state.join("pods").join(&p.id).is_dir(), "round {round}: pod dir");
                let net = state.join("pods").join(&p.id).join("ns/net");
                assert!(
                    berth_e2e::mounts::mounts_under(&net).contains(&net),
                    "round {round}: netns pin of ready pod {}",
                    p.id
                );
            }
        }
        let ctrs =
            r.env.rt.list_containers(ListContainersRequest { filter: None }).await?.into_inner();
        for c in &ctrs.containers {
            assert!(pods.items.iter().any(|p| p.id == c.pod_sandbox_id), "round {round}");
            if c.state == ContainerState::ContainerExited as i32 {
                continue;
            }
            let rootfs = state.join("containers").join(&c.id).join("rootfs");
            assert!(
                berth_e2e::mounts::mounts_under(&rootfs).contains(&rootfs),
                "round {round}: rootfs of {} ({:?})",
                c.id,
                c.state
            );
            if c.state == ContainerState::ContainerRunning as i32 {
                let pid = r.pid_of(&c.id).await?;
                assert!(alive(pid), "round {round}: running container {} has no process", c.id);
            }
        }
        // The kubelet's retry of the interrupted round succeeds: a pod of this name either
        // exists (it was made) or can be made now.
        if !pods.items.iter().any(|p| p.metadata.as_ref().is_some_and(|m| m.name == name)) {
            let mut rt = r.env.d.runtime().await?;
            lifecycle_round(&mut rt, pod_config, ctr_config).await?;
        }
        r.remove_everything().await?;
        let leaks = r.leaks();
        assert!(leaks.is_empty(), "round {round}: leaked: {leaks:#?}");
    }
    remove_cgroup_parent(&r.cgroup_parent);
    Ok(())
}

/// The shim's footprint with a container under each: RSS/PSS per pod shim and the time of a
/// pod's first CreateContainer + StartContainer (the start starts its shim). Run with
/// `BERTH_SHIM_BIN=target/shim/berth-shim cargo nextest run -p berth-e2e --test recovery
/// --run-ignored only shim_memory` (a release-like build; the debug build is much larger).
#[tokio::test]
#[ignore = "benchmark: prints numbers"]
async fn shim_memory_per_pod() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    const PODS: usize = 5;
    let bin = std::env::var_os("BERTH_SHIM_BIN").map(std::path::PathBuf::from);
    let mut r = RecoveryEnv::start_with_shim_binary("external", bin.clone()).await?;
    let mut pods = Vec::new();
    for i in 0..PODS {
        let pod_config = r.env.pod_config(&format!("mem{i}"));
        let pod = r.env.run_pod(pod_config.clone()).await?;
        let c = r.env.container_config("c", &["/bin/sleep", "1000"]);
        let started = Instant::now();
        r.env.run(&pod, &pod_config, c).await?;
        pods.push((pod, started.elapsed()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut rss_sum, mut pss_sum) = (0, 0);
    for (pod, create) in &pods {
        let pid = r.shim_pid(pod)?;
        let (rss, pss) = recoverykit::rss_pss_kb(pid).expect("smaps_rollup");
        rss_sum += rss;
        pss_sum += pss;
        eprintln!("shim {pid}: RSS {rss} kB, PSS {pss} kB; first create + start {create:?}");
    }
    eprintln!(
        "berth-shim {}: average per pod RSS {} kB, PSS {} kB",
        bin.map(|b| b.display().to_string()).unwrap_or_else(|| "(next to berthd)".into()),
        rss_sum / PODS as u64,
        pss_sum / PODS as u64
    );
    r.remove_everything().await?;
    remove_cgroup_parent(&r.cgroup_parent);
    Ok(())
}

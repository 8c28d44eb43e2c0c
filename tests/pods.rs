//! End-to-end: pod sandboxes through the CRI (RunPodSandbox, Stop, Remove, Status, List),
//! their namespaces, files and shm as the kernel sees them, and their errors.

#[path = "support/podkit.rs"]
mod podkit;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use berth_e2e::mounts::mounts_under;
use k8s_cri::v1::*;
use podkit::{Env, eventually, skip, with_namespaces};
use tonic::Code;

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

#[tokio::test]
async fn pod_lifecycle_status_list_and_cleanup() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let mut config = env.pod_config("web");
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.0.0.10".into()],
        searches: vec!["default.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let id = env.run_pod(config.clone()).await?;
    assert_eq!(id.len(), 64);

    // The namespaces are pinned under the pod dir and differ from the host's.
    let pod_dir = env.state().join("pods").join(&id);
    let netns = pod_dir.join("ns/net");
    assert_ne!(inode(&netns), 0);
    assert_ne!(inode(&netns), inode(Path::new("/proc/self/ns/net")));
    assert_ne!(inode(&pod_dir.join("ns/ipc")), inode(Path::new("/proc/self/ns/ipc")));
    let resolv = std::fs::read_to_string(pod_dir.join("resolv.conf"))?;
    assert!(resolv.contains("nameserver 10.0.0.10"), "{resolv}");
    assert!(resolv.contains("options ndots:5"), "{resolv}");
    assert_eq!(std::fs::read_to_string(pod_dir.join("hostname"))?, "web\n");
    let mounts = mounts_under(&pod_dir);
    assert!(mounts.contains(&pod_dir.join("shm")), "{mounts:?}");

    let status = env
        .rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: true })
        .await?
        .into_inner();
    let s = status.status.clone().expect("status");
    assert_eq!(s.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(s.metadata, config.metadata);
    assert_eq!(s.labels, config.labels);
    assert_eq!(s.annotations, config.annotations);
    assert_eq!(s.runtime_handler, "runc");
    assert!(s.created_at > 0);
    let info: serde_json::Value = serde_json::from_str(&status.info["info"])?;
    assert_eq!(info["id"], id.as_str());

    // List with filters.
    let all = env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?.into_inner();
    assert_eq!(all.items.len(), 1);
    let by_label = env
        .rt
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: [("app".to_string(), "other".to_string())].into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    assert!(by_label.items.is_empty());
    let by_prefix = env
        .rt
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter { id: id[..12].to_string(), ..Default::default() }),
        })
        .await?
        .into_inner();
    assert_eq!(by_prefix.items.len(), 1);

    // Stop: NOTREADY, shm gone, idempotent.
    for _ in 0..2 {
        env.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
    }
    let s = env
        .rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: false })
        .await?
        .into_inner()
        .status
        .expect("status");
    assert_eq!(s.state, PodSandboxState::SandboxNotready as i32);
    assert!(!mounts_under(&pod_dir).contains(&pod_dir.join("shm")));
    let ready_only = env
        .rt
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                state: Some(PodSandboxStateValue { state: PodSandboxState::SandboxReady as i32 }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    assert!(ready_only.items.is_empty());

    // Remove: everything gone, idempotent, the name is free again.
    for _ in 0..2 {
        env.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
    }
    assert!(!pod_dir.exists());
    assert!(mounts_under(&env.state()).is_empty(), "{:?}", mounts_under(&env.state()));
    let err = env
        .rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: false })
        .await
        .expect_err("removed");
    assert_eq!(err.code(), Code::NotFound);
    let again = env.run_pod(config).await?;
    env.remove_pod(&again).await?;
    Ok(())
}

#[tokio::test]
async fn pod_errors() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let run = |config: Option<PodSandboxConfig>, handler: &str| RunPodSandboxRequest {
        config,
        runtime_handler: handler.to_string(),
    };
    // Missing config / metadata / name.
    let e = env.rt.run_pod_sandbox(run(None, "")).await.expect_err("no config");
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut c = env.pod_config("bad");
    c.metadata = None;
    let e = env.rt.run_pod_sandbox(run(Some(c), "")).await.expect_err("no metadata");
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut c = env.pod_config("bad");
    c.metadata.as_mut().expect("meta").uid.clear();
    let e = env.rt.run_pod_sandbox(run(Some(c), "")).await.expect_err("no uid");
    assert_eq!(e.code(), Code::InvalidArgument);
    // Unknown handler.
    let e = env
        .rt
        .run_pod_sandbox(run(Some(env.pod_config("h")), "kata"))
        .await
        .expect_err("unknown handler");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("kata"), "{}", e.message());
    // A sysctl outside the allowlist.
    let mut c = env.pod_config("sysctl");
    c.linux.as_mut().expect("linux").sysctls.insert("kernel.panic".into(), "1".into());
    let e = env.rt.run_pod_sandbox(run(Some(c), "")).await.expect_err("bad sysctl");
    assert_eq!(e.code(), Code::InvalidArgument);
    // Nothing was left behind by the refused requests.
    let pods_dir = env.state().join("pods");
    assert_eq!(std::fs::read_dir(&pods_dir)?.count(), 0);

    // Name taken: AlreadyExists naming the holder.
    let id = env.run_pod(env.pod_config("dup")).await?;
    let e = env.rt.run_pod_sandbox(run(Some(env.pod_config("dup")), "")).await.expect_err("dup");
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains(&id), "{}", e.message());

    // Unknown ids.
    let unknown = "0".repeat(64);
    // Stop and remove are idempotent: an unknown pod succeeds (the CRI; containerd 2.x).
    env.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: unknown.clone() }).await?;
    env.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: unknown }).await?;
    env.remove_pod(&id).await?;
    Ok(())
}

#[tokio::test]
async fn host_network_pod_sees_host_interfaces() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = with_namespaces(
        env.pod_config("hostnet"),
        NamespaceOption {
            network: NamespaceMode::Node as i32,
            pid: NamespaceMode::Container as i32,
            ..Default::default()
        },
    );
    let pod = env.run_pod(config.clone()).await?;
    let pod_dir = env.state().join("pods").join(&pod);
    assert!(!pod_dir.join("ns/net").exists(), "no netns pin for host network");
    let ctr = env.run(&pod, &config, env.container_config("c", &["/bin/sleep", "1000"])).await?;
    // The container's network namespace is the host's.
    let out = env.exec(&ctr, &["/bin/readlink", "/proc/self/ns/net"], 10).await?;
    let host = std::fs::read_link("/proc/self/ns/net")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), host.to_string_lossy());
    let out = env.exec(&ctr, &["/bin/hostname"], 10).await?;
    let node = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), node);
    env.remove_pod(&pod).await?;
    Ok(())
}

#[tokio::test]
async fn pod_network_has_loopback_up_and_own_hostname() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("netpod");
    let pod = env.run_pod(config.clone()).await?;
    let ctr = env.run(&pod, &config, env.container_config("c", &["/bin/sleep", "1000"])).await?;
    let out = env.exec(&ctr, &["/bin/hostname"], 10).await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "netpod");
    let out = env.exec(&ctr, &["/bin/cat", "/sys/class/net/lo/operstate"], 10).await?;
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(state == "unknown" || state == "up", "lo is {state:?}");
    let out = env.exec(&ctr, &["/bin/ping", "-c", "1", "-W", "2", "127.0.0.1"], 10).await?;
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stdout));
    env.remove_pod(&pod).await?;
    Ok(())
}

#[tokio::test]
async fn shared_pid_namespace_pod() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = with_namespaces(
        env.pod_config("sharedpid"),
        NamespaceOption { pid: NamespaceMode::Pod as i32, ..Default::default() },
    );
    let pod = env.run_pod(config.clone()).await?;
    let a = env.run(&pod, &config, env.container_config("a", &["/bin/sleep", "1001"])).await?;
    let b = env.run(&pod, &config, env.container_config("b", &["/bin/sleep", "1002"])).await?;
    // b sees a's process, and PID 1 is the pod init, not a container.
    let out = env.exec(&b, &["/bin/ps", "-o", "pid,args"], 10).await?;
    let ps = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(ps.contains("sleep 1001"), "{ps}");
    assert!(ps.contains("sleep 1002"), "{ps}");
    let out = env.exec(&a, &["/bin/cat", "/proc/1/cmdline"], 10).await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("pod-init"));
    let status = env
        .rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: true })
        .await?
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&status.info["info"])?;
    let init_pid = info["podInitPid"].as_u64().expect("pod init pid");
    assert!(Path::new(&format!("/proc/{init_pid}")).exists());
    env.remove_pod(&pod).await?;
    // The pod init is gone with the pod (reaped by berthd, its subreaper).
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{init_pid}/cmdline"))
                .map(|c| !c.contains("pod-init"))
                .unwrap_or(true)
        })
        .await
    );
    Ok(())
}

#[tokio::test]
async fn restart_keeps_pods_listed() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("survivor");
    let pod = env.run_pod(config.clone()).await?;
    let done = env.run(&pod, &config, env.container_config("done", &["/bin/true"])).await?;
    env.wait_exited(&done, Duration::from_secs(20)).await?;
    let live =
        env.run(&pod, &config, env.container_config("live", &["/bin/sleep", "1000"])).await?;

    env.d.restart().await?;
    env.rt = env.d.runtime().await?;

    let pods = env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?.into_inner();
    assert_eq!(pods.items.len(), 1);
    assert_eq!(pods.items[0].id, pod);
    assert_eq!(pods.items[0].state, PodSandboxState::SandboxReady as i32);
    let s = env.status(&done).await?;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert_eq!(s.reason, "Completed");
    let s = env.status(&live).await?;
    assert_eq!(s.state, ContainerState::ContainerRunning as i32);
    // The name is still reserved after the restart.
    let e = env
        .rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("name still held");
    assert_eq!(e.code(), Code::AlreadyExists);
    // And the pod can still be torn down.
    env.remove_pod(&pod).await?;
    assert!(
        env.rt
            .list_containers(ListContainersRequest { filter: None })
            .await?
            .into_inner()
            .containers
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn crun_handler_runs_containers() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("crunpod");
    let pod = env
        .rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "crun".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    match env.run(&pod, &config, env.container_config("c", &["/bin/sh", "-c", "exit 7"])).await {
        Ok(ctr) => {
            let s = env.wait_exited(&ctr, Duration::from_secs(20)).await?;
            assert_eq!(s.exit_code, 7);
        }
        // crun refuses cgroup v1/v2 hybrid hosts: then it was at least crun that ran.
        Err(e) if e.to_string().contains("crun run") && e.to_string().contains("hybrid") => {
            eprintln!("crun cannot run containers on this host: {e}");
        }
        Err(e) => return Err(e),
    }
    let status = env
        .rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: false })
        .await?
        .into_inner();
    assert_eq!(status.status.expect("status").runtime_handler, "crun");
    env.remove_pod(&pod).await?;
    Ok(())
}

/// The kubelet gives up on a slow RunPodSandbox (its deadline passes) and retries: the retry
/// gets the pod the first call went on to make, not "name is reserved" (CRI-O's resource
/// store). Once the pod has been handed out, the same name again is AlreadyExists.
#[tokio::test]
async fn retry_after_deadline_gets_the_finished_pod() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("slow");
    let request =
        || RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: "".into() };
    let mut first = tonic::Request::new(request());
    first.set_timeout(Duration::from_millis(1));
    let e = env.rt.run_pod_sandbox(first).await.expect_err("deadline passes first");
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");

    // The create goes on without its caller; wait until it shows up.
    let mut made = None;
    for _ in 0..100 {
        let pods = env.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?;
        if let Some(p) = pods.into_inner().items.into_iter().find(|p| {
            p.metadata.as_ref().is_some_and(|m| {
                m.name == config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default()
            })
        }) {
            made = Some(p.id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let made = made.expect("the abandoned create finished");

    let retry = env.rt.run_pod_sandbox(request()).await?.into_inner().pod_sandbox_id;
    assert_eq!(retry, made);
    let again = env.rt.run_pod_sandbox(request()).await.expect_err("already handed out");
    assert_eq!(again.code(), Code::AlreadyExists);
    env.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: made.clone() }).await?;
    env.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: made }).await?;
    Ok(())
}

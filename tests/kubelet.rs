//! End-to-end: requests shaped as the kubelet (`pkg/kubelet/kuberuntime`) and critest send
//! them, on this host as it is. The kubelet puts a hugepage limit for every page size the
//! node has into every container, the default masked and read-only paths, seccomp and
//! AppArmor profiles, SELinux options it does not know the runtime ignores, and its own
//! labels, annotations and mounts; none of that may fail a container here, whatever
//! controllers the host's cgroups lack.

#[path = "support/podkit.rs"]
mod podkit;

use std::collections::HashMap;

use anyhow::{Context, Result};
use berth_e2e::fixtures::{BUSYBOX_APPLETS, HOST_BUSYBOX};
use berth_e2e::oci::{Compression, Format, Image, ImageConfig, LayerBuilder, layer};
use berth_e2e::{Options, image_spec};
use k8s_cri::v1::*;
use podkit::{Env, skip};
use tonic::Code;

/// The kubelet's default masked paths (`securitycontext.ConvertToRuntimeMaskedPaths`).
const KUBELET_MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The kubelet's default read-only paths.
const KUBELET_READONLY: &[&str] =
    &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// A hugepage limit of 0 for every page size this node has, as the kubelet's
/// `GetHugepageLimitsFromResources` sends them (`hugepages-2048kB` → `2MB`).
fn node_hugepage_limits() -> Vec<HugepageLimit> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/kernel/mm/hugepages").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(kb) = name.strip_prefix("hugepages-").and_then(|s| s.strip_suffix("kB")) else {
            continue;
        };
        let Ok(kb) = kb.parse::<u64>() else { continue };
        let size = if kb >= 1 << 20 {
            format!("{}GB", kb >> 20)
        } else if kb >= 1 << 10 {
            format!("{}MB", kb >> 10)
        } else {
            format!("{kb}KB")
        };
        out.push(HugepageLimit { page_size: size, limit: 0 });
    }
    // A node without hugepages still gets the shape the test is about.
    if out.is_empty() {
        out.push(HugepageLimit { page_size: "2MB".into(), limit: 0 });
    }
    out
}

/// The resources the kubelet computes for a Burstable container with a 250m CPU request,
/// a 500m CPU limit and a 64 MiB memory limit, on cgroup v1 with swap disabled for it.
fn kubelet_resources(memory: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 256,
        memory_limit_in_bytes: memory,
        oom_score_adj: 968,
        hugepage_limits: node_hugepage_limits(),
        // cgroup v1, NoSwap: the memory+swap limit equals the memory limit.
        memory_swap_limit_in_bytes: memory,
        ..Default::default()
    }
}

/// A pod as the kubelet's `generatePodSandboxConfig` makes it, under `cgroup_parent`.
fn kubelet_pod(env: &Env, name: &str, cgroup_parent: &str) -> PodSandboxConfig {
    let uid = format!("{name}-0000-4000-8000-000000000001");
    let mut config = env.pod_config(name);
    let meta = config.metadata.get_or_insert_with(Default::default);
    meta.uid = uid.clone();
    config.labels = [
        ("io.kubernetes.pod.name".to_string(), name.to_string()),
        ("io.kubernetes.pod.namespace".to_string(), "default".to_string()),
        ("io.kubernetes.pod.uid".to_string(), uid.clone()),
    ]
    .into();
    config.annotations = [
        ("kubernetes.io/config.seen".to_string(), "2026-12-03T10:00:00.000000000Z".to_string()),
        ("kubernetes.io/config.source".to_string(), "api".to_string()),
    ]
    .into();
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["default.svc.cluster.local".into(), "svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let linux = config.linux.get_or_insert_with(Default::default);
    linux.cgroup_parent = format!("{cgroup_parent}/kubepods/burstable/pod{uid}");
    linux.overhead = Some(LinuxContainerResources::default());
    linux.resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 256,
        memory_limit_in_bytes: 64 << 20,
        hugepage_limits: node_hugepage_limits(),
        ..Default::default()
    });
    let sc = linux.security_context.get_or_insert_with(Default::default);
    sc.seccomp = Some(SecurityProfile {
        profile_type: security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    sc.supplemental_groups = vec![2000];
    config
}

/// A container as the kubelet's `generateContainerConfig` makes it, with a host directory
/// as its emptyDir volume and a termination-log file. The kubelet still fills the
/// deprecated `apparmor_profile` beside `apparmor`, for older runtimes.
#[allow(deprecated)]
fn kubelet_container(
    env: &Env,
    name: &str,
    args: &[&str],
    volumes: &std::path::Path,
) -> Result<ContainerConfig> {
    use std::os::unix::fs::PermissionsExt;
    // The kubelet makes emptyDir volumes 0777; the volume root's parent must be reachable.
    std::fs::set_permissions(volumes, std::fs::Permissions::from_mode(0o755))?;
    let empty_dir = volumes.join("empty-dir");
    std::fs::create_dir_all(&empty_dir)?;
    std::fs::set_permissions(&empty_dir, std::fs::Permissions::from_mode(0o777))?;
    let termination_log = volumes.join("termination-log");
    std::fs::write(&termination_log, b"")?;
    let mut config = env.container_config(name, args);
    config.labels = [
        ("io.kubernetes.container.name".to_string(), name.to_string()),
        ("io.kubernetes.pod.name".to_string(), "kubelet-shaped".to_string()),
        ("io.kubernetes.pod.namespace".to_string(), "default".to_string()),
    ]
    .into();
    config.annotations = [
        ("io.kubernetes.container.hash".to_string(), "6c8a3f2e".to_string()),
        ("io.kubernetes.container.restartCount".to_string(), "0".to_string()),
        (
            "io.kubernetes.container.terminationMessagePath".to_string(),
            "/dev/termination-log".to_string(),
        ),
        ("io.kubernetes.container.terminationMessagePolicy".to_string(), "File".to_string()),
        ("io.kubernetes.pod.terminationGracePeriod".to_string(), "30".to_string()),
    ]
    .into();
    config.envs = vec![
        KeyValue { key: "KUBERNETES_SERVICE_HOST".into(), value: "10.96.0.1".into() },
        KeyValue { key: "KUBERNETES_SERVICE_PORT".into(), value: "443".into() },
    ];
    config.mounts = vec![
        Mount {
            container_path: "/cache".into(),
            host_path: empty_dir.to_string_lossy().into_owned(),
            selinux_relabel: false,
            propagation: MountPropagation::PropagationPrivate as i32,
            ..Default::default()
        },
        Mount {
            container_path: "/dev/termination-log".into(),
            host_path: termination_log.to_string_lossy().into_owned(),
            ..Default::default()
        },
    ];
    config.linux = Some(LinuxContainerConfig {
        resources: Some(kubelet_resources(64 << 20)),
        security_context: Some(LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["NET_BIND_SERVICE".into()],
                drop_capabilities: vec!["NET_RAW".into()],
                add_ambient_capabilities: vec![],
            }),
            privileged: false,
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Pod as i32,
                pid: NamespaceMode::Container as i32,
                ipc: NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            selinux_options: Some(SeLinuxOption {
                user: "system_u".into(),
                role: "system_r".into(),
                r#type: "container_t".into(),
                level: "s0:c1,c2".into(),
            }),
            run_as_user: Some(Int64Value { value: 1000 }),
            run_as_group: Some(Int64Value { value: 3000 }),
            supplemental_groups: vec![2000],
            no_new_privs: true,
            masked_paths: KUBELET_MASKED.iter().map(|s| s.to_string()).collect(),
            readonly_paths: KUBELET_READONLY.iter().map(|s| s.to_string()).collect(),
            seccomp: Some(SecurityProfile {
                profile_type: security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            apparmor: Some(SecurityProfile {
                profile_type: security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            apparmor_profile: "runtime/default".into(),
            ..Default::default()
        }),
    });
    Ok(config)
}

/// The container's cgroup directory in the v1 hierarchy `controller`.
fn cgroup_file(info: &serde_json::Value, controller: &str, file: &str) -> Result<String> {
    let path = info["cgroupsPath"].as_str().context("cgroupsPath")?.trim_start_matches('/');
    let p = format!("/sys/fs/cgroup/{controller}/{path}/{file}");
    Ok(std::fs::read_to_string(&p).with_context(|| format!("read {p}"))?.trim().to_string())
}

/// UpdateContainerResources as the kubelet's in-place resize sends it, with `memory`.
async fn update(env: &mut Env, id: &str, memory: i64) -> Result<()> {
    env.rt
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(kubelet_resources(memory)),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Everything the kubelet sends for a Burstable pod on this host: the container runs with
/// its limits applied, hugepage limits for every page size included (this host has no
/// hugetlb controller), and UpdateContainerResources of the same shape works.
#[tokio::test]
async fn kubelet_shaped_pod_runs_and_updates() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let volumes = tempfile::Builder::new().prefix("berth-kubelet-vol").tempdir_in("/tmp")?;
    let parent = env.d.cgroup_parent().to_string();
    let pod_config = kubelet_pod(&env, "kubelet-shaped", &parent);
    let pod = env.run_pod(pod_config.clone()).await?;
    let script = "trap 'exit 0' TERM; echo up > /cache/up; sleep 1000 & wait";
    let config = kubelet_container(&env, "app", &["/bin/sh", "-c", script], volumes.path())?;
    let ctr = env.run(&pod, &pod_config, config.clone()).await?;

    let (s, info) = env.verbose_status(&ctr).await?;
    assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
    assert_eq!(s.labels, config.labels);
    assert_eq!(s.annotations, config.annotations);
    assert_eq!(cgroup_file(&info, "memory", "memory.limit_in_bytes")?, (64u64 << 20).to_string());
    assert_eq!(cgroup_file(&info, "cpu", "cpu.cfs_quota_us")?, "50000");
    assert_eq!(cgroup_file(&info, "cpu", "cpu.shares")?, "256");
    let id = env.exec(&ctr, &["/bin/id"], 10).await?;
    let id = String::from_utf8_lossy(&id.stdout).into_owned();
    assert!(id.contains("uid=1000") && id.contains("gid=3000") && id.contains("2000"), "{id}");
    assert!(
        podkit::eventually(std::time::Duration::from_secs(10), || {
            volumes.path().join("empty-dir/up").exists()
        })
        .await
    );

    // The kubelet's in-place resize: the same shape, hugepages and all.
    update(&mut env, &ctr, 96 << 20).await?;
    assert_eq!(cgroup_file(&info, "memory", "memory.limit_in_bytes")?, (96u64 << 20).to_string());

    // A second container, created and updated before its start.
    let idle = env.create(&pod, &pod_config, {
        let mut c = config.clone();
        c.metadata = Some(ContainerMetadata { name: "idle".into(), attempt: 0 });
        c.log_path = "idle/0.log".into();
        c
    });
    let idle = idle.await?;
    update(&mut env, &idle, 80 << 20).await?;
    env.rt.start_container(StartContainerRequest { container_id: idle.clone() }).await?;
    let (s, info) = env.verbose_status(&idle).await?;
    assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
    assert_eq!(cgroup_file(&info, "memory", "memory.limit_in_bytes")?, (80u64 << 20).to_string());

    env.remove_pod(&pod).await?;
    Ok(())
}

/// The hex mask after `key` (e.g. `CapEff:`) in `/proc/<pid>/status` text.
fn cap_mask(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// What berthd holds: bounding ∩ effective of its process.
fn berthd_caps(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(cap_mask(&status, "CapBnd:").context("CapBnd")?
        & cap_mask(&status, "CapEff:").context("CapEff")?)
}

/// CAP_SYS_RESOURCE, the one this VM's bounding set lacks.
const CAP_SYS_RESOURCE: u32 = 24;

/// A privileged container and one with `add: [ALL]` get exactly the capabilities berthd
/// holds (this VM's bounding set lacks CAP_SYS_RESOURCE); asking for one berthd lacks is a
/// clear InvalidArgument naming it.
#[tokio::test]
async fn privileged_and_all_capabilities_get_what_berthd_holds() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let held = berthd_caps(env.d.pid().context("berthd pid")?)?;
    let mut pod_config = env.pod_config("privileged");
    pod_config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
    let pod = env.run_pod(pod_config.clone()).await?;
    let sleeper = ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"];

    let mut privileged = env.container_config("privileged", &sleeper);
    privileged.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut all = env.container_config("all", &sleeper);
    all.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["ALL".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    for config in [privileged, all] {
        let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        let ctr = env.run(&pod, &pod_config, config).await?;
        let out = env.exec(&ctr, &["/bin/cat", "/proc/self/status"], 10).await?;
        let caps = cap_mask(&String::from_utf8_lossy(&out.stdout), "CapEff:").context("CapEff")?;
        assert_eq!(caps, held, "{name}: {caps:x} != berthd's {held:x}");
    }

    // One berthd lacks: refused up front with its name, unless privileged.
    if held & (1u64 << CAP_SYS_RESOURCE) == 0 {
        let name = "SYS_RESOURCE";
        let mut config = env.container_config("lacking", &sleeper);
        config.linux = Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: vec![name.to_string()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = env.create(&pod, &pod_config, config.clone()).await.expect_err("lacking");
        let status = e.downcast_ref::<tonic::Status>().context("a gRPC status")?;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(name), "{}", status.message());
        let sc = config.linux.as_mut().and_then(|l| l.security_context.as_mut());
        sc.context("security context")?.privileged = true;
        config.metadata = Some(ContainerMetadata { name: "lacking-privileged".into(), attempt: 0 });
        let ctr = env.run(&pod, &pod_config, config).await?;
        assert_eq!(env.status(&ctr).await?.state, ContainerState::ContainerRunning as i32);
    } else {
        eprintln!("berthd holds CAP_SYS_RESOURCE: the refusal is not exercised here");
    }
    env.remove_pod(&pod).await?;
    Ok(())
}

/// An image with nothing but busybox: no `/proc`, `/dev`, `/sys`, `/etc`, `/tmp` for the
/// runtime's mounts.
fn bare_image() -> Result<Image> {
    let bin = std::fs::read(HOST_BUSYBOX).with_context(|| format!("reading {HOST_BUSYBOX}"))?;
    let mut l = LayerBuilder::new().dir("bin", 0o755).file("bin/busybox", 0o755, &bin);
    for a in BUSYBOX_APPLETS {
        l = l.symlink(&format!("bin/{a}"), "busybox");
    }
    let cfg = ImageConfig { env: vec!["PATH=/bin".into()], ..Default::default() };
    Ok(Image::build(Format::Oci, &cfg, vec![layer(&l.finish(), Compression::Gzip, Format::Oci)?]))
}

/// `readOnlyRootFilesystem: true` on an image that has none of the mount points the spec
/// needs: the runtime makes them, then the rootfs is read-only; volumes stay writable.
#[tokio::test]
async fn read_only_rootfs_on_an_image_without_mount_points() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start_with(Options::default()).await?;
    let bare = env.reg.push_image("bare", "1.0", &bare_image()?).await?.reference();
    env.d
        .images()
        .await?
        .pull_image(PullImageRequest { image: Some(image_spec(&bare)), ..Default::default() })
        .await?;
    let volumes = tempfile::Builder::new().prefix("berth-ro-vol").tempdir_in("/tmp")?;
    let pod_config = env.pod_config("readonly");
    let pod = env.run_pod(pod_config.clone()).await?;
    let script = "trap 'exit 0' TERM; sleep 1000 & wait";
    let mut config = env.container_config("ro", &["/bin/sh", "-c", script]);
    config.image = Some(image_spec(&bare));
    config.mounts = vec![Mount {
        container_path: "/data/volume".into(),
        host_path: volumes.path().to_string_lossy().into_owned(),
        ..Default::default()
    }];
    config.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            readonly_rootfs: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let ctr = env.run(&pod, &pod_config, config).await?;
    assert_eq!(env.status(&ctr).await?.state, ContainerState::ContainerRunning as i32);
    let out = env.exec(&ctr, &["/bin/touch", "/written"], 10).await?;
    assert_ne!(out.exit_code, 0, "the rootfs took a write");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only"), "{out:?}");
    let out = env.exec(&ctr, &["/bin/touch", "/data/volume/written"], 10).await?;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(volumes.path().join("written").exists());
    let out = env.exec(&ctr, &["/bin/cat", "/proc/self/mounts"], 10).await?;
    let mounts = String::from_utf8_lossy(&out.stdout).into_owned();
    let root_opts: HashMap<&str, &str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, target, _, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some((target, opts))
        })
        .collect();
    assert!(root_opts.get("/").is_some_and(|o| o.split(',').any(|x| x == "ro")), "{mounts}");
    assert!(root_opts.contains_key("/proc"), "{mounts}");
    env.remove_pod(&pod).await?;
    Ok(())
}

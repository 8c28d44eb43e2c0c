//! End-to-end: hostile and broken requests (issue 12). Each was once one CRI request that
//! made berthd allocate without bound, block a thread forever, write outside the pod's
//! directories, or accept at create what could only fail at start. Each now gets a clear
//! error code naming the field, and berthd keeps serving: a ListPodSandbox sent while the
//! bad request is in flight (or right after it was refused) answers within a second.

#[path = "support/podkit.rs"]
mod podkit;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_e2e::fixtures::busybox_tar;
use berth_e2e::oci::{Compression, Format, Image, ImageConfig, layer};
use berth_e2e::{Options, image_spec};
use k8s_cri::v1::*;
use podkit::{Env, skip};
use tonic::{Code, Status};

/// How long a bad request may take before we call it hung.
const HANG: Duration = Duration::from_secs(30);
/// How fast berthd must answer a ListPodSandbox next to a bad request.
const SERVING: Duration = Duration::from_secs(1);

/// Runs `bad` while a ListPodSandbox goes out next to it; returns the bad request's error.
/// Fails if the bad request succeeds or hangs, or if the list does not answer in time.
async fn refused_while_serving<T: std::fmt::Debug>(
    env: &Env,
    bad: impl Future<Output = Result<T, Status>>,
) -> Result<Status> {
    let mut rt = env.rt.clone();
    let list = async {
        // Let the bad request get going first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::time::timeout(SERVING, rt.list_pod_sandbox(ListPodSandboxRequest::default())).await
    };
    let (bad, list) = tokio::join!(tokio::time::timeout(HANG, bad), list);
    match list {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => bail!("ListPodSandbox next to the bad request failed: {e}"),
        Err(_) => bail!("ListPodSandbox next to the bad request took over {SERVING:?}"),
    }
    match bad {
        Ok(Ok(v)) => bail!("the bad request was accepted: {v:?}"),
        Ok(Err(status)) => Ok(status),
        Err(_) => bail!("the bad request hung for {HANG:?}"),
    }
}

/// Asserts `status` has `code` and its message names `what`.
fn assert_refused(status: &Status, code: Code, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(status.message().contains(what), "message should name {what:?}: {status:?}");
}

/// CreateContainer in `pod` with `config`, as a future for [`refused_while_serving`].
fn create(
    env: &Env,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> impl Future<Output = Result<CreateContainerResponse, Status>> + use<> {
    let mut rt = env.rt.clone();
    let req = CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config.clone()),
    };
    async move { rt.create_container(req).await.map(|r| r.into_inner()) }
}

/// Sets a Localhost seccomp profile.
fn with_localhost_profile(mut config: ContainerConfig, profile: &Path) -> ContainerConfig {
    let linux = config.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    sc.seccomp = Some(SecurityProfile {
        profile_type: security_profile::ProfileType::Localhost as i32,
        localhost_ref: profile.to_string_lossy().into_owned(),
    });
    config
}

/// No container, and nothing of one, is left in the daemon's state: refused creates make
/// nothing, failed starts and removals leave nothing behind.
fn assert_no_container_state(env: &Env) {
    let state = env.state();
    for dir in [state.join("containers"), state.join("shim")] {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
    // The external shims' task directories: <state>/shims/<pod>/run/<id>.
    for pod in std::fs::read_dir(state.join("shims")).into_iter().flatten().flatten() {
        let run = pod.path().join("run");
        let left: Vec<_> = std::fs::read_dir(&run)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", run.display());
    }
}

/// berthd still runs a container to completion after what it refused.
async fn still_runs_containers(
    env: &mut Env,
    pod: &str,
    pod_config: &PodSandboxConfig,
) -> Result<()> {
    let ctr = env.run(pod, pod_config, env.container_config("after", &["/bin/true"])).await?;
    let s = env.wait_exited(&ctr, Duration::from_secs(30)).await?;
    assert_eq!(s.exit_code, 0);
    env.rt.remove_container(RemoveContainerRequest { container_id: ctr }).await?;
    Ok(())
}

#[tokio::test]
async fn seccomp_profile_dev_zero_is_refused() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let pod_config = env.pod_config("seccomp-zero");
    let pod = env.run_pod(pod_config.clone()).await?;
    // Once read without bound: berthd was OOM-killed.
    let files = tempfile::tempdir()?;
    let link = files.path().join("zero.json");
    std::os::unix::fs::symlink("/dev/zero", &link)?;
    for profile in [Path::new("/dev/zero"), link.as_path()] {
        let config = with_localhost_profile(env.container_config("c", &["/bin/true"]), profile);
        let status = refused_while_serving(&env, create(&env, &pod, &pod_config, config)).await?;
        assert_refused(&status, Code::InvalidArgument, &profile.to_string_lossy());
        assert!(status.message().contains("not a regular file"), "{status:?}");
    }
    assert_no_container_state(&env);
    still_runs_containers(&mut env, &pod, &pod_config).await?;
    env.remove_pod(&pod).await
}

#[tokio::test]
async fn seccomp_profile_fifo_is_refused() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let pod_config = env.pod_config("seccomp-fifo");
    let pod = env.run_pod(pod_config.clone()).await?;
    // Once opened blocking: the open waited forever for a writer, holding a runtime thread.
    let files = tempfile::tempdir()?;
    let fifo = files.path().join("profile.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let config = with_localhost_profile(env.container_config("c", &["/bin/true"]), &fifo);
    let status = refused_while_serving(&env, create(&env, &pod, &pod_config, config)).await?;
    assert_refused(&status, Code::InvalidArgument, &fifo.to_string_lossy());
    assert!(status.message().contains("FIFO"), "{status:?}");
    assert_no_container_state(&env);
    still_runs_containers(&mut env, &pod, &pod_config).await?;
    env.remove_pod(&pod).await
}

/// A running container whose output goes to its log, with the log's path.
async fn chatty_container(
    env: &mut Env,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
) -> Result<(String, PathBuf)> {
    let script = "trap 'exit 0' TERM; while true; do echo tick; sleep 0.1; done & wait";
    let ctr =
        env.run(pod, pod_config, env.container_config(name, &["/bin/sh", "-c", script])).await?;
    let log = PathBuf::from(&pod_config.log_directory).join(format!("{name}/0.log"));
    let has_output = || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("tick"));
    if !podkit::eventually(Duration::from_secs(10), has_output).await {
        bail!("no output in {}", log.display());
    }
    Ok((ctr, log))
}

/// ReopenContainerLog, as a future for [`refused_while_serving`].
fn reopen(
    env: &Env,
    ctr: &str,
) -> impl Future<Output = Result<ReopenContainerLogResponse, Status>> + use<> {
    let mut rt = env.rt.clone();
    let req = ReopenContainerLogRequest { container_id: ctr.into() };
    async move { rt.reopen_container_log(req).await.map(|r| r.into_inner()) }
}

fn options(shim: &str) -> Options {
    Options { shim: Some(shim.into()), ..Default::default() }
}

/// The kubelet rotated the log away and a FIFO took its place: ReopenContainerLog once
/// blocked (in berthd or the pod's shim) until a reader came.
async fn reopen_log_at_fifo(shim: &str) -> Result<()> {
    let mut env = Env::start_with(options(shim)).await?;
    let pod_config = env.pod_config(&format!("reopen-fifo-{shim}"));
    let pod = env.run_pod(pod_config.clone()).await?;
    let (ctr, log) = chatty_container(&mut env, &pod, &pod_config, "c").await?;
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated)?;
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let status = refused_while_serving(&env, reopen(&env, &ctr)).await?;
    assert_refused(&status, Code::FailedPrecondition, &log.to_string_lossy());
    assert!(status.message().contains("FIFO"), "{status:?}");
    // The container keeps running and writing to the file it had.
    assert_eq!(env.status(&ctr).await?.state, ContainerState::ContainerRunning as i32);
    let before = std::fs::metadata(&rotated)?.len();
    let grew = || std::fs::metadata(&rotated).is_ok_and(|m| m.len() > before);
    assert!(podkit::eventually(Duration::from_secs(5), grew).await, "old log not written");
    // Once the FIFO is gone, a reopen works again.
    std::fs::remove_file(&log)?;
    reopen(&env, &ctr).await?;
    let fresh = || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("tick"));
    assert!(podkit::eventually(Duration::from_secs(5), fresh).await, "new log not written");
    env.remove_pod(&pod).await
}

/// The kubelet rotated the log away and a symlink to a host file took its place:
/// ReopenContainerLog once appended the container's output to that file.
async fn reopen_log_at_symlink(shim: &str) -> Result<()> {
    let mut env = Env::start_with(options(shim)).await?;
    let pod_config = env.pod_config(&format!("reopen-link-{shim}"));
    let pod = env.run_pod(pod_config.clone()).await?;
    let (ctr, log) = chatty_container(&mut env, &pod, &pod_config, "c").await?;
    let files = tempfile::tempdir()?;
    let host_file = files.path().join("precious");
    std::fs::write(&host_file, "precious\n")?;
    std::fs::rename(&log, log.with_extension("log.1"))?;
    std::os::unix::fs::symlink(&host_file, &log)?;
    let status = refused_while_serving(&env, reopen(&env, &ctr)).await?;
    assert_refused(&status, Code::FailedPrecondition, &log.to_string_lossy());
    assert!(status.message().contains("symbolic link"), "{status:?}");
    // Give the container time to write: nothing of it may reach the host file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&host_file)?, "precious\n");
    assert_eq!(std::fs::read_link(&log)?, host_file);
    env.remove_pod(&pod).await
}

#[tokio::test]
async fn reopen_log_at_fifo_embedded() -> Result<()> {
    if skip() {
        return Ok(());
    }
    reopen_log_at_fifo("embedded").await
}

#[tokio::test]
async fn reopen_log_at_fifo_external() -> Result<()> {
    if skip() {
        return Ok(());
    }
    reopen_log_at_fifo("external").await
}

#[tokio::test]
async fn reopen_log_at_symlink_embedded() -> Result<()> {
    if skip() {
        return Ok(());
    }
    reopen_log_at_symlink("embedded").await
}

#[tokio::test]
async fn reopen_log_at_symlink_external() -> Result<()> {
    if skip() {
        return Ok(());
    }
    reopen_log_at_symlink("external").await
}

/// A FIFO already at the log path when the container starts: StartContainer is refused
/// without blocking, and nothing of the task is left once the container is removed (the
/// shim's task directory once survived removal and restarts).
#[tokio::test]
async fn start_with_fifo_log_fails_cleanly() -> Result<()> {
    if skip() {
        return Ok(());
    }
    for shim in ["embedded", "external"] {
        let mut env = Env::start_with(options(shim)).await?;
        let pod_config = env.pod_config("start-fifo");
        let pod = env.run_pod(pod_config.clone()).await?;
        let ctr = env.create(&pod, &pod_config, env.container_config("c", &["/bin/true"])).await?;
        let log = env.log_dir("start-fifo").join("c/0.log");
        nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        let mut rt = env.rt.clone();
        let start = async move {
            rt.start_container(StartContainerRequest { container_id: ctr.clone() }).await
        };
        let status = refused_while_serving(&env, start).await?;
        assert_refused(&status, Code::FailedPrecondition, &log.to_string_lossy());
        let ctrs = env.rt.list_containers(ListContainersRequest::default()).await?.into_inner();
        for c in ctrs.containers {
            env.rt.remove_container(RemoveContainerRequest { container_id: c.id }).await?;
        }
        assert_no_container_state(&env);
        std::fs::remove_file(&log)?;
        still_runs_containers(&mut env, &pod, &pod_config).await?;
        env.remove_pod(&pod).await?;
    }
    Ok(())
}

#[tokio::test]
async fn log_path_stays_in_the_log_directory() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let pod_config = env.pod_config("logpath");
    let pod = env.run_pod(pod_config.clone()).await?;
    let outside = tempfile::tempdir()?;
    let absolute = outside.path().join("abs.log");
    let long = format!("{}/0.log", "d".repeat(5000));
    let cases = [
        "../../escape.log".to_string(),
        "c/../../../escape.log".to_string(),
        absolute.to_string_lossy().into_owned(),
        ".".into(),
        "..".into(),
        "c/".into(),
        "c/\0.log".into(),
        long,
    ];
    for log_path in cases {
        let mut config = env.container_config("c", &["/bin/true"]);
        config.log_path = log_path.clone();
        let status = refused_while_serving(&env, create(&env, &pod, &pod_config, config)).await?;
        assert_refused(&status, Code::InvalidArgument, "log_path");
        assert!(status.message().len() < 1024, "{log_path:.40}: message too long");
    }
    assert!(!absolute.exists());
    assert!(!env.logs.path().join("escape.log").exists());
    assert!(!env.logs.path().parent().context("no parent")?.join("escape.log").exists());
    assert_no_container_state(&env);
    still_runs_containers(&mut env, &pod, &pod_config).await?;
    env.remove_pod(&pod).await
}

#[tokio::test]
async fn pod_host_paths_are_confined() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let cases = [
        ("linux.cgroup_parent", "kubepods/pod-relative", ""),
        ("linux.cgroup_parent", "/kubepods/../../escape", ""),
        ("log_directory", "", "relative/logs"),
    ];
    for (field, cgroup_parent, log_directory) in cases {
        let mut config = env.pod_config("confined");
        config.linux.get_or_insert_with(Default::default).cgroup_parent = cgroup_parent.into();
        if !log_directory.is_empty() {
            config.log_directory = log_directory.into();
        }
        let mut rt = env.rt.clone();
        let run = async move {
            rt.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        };
        let status = refused_while_serving(&env, run).await?;
        assert_refused(&status, Code::InvalidArgument, field);
    }
    let pods = env.rt.list_pod_sandbox(ListPodSandboxRequest::default()).await?.into_inner();
    assert!(pods.items.is_empty(), "{:?}", pods.items);
    let pods_dir: Vec<_> = std::fs::read_dir(env.state().join("pods"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(pods_dir.is_empty(), "{pods_dir:?}");
    // The name was released: the same pod with sane paths runs.
    let pod_config = env.pod_config("confined");
    let pod = env.run_pod(pod_config.clone()).await?;
    still_runs_containers(&mut env, &pod, &pod_config).await?;
    env.remove_pod(&pod).await
}

/// Pushes and pulls `nocmd:1.0`: busybox without Entrypoint and Cmd.
async fn pull_image_without_command(env: &Env) -> Result<String> {
    let l = layer(&busybox_tar()?, Compression::Gzip, Format::Oci)?;
    let config = ImageConfig { cmd: Vec::new(), ..Default::default() };
    let pushed =
        env.reg.push_image("nocmd", "1.0", &Image::build(Format::Oci, &config, vec![l])).await?;
    let image = pushed.reference();
    env.d
        .images()
        .await?
        .pull_image(PullImageRequest { image: Some(image_spec(&image)), ..Default::default() })
        .await
        .context("pull nocmd")?;
    Ok(image)
}

/// Fields that CreateContainer once accepted and StartContainer (runc) then refused.
#[tokio::test]
async fn refused_at_create_not_at_start() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let pod_config = env.pod_config("atcreate");
    let pod = env.run_pod(pod_config.clone()).await?;
    let nocmd = pull_image_without_command(&env).await?;
    let kv = |k: &str, v: &str| KeyValue { key: k.into(), value: v.into() };
    let mount = |path: &str| Mount {
        container_path: path.into(),
        host_path: "/tmp".into(),
        ..Default::default()
    };
    type Edit = Box<dyn Fn(&mut ContainerConfig)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("envs", Box::new(move |c| c.envs = vec![kv("", "x")])),
        ("envs", Box::new(move |c| c.envs = vec![kv("A=B", "x")])),
        ("envs", Box::new(move |c| c.envs = vec![kv("A\0B", "x")])),
        ("envs", Box::new(move |c| c.envs = vec![kv("A", "x\0y")])),
        ("working_dir", Box::new(|c| c.working_dir = "relative/dir".into())),
        ("working_dir", Box::new(|c| c.working_dir = "/a\0b".into())),
        ("command", Box::new(|c| c.command = vec!["/bin/tr\0ue".into()])),
        ("executable", Box::new(|c| c.command = vec![String::new()])),
        ("mounts.container_path", Box::new(move |c| c.mounts = vec![mount("/")])),
        ("mounts.container_path", Box::new(move |c| c.mounts = vec![mount("//")])),
        ("mounts.container_path", Box::new(move |c| c.mounts = vec![mount("/x\0y")])),
        ("mounts.container_path", Box::new(move |c| c.mounts = vec![mount("/a/../../etc")])),
        ("mounts.container_path", Box::new(move |c| c.mounts = vec![mount("relative")])),
        ("command", {
            let nocmd = nocmd.clone();
            Box::new(move |c| {
                c.command.clear();
                c.image = Some(image_spec(&nocmd));
            })
        }),
    ];
    for (field, edit) in cases {
        let mut config = env.container_config("c", &["/bin/true"]);
        edit(&mut config);
        let status = refused_while_serving(&env, create(&env, &pod, &pod_config, config)).await?;
        assert_refused(&status, Code::InvalidArgument, field);
    }
    assert_no_container_state(&env);

    // An empty command is fine when the image has one: busybox's Cmd `/bin/sh` runs (and,
    // its stdin empty, exits at once).
    let mut config = env.container_config("imagecmd", &[]);
    config.command.clear();
    let ctr = env.run(&pod, &pod_config, config).await?;
    assert_eq!(env.wait_exited(&ctr, Duration::from_secs(30)).await?.exit_code, 0);
    still_runs_containers(&mut env, &pod, &pod_config).await?;
    env.remove_pod(&pod).await
}

//! Unit tests of a whole [`Runtime`] on temp dirs: the [`FakeShim`] instead of a real one, a
//! fake cgroup root, no network. Pods here share the host's network and IPC namespaces, so
//! making one needs no root (no namespace pins, no shm mount). A container's rootfs is an
//! overlay mount, which needs root: those tests say `SKIPPED` on stderr and return when run
//! without it (the end-to-end suite covers them with real binaries).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_image::{Image, ImageConfig, ImageStore};
use berth_shim::{Exit, RecoveredTask, ShimError, TaskState};
use berth_snapshot::{Compression, Snapshotter};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RunPodSandboxRequest,
};
use sha2::{Digest, Sha256};

use crate::fake_shim::{Call, FakeShim};
use crate::state::{ContainerState, SandboxState};
use crate::{Runtime, RuntimeConfig, RuntimeError};

const CGROUP_PARENT: &str = "/berth-test";
const IMAGE: &str = "test.invalid/hello:1";

/// Whether this process may mount (the overlay rootfs); prints why a test is skipped if not.
fn can_mount(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        // Straight to the stderr file, past the test harness's capture, so `cargo test`
        // shows it even though the test then passes.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs root (a container's rootfs is an overlay mount)"
        );
    }
    root
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One runtime's world on a temp dir: database, images, snapshots, state, fake cgroupfs.
struct World {
    dir: tempfile::TempDir,
    db: Arc<redb::Database>,
    images: Arc<ImageStore>,
    snapshots: Arc<Snapshotter>,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(redb::Database::create(dir.path().join("meta.redb")).expect("db"));
        let snapshots =
            Arc::new(Snapshotter::open(dir.path().join("snapshots")).expect("snapshotter"));
        let images = Arc::new(
            ImageStore::open(
                db.clone(),
                snapshots.clone(),
                ImageConfig { content_dir: dir.path().join("content"), ..Default::default() },
            )
            .expect("image store"),
        );
        // A cgroup v1 layout, as the runtime reads a plain directory.
        std::fs::create_dir_all(dir.path().join("cgroup/memory")).expect("mkdir");
        let world = Self { dir, db, images, snapshots };
        world.add_image();
        world
    }

    /// An image of one layer holding `/hello`, recorded as [`IMAGE`].
    fn add_image(&self) {
        let mut tar = tar::Builder::new(Vec::new());
        let body = b"hello\n";
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        // Owned by whoever runs the test, so the unpack's chown works without root.
        header.set_uid(nix::unistd::geteuid().as_raw().into());
        header.set_gid(nix::unistd::getegid().as_raw().into());
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, "hello", &body[..]).expect("tar");
        let layer = tar.into_inner().expect("tar");
        let diff_id = sha256(&layer);
        let chain_id = self
            .snapshots
            .unpack_layer_from_reader(
                None,
                &diff_id,
                Path::new("test layer"),
                Cursor::new(layer),
                Compression::None,
            )
            .expect("unpack");
        let config_json = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": ["/hello"] },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        })
        .to_string();
        self.images
            .record_unpacked(Image {
                id: sha256(config_json.as_bytes()),
                repo_tags: vec![IMAGE.into()],
                repo_digests: Vec::new(),
                size: 0,
                config_json,
                diff_ids: vec![diff_id],
                chain_id,
                user: None,
                pinned: false,
            })
            .expect("record image");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self) -> RuntimeConfig {
        RuntimeConfig {
            state_dir: self.path("state"),
            default_handler: "runc".into(),
            // Never run: the fake shim runs nothing.
            handlers: BTreeMap::from([("runc".into(), PathBuf::from("/nonexistent/runc"))]),
            seccomp_profile_root: self.path("seccomp"),
            cgroup_parent: CGROUP_PARENT.into(),
            pod_init_program: PathBuf::from("/nonexistent/berth-pod-init"),
            cgroup_root: self.path("cgroup"),
        }
    }

    /// A runtime on this world (a second one after dropping the first is a "restart").
    fn open(&self, shim: Arc<FakeShim>) -> Arc<Runtime<FakeShim>> {
        Runtime::open(
            self.config(),
            self.db.clone(),
            self.images.clone(),
            self.snapshots.clone(),
            shim,
            None,
        )
        .expect("open runtime")
    }

    /// Where the pod's own cgroup would be (cgroup v1 memory hierarchy).
    fn pod_cgroup(&self, pod_id: &str) -> PathBuf {
        self.path("cgroup/memory")
            .join(CGROUP_PARENT.trim_start_matches('/'))
            .join(format!("pod-{pod_id}"))
    }

    /// Mount points under the world's directory.
    fn mounts(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(self.dir.path()))
            .collect()
    }
}

impl Drop for World {
    /// Unmounts whatever a failed test left mounted, so the temp dir can go.
    fn drop(&mut self) {
        for m in self.mounts().into_iter().rev() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn pod_request(name: &str, log_directory: &Path, pid: NamespaceMode) -> RunPodSandboxRequest {
    RunPodSandboxRequest {
        config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                namespace: "default".into(),
                uid: format!("uid-{name}"),
                attempt: 0,
            }),
            log_directory: log_directory.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ipc: NamespaceMode::Node as i32,
                        pid: pid as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        runtime_handler: String::new(),
    }
}

fn container_request(pod_id: &str, name: &str) -> CreateContainerRequest {
    CreateContainerRequest {
        pod_sandbox_id: pod_id.into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
            log_path: format!("{name}.log"),
            ..Default::default()
        }),
        sandbox_config: None,
    }
}

fn pod_state(rt: &Runtime<FakeShim>, id: &str) -> SandboxState {
    rt.sandbox(id).expect("pod").status().state
}

fn container_state(rt: &Runtime<FakeShim>, id: &str) -> ContainerState {
    rt.container(id).expect("container").state()
}

fn subdirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_runs_stops_and_is_removed_with_its_cgroup() {
    let world = World::new();
    let rt = world.open(Arc::new(FakeShim::new()));
    let logs = world.path("logs/p1");
    let id = rt
        .run_pod_sandbox(pod_request("p1", &logs, NamespaceMode::Container))
        .await
        .expect("run pod");
    assert_eq!(pod_state(&rt, &id), SandboxState::Ready);
    let dir = world.path("state/pods").join(&id);
    assert!(dir.join("hostname").is_file() && dir.join("hosts").is_file());
    // The name is held by the pod (a delivered create is not handed out again).
    let again = rt.run_pod_sandbox(pod_request("p1", &logs, NamespaceMode::Container)).await;
    assert!(matches!(again, Err(RuntimeError::NameReserved { holder, .. }) if holder == id));

    // The runtime's cgroup of the pod, in the fake cgroupfs (the OCI runtime would make it).
    std::fs::create_dir_all(world.pod_cgroup(&id)).expect("mkdir");
    rt.stop_pod_sandbox(&id).await.expect("stop pod");
    assert_eq!(pod_state(&rt, &id), SandboxState::NotReady);
    rt.stop_pod_sandbox(&id).await.expect("stop is idempotent");
    rt.remove_pod_sandbox(&id).await.expect("remove pod");
    assert!(rt.sandbox(&id).is_none());
    assert!(!dir.exists());
    assert!(!world.pod_cgroup(&id).exists(), "the pod cgroup goes, under the configured root");
    rt.remove_pod_sandbox(&id).await.expect("remove is idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pod_create_is_rolled_back() {
    let world = World::new();
    let rt = world.open(Arc::new(FakeShim::new()));
    let logs = world.path("logs/p1");
    // A pod-wide PID namespace needs the pod init, whose program does not exist: the pod
    // directory and its files were made before, and must be gone.
    let err = rt
        .run_pod_sandbox(pod_request("p1", &logs, NamespaceMode::Pod))
        .await
        .expect_err("no pod init program");
    assert!(err.to_string().contains("pod init"), "{err}");
    assert_eq!(subdirs(&world.path("state/pods")), Vec::<String>::new());
    assert!(rt.list_pod_sandbox(None).is_empty());
    // The name was released: the same pod can be made.
    let id = rt
        .run_pod_sandbox(pod_request("p1", &logs, NamespaceMode::Container))
        .await
        .expect("run pod");
    assert_eq!(subdirs(&world.path("state/pods")), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_keeps_pods_marks_lost_ones_and_repairs_orphans() {
    let world = World::new();
    let (kept, lost) = {
        let rt = world.open(Arc::new(FakeShim::new()));
        let logs = world.path("logs");
        let kept = rt
            .run_pod_sandbox(pod_request("kept", &logs, NamespaceMode::Container))
            .await
            .expect("pod");
        let lost = rt
            .run_pod_sandbox(pod_request("lost", &logs, NamespaceMode::Container))
            .await
            .expect("pod");
        (kept, lost)
    };
    // While "berthd" is down: a pod's directory vanishes, a crashed create left a pod
    // directory and a cgroup no record owns.
    crate::util::remove_dir_all(&world.path("state/pods").join(&lost)).expect("rm");
    let orphan = "f".repeat(64);
    std::fs::create_dir_all(world.path("state/pods").join(&orphan)).expect("mkdir");
    std::fs::create_dir_all(world.pod_cgroup(&orphan)).expect("mkdir");

    let rt = world.open(Arc::new(FakeShim::new()));
    let report = rt.recover().await.expect("recover");
    assert_eq!(pod_state(&rt, &kept), SandboxState::Ready);
    assert_eq!(pod_state(&rt, &lost), SandboxState::NotReady);
    assert_eq!(report.pods_not_ready, 1);
    assert_eq!(report.orphans_removed, 2, "{report:?}");
    assert!(!world.path("state/pods").join(&orphan).exists());
    assert!(!world.pod_cgroup(&orphan).exists());
    // The names came back with the records.
    let logs = world.path("logs");
    let again = rt.run_pod_sandbox(pod_request("kept", &logs, NamespaceMode::Container)).await;
    assert!(matches!(again, Err(RuntimeError::NameReserved { holder, .. }) if holder == kept));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_is_created_started_stopped_and_removed() {
    if !can_mount("container_is_created_started_stopped_and_removed") {
        return;
    }
    let world = World::new();
    let shim = Arc::new(FakeShim::new());
    let rt = world.open(shim.clone());
    let pod = rt
        .run_pod_sandbox(pod_request("p", &world.path("logs/p"), NamespaceMode::Container))
        .await
        .expect("pod");
    let id = rt.create_container(container_request(&pod, "c1")).await.expect("create");
    assert_eq!(container_state(&rt, &id), ContainerState::Created);
    let bundle = world.path("state/containers").join(&id);
    assert!(bundle.join("config.json").is_file());
    assert!(bundle.join("rootfs/hello").is_file(), "the image's layer is the rootfs");
    // The retry of a create the kubelet gave up on gets the same container.
    assert_eq!(rt.create_container(container_request(&pod, "c1")).await.expect("retry"), id);

    rt.start_container(&id).await.expect("start");
    assert_eq!(container_state(&rt, &id), ContainerState::Running);
    assert!(shim.has_task(&id));

    rt.stop_container(&id, 10).await.expect("stop");
    let status = rt.container(&id).expect("container").status();
    assert_eq!(status.state, ContainerState::Exited);
    assert_eq!((status.exit_code, status.reason.as_str()), (128 + libc::SIGTERM, "Error"));

    rt.remove_container(&id).await.expect("remove");
    assert!(rt.container(&id).is_none());
    assert!(!bundle.exists());
    assert!(!shim.has_task(&id), "the task is deleted");
    assert!(world.mounts().is_empty(), "the rootfs is unmounted: {:?}", world.mounts());
    assert!(world.snapshots.active_keys().expect("keys").is_empty());
    // The name is free again.
    let next = rt.create_container(container_request(&pod, "c1")).await.expect("create again");
    assert_ne!(next, id);
    // A container that ends by itself: the shim's exit event is recorded.
    rt.start_container(&next).await.expect("start");
    shim.exit(&next, 0);
    for _ in 0..200 {
        if container_state(&rt, &next) == ContainerState::Exited {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let status = rt.container(&next).expect("container").status();
    assert_eq!((status.state, status.reason.as_str()), (ContainerState::Exited, "Completed"));
    rt.remove_pod_sandbox(&pod).await.expect("remove pod with its container");
    assert!(rt.container(&next).is_none());
    assert!(world.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_container_that_ignores_its_stop_signal() {
    if !can_mount("stop_kills_a_container_that_ignores_its_stop_signal") {
        return;
    }
    let world = World::new();
    let shim = Arc::new(FakeShim::new());
    shim.ignore_signal(libc::SIGTERM);
    let rt = world.open(shim.clone());
    let pod = rt
        .run_pod_sandbox(pod_request("p", &world.path("logs/p"), NamespaceMode::Container))
        .await
        .expect("pod");
    let id = rt.create_container(container_request(&pod, "c1")).await.expect("create");
    rt.start_container(&id).await.expect("start");
    rt.stop_container(&id, 1).await.expect("stop");
    assert_eq!(rt.container(&id).expect("c").status().exit_code, 128 + libc::SIGKILL);
    let kills: Vec<String> = shim.calls().into_iter().filter(|c| c.starts_with("kill")).collect();
    assert_eq!(
        kills,
        [format!("kill {id} {}", libc::SIGTERM), format!("kill {id} {}", libc::SIGKILL)]
    );
    rt.remove_pod_sandbox(&pod).await.expect("remove pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_container_create_is_rolled_back_and_a_failed_start_is_recorded() {
    if !can_mount("failed_container_create_is_rolled_back_and_a_failed_start_is_recorded") {
        return;
    }
    let world = World::new();
    let shim = Arc::new(FakeShim::new());
    let rt = world.open(shim.clone());
    // The pod's log directory is a file: the container's log directory cannot be made, a
    // step after its bundle and rootfs.
    let logs = world.path("logs-file");
    std::fs::write(&logs, b"not a directory").expect("write");
    let pod =
        rt.run_pod_sandbox(pod_request("p", &logs, NamespaceMode::Container)).await.expect("pod");
    let err = rt.create_container(container_request(&pod, "c1")).await.expect_err("no log dir");
    assert!(err.to_string().contains("create directory"), "{err}");
    assert_eq!(subdirs(&world.path("state/containers")), Vec::<String>::new());
    assert!(world.mounts().is_empty(), "rootfs left mounted: {:?}", world.mounts());
    assert!(world.snapshots.active_keys().expect("keys").is_empty());
    assert!(rt.list_containers(None).is_empty());

    // Once the directory can be made, the same name is free.
    std::fs::remove_file(&logs).expect("rm");
    let id = rt.create_container(container_request(&pod, "c1")).await.expect("create");
    // A start the shim fails leaves the container exited with StartError, as containerd.
    shim.fail_next(Call::Create, ShimError::NotRunning { id: id.clone() });
    rt.start_container(&id).await.expect_err("start fails");
    let status = rt.container(&id).expect("c").status();
    assert_eq!((status.state, status.reason.as_str()), (ContainerState::Exited, "StartError"));
    rt.remove_pod_sandbox(&pod).await.expect("remove pod");
    assert!(world.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_reattaches_running_containers_and_records_exits() {
    if !can_mount("recovery_reattaches_running_containers_and_records_exits") {
        return;
    }
    let world = World::new();
    let (pod, alive, gone) = {
        let shim = Arc::new(FakeShim::new());
        let rt = world.open(shim.clone());
        let pod = rt
            .run_pod_sandbox(pod_request("p", &world.path("logs/p"), NamespaceMode::Container))
            .await
            .expect("pod");
        let alive = rt.create_container(container_request(&pod, "alive")).await.expect("create");
        let gone = rt.create_container(container_request(&pod, "gone")).await.expect("create");
        rt.start_container(&alive).await.expect("start");
        rt.start_container(&gone).await.expect("start");
        (pod, alive, gone)
    };
    // A bundle of a create that crashed before its record was written.
    let orphan = "e".repeat(64);
    std::fs::create_dir_all(world.path("state/containers").join(&orphan)).expect("mkdir");

    // The shim outlived berthd: one task still runs, the other exited meanwhile.
    let shim = Arc::new(FakeShim::new());
    let exit = Exit { code: 3, at: std::time::SystemTime::now(), oom_killed: false, lost: false };
    shim.set_reattach(vec![
        RecoveredTask {
            id: alive.clone(),
            pod_id: pod.clone(),
            state: TaskState::Running { pid: 1 << 30 },
        },
        RecoveredTask { id: gone.clone(), pod_id: pod.clone(), state: TaskState::Exited(exit) },
    ]);
    let rt = world.open(shim.clone());
    let report = rt.recover().await.expect("recover");
    assert_eq!((report.reattached, report.exited), (1, 1), "{report:?}");
    assert_eq!(container_state(&rt, &alive), ContainerState::Running);
    let status = rt.container(&gone).expect("c").status();
    assert_eq!(
        (status.state, status.exit_code, status.reason.as_str()),
        (ContainerState::Exited, 3, "Error")
    );
    assert!(!world.path("state/containers").join(&orphan).exists(), "repair removed the orphan");
    // The reattached container is driven as before.
    rt.stop_container(&alive, 10).await.expect("stop");
    assert_eq!(container_state(&rt, &alive), ContainerState::Exited);
    rt.remove_pod_sandbox(&pod).await.expect("remove pod");
    assert!(world.mounts().is_empty());
}

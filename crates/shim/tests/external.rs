//! Real containers through `ExternalShim`, a real `berth-shim` process per pod, and runc.
//!
//! Needs root, `runc` and a static `/bin/busybox` (skipped with a message otherwise). Each
//! test has its own shim root, pod, container ID and runtime root; on the way out it
//! force-deletes its container and kills its shim by PID, so the tests run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_shim::state_file::{self, TaskRecord};
use berth_shim::{CreateTask, ExternalShim, Shim, ShimError, TaskEvent, TaskState};
use common::{RUNC, available, process, runc_delete, write_bundle};

const SHIM_BIN: &str = env!("CARGO_BIN_EXE_berth-shim");

/// The container loops until `/tmp/stop` exists (the test creates it from the host side),
/// then exits 7.
const LOOP_UNTIL_STOP: &[&str] =
    &["sh", "-c", "echo started; while [ ! -f /tmp/stop ]; do sleep 0.05; done; exit 7"];

struct Fixture {
    id: String,
    pod: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(name: &str, args: &[&str]) -> Fixture {
        let id = format!("berth-ext-{name}-{}", std::process::id());
        let pod = format!("pod-{name}-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        write_bundle(&dir.path().join("bundle"), args);
        std::fs::create_dir_all(dir.path().join("runc-root")).unwrap();
        Fixture { id, pod, dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("shims")
    }
    fn runtime_root(&self) -> PathBuf {
        self.dir.path().join("runc-root")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("logs/0.log")
    }
    fn shim_dir(&self) -> PathBuf {
        self.root().join(&self.pod)
    }
    fn stop_container(&self) {
        std::fs::write(self.dir.path().join("bundle/rootfs/tmp/stop"), b"").unwrap();
    }
    fn client(&self) -> Arc<ExternalShim> {
        ExternalShim::new(self.root(), SHIM_BIN.into()).unwrap()
    }
    fn task(&self) -> CreateTask {
        CreateTask {
            id: self.id.clone(),
            bundle: self.dir.path().join("bundle"),
            runtime: RUNC.into(),
            runtime_root: self.runtime_root(),
            log_path: Some(self.log_path()),
            memory_cgroup: None,
            tty: false,
            stdin: false,
            stdin_once: false,
            start: false,
        }
    }
    async fn create_and_start(&self, shim: &ExternalShim) -> u32 {
        shim.bind_container(&self.id, &self.pod);
        let pid = shim.create(self.task()).await.expect("create");
        shim.start(&self.id).await.expect("start");
        pid
    }
    fn shim_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.shim_dir().join("shim.pid")).ok()?.trim().parse().ok()
    }
    fn record(&self) -> Option<TaskRecord> {
        state_file::read_all(&state_file::tasks_dir(&self.shim_dir()))
            .into_iter()
            .find(|r| r.id == self.id)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Synchronous, best effort: neither container nor shim may outlive a failed test.
        runc_delete(&self.runtime_root(), &self.id);
        if let Some(pid) = self.shim_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn alive(pid: i32) -> bool {
    // A zombie still "exists": check its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_has(path: &Path, text: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|l| l.contains(text))
}

#[tokio::test]
async fn lifecycle_exec_exit_code_and_shutdown() {
    if !available() {
        return;
    }
    let f = Fixture::new("life", LOOP_UNTIL_STOP);
    let shim = f.client();
    let mut events = shim.subscribe();

    // Not bound to a pod: refused before anything starts.
    let mut unbound = f.task();
    unbound.id = format!("{}-unbound", f.id);
    assert!(matches!(shim.create(unbound).await, Err(ShimError::PodNotBound { .. })));

    let pid = f.create_and_start(&shim).await;
    assert_eq!(shim.state(&f.id).await.unwrap(), TaskState::Running { pid });
    let shim_pid = f.shim_pid().expect("shim pid file");
    assert!(alive(shim_pid));
    // The shim lives in a session of its own.
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(shim_pid))).unwrap().as_raw(),
        shim_pid
    );
    // Its directory is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(f.shim_dir()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);

    let out = shim
        .exec_sync(
            &f.id,
            process(&["sh", "-c", "echo out; echo err >&2; exit 2"]),
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 2)
    );

    assert_eq!(shim.wait(&f.id, Duration::from_millis(50)).await.unwrap(), None);
    f.stop_container();
    let exit = shim.wait(&f.id, Duration::from_secs(20)).await.unwrap().expect("exit");
    assert_eq!(exit.code, 7);
    assert_eq!(shim.state(&f.id).await.unwrap(), TaskState::Exited(exit));
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, TaskEvent::Exited { id: f.id.clone(), exit });
    assert!(log_has(&f.log_path(), "stdout F started"));
    // The exit is on disk too, for a berthd that missed it.
    let rec = f.record().expect("state file");
    assert_eq!((rec.exit, rec.started, rec.pid), (Some(exit), true, pid));

    shim.delete(&f.id).await.unwrap();
    assert!(f.record().is_none());
    assert!(matches!(shim.state(&f.id).await, Err(ShimError::NotFound { .. })));
    shim.delete(&f.id).await.unwrap();

    shim.shutdown_pod_shim(&f.pod).await.unwrap();
    until("shim exit", Duration::from_secs(10), || !alive(shim_pid)).await;
    assert!(!f.shim_dir().exists());
    shim.shutdown_pod_shim(&f.pod).await.unwrap();
}

#[tokio::test]
async fn restarted_client_learns_exit_it_missed() {
    if !available() {
        return;
    }
    let f = Fixture::new("restart", LOOP_UNTIL_STOP);
    let shim = f.client();
    let pid = f.create_and_start(&shim).await;
    let shim_pid = f.shim_pid().unwrap();
    // berthd "dies": the client goes, the shim and the container stay.
    drop(shim);
    assert!(alive(shim_pid));

    // A new client finds the running task.
    let shim = f.client();
    let found = shim.connect_existing().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, f.id);
    assert_eq!(found[0].pod_id, f.pod);
    assert_eq!(found[0].state, TaskState::Running { pid });
    drop(shim);

    // The container exits while no client is there; the shim records it.
    f.stop_container();
    until("recorded exit", Duration::from_secs(20), || {
        f.record().is_some_and(|r| r.exit.is_some())
    })
    .await;

    let shim = f.client();
    let found = shim.connect_existing().await.unwrap();
    let TaskState::Exited(exit) = found[0].state else { panic!("{found:?}") };
    assert_eq!(exit.code, 7);
    assert_eq!(shim.wait(&f.id, Duration::from_secs(1)).await.unwrap(), Some(exit));
    assert_eq!(shim.state(&f.id).await.unwrap(), TaskState::Exited(exit));
    // A second scan skips known pods.
    assert!(shim.connect_existing().await.unwrap().is_empty());
    shim.delete(&f.id).await.unwrap();
    shim.shutdown_pod_shim(&f.pod).await.unwrap();
    until("shim exit", Duration::from_secs(10), || !alive(shim_pid)).await;
}

#[tokio::test]
async fn restarted_client_waits_for_running_task() {
    if !available() {
        return;
    }
    let f = Fixture::new("rwait", LOOP_UNTIL_STOP);
    let shim = f.client();
    f.create_and_start(&shim).await;
    drop(shim);
    let shim = f.client();
    let mut events = shim.subscribe();
    shim.connect_existing().await.unwrap();
    f.stop_container();
    let exit = shim.wait(&f.id, Duration::from_secs(20)).await.unwrap().expect("exit");
    assert_eq!(exit.code, 7);
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, TaskEvent::Exited { id: f.id.clone(), exit });
    shim.shutdown_pod_shim(&f.pod).await.unwrap();
}

#[tokio::test]
async fn killed_shim_reports_tasks_lost() {
    if !available() {
        return;
    }
    let f = Fixture::new("kill9", &["sleep", "1000"]);
    let shim = f.client();
    let mut events = shim.subscribe();
    f.create_and_start(&shim).await;
    let shim_pid = f.shim_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim_pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();

    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    let TaskEvent::Exited { id, exit } = ev else { panic!("{ev:?}") };
    assert_eq!((id.as_str(), exit.code), (f.id.as_str(), 255));
    assert_eq!(shim.state(&f.id).await.unwrap(), TaskState::Exited(exit));
    assert_eq!(shim.wait(&f.id, Duration::from_secs(1)).await.unwrap(), Some(exit));
    assert!(matches!(shim.start(&f.id).await, Err(ShimError::NotRunning { .. })));
    shim.kill(&f.id, 9, false).await.unwrap();

    // A client started after the death learns the same.
    let other = f.client();
    let found = other.connect_existing().await.unwrap();
    assert!(matches!(found[0].state, TaskState::Exited(e) if e.code == 255), "{found:?}");
    drop(other);

    // Delete goes to runc directly: the container is gone afterwards.
    shim.delete(&f.id).await.unwrap();
    // Through the reaper: this process reaps every child (a plain `output()` would race it).
    let mut cmd = std::process::Command::new(RUNC);
    cmd.arg("--root").arg(f.runtime_root()).args(["state", &f.id]);
    let st = berth_shim::run_captured(cmd, Some(Duration::from_secs(30))).await.unwrap();
    assert_ne!(st.code, 0, "container still exists");

    // The pod gets a new shim on the next create.
    let mut second = f.task();
    second.id = format!("{}-2", f.id);
    shim.bind_container(&second.id, &f.pod);
    // Same bundle: the first container is gone, so its rootfs is free.
    shim.create(second.clone()).await.unwrap();
    let new_pid = f.shim_pid().unwrap();
    assert_ne!(new_pid, shim_pid);
    shim.delete(&second.id).await.unwrap();
    shim.shutdown_pod_shim(&f.pod).await.unwrap();
    runc_delete(&f.runtime_root(), &second.id);
}

/// Prints the memory of a shim with one running container (run with `--ignored
/// --nocapture`; the number depends on the build profile).
#[tokio::test]
#[ignore]
async fn measure_shim_memory() {
    if !available() {
        return;
    }
    // Three pods: file-backed pages (the binary's code) are shared among their shims, and
    // Pss splits them; Private_Dirty is what each further pod really costs.
    let pods: Vec<Fixture> =
        (0..3).map(|i| Fixture::new(&format!("mem{i}"), &["sleep", "1000"])).collect();
    let shim = pods[0].client();
    for f in &pods {
        f.create_and_start(&shim).await;
        shim.exec_sync(&f.id, process(&["true"]), Some(Duration::from_secs(20))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let f = &pods[0];
    let pid = f.shim_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let pick = |text: &str, key: &str| {
        text.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_owned()
    };
    println!(
        "shim {pid}: {} | {} | {} | {} | {} | {}",
        pick(&status, "VmRSS:"),
        pick(&smaps, "Private_Dirty:"),
        pick(&status, "RssAnon:"),
        pick(&status, "RssFile:"),
        pick(&smaps, "Pss:"),
        pick(&status, "Threads:"),
    );
    for f in &pods {
        shim.shutdown_pod_shim(&f.pod).await.unwrap();
    }
}

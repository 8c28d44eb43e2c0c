//! Real containers through `EmbeddedShim` and runc, with a busybox rootfs.
//!
//! Needs root, `runc` and a static `/bin/busybox` (skipped with a message otherwise). Each
//! test uses its own container ID, runtime root and bundle, and force-deletes its container
//! on the way out, so the tests run in parallel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_shim::{CreateTask, EmbeddedShim, Shim, ShimError, TaskEvent, TaskState};
use common::{RUNC, available, process, write_bundle_in_cgroup};

mod common;

struct Fixture {
    id: String,
    dir: tempfile::TempDir,
    /// Set when the container gets its own memory cgroup (removed on drop).
    cgroup: Option<PathBuf>,
    shim: Arc<EmbeddedShim>,
}

impl Fixture {
    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }
    fn runtime_root(&self) -> PathBuf {
        self.dir.path().join("runc-root")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("logs/0.log")
    }

    fn task(&self) -> CreateTask {
        CreateTask {
            id: self.id.clone(),
            bundle: self.bundle(),
            runtime: RUNC.into(),
            runtime_root: self.runtime_root(),
            log_path: Some(self.log_path()),
            memory_cgroup: self.cgroup.clone(),
            tty: false,
            stdin: false,
            stdin_once: false,
            start: false,
        }
    }

    async fn create_and_start(&self) -> u32 {
        let pid = self.shim.create(self.task()).await.expect("create");
        self.shim.start(&self.id).await.expect("start");
        pid
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Synchronous, best effort: the container must not outlive a failed test.
        let _ = std::process::Command::new(RUNC)
            .arg("--root")
            .arg(self.runtime_root())
            .args(["delete", "--force", &self.id])
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(cg) = &self.cgroup {
            let _ = std::fs::remove_dir(cg);
        }
    }
}

/// A bundle running `args`; `memory_limit` gives the container its own memory cgroup.
fn fixture(name: &str, args: &[&str], memory_limit: Option<i64>) -> Fixture {
    let id = format!("berth-shim-{name}-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let shim = EmbeddedShim::new(dir.path().join("state")).unwrap();
    std::fs::create_dir_all(dir.path().join("runc-root")).unwrap();
    // Absolute and one level deep, so runc's own cleanup removes all of it.
    let cg_name = format!("berth-shim-test-{id}");
    let cgroups_path = format!("/{cg_name}");
    let cgroup = memory_limit.map(|_| PathBuf::from("/sys/fs/cgroup/memory").join(&cg_name));
    write_bundle_in_cgroup(
        &dir.path().join("bundle"),
        args,
        memory_limit.map(|limit| (cgroups_path.as_str(), limit)),
    );
    Fixture { id, dir, cgroup, shim }
}

/// (stream, tag, content) of every CRI log line, checking the timestamp format.
fn read_log(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let ts = parts.next().unwrap();
            assert_eq!(ts.len(), 30, "timestamp {ts:?} in {line:?}");
            assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
            let stream = parts.next().unwrap().to_owned();
            let tag = parts.next().unwrap().to_owned();
            let content = parts.next().unwrap_or("").to_owned();
            (stream, tag, content)
        })
        .collect()
}

fn rec(stream: &str, tag: &str, content: &str) -> (String, String, String) {
    (stream.into(), tag.into(), content.into())
}

#[tokio::test]
async fn run_exit_code_and_logs() {
    if !available() {
        return;
    }
    let f = fixture(
        "exit",
        &["/bin/sh", "-c", "echo hello; echo oops >&2; printf partial; exit 3"],
        None,
    );
    let mut events = f.shim.subscribe();
    let pid = f.shim.create(f.task()).await.expect("create");
    assert_eq!(f.shim.state(&f.id).await.unwrap(), TaskState::Created { pid });
    // A second create with the same ID is refused.
    assert!(matches!(f.shim.create(f.task()).await, Err(ShimError::AlreadyExists { .. })));
    f.shim.start(&f.id).await.expect("start");
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 3);
    assert!(!exit.oom_killed);
    assert_eq!(f.shim.state(&f.id).await.unwrap(), TaskState::Exited(exit));
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, TaskEvent::Exited { id: f.id.clone(), exit });
    // Logs are complete once the exit is published.
    let log = read_log(&f.log_path());
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.contains(&rec("stdout", "F", "hello")), "{log:?}");
    assert!(log.contains(&rec("stderr", "F", "oops")), "{log:?}");
    assert!(log.contains(&rec("stdout", "P", "partial")), "{log:?}");
    // Killing an exited task is fine.
    f.shim.kill(&f.id, libc::SIGKILL, false).await.unwrap();

    f.shim.delete(&f.id).await.unwrap();
    assert!(matches!(f.shim.state(&f.id).await, Err(ShimError::NotFound { .. })));
    f.shim.delete(&f.id).await.unwrap();
    assert!(!f.dir.path().join("state").join(&f.id).exists());
}

/// `start` set: one `runc run --detach`; the task is running when create returns, and a
/// process that exits at once still has its exit and logs.
#[tokio::test]
async fn run_in_one_call() {
    if !available() {
        return;
    }
    let f = fixture("run", &["/bin/sh", "-c", "echo ran; exit 5"], None);
    let pid = f.shim.create(CreateTask { start: true, ..f.task() }).await.expect("run");
    match f.shim.state(&f.id).await.unwrap() {
        TaskState::Running { pid: p } => assert_eq!(p, pid),
        TaskState::Exited(exit) => assert_eq!(exit.code, 5),
        other => panic!("not started: {other:?}"),
    }
    // Already started: a start is refused by the runtime, or finds the task exited.
    assert!(f.shim.start(&f.id).await.is_err());
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 5);
    assert_eq!(read_log(&f.log_path()), vec![rec("stdout", "F", "ran")]);
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn kill_with_sigterm() {
    if !available() {
        return;
    }
    let f = fixture(
        "kill",
        &["/bin/sh", "-c", "trap 'echo term; exit 7' TERM; echo ready; sleep 1000 & wait"],
        None,
    );
    f.create_and_start().await;
    // Wait until the trap is installed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(f.log_path()).unwrap_or_default().contains("ready") {
        assert!(Instant::now() < deadline, "container never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(f.shim.wait(&f.id, Duration::from_millis(100)).await.unwrap().is_none());
    f.shim.kill(&f.id, libc::SIGTERM, false).await.unwrap();
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 7);
    assert!(read_log(&f.log_path()).contains(&rec("stdout", "F", "term")));
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn delete_kills_running_task() {
    if !available() {
        return;
    }
    let f = fixture("delete", &["/bin/sleep", "1000"], None);
    f.create_and_start().await;
    let mut events = f.shim.subscribe();
    f.shim.delete(&f.id).await.unwrap();
    // The killed process's exit was published before the task was forgotten.
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert!(
        matches!(ev, TaskEvent::Exited { ref id, exit } if *id == f.id && exit.code == 137),
        "{ev:?}"
    );
}

#[tokio::test]
async fn kill_of_created_task_then_delete() {
    if !available() {
        return;
    }
    let f = fixture("killcreated", &["/bin/sleep", "1000"], None);
    let pid = f.shim.create(f.task()).await.expect("create");
    // Never started: the init is signalled directly (no runtime run), as `kill --all` would.
    f.shim.kill(&f.id, libc::SIGKILL, true).await.unwrap();
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 137);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "init {pid} still there");
    // The runtime keeps its (stopped) container until the delete.
    assert!(f.runtime_root().join(&f.id).exists());
    f.shim.kill(&f.id, libc::SIGKILL, true).await.unwrap();
    f.shim.delete(&f.id).await.unwrap();
    assert!(!f.runtime_root().join(&f.id).exists());
    assert!(matches!(f.shim.state(&f.id).await, Err(ShimError::NotFound { .. })));
}

#[tokio::test]
async fn kill_all_in_own_pid_namespace() {
    if !available() {
        return;
    }
    let f = fixture("killall", &["/bin/sh", "-c", "sleep 1000 & sleep 1000 & wait"], None);
    let pid = f.create_and_start().await;
    let children = format!("/proc/{pid}/task/{pid}/children");
    let deadline = Instant::now() + Duration::from_secs(10);
    let kids: Vec<u32> = loop {
        let kids: Vec<u32> = std::fs::read_to_string(&children)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if kids.len() == 2 {
            break kids;
        }
        assert!(Instant::now() < deadline, "children never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The init is PID 1 of its namespace: killing it kills the rest, so no runtime run.
    f.shim.kill(&f.id, libc::SIGKILL, true).await.unwrap();
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 137);
    let deadline = Instant::now() + Duration::from_secs(10);
    while kids.iter().any(|k| Path::new(&format!("/proc/{k}")).exists()) {
        assert!(Instant::now() < deadline, "children {kids:?} outlived the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn create_failure_reports_runtime_error() {
    if !available() {
        return;
    }
    let f = fixture("badexe", &["/bin/does-not-exist"], None);
    let err = f.shim.create(f.task()).await.unwrap_err();
    match &err {
        ShimError::RuntimeFailed { id, stderr, .. } => {
            assert_eq!(id, &f.id);
            assert!(stderr.contains("does-not-exist"), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(matches!(f.shim.state(&f.id).await, Err(ShimError::NotFound { .. })));
    // The create's undo ran: no task state, no runtime container left.
    assert!(!f.dir.path().join("state").join(&f.id).exists(), "task dir left behind");
    assert!(!f.runtime_root().join(&f.id).exists(), "runtime container left behind");
}

#[tokio::test]
async fn exec_sync_output_code_and_timeout() {
    if !available() {
        return;
    }
    let f = fixture("exec", &["/bin/sleep", "1000"], None);
    f.create_and_start().await;

    let out = f
        .shim
        .exec_sync(
            &f.id,
            process(&["/bin/sh", "-c", "echo out; echo err >&2; exit 5"]),
            Some(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit_code, 5);
    assert!(!out.timed_out);

    // Timeout: the process is killed and the call returns promptly.
    let started = Instant::now();
    let out = f
        .shim
        .exec_sync(&f.id, process(&["/bin/sleep", "100"]), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(out.timed_out);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A background child holding the pipes open does not hang the call.
    let started = Instant::now();
    let out = f
        .shim
        .exec_sync(
            &f.id,
            process(&["/bin/sh", "-c", "sleep 100 & echo done"]),
            Some(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, b"done\n");
    assert_eq!(out.exit_code, 0);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // The runtime's own failure is an error, not an exit code.
    let err = f
        .shim
        .exec_sync(&f.id, process(&["/bin/nope"]), Some(Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert!(matches!(err, ShimError::RuntimeFailed { .. }), "{err}");

    // No per-exec files left behind.
    let task_dir = f.dir.path().join("state").join(&f.id);
    let leftovers: Vec<_> = std::fs::read_dir(&task_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("exec-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    f.shim.kill(&f.id, libc::SIGKILL, false).await.unwrap();
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 137);
    assert!(!exit.oom_killed);
    assert!(matches!(
        f.shim.exec_sync(&f.id, process(&["/bin/true"]), None).await,
        Err(ShimError::NotRunning { .. })
    ));
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn exec_sync_large_output() {
    if !available() {
        return;
    }
    let f = fixture("bigexec", &["/bin/sleep", "1000"], None);
    f.create_and_start().await;
    // 4 MiB of output (far beyond a pipe buffer) arrives complete.
    let out = f
        .shim
        .exec_sync(
            &f.id,
            process(&["/bin/head", "-c", "4194304", "/dev/zero"]),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout.len(), 4 << 20);
    f.shim.delete(&f.id).await.unwrap();
}

fn memory_cgroup_v1() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.oom_control").exists()
}

#[tokio::test]
async fn oom_kill_of_main_process() {
    if !available() || !memory_cgroup_v1() {
        return;
    }
    // `tail` keeps the current (endless, newline-free) line in memory.
    let f = fixture("oom", &["/bin/sh", "-c", "sleep 1; tail /dev/zero"], Some(32 << 20));
    let mut events = f.shim.subscribe();
    f.create_and_start().await;
    let exit = f.shim.wait(&f.id, Duration::from_secs(60)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 137);
    assert!(exit.oom_killed);
    let mut saw_oom = false;
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        saw_oom |= ev == TaskEvent::Oom { id: f.id.clone() };
    }
    assert!(saw_oom);
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn oom_kill_of_exec_does_not_mark_main_process() {
    if !available() || !memory_cgroup_v1() {
        return;
    }
    let f = fixture(
        "execoom",
        &["/bin/sh", "-c", "trap 'exit 7' TERM; sleep 1000 & wait"],
        Some(32 << 20),
    );
    let mut events = f.shim.subscribe();
    f.create_and_start().await;
    let out = f
        .shim
        .exec_sync(&f.id, process(&["/bin/tail", "/dev/zero"]), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 137);
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, TaskEvent::Oom { id: f.id.clone() });
    f.shim.kill(&f.id, libc::SIGTERM, false).await.unwrap();
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 7);
    assert!(!exit.oom_killed);
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn reopen_log_after_rotation() {
    if !available() {
        return;
    }
    let f = fixture("rotate", &["/bin/sh", "-c", "echo one; read x; echo two"], None);
    let mut task = f.task();
    task.stdin = true;
    f.shim.create(task).await.unwrap();
    f.shim.start(&f.id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(f.log_path()).unwrap_or_default().contains("one") {
        assert!(Instant::now() < deadline, "no output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // stdin stays open: `read` blocks, the task keeps running.
    assert!(matches!(f.shim.state(&f.id).await.unwrap(), TaskState::Running { .. }));
    let rotated = f.dir.path().join("logs/0.log.1");
    std::fs::rename(f.log_path(), &rotated).unwrap();
    f.shim.reopen_log(&f.id).await.unwrap();
    assert!(std::fs::read_to_string(f.log_path()).unwrap().is_empty());
    f.shim.delete(&f.id).await.unwrap();
}

#[tokio::test]
async fn tty_output_is_logged() {
    if !available() {
        return;
    }
    let f = fixture("tty", &["/bin/sh", "-c", "[ -t 1 ] && echo tty-hello; exit 4"], None);
    let config_path = f.bundle().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["process"]["terminal"] = true.into();
    config["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/dev/pts", "type": "devpts", "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
    }));
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let mut task = f.task();
    task.tty = true;
    f.shim.create(task).await.expect("create with tty");
    f.shim.start(&f.id).await.unwrap();
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 4);
    let log = read_log(&f.log_path());
    assert_eq!(log, vec![rec("stdout", "F", "tty-hello")]);
    f.shim.delete(&f.id).await.unwrap();
    // The console socket is gone.
    let leftovers: Vec<_> =
        std::fs::read_dir(f.dir.path().join("state")).unwrap().filter_map(|e| e.ok()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A berthd restart, as the embedded shim sees it: a new shim on the same state directory.
fn restarted(f: &Fixture) -> Arc<EmbeddedShim> {
    EmbeddedShim::new(f.dir.path().join("state")).unwrap()
}

#[tokio::test]
async fn running_task_is_adopted_after_restart() {
    if !available() {
        return;
    }
    let f = fixture("adopt", &["/bin/sleep", "1000"], None);
    f.shim.bind_container(&f.id, "pod-a");
    let pid = f.create_and_start().await;
    // A create cut short before its record was written leaves a directory without one.
    let stray = f.dir.path().join("state/half-made");
    std::fs::create_dir_all(&stray).unwrap();

    let shim = restarted(&f);
    let tasks = shim.reattach().await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!((tasks[0].id.as_str(), tasks[0].pod_id.as_str()), (f.id.as_str(), "pod-a"));
    assert_eq!(tasks[0].state, TaskState::Running { pid });
    assert!(!stray.exists(), "state without a record left");
    assert_eq!(shim.state(&f.id).await.unwrap(), TaskState::Running { pid });

    let out = shim.exec_sync(&f.id, process(&["/bin/echo", "hi"]), None).await.unwrap();
    assert_eq!((out.exit_code, out.stdout.as_slice()), (0, b"hi\n".as_slice()));
    shim.reopen_log(&f.id).await.unwrap();
    assert!(shim.wait(&f.id, Duration::from_millis(100)).await.unwrap().is_none());

    // Not the new shim's child: its exit is seen through the pidfd, its code is not.
    let mut events = shim.subscribe();
    shim.kill(&f.id, libc::SIGKILL, true).await.unwrap();
    let exit = shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!((exit.code, exit.lost, exit.oom_killed), (255, true, false));
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, TaskEvent::Exited { id: f.id.clone(), exit });
    assert!(!alive(pid));
    // Killing it again is fine.
    shim.kill(&f.id, libc::SIGKILL, true).await.unwrap();
    shim.delete(&f.id).await.unwrap();
    assert!(!f.dir.path().join("state").join(&f.id).exists());
    assert!(!f.runtime_root().join(&f.id).exists());
    assert!(shim.reattach().await.unwrap().is_empty());
}

#[tokio::test]
async fn task_gone_during_restart_comes_back_exited() {
    if !available() {
        return;
    }
    let f = fixture("adoptgone", &["/bin/sh", "-c", "exit 3"], None);
    f.create_and_start().await;
    let exit = f.shim.wait(&f.id, Duration::from_secs(30)).await.unwrap().expect("exited");
    assert_eq!(exit.code, 3);

    let shim = restarted(&f);
    let tasks = shim.reattach().await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let TaskState::Exited(exit) = tasks[0].state else { panic!("{tasks:?}") };
    assert_eq!((exit.code, exit.lost, exit.oom_killed), (255, true, false));
    assert_eq!(shim.wait(&f.id, Duration::from_secs(1)).await.unwrap(), Some(exit));
    assert!(matches!(
        shim.exec_sync(&f.id, process(&["/bin/true"]), None).await,
        Err(ShimError::NotRunning { .. })
    ));
    shim.kill(&f.id, libc::SIGKILL, true).await.unwrap();
    shim.delete(&f.id).await.unwrap();
    assert!(!f.dir.path().join("state").join(&f.id).exists());
    assert!(!f.runtime_root().join(&f.id).exists());
}

#[tokio::test]
async fn oom_kill_during_restart_is_reported() {
    if !available() || !memory_cgroup_v1() {
        return;
    }
    let f = fixture("adoptoom", &["/bin/sh", "-c", "sleep 1; tail /dev/zero"], Some(32 << 20));
    f.create_and_start().await;
    let exit = f.shim.wait(&f.id, Duration::from_secs(60)).await.unwrap().expect("exited");
    assert!(exit.oom_killed);

    let shim = restarted(&f);
    let tasks = shim.reattach().await.unwrap();
    let TaskState::Exited(exit) = tasks[0].state else { panic!("{tasks:?}") };
    assert_eq!((exit.code, exit.lost, exit.oom_killed), (137, false, true));
    shim.delete(&f.id).await.unwrap();
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test]
async fn unusable_log_file_fails_create_and_leaves_no_state() {
    if !available() {
        return;
    }
    let f = fixture("fifolog", &["/bin/true"], None);
    std::fs::create_dir_all(f.log_path().parent().unwrap()).unwrap();
    nix::unistd::mkfifo(&f.log_path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Bounded: before the fix the open blocked until a reader came.
    let err = tokio::time::timeout(Duration::from_secs(10), f.shim.create(f.task()))
        .await
        .expect("create did not block")
        .expect_err("a FIFO as log file");
    assert!(matches!(err, ShimError::LogNotRegular { .. }), "{err}");
    assert!(!f.dir.path().join("state").join(&f.id).exists(), "task dir left behind");
    // The id is free again.
    std::fs::remove_file(f.log_path()).unwrap();
    f.shim.create(f.task()).await.expect("create after the log was fixed");
    f.shim.delete(&f.id).await.unwrap();
}

//! `exec_sync`: run a process in a container and collect its output.
//!
//! `<runtime> exec --detach --process <json> --pid-file <file> <id>`; the process is then
//! reparented to us and its exit comes through the reaper. Output is captured up to
//! [`EXEC_OUTPUT_CAP`] for both streams together and the rest drained and discarded (a
//! chatty process must neither block nor make us buffer without bound; cf. containerd
//! CVE-2022-31030).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::pipe::{Capped, CappedReader, pipe};
use crate::reaper::{Reaper, spawn, wait_or_kill};
use crate::runtime_cmd::{RUNTIME_TIMEOUT, RuntimeCmd, display_command};
use crate::{ExecOutput, ShimError};

/// Most bytes of stdout and stderr together that `exec_sync` keeps: the kubelet receives
/// gRPC messages of at most 16 MiB, and the `ExecSyncResponse` carries both streams, so
/// 16 MiB each (containerd's cap per stream) can make an answer it cannot read. 4 KiB are
/// left for the rest of the message (field tags, lengths, the exit code).
pub const EXEC_OUTPUT_CAP: usize = (16 << 20) - (4 << 10);
/// After the process exits, how long to keep reading output that a background child of it
/// may still be writing.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long a `SIGKILL`ed exec process gets to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(5);

static EXEC_SEQ: AtomicU64 = AtomicU64::new(0);

/// Per-exec files in the task's state directory, removed on drop.
pub(crate) struct ExecFiles {
    pub(crate) process: PathBuf,
    pub(crate) pid: PathBuf,
    pub(crate) log: PathBuf,
}

impl ExecFiles {
    pub(crate) fn new(task_dir: &Path) -> Self {
        // Unique within this process (counter) and across restarts (time).
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let stem = format!("exec-{nanos:x}-{}", EXEC_SEQ.fetch_add(1, Ordering::Relaxed));
        ExecFiles {
            process: task_dir.join(format!("{stem}.json")),
            pid: task_dir.join(format!("{stem}.pid")),
            log: task_dir.join(format!("{stem}.log")),
        }
    }

    /// Writes the process JSON for `--process` (a fresh file: never another exec's).
    pub(crate) fn write_process(&self, json: &[u8]) -> Result<(), ShimError> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.process)
            .and_then(|mut f| std::io::Write::write_all(&mut f, json))
            .map_err(|source| ShimError::Io {
                action: "write exec process",
                path: self.process.clone(),
                source,
            })
    }

    /// The PID the runtime wrote, if it has.
    pub(crate) fn read_pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid).ok()?.trim().parse().ok().filter(|&p: &i32| p > 0)
    }
}

impl Drop for ExecFiles {
    fn drop(&mut self) {
        for p in [&self.process, &self.pid, &self.log] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs `process` in container `id` and collects its output.
pub(crate) async fn exec_sync(
    runtime: &RuntimeCmd,
    task_dir: &Path,
    id: &str,
    process: &oci_spec::runtime::Process,
    timeout: Option<Duration>,
) -> Result<ExecOutput, ShimError> {
    if process.terminal().unwrap_or(false) {
        return Err(ShimError::TtyNotSupported { id: id.to_owned() });
    }
    let json = serde_json::to_vec(process)
        .map_err(|source| ShimError::ProcessJson { id: id.to_owned(), source })?;
    exec_sync_json(runtime, task_dir, id, &json, timeout).await
}

/// The parts of an OCI process [`check_process_json`] looks at. Unknown fields are ignored
/// (the runtime reads them); the fields the OCI spec requires must be there.
#[derive(serde::Deserialize)]
struct ProcessProbe {
    #[serde(default)]
    terminal: Option<bool>,
    #[allow(dead_code)] // only its presence and type are checked
    user: serde::de::IgnoredAny,
    #[allow(dead_code)]
    cwd: String,
    #[allow(dead_code)]
    #[serde(default)]
    args: Option<Vec<String>>,
    #[allow(dead_code)]
    #[serde(default)]
    env: Option<Vec<String>>,
}

/// Checks that `json` looks like an OCI process (a JSON object with `user` and `cwd`, and
/// well-typed `terminal`, `args` and `env`) that asks for no terminal, without building an
/// `oci_spec` process: the external shim hands berthd's bytes to the runtime as they are,
/// and the runtime validates the rest. Keeping `oci_spec`'s deserializer (and the regex
/// engine it pulls in) out of `berth-shim` is a good part of its memory footprint.
pub(crate) fn check_process_json(id: &str, json: &[u8]) -> Result<(), ShimError> {
    let bad = || ShimError::BadRequest { detail: "process_json is not an OCI process" };
    // serde_json would also take a positional array for a struct.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad());
    }
    let probe: ProcessProbe = serde_json::from_slice(json).map_err(|_| bad())?;
    if probe.terminal == Some(true) {
        return Err(ShimError::TtyNotSupported { id: id.to_owned() });
    }
    Ok(())
}

/// Runs the process given as OCI JSON (see [`check_process_json`]; it must not ask for a
/// terminal) in container `id` and collects its output.
pub(crate) async fn exec_sync_json(
    runtime: &RuntimeCmd,
    task_dir: &Path,
    id: &str,
    json: &[u8],
    timeout: Option<Duration>,
) -> Result<ExecOutput, ShimError> {
    let files = ExecFiles::new(task_dir);
    files.write_process(json)?;

    let (out_rx, out_tx) = pipe("create exec stdout pipe")?;
    let (err_rx, err_tx) = pipe("create exec stderr pipe")?;
    // `--detach`: the process inherits our pipes directly and, once the runtime has exited,
    // is reparented to us (the subreaper) and reaped by the reaper. Without it, runc copies
    // the output through pipes of its own and waits for EOF on them, so a background child
    // of the exec would keep it (and us) waiting.
    let mut cmd = runtime.base(Some(&files.log));
    cmd.arg("exec")
        .arg("--detach")
        .arg("--process")
        .arg(&files.process)
        .arg("--pid-file")
        .arg(&files.pid)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_tx))
        .stderr(Stdio::from(err_tx));
    let display = display_command(&cmd);
    let reaper = Reaper::global()?;
    let before = Instant::now();
    // The timeout comes from the request (seconds up to i64::MAX): one past what `Instant`
    // can hold is as good as none, and must not panic.
    let deadline = timeout.and_then(|t| before.checked_add(t));
    let child = spawn(&mut cmd)
        .map_err(|source| ShimError::Spawn { program: runtime.binary().to_owned(), source })?;
    // Drop our copies of the write ends, or we would never see EOF.
    drop(cmd);
    let runtime_pid = child.id() as i32;
    let runtime_exited = reaper.register(runtime_pid, before);
    let stdout = CappedReader::spawn(out_rx, EXEC_OUTPUT_CAP);
    let stderr = CappedReader::spawn(err_rx, EXEC_OUTPUT_CAP);

    let runtime_exit =
        wait_or_kill(reaper, runtime_pid, runtime_exited, Some(RUNTIME_TIMEOUT), &display).await?;
    if runtime_exit.code != 0 {
        let log = std::fs::read_to_string(&files.log).unwrap_or_default();
        return Err(runtime.failed("exec", id, runtime_exit.code, &log));
    }
    let pid = files.read_pid().ok_or_else(|| ShimError::BadPidFile {
        path: files.pid.clone(),
        content: std::fs::read_to_string(&files.pid).unwrap_or_default(),
    })?;
    // The process started after `before`: an older unclaimed exit of its PID is not its own.
    let mut exited = reaper.register(pid, before);

    let mut timed_out = false;
    let reaped = match deadline {
        None => (&mut exited).await.ok(),
        Some(deadline) => {
            match tokio::time::timeout_at(deadline.into(), &mut exited).await {
                Ok(r) => r.ok(),
                Err(_) => {
                    timed_out = true;
                    match exited.try_recv() {
                        Ok(r) => Some(r),
                        // Not reaped yet, so the PID is still our child's.
                        Err(_) => {
                            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                            tokio::time::timeout(KILL_GRACE, &mut exited)
                                .await
                                .ok()
                                .and_then(|r| r.ok())
                        }
                    }
                }
            }
        }
    };
    if reaped.is_none() {
        reaper.unregister(pid);
    }
    let (mut out, mut err) = tokio::join!(stdout.finish(DRAIN_GRACE), stderr.finish(DRAIN_GRACE));
    fit_output(&mut out, &mut err, EXEC_OUTPUT_CAP);
    if out.truncated || err.truncated {
        tracing::warn!(
            id,
            stdout_truncated = out.truncated,
            stderr_truncated = err.truncated,
            cap = EXEC_OUTPUT_CAP,
            "exec output truncated"
        );
    }
    let exit_code = match (reaped, timed_out) {
        (_, true) => -1,
        (Some(r), false) => r.code,
        (None, false) => return Err(ShimError::ReaperLost { pid }),
    };
    Ok(ExecOutput { stdout: out.data, stderr: err.data, exit_code, timed_out })
}

/// Cuts `out` and `err` so that together they hold at most `cap` bytes. Each keeps up to
/// half of it; what one does not need, the other may use (a probe's stderr stays readable
/// next to a flood on stdout).
fn fit_output(out: &mut Capped, err: &mut Capped, cap: usize) {
    if out.data.len() + err.data.len() <= cap {
        return;
    }
    let half = cap / 2;
    let (out_len, err_len) = if out.data.len() <= half {
        (out.data.len(), cap - out.data.len())
    } else if err.data.len() <= half {
        (cap - err.data.len(), err.data.len())
    } else {
        (half, cap - half)
    };
    for (stream, len) in [(out, out_len), (err, err_len)] {
        if stream.data.len() > len {
            stream.data.truncate(len);
            stream.truncated = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(len: usize) -> Capped {
        Capped { data: vec![b'x'; len], truncated: false }
    }

    #[test]
    fn both_streams_fit_the_cap_together() {
        let fit = |o: usize, e: usize| {
            let (mut out, mut err) = (capped(o), capped(e));
            fit_output(&mut out, &mut err, 100);
            (out.data.len(), err.data.len(), out.truncated, err.truncated)
        };
        assert_eq!(fit(60, 40), (60, 40, false, false));
        assert_eq!(fit(100, 100), (50, 50, true, true));
        assert_eq!(fit(100, 10), (90, 10, true, false));
        assert_eq!(fit(10, 100), (10, 90, false, true));
        assert_eq!(fit(0, 101), (0, 100, false, true));
        const { assert!(EXEC_OUTPUT_CAP < 16 << 20) };
    }

    #[test]
    fn exec_files_are_unique_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let a = ExecFiles::new(dir.path());
        let b = ExecFiles::new(dir.path());
        assert_ne!(a.process, b.process);
        std::fs::write(&a.pid, "123\n").unwrap();
        assert_eq!(a.read_pid(), Some(123));
        std::fs::write(&a.process, "{}").unwrap();
        drop(a);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(b.read_pid(), None);
    }

    #[test]
    fn process_json_is_checked_cheaply() {
        let ok = br#"{"user":{"uid":0,"gid":0},"args":["sh","-c","true"],"env":["A=b"],
            "cwd":"/","capabilities":{"bounding":["CAP_KILL"]},"unknownField":[1,{"x":2}]}"#;
        assert!(check_process_json("c", ok).is_ok());
        assert!(check_process_json("c", br#" {"user":{},"cwd":"/","terminal":false}"#).is_ok());
        let tty = br#"{"user":{},"cwd":"/","terminal":true}"#;
        assert!(
            matches!(check_process_json("c", tty), Err(ShimError::TtyNotSupported { id }) if id == "c")
        );
        for bad in [
            &br#"["#[..],
            br#"[true,{},"/"]"#,
            br#"{"cwd":"/"}"#,
            br#"{"user":{}}"#,
            br#"{"user":{},"cwd":"/","args":"sh"}"#,
            br#"{"user":{},"cwd":"/","env":[1]}"#,
            br#"{"user":{},"cwd":"/","terminal":"yes"}"#,
            br#"{"user":{},"cwd":"/"} trailing"#,
            b"",
        ] {
            assert!(
                matches!(check_process_json("c", bad), Err(ShimError::BadRequest { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oci_process_passes_the_check() {
        let mut p = oci_spec::runtime::Process::default();
        p.set_args(Some(vec!["true".into()]));
        assert!(check_process_json("c", &serde_json::to_vec(&p).unwrap()).is_ok());
        p.set_terminal(Some(true));
        let err = check_process_json("c", &serde_json::to_vec(&p).unwrap()).unwrap_err();
        assert!(matches!(err, ShimError::TtyNotSupported { .. }));
    }
}

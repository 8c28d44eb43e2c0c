//! Invocations of the OCI runtime binary (`runc`, `crun`, ...).
//!
//! Every command is a `std::process::Command` spawned through the reaper (see
//! `reaper.rs` for why not `tokio::process`). The runtime's own log output is JSON
//! (`--log-format json`): on stderr for short commands, in a `--log` file for `create` and
//! `exec`, whose stdio belongs to the container process. A failure carries the runtime's last
//! error message.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ShimError;
use crate::reaper::{Captured, run_captured};

/// How long a runtime command (other than a non-detached exec) may take before it is killed.
/// Generous: `runc create` on a loaded node can take several seconds, `delete --force` waits
/// for the container's processes to die.
pub(crate) const RUNTIME_TIMEOUT: Duration = Duration::from_secs(90);

/// The runtime binary and its state root.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeCmd {
    binary: PathBuf,
    root: PathBuf,
}

impl RuntimeCmd {
    pub(crate) fn new(binary: PathBuf, root: PathBuf) -> Self {
        RuntimeCmd { binary, root }
    }

    /// The binary, for error messages.
    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// `<runtime> --root <root> --log-format json [--log <file>]`.
    pub(crate) fn base(&self, log_file: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if let Some(log) = log_file {
            cmd.arg("--log").arg(log);
        }
        cmd.arg("--log-format").arg("json");
        cmd
    }

    /// `<runtime> <sub> <args...>` for a command whose output is its own: waits for it and
    /// turns a non-zero exit into [`ShimError::RuntimeFailed`].
    pub(crate) async fn run(
        &self,
        id: &str,
        sub: &'static str,
        args: &[&OsStr],
    ) -> Result<Captured, ShimError> {
        let mut cmd = self.base(None);
        cmd.arg(sub).args(args);
        let out = run_captured(cmd, Some(RUNTIME_TIMEOUT)).await?;
        if out.code != 0 {
            return Err(self.failed(sub, id, out.code, &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(out)
    }

    /// A [`ShimError::RuntimeFailed`] from the runtime's log output.
    pub(crate) fn failed(&self, sub: &str, id: &str, code: i32, log: &str) -> ShimError {
        ShimError::RuntimeFailed {
            command: format!("{} {sub}", self.binary.display()),
            id: id.to_owned(),
            stderr: error_message(log),
            code,
        }
    }
}

/// The runtime's error message from its log output: the last `"level":"error"` JSON line's
/// `msg` (runc also logs warnings there), else the tail of the text.
pub(crate) fn error_message(log: &str) -> String {
    let from_json = log.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        let level = v.get("level")?.as_str()?;
        if level != "error" && level != "fatal" {
            return None;
        }
        Some(v.get("msg")?.as_str()?.to_owned())
    });
    if let Some(msg) = from_json {
        return msg;
    }
    let text = log.trim();
    // Keep error messages readable: the end of the output is where the cause is.
    const TAIL: usize = 2048;
    if text.len() <= TAIL {
        return text.to_owned();
    }
    let mut start = text.len() - TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// The runtime's message says the container is gone (so `delete` has nothing to do).
pub(crate) fn is_not_exist(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("does not exist") || m.contains("not found") || m.contains("no such file")
}

/// The runtime's message says the container's process has already ended (so `kill` has
/// nothing to do).
pub(crate) fn is_not_running(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("not running")
        || m.contains("already finished")
        || m.contains("no such process")
        || m.contains("stopped")
}

/// `program arg arg...`, for messages.
pub(crate) fn display_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_takes_last_error_line() {
        let log = concat!(
            r#"{"level":"warning","msg":"something odd","time":"2024-01-01T00:00:00Z"}"#,
            "\n",
            r#"{"level":"error","msg":"first","time":"2024-01-01T00:00:00Z"}"#,
            "\n",
            r#"{"level":"error","msg":"runc run failed: exec: \"nope\": not found","time":"x"}"#,
            "\n",
            r#"{"level":"info","msg":"bye","time":"x"}"#,
            "\n",
        );
        assert_eq!(error_message(log), r#"runc run failed: exec: "nope": not found"#);
    }

    #[test]
    fn error_message_falls_back_to_text() {
        assert_eq!(error_message("  plain failure\n"), "plain failure");
        let long = "é".repeat(3000);
        let m = error_message(&long);
        assert!(m.starts_with("..."));
        assert!(m.len() <= 2048 + 3 + 1);
    }

    #[test]
    fn classifies_messages() {
        assert!(is_not_exist("container \"abc\" does not exist"));
        assert!(is_not_running("container not running"));
        assert!(is_not_running("process already finished"));
        assert!(!is_not_running("permission denied"));
    }

    #[test]
    fn base_command_line() {
        let rt = RuntimeCmd::new("runc".into(), "/run/r".into());
        let mut c = rt.base(Some(Path::new("/tmp/l.json")));
        c.arg("start").arg("x");
        assert_eq!(
            display_command(&c),
            "runc --root /run/r --log /tmp/l.json --log-format json start x"
        );
    }
}

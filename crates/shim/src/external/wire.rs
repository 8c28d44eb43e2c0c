//! The framing of the shim API and the conversions between its protobuf messages and the
//! shim's Rust types.
//!
//! A frame is a big-endian `u32` length followed by that many bytes of one protobuf
//! `Request` or `Response` (see `proto/shim/v1/shim.proto`). No HTTP/2, no gRPC: the shim
//! stays small.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::proto::{self, error::Code, request, response, task_status::Phase};
use crate::{CreateTask, ExecOutput, Exit, ShimError, TaskEvent, TaskState};

/// Largest frame either side accepts: two capped exec outputs (16 MiB each) and slack.
pub const MAX_FRAME: usize = 64 << 20;

/// Writes one frame.
pub async fn write_frame<W, M>(w: &mut W, msg: &M, path: &Path) -> Result<(), ShimError>
where
    W: AsyncWriteExt + Unpin,
    M: Message,
{
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(ShimError::FrameTooLarge { len });
    }
    let mut buf = Vec::with_capacity(4 + len);
    // `len <= MAX_FRAME < u32::MAX`.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec cannot run out of space.
    let _ = msg.encode(&mut buf);
    w.write_all(&buf).await.map_err(wire_err("write frame", path))?;
    w.flush().await.map_err(wire_err("write frame", path))
}

/// Reads one frame; `Ok(None)` on a clean end of stream before the frame started.
pub async fn read_frame<R, M>(r: &mut R, path: &Path) -> Result<Option<M>, ShimError>
where
    R: AsyncReadExt + Unpin,
    M: Message + Default,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(wire_err("read frame", path)(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ShimError::FrameTooLarge { len });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(wire_err("read frame", path))?;
    M::decode(buf.as_slice()).map(Some).map_err(|source| ShimError::Decode { source })
}

/// A `ShimError::Wire` builder.
pub fn wire_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ShimError {
    let path = path.to_owned();
    move |source| ShimError::Wire { action, path, source }
}

/// Raw bytes of a path.
pub fn path_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// A path from raw bytes.
pub fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

fn opt_path(b: &[u8]) -> Option<PathBuf> {
    if b.is_empty() { None } else { Some(bytes_path(b)) }
}

/// Milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `CreateTask` to its message.
pub fn create_request(t: &CreateTask) -> proto::CreateRequest {
    proto::CreateRequest {
        id: t.id.clone(),
        bundle: path_bytes(&t.bundle),
        runtime: path_bytes(&t.runtime),
        runtime_root: path_bytes(&t.runtime_root),
        log_path: t.log_path.as_deref().map(path_bytes).unwrap_or_default(),
        memory_cgroup: t.memory_cgroup.as_deref().map(path_bytes).unwrap_or_default(),
        tty: t.tty,
        stdin: t.stdin,
        stdin_once: t.stdin_once,
        start: t.start,
    }
}

/// The message back to a `CreateTask`.
pub fn create_task(r: proto::CreateRequest) -> CreateTask {
    CreateTask {
        id: r.id,
        bundle: bytes_path(&r.bundle),
        runtime: bytes_path(&r.runtime),
        runtime_root: bytes_path(&r.runtime_root),
        log_path: opt_path(&r.log_path),
        memory_cgroup: opt_path(&r.memory_cgroup),
        tty: r.tty,
        stdin: r.stdin,
        stdin_once: r.stdin_once,
        start: r.start,
    }
}

/// `Exit` to its message.
pub fn exit_msg(e: &Exit) -> proto::Exit {
    let nanos = match e.at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
    };
    proto::Exit { code: e.code, exited_at_unix_nanos: nanos, oom_killed: e.oom_killed }
}

/// The message back to an `Exit`.
pub fn exit_from(m: &proto::Exit) -> Exit {
    let at = if m.exited_at_unix_nanos >= 0 {
        UNIX_EPOCH + Duration::from_nanos(m.exited_at_unix_nanos as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(m.exited_at_unix_nanos.unsigned_abs())
    };
    Exit { code: m.code, at, oom_killed: m.oom_killed, lost: false }
}

/// The exit reported for a task whose shim died without recording its exit.
pub fn lost_exit() -> Exit {
    Exit { code: 255, at: SystemTime::now(), oom_killed: false, lost: true }
}

/// A task's state to its message.
pub fn status_msg(id: &str, s: &TaskState) -> proto::TaskStatus {
    let (phase, pid, exit) = match s {
        TaskState::Created { pid } => (Phase::Created, *pid, None),
        TaskState::Running { pid } => (Phase::Running, *pid, None),
        TaskState::Exited(e) => (Phase::Exited, 0, Some(exit_msg(e))),
    };
    proto::TaskStatus { id: id.to_owned(), phase: phase as i32, pid, exit }
}

/// The message back to a task state.
pub fn status_from(m: &proto::TaskStatus) -> Result<TaskState, ShimError> {
    match (Phase::try_from(m.phase), &m.exit) {
        (Ok(Phase::Created), _) => Ok(TaskState::Created { pid: m.pid }),
        (Ok(Phase::Running), _) => Ok(TaskState::Running { pid: m.pid }),
        (Ok(Phase::Exited), Some(e)) => Ok(TaskState::Exited(exit_from(e))),
        _ => Err(ShimError::UnexpectedResponse { expected: "a task status" }),
    }
}

/// An event to its message.
pub fn event_msg(e: &TaskEvent) -> proto::Event {
    match e {
        TaskEvent::Exited { id, exit } => {
            proto::Event { id: id.clone(), kind: Some(proto::event::Kind::Exited(exit_msg(exit))) }
        }
        TaskEvent::Oom { id } => {
            proto::Event { id: id.clone(), kind: Some(proto::event::Kind::Oom(proto::Empty {})) }
        }
    }
}

/// The message back to an event (`None`: an event kind this version does not know).
pub fn event_from(m: proto::Event) -> Option<TaskEvent> {
    match m.kind? {
        proto::event::Kind::Exited(e) => Some(TaskEvent::Exited { id: m.id, exit: exit_from(&e) }),
        proto::event::Kind::Oom(_) => Some(TaskEvent::Oom { id: m.id }),
    }
}

/// Exec output to its message.
pub fn exec_msg(o: ExecOutput) -> proto::ExecSyncResponse {
    proto::ExecSyncResponse {
        stdout: o.stdout,
        stderr: o.stderr,
        exit_code: o.exit_code,
        timed_out: o.timed_out,
    }
}

/// The message back to exec output.
pub fn exec_from(m: proto::ExecSyncResponse) -> ExecOutput {
    ExecOutput {
        stdout: m.stdout,
        stderr: m.stderr,
        exit_code: m.exit_code,
        timed_out: m.timed_out,
    }
}

/// A shim error to its message: the variants the runtime reacts to keep their fields.
pub fn error_msg(e: &ShimError) -> proto::Error {
    let mut m = proto::Error { message: e.to_string(), ..Default::default() };
    let code = match e {
        ShimError::RuntimeFailed { command, id, stderr, code } => {
            m.command = command.clone();
            m.id = id.clone();
            m.stderr = stderr.clone();
            m.exit_code = *code;
            Code::RuntimeFailed
        }
        ShimError::Timeout { command, after } => {
            m.command = command.clone();
            m.after_ms = millis(*after);
            Code::Timeout
        }
        ShimError::NotFound { id } => with_id(&mut m, id, Code::NotFound),
        ShimError::AlreadyExists { id } => with_id(&mut m, id, Code::AlreadyExists),
        ShimError::InvalidId { id } => with_id(&mut m, id, Code::InvalidId),
        ShimError::NotRunning { id } => with_id(&mut m, id, Code::NotRunning),
        ShimError::TtyNotSupported { id } => with_id(&mut m, id, Code::TtyNotSupported),
        ShimError::BadRequest { .. } | ShimError::Decode { .. } | ShimError::ProcessJson { .. } => {
            Code::BadRequest
        }
        ShimError::ShimBusy { .. } => Code::Busy,
        ShimError::LogNotRegular { path, kind } => {
            m.path = path.to_string_lossy().into_owned();
            m.kind = kind.clone();
            Code::LogNotRegular
        }
        _ => Code::Internal,
    };
    m.code = code as i32;
    m
}

fn with_id(m: &mut proto::Error, id: &str, code: Code) -> Code {
    m.id = id.to_owned();
    code
}

/// The message back to a shim error. `pod_id` names the shim, for errors about the shim
/// itself.
pub fn error_from(m: proto::Error, pod_id: &str) -> ShimError {
    let id = m.id;
    match Code::try_from(m.code).unwrap_or(Code::Internal) {
        Code::RuntimeFailed => {
            ShimError::RuntimeFailed { command: m.command, id, stderr: m.stderr, code: m.exit_code }
        }
        Code::Timeout => {
            ShimError::Timeout { command: m.command, after: Duration::from_millis(m.after_ms) }
        }
        Code::NotFound => ShimError::NotFound { id },
        Code::AlreadyExists => ShimError::AlreadyExists { id },
        Code::InvalidId => ShimError::InvalidId { id },
        Code::NotRunning => ShimError::NotRunning { id },
        Code::TtyNotSupported => ShimError::TtyNotSupported { id },
        Code::Busy => ShimError::ShimBusy { pod_id: pod_id.to_owned() },
        Code::LogNotRegular => ShimError::LogNotRegular { path: m.path.into(), kind: m.kind },
        Code::BadRequest | Code::Internal | Code::Unspecified => {
            ShimError::Remote { id, message: m.message }
        }
    }
}

/// An error response.
pub fn error_response(e: &ShimError) -> proto::Response {
    proto::Response { kind: Some(response::Kind::Error(error_msg(e))) }
}

/// An empty success response.
pub fn ok_response() -> proto::Response {
    proto::Response { kind: Some(response::Kind::Ok(proto::Empty {})) }
}

/// A request of one kind.
pub fn request(kind: request::Kind) -> proto::Request {
    proto::Request { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_reject_oversize() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let p = Path::new("test");
        let req = request(request::Kind::Kill(proto::KillRequest {
            id: "c1".into(),
            signal: 15,
            all: true,
        }));
        write_frame(&mut a, &req, p).await.unwrap();
        let got: proto::Request = read_frame(&mut b, p).await.unwrap().unwrap();
        assert_eq!(got, req);
        // A length above the limit is refused before allocating.
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes()).await.unwrap();
        let err = read_frame::<_, proto::Request>(&mut b, p).await.unwrap_err();
        assert!(matches!(err, ShimError::FrameTooLarge { .. }), "{err}");
        drop(a);
        assert!(read_frame::<_, proto::Request>(&mut b, p).await.unwrap().is_none());
    }

    #[test]
    fn create_task_round_trips() {
        let t = CreateTask {
            id: "c".into(),
            bundle: "/b".into(),
            runtime: "runc".into(),
            runtime_root: "/r".into(),
            log_path: Some("/l/0.log".into()),
            memory_cgroup: None,
            tty: true,
            stdin: false,
            stdin_once: true,
            start: true,
        };
        let back = create_task(create_request(&t));
        assert_eq!(format!("{back:?}"), format!("{t:?}"));
    }

    #[test]
    fn exits_and_states_round_trip() {
        let exit = Exit {
            code: 137,
            at: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            oom_killed: true,
            lost: false,
        };
        assert_eq!(exit_from(&exit_msg(&exit)), exit);
        for s in
            [TaskState::Created { pid: 7 }, TaskState::Running { pid: 8 }, TaskState::Exited(exit)]
        {
            assert_eq!(status_from(&status_msg("x", &s)).unwrap(), s);
        }
        let ev = TaskEvent::Exited { id: "x".into(), exit };
        assert_eq!(event_from(event_msg(&ev)), Some(ev));
    }

    #[test]
    fn errors_keep_their_fields() {
        let e = ShimError::RuntimeFailed {
            command: "runc create".into(),
            id: "c".into(),
            stderr: "boom".into(),
            code: 1,
        };
        let back = error_from(error_msg(&e), "pod");
        assert!(
            matches!(&back, ShimError::RuntimeFailed { command, id, stderr, code: 1 }
                if command == "runc create" && id == "c" && stderr == "boom"),
            "{back}"
        );
        let back = error_from(error_msg(&ShimError::NotRunning { id: "c".into() }), "pod");
        assert!(matches!(back, ShimError::NotRunning { id } if id == "c"));
        let log = ShimError::LogNotRegular { path: "/l/0.log".into(), kind: "a FIFO".into() };
        let back = error_from(error_msg(&log), "pod");
        assert_eq!(back.to_string(), log.to_string());
        assert!(matches!(back, ShimError::LogNotRegular { .. }));
        let io = ShimError::Pipe { action: "x", source: std::io::Error::other("y") };
        let back = error_from(error_msg(&io), "pod");
        assert!(matches!(back, ShimError::Remote { message, .. } if message == "x: y"));
    }
}

//! `berth-shim`: one per pod sandbox, started by berthd's `ExternalShim`. It runs the pod's
//! containers and exec sessions through the OCI runtime, writes their CRI logs, records
//! their exits and serves the shim API on `<dir>/shim.sock`. It lives in a session of its
//! own, so it outlives berthd; it exits when berthd asks it to (`shutdown`).
//!
//! Usage: `berth-shim --dir <shim dir> --pod <pod id>`.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_shim::external::{ServerConfig, serve};

/// One malloc arena for the whole process. glibc gives every thread that allocates an arena
/// of its own (a heap, its pages and bookkeeping); the shim's second thread (the reaper)
/// allocates little and rarely, so sharing the main arena costs no contention but saves a
/// heap per pod. Call before any thread starts.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Our stdout, where berthd waits for the byte that says the socket listens, moved to an fd of
/// its own; stdout itself becomes /dev/null (nothing else is ever written there, and berthd
/// stops reading after that byte).
fn readiness_fd() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let ready = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").ok()?;
    // SAFETY: dup2 onto our own stdout; both fds are valid and owned by this process.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        return None;
    }
    Some(ready)
}

fn usage() -> ExitCode {
    eprintln!("usage: berth-shim --dir <shim dir> --pod <pod id>");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    one_malloc_arena();
    let mut dir = None;
    let mut pod = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--dir") => dir = args.next().map(PathBuf::from),
            Some("--pod") => pod = args.next().and_then(|p| p.into_string().ok()),
            _ => return usage(),
        }
    }
    let (Some(dir), Some(pod_id)) = (dir, pod) else {
        return usage();
    };
    if let Err(e) = berth_shim::validate_id(&pod_id) {
        eprintln!("berth-shim: {e}");
        return ExitCode::from(2);
    }
    // Absolute before the chdir below.
    let dir = match std::path::absolute(&dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("berth-shim: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    // A session of our own: berthd's terminal, process group and death are not ours. Fails
    // only if we lead a process group already, which is as good.
    let _ = nix::unistd::setsid();
    // Our working directory must not pin whatever berthd ran in.
    let _ = std::env::set_current_dir("/");
    // One thread for the API and the log copiers (plus the reaper's): small and enough.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth-shim: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ready = readiness_fd();
    match runtime.block_on(serve(ServerConfig { dir, pod_id, ready })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

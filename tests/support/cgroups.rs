//! Each test daemon's cgroup parent, removed with everything in it when the daemon goes:
//! a test that fails half-way must not leave container processes or cgroups behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A cgroup parent (`/berth-e2e-<pid>-<n>`) unique to one daemon of this test process.
pub fn unique_parent() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("/berth-e2e-{}-d{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `<hierarchy>/<parent>` in every mounted hierarchy (v1) and the unified root (v2).
pub fn dirs_of(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let mut out = vec![root.join(rel)];
    if let Ok(entries) = std::fs::read_dir(root) {
        out.extend(entries.flatten().map(|e| e.path().join(rel)));
    }
    out.retain(|d| d.is_dir());
    out.sort();
    out.dedup();
    out
}

/// Every cgroup directory under `dir`, deepest first.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

fn pids_in(dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Kills every process left in `parent`'s subtree and removes the cgroups. Returns what it
/// had to kill or could not remove (empty when the daemon cleaned up after itself).
pub fn remove_parent(parent: &str) -> Vec<String> {
    let dirs: Vec<PathBuf> = dirs_of(parent).iter().flat_map(|d| subtree(d)).collect();
    let mut found = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(&dirs);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            found.push(format!("process {pid}"));
            // SAFETY: kill(2) with a pid read from the test's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for d in &dirs {
        if std::fs::remove_dir(d).is_err() && d.exists() {
            found.push(format!("cgroup {}", d.display()));
        }
    }
    found.sort();
    found.dedup();
    found
}

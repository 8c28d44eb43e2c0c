//! The memory scenario: the daemon's RSS and PSS idle and with pods running, and the shims'
//! memory per pod, from /proc/<pid>/smaps_rollup.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_cri::v1::{CreateContainerRequest, RunPodSandboxRequest, StartContainerRequest};

use crate::cri::{Cri, container_config, pod_config, sleeper_args};
use crate::report::{Report, round3};

/// Resident and proportional set size of one process or a group of them, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mem {
    /// Resident set size.
    pub rss_kib: u64,
    /// Proportional set size: shared pages divided among the processes sharing them.
    pub pss_kib: u64,
}

impl std::ops::Add for Mem {
    type Output = Mem;
    fn add(self, o: Mem) -> Mem {
        Mem { rss_kib: self.rss_kib + o.rss_kib, pss_kib: self.pss_kib + o.pss_kib }
    }
}

/// Parses the `Rss:` and `Pss:` lines of a smaps_rollup file (values in kB).
pub fn parse_smaps_rollup(text: &str) -> Option<Mem> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.trim();
            rest.strip_suffix("kB").unwrap_or(rest).trim().parse::<u64>().ok()
        })
    };
    Some(Mem { rss_kib: field("Rss:")?, pss_kib: field("Pss:")? })
}

/// The memory of process `pid`.
pub fn process_mem(pid: u32) -> Result<Mem> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_smaps_rollup(&text).with_context(|| format!("no Rss/Pss in {path}"))
}

/// A process's name as it was started: the file name of argv[0], else its `comm`.
fn process_name(pid: u32) -> Option<(String, String)> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let argv0 = args.first().map(|a| {
        Path::new(a).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    });
    let name = match argv0 {
        Some(n) if !n.is_empty() => n,
        _ => std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_string(),
    };
    Some((name, args.join(" ")))
}

/// Whether a process named `actual` (argv[0] file name) is `wanted`. `comm` is cut at 15
/// bytes, so a match on the first 15 bytes counts when argv[0] was unavailable.
pub fn name_matches(actual: &str, wanted: &str) -> bool {
    actual == wanted || (actual.len() == 15 && wanted.len() > 15 && wanted.starts_with(actual))
}

/// PIDs of processes named `name` whose command line contains `needle` (if given).
pub fn find_pids(name: &str, needle: Option<&str>) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Processes come and go while we scan: a vanished one is simply not counted.
        if let Some((n, cmdline)) = process_name(pid)
            && name_matches(&n, name)
            && needle.is_none_or(|x| cmdline.contains(x))
        {
            out.insert(pid);
        }
    }
    Ok(out)
}

/// Sum of the memory of `pids`, skipping processes that exited meanwhile.
fn sum_mem(pids: &BTreeSet<u32>) -> (Mem, usize) {
    pids.iter()
        .filter_map(|p| process_mem(*p).ok())
        .fold((Mem::default(), 0), |(m, n), x| (m + x, n + 1))
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// The daemon's PID, else found by `daemon_name`.
    pub daemon_pid: Option<u32>,
    /// The daemon's process name.
    pub daemon_name: Option<String>,
    /// Shim process names (several for runtimes with more than one kind).
    pub shim_names: Vec<String>,
    /// Only count shims whose command line contains this (e.g. the daemon's temp dir).
    pub shim_match: Option<String>,
    /// Pods to run, one sleeping container each.
    pub pods: usize,
    /// Pods started at once.
    pub concurrency: usize,
    /// Wait before measuring, so that start-up allocations settle.
    pub settle: Duration,
    /// The container image.
    pub image: String,
    /// `linux.cgroup_parent` of the pods.
    pub cgroup_parent: Option<String>,
}

fn mib(kib: u64) -> f64 {
    round3(kib as f64 / 1024.0)
}

/// Runs the scenario, always removing the pods it started.
pub async fn run(cri: &Cri, run: &str, p: &Params, report: &mut Report) -> Result<()> {
    let pid = match (p.daemon_pid, &p.daemon_name) {
        (Some(pid), _) => pid,
        (None, Some(name)) => {
            let pids = find_pids(name, None)?;
            match pids.len() {
                1 => pids.into_iter().next().context("no pid")?,
                0 => bail!("no process named {name}"),
                n => bail!("{n} processes named {name}: pass --daemon-pid"),
            }
        }
        (None, None) => bail!("--daemon-pid or --daemon-name is required"),
    };
    let mut c = cri.clone();
    // A cold pull, so that "idle" includes what pulling leaves in the daemon, even when
    // the image was on disk from an earlier run.
    c.remove_image_quietly(&p.image).await;
    c.ensure_image(&p.image).await?;
    tokio::time::sleep(p.settle).await;
    let idle = process_mem(pid)?;
    report.push("memory daemon idle RSS", mib(idle.rss_kib), "MiB");
    report.push("memory daemon idle PSS", mib(idle.pss_kib), "MiB");
    let mut shims_before = BTreeSet::new();
    for n in &p.shim_names {
        shims_before.extend(find_pids(n, p.shim_match.as_deref())?);
    }

    let r = measure_loaded(cri, run, p, pid, idle, &shims_before, report).await;
    let swept = c.sweep(Some(run)).await;
    tokio::time::sleep(p.settle).await;
    if let Ok(after) = process_mem(pid) {
        report.push("memory daemon after cleanup RSS", mib(after.rss_kib), "MiB");
    }
    r.and(swept.map(|_| ()))
}

async fn measure_loaded(
    cri: &Cri,
    run: &str,
    p: &Params,
    pid: u32,
    idle: Mem,
    shims_before: &BTreeSet<u32>,
    report: &mut Report,
) -> Result<()> {
    let mut starts = futures::stream::iter(0..p.pods)
        .map(|i| {
            let mut c = cri.clone();
            async move {
                let cfg = pod_config(run, &format!("mem{i}"), p.cgroup_parent.as_deref());
                let req = RunPodSandboxRequest {
                    config: Some(cfg.clone()),
                    runtime_handler: String::new(),
                };
                let id = c.rt.run_pod_sandbox(req).await?.into_inner().pod_sandbox_id;
                let req = CreateContainerRequest {
                    pod_sandbox_id: id,
                    config: Some(container_config(run, "sleeper", &p.image, sleeper_args())),
                    sandbox_config: Some(cfg),
                };
                let cid = c.rt.create_container(req).await?.into_inner().container_id;
                c.rt.start_container(StartContainerRequest { container_id: cid }).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(p.concurrency.max(1));
    while let Some(r) = starts.next().await {
        r?;
    }
    tokio::time::sleep(p.settle).await;

    let n = p.pods.max(1) as f64;
    let loaded = process_mem(pid)?;
    report.push(format!("memory daemon {} pods RSS", p.pods), mib(loaded.rss_kib), "MiB");
    report.push(format!("memory daemon {} pods PSS", p.pods), mib(loaded.pss_kib), "MiB");
    let growth = loaded.pss_kib.saturating_sub(idle.pss_kib) as f64 / n;
    report.push("memory daemon PSS growth per pod", round3(growth), "KiB");

    let mut shims = BTreeSet::new();
    for name in &p.shim_names {
        shims.extend(find_pids(name, p.shim_match.as_deref())?);
    }
    let new: BTreeSet<u32> = shims.difference(shims_before).copied().collect();
    let (shim_mem, count) = sum_mem(&new);
    report.push("memory shim processes", count as f64, "count");
    report.push("memory shim RSS per pod", round3(shim_mem.rss_kib as f64 / n), "KiB");
    report.push("memory shim PSS per pod", round3(shim_mem.pss_kib as f64 / n), "KiB");
    report.push(
        "memory overhead PSS per pod (daemon growth + shims)",
        round3(growth + shim_mem.pss_kib as f64 / n),
        "KiB",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLUP: &str = "55d0c0a00000-7ffd5c3e5000 ---p 00000000 00:00 0   [rollup]\n\
        Rss:               12345 kB\n\
        Pss:                6789 kB\n\
        Pss_Anon:           4000 kB\n\
        Shared_Clean:       1000 kB\n";

    #[test]
    fn parses_rollup() {
        assert_eq!(parse_smaps_rollup(ROLLUP), Some(Mem { rss_kib: 12345, pss_kib: 6789 }));
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
    }

    #[test]
    fn names_match_truncated_comm() {
        assert!(name_matches("containerd-shim-runc-v2", "containerd-shim-runc-v2"));
        assert!(name_matches("containerd-shim", "containerd-shim-runc-v2"));
        assert!(!name_matches("containerd", "containerd-shim-runc-v2"));
        assert!(!name_matches("berthd", "berth-shim"));
    }

    #[test]
    fn finds_ourselves() {
        let me = std::process::id();
        let (name, _) = process_name(me).unwrap();
        assert!(find_pids(&name, None).unwrap().contains(&me));
        assert!(process_mem(me).unwrap().rss_kib > 0);
    }
}

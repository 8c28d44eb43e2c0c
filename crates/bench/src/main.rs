//! `berth-bench`: CRI benchmarks against any CRI endpoint (berthd, containerd, CRI-O), so that
//! runtimes can be compared side by side on one machine.
//!
//! Scenarios: `lifecycle` (the kubelet's nine calls for a one-container pod, sequential and
//! concurrent), `pull` (cold PullImage), `list-scale` (List* with many containers), `churn`
//! (call latency before and after many containers came and went) and `memory` (daemon and
//! shim RSS/PSS). Each prints a table and can merge its figures into a JSON file;
//! `compare` and `plot` read two such files. `push-fixtures` builds the images the scenarios
//! use and pushes them to a registry. `hack/bench-vs-containerd.sh` drives it all.

mod churn;
mod compare;
mod cri;
mod daemon_cpu;
mod fixtures;
mod lifecycle;
mod list_probe;
mod list_scale;
mod memory;
mod plot;
mod pull;
mod report;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::cri::Cri;
use crate::report::Report;

/// CRI benchmarks for berth and other CRI runtimes.
#[derive(Debug, Parser)]
#[command(name = "berth-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every scenario takes.
#[derive(Debug, Args, Clone)]
struct Common {
    /// CRI endpoint, `unix:///path/to.sock` or a path.
    #[arg(long, default_value = "unix:///run/berth/berth.sock")]
    endpoint: String,
    /// Name of the runtime in tables and JSON.
    #[arg(long, default_value = "runtime")]
    label: String,
    /// Merge the figures into this JSON file (created if missing).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Container image (busybox with /bin/busybox).
    #[arg(long, default_value = "127.0.0.1:5000/busybox:1.0")]
    image: String,
    /// `linux.cgroup_parent` for the pods (empty: the runtime's default).
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// Timeout of each CRI call, seconds.
    #[arg(long, default_value_t = 120)]
    call_timeout: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pod lifecycle latency per call, sequential and concurrent, and pods per second.
    Lifecycle {
        #[command(flatten)]
        common: Common,
        /// Pod cycles per phase.
        #[arg(long, short = 'n', default_value_t = 50)]
        iterations: usize,
        /// Pods in flight in the concurrent phase.
        #[arg(long, short = 'c', default_value_t = 8)]
        concurrency: usize,
        /// Unmeasured cycles first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// StopContainer grace period, seconds (the container exits on SIGTERM).
        #[arg(long, default_value_t = 10)]
        stop_timeout: i64,
    },
    /// Cold PullImage time (RemoveImage first), median of M repetitions.
    Pull {
        #[command(flatten)]
        common: Common,
        /// Image to pull [default: the --image].
        #[arg(long)]
        pull_image: Option<String>,
        /// Cold pulls.
        #[arg(long, short = 'm', default_value_t = 5)]
        repetitions: usize,
    },
    /// ListContainers / ListPodSandbox latency with many containers.
    ListScale {
        #[command(flatten)]
        common: Common,
        /// Containers in total.
        #[arg(long, default_value_t = 1000)]
        containers: usize,
        /// Pods they are spread over.
        #[arg(long, default_value_t = 10)]
        pods: usize,
        /// Calls measured per list method.
        #[arg(long, short = 'k', default_value_t = 100)]
        calls: usize,
        /// Also start the containers (default: created only).
        #[arg(long)]
        start: bool,
        /// Creates in flight.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// The daemon's PID: also report its CPU time per ListContainers call.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Leave the pods and containers in place (remove them later with `cleanup`).
        #[arg(long)]
        keep: bool,
        /// Create nothing: measure over the containers that exist (e.g. kept by `--keep`).
        #[arg(long, conflicts_with = "keep")]
        existing: bool,
    },
    /// Diagnostic: splits one ListContainers into transfer and protobuf decode, on a
    /// multi-thread and a current-thread client, over the containers that exist.
    #[command(hide = true)]
    ListProbe {
        #[command(flatten)]
        common: Common,
        /// Rounds measured.
        #[arg(long, short = 'k', default_value_t = 100)]
        calls: usize,
        /// Print the first container as decoded.
        #[arg(long)]
        dump: bool,
    },
    /// Call latency with a few live pods, before and after N containers came and went.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Containers created and removed between the two rounds.
        #[arg(long, short = 'n', default_value_t = 1000)]
        churn: usize,
        /// Live pods (one running container each).
        #[arg(long, default_value_t = 3)]
        live_pods: usize,
        /// Samples of each list/status call per round.
        #[arg(long, short = 'k', default_value_t = 100)]
        calls: usize,
        /// Container and pod create/remove cycles per round.
        #[arg(long, default_value_t = 20)]
        cycles: usize,
        /// Creates in flight while churning.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Daemon RSS/PSS idle and with N pods, and shim memory per pod.
    Memory {
        #[command(flatten)]
        common: Common,
        /// The daemon's PID.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Find the daemon by process name instead.
        #[arg(long)]
        daemon_name: Option<String>,
        /// Shim process name (repeatable), e.g. containerd-shim-runc-v2 or berth-shim.
        #[arg(long = "shim-name")]
        shim_names: Vec<String>,
        /// Only count shims whose command line contains this string.
        #[arg(long)]
        shim_match: Option<String>,
        /// Pods to run (one sleeping container each).
        #[arg(long, default_value_t = 20)]
        pods: usize,
        /// Pods started at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds to wait before each measurement.
        #[arg(long, default_value_t = 3)]
        settle: u64,
    },
    /// Remove every pod and container the bench created (label berth-bench=1).
    Cleanup {
        #[command(flatten)]
        common: Common,
    },
    /// Build the fixture images and push them to a registry.
    PushFixtures {
        /// Registry `host:port` (plain HTTP).
        #[arg(long, default_value = "127.0.0.1:5000")]
        registry: String,
        /// Size of the big image's file, MiB.
        #[arg(long, default_value_t = 100)]
        big_mib: usize,
    },
    /// Side-by-side table of two JSON reports: figure, A, B, A/B.
    Compare {
        /// Report A (e.g. berth).
        a: PathBuf,
        /// Report B (e.g. containerd).
        b: PathBuf,
        /// Markdown instead of aligned text.
        #[arg(long)]
        markdown: bool,
    },
    /// SVG of latency distributions (CDF per call) of one or more JSON reports.
    Plot {
        /// Reports.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Output SVG.
        #[arg(long, short = 'o', default_value = "bench.svg")]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Lifecycle { common, iterations, concurrency, warmup, stop_timeout } => {
            let p = lifecycle::Params {
                iterations,
                concurrency,
                warmup,
                image: common.image.clone(),
                stop_timeout,
                cgroup_parent: common.cgroup_parent.clone(),
            };
            scenario(&common, |cri, run, rep| {
                Box::pin(async move { lifecycle::run(&cri, &run, &p, rep).await })
            })
            .await
        }
        Command::Pull { common, pull_image, repetitions } => {
            let image = pull_image.unwrap_or_else(|| common.image.clone());
            scenario(&common, |cri, _, rep| {
                Box::pin(async move { pull::run(&cri, &image, repetitions, rep).await })
            })
            .await
        }
        Command::ListScale {
            common,
            containers,
            pods,
            calls,
            start,
            concurrency,
            daemon_pid,
            keep,
            existing,
        } => {
            let p = list_scale::Params {
                containers,
                pods,
                calls,
                start,
                concurrency,
                daemon_pid,
                keep,
                existing,
                image: common.image.clone(),
                cgroup_parent: common.cgroup_parent.clone(),
            };
            scenario(&common, |cri, run, rep| {
                Box::pin(async move { list_scale::run(&cri, &run, &p, rep).await })
            })
            .await
        }
        Command::ListProbe { common, calls, dump } => {
            let (endpoint, timeout) =
                (common.endpoint.clone(), Duration::from_secs(common.call_timeout));
            scenario(&common, |cri, _, rep| {
                Box::pin(async move {
                    list_probe::run(&cri, &endpoint, timeout, calls, dump, rep).await
                })
            })
            .await
        }
        Command::Churn { common, churn, live_pods, calls, cycles, concurrency } => {
            let p = churn::Params {
                churn,
                live_pods,
                calls,
                cycles,
                concurrency,
                image: common.image.clone(),
                cgroup_parent: common.cgroup_parent.clone(),
            };
            scenario(&common, |cri, run, rep| {
                Box::pin(async move { churn::run(&cri, &run, &p, rep).await })
            })
            .await
        }
        Command::Memory {
            common,
            daemon_pid,
            daemon_name,
            shim_names,
            shim_match,
            pods,
            concurrency,
            settle,
        } => {
            let p = memory::Params {
                daemon_pid,
                daemon_name,
                shim_names,
                shim_match,
                pods,
                concurrency,
                settle: Duration::from_secs(settle),
                image: common.image.clone(),
                cgroup_parent: common.cgroup_parent.clone(),
            };
            scenario(&common, |cri, run, rep| {
                Box::pin(async move { memory::run(&cri, &run, &p, rep).await })
            })
            .await
        }
        Command::Cleanup { common } => {
            let mut cri =
                Cri::connect(&common.endpoint, Duration::from_secs(common.call_timeout)).await?;
            let n = cri.sweep(None).await?;
            println!("removed {n} pods");
            Ok(())
        }
        Command::PushFixtures { registry, big_mib } => {
            for r in fixtures::push_all(&registry, big_mib).await? {
                println!("{r}");
            }
            Ok(())
        }
        Command::Compare { a, b, markdown } => {
            print!("{}", compare::render(&Report::load(&a)?, &Report::load(&b)?, markdown));
            Ok(())
        }
        Command::Plot { reports, out } => {
            let reports = reports.iter().map(|p| Report::load(p)).collect::<Result<Vec<_>>>()?;
            let n = plot::draw(&reports, &out)?;
            println!("{n} panels in {}", out.display());
            Ok(())
        }
    }
}

type ScenarioFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>>;

/// Connects, runs one scenario (interruptible by Ctrl-C, after which the run's leftovers are
/// swept), prints and saves its figures.
async fn scenario<F>(common: &Common, f: F) -> Result<()>
where
    F: for<'a> FnOnce(Cri, String, &'a mut Report) -> ScenarioFuture<'a>,
{
    let cri = Cri::connect(&common.endpoint, Duration::from_secs(common.call_timeout)).await?;
    let run = cri::run_id();
    let mut report = Report::new(&common.label);
    let result = tokio::select! {
        r = f(cri.clone(), run.clone(), &mut report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if result.is_err() {
        // Best effort: whatever the failed scenario left behind goes now.
        let _ = cri.clone().sweep(Some(&run)).await;
    }
    report.print();
    if let Some(path) = &common.json {
        report.merge_into(path).with_context(|| format!("saving {}", path.display()))?;
    }
    result
}

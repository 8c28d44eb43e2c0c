//! Wiring: stores, CRI services, metrics endpoint, signals, shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_cri::instrument::{InstrumentLayer, Readiness};
use berth_image::{ImageConfig, ImageStore};
use berth_runtime::{Runtime, RuntimeConfig};
use berth_shim::{AnyShim, EmbeddedShim, ExternalShim};
use berth_snapshot::Snapshotter;
use futures::TryStreamExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::{Config, ShimKind};
use crate::lock::RootLock;

/// Sets up logging to stderr with `filter`.
pub fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log level {filter:?}"))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    Ok(())
}

/// Process-wide setup that must happen before the async runtime starts threads.
pub fn prepare_process() -> anyhow::Result<()> {
    crate::memory::limit_arenas();
    // Orphaned descendants (a shim's runc children, helpers whose parent died) are
    // re-parented to berthd, whose reaper waits for them.
    nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop berthd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// The shim `[runtime] shim` chose. The external one reattaches to the shims a previous
/// berthd left in `<state>/shims` during recovery.
fn make_shim(config: &Config) -> anyhow::Result<AnyShim> {
    Ok(match config.runtime.shim {
        ShimKind::Embedded => AnyShim::Embedded(
            EmbeddedShim::new(config.state.join("shim"))
                .context("cannot start the embedded shim")?,
        ),
        ShimKind::External => {
            let binary = if config.runtime.shim_binary.as_os_str().is_empty() {
                ExternalShim::default_binary().context("cannot find berthd's own executable")?
            } else {
                config.runtime.shim_binary.clone()
            };
            anyhow::ensure!(
                binary.is_file(),
                "shim binary {} not found: install berth-shim next to berthd, set \
                 runtime.shim_binary, or choose runtime.shim = \"embedded\"",
                binary.display()
            );
            tracing::info!(binary = %binary.display(), "using external shims");
            AnyShim::External(
                ExternalShim::new(config.state.join("shims"), binary)
                    .context("cannot set up the external shim")?,
            )
        }
    })
}

/// Runs the daemon until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    for dir in [&config.root, &config.state] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let _lock = RootLock::acquire(&config.root)?;

    let db_path = config.root.join("meta.redb");
    let db = Arc::new(
        redb::Database::create(&db_path)
            .with_context(|| format!("cannot open metadata database {}", db_path.display()))?,
    );
    let snapshots = Arc::new(Snapshotter::open(config.root.join("snapshots"))?);
    let images = Arc::new(ImageStore::open(
        db.clone(),
        snapshots.clone(),
        ImageConfig {
            content_dir: config.root.join("content"),
            registry: config.registry.clone(),
            max_concurrent_downloads: config.image.max_concurrent_downloads,
        },
    )?);

    // Pod networking shares the metadata database (IPAM) and keeps the CNI results under
    // root, so that a restart (or reboot) can still tear down what it set up. Its helper
    // programs are waited for through the shim's reaper.
    let network = berth_net::NetworkManager::with_runner(
        config.network.clone(),
        db.clone(),
        &config.root.join("network"),
        Arc::new(berth_runtime::ReaperCommandRunner),
    )
    .context("cannot set up pod networking")?;

    let shim = Arc::new(make_shim(&config)?);
    let pod_init_program = pod_init_program()?;
    let runtime = Runtime::open(
        RuntimeConfig {
            state_dir: config.state.clone(),
            default_handler: config.runtime.default_handler.clone(),
            handlers: config.runtime.handlers.clone(),
            seccomp_profile_root: config.runtime.seccomp_profile_root.clone(),
            cgroup_parent: config.runtime.cgroup_parent.clone(),
            pod_init_program,
            cgroup_root: std::path::PathBuf::from(berth_runtime::DEFAULT_CGROUP_ROOT),
        },
        db.clone(),
        images.clone(),
        snapshots.clone(),
        shim,
        Some(Arc::new(network)),
    )
    .context("cannot open the pod and container runtime")?;
    // The one setter left, for a real cycle: the runtime is built on the image store, and
    // the store's garbage collection asks the runtime which snapshots containers use. The
    // store keeps a weak handle to the runtime, set here before anything is served.
    images.set_snapshot_users(runtime.snapshot_users());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let stream = berth_stream::StreamServer::bind(
        &berth_stream::StreamConfig {
            address: config.stream.address.clone(),
            port: config.stream.port,
            tls: config.stream.tls(),
        },
        runtime.clone(),
    )
    .await
    .context("cannot start the streaming server")?;
    tracing::info!(url = stream.base_url(), "streaming server for exec and port-forward");
    let stream_task = tokio::spawn(stream.clone().serve(stopped(stop_rx.clone())));

    let readiness = Readiness::default();
    let (runtime_service, image_service) = berth_cri::services(berth_cri::Backends {
        images: images.clone(),
        runtime: runtime.clone(),
        stream: Some(stream),
    });

    let metrics_task = match config.metrics_address()? {
        Some(address) => {
            let (bound, serve) = berth_metrics::serve(address, stopped(stop_rx.clone())).await?;
            tracing::info!(%bound, "serving metrics at /metrics");
            Some(tokio::spawn(serve))
        }
        None => None,
    };

    let scavenger = tokio::spawn(crate::memory::scavenge());
    let listener = crate::socket::bind(&config.listen).await?;
    tracing::info!(socket = %config.listen.display(), root = %config.root.display(), "berthd serving the CRI");
    // Recovery (reattaching to the shims, settling exits missed while we were down, startup
    // repair) runs while the socket is already bound: the kubelet gets `Unavailable`
    // from the readiness gate meanwhile, rather than "connection refused".
    {
        let (runtime, readiness) = (runtime.clone(), readiness.clone());
        tokio::spawn(async move {
            // Which handlers can run containers here is known before the first Status.
            let (recovered, ()) = tokio::join!(runtime.recover(), runtime.probe_handlers());
            match recovered {
                Ok(report) => tracing::info!(?report, "state recovered; serving CRI calls"),
                Err(e) => tracing::error!(error = %e, "recovery failed; serving what was loaded"),
            }
            readiness.set_ready();
        });
    }

    let server = tonic::transport::Server::builder()
        .layer(InstrumentLayer::new(readiness))
        .add_service(runtime_service)
        .add_service(image_service)
        .serve_with_incoming_shutdown(
            // grpc-core and grpc-java clients send an authority h2 refuses: see `authority`.
            UnixListenerStream::new(listener).map_ok(crate::authority::AuthorityFix::new),
            async move {
                shutdown_signal().await;
                let _ = stop_tx.send(true);
            },
        );
    let result = server.await.context("CRI server failed");
    // Pod links still being deleted in the background: let them finish, so the addresses
    // are released now rather than by the next start's repair.
    if let Some(network) = runtime.network()
        && tokio::time::timeout(Duration::from_secs(10), network.settle()).await.is_err()
    {
        tracing::warn!("background network teardowns still running at shutdown");
    }

    scavenger.abort();
    let _ = stream_task.await;
    if let Err(e) = std::fs::remove_file(&config.listen) {
        tracing::warn!(error = %e, "cannot remove the CRI socket");
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("berthd stopped");
    result
}

/// The program RunPodSandbox starts as a pod's PID 1: the small `berth-pod-init` next to
/// berthd (a fraction of berthd's exec time), else berthd itself (`berthd pod-init`).
fn pod_init_program() -> anyhow::Result<std::path::PathBuf> {
    let berthd = std::env::current_exe().context("cannot find berthd's own executable")?;
    let small = berthd.with_file_name("berth-pod-init");
    Ok(if small.is_file() { small } else { berthd })
}

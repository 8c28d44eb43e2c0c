//! berthd: the berth daemon. Reads the config, takes the root lock, opens the stores, and serves
//! the CRI over a unix socket and Prometheus metrics over HTTP until SIGTERM or SIGINT.

#![deny(unsafe_code)]

mod authority;
mod config;
mod daemon;
mod lock;
// mallopt, mallinfo2 and malloc_trim: glibc's allocator has no safe interface.
#[allow(unsafe_code)]
mod memory;
mod socket;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// The berth Kubernetes container runtime daemon.
#[derive(Debug, Parser)]
#[command(name = "berthd", version, about)]
struct Cli {
    /// Configuration file (TOML); without one the defaults serve.
    #[arg(long, short = 'c', env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Persistent root directory [default: /var/lib/berth].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Volatile state directory [default: /run/berth].
    #[arg(long)]
    state: Option<PathBuf>,
    /// CRI unix socket path [default: /run/berth/berth.sock].
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Metrics address `host:port`, empty to disable [default: 127.0.0.1:9464].
    #[arg(long)]
    metrics_address: Option<String>,
    /// Log filter, e.g. `info` or `debug` [default: info].
    #[arg(long)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the full default berth.toml.
    Default,
}

impl Cli {
    /// The config file (or defaults) with the command-line overrides applied.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let listen_given = self.listen.is_some() || self.config.is_some();
        if let Some(root) = &self.root {
            config.root = root.clone();
        }
        if let Some(state) = &self.state {
            config.state = state.clone();
            // The socket follows the state dir unless it was set explicitly.
            if !listen_given {
                config.listen = state.join("berth.sock");
            }
        }
        if let Some(listen) = &self.listen {
            config.listen = listen.clone();
        }
        if let Some(address) = &self.metrics_address {
            config.metrics.address = address.clone();
        }
        if let Some(level) = &self.log_level {
            config.log_level = level.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    // `berthd pod-init <pod dir>`: the PID 1 of a pod's shared PID namespace, started by the
    // runtime when `berth-pod-init` is not installed next to berthd. Checked before anything
    // else, while the process is still single-threaded.
    if std::env::args_os().nth(1).is_some_and(|a| a == berth_pod_init::POD_INIT_COMMAND) {
        berth_pod_init::run();
    }
    let cli = Cli::parse();
    if let Some(Command::Config { action: ConfigAction::Default }) = cli.command {
        print!("{}", Config::default_toml()?);
        return Ok(());
    }
    let config = cli.config()?;
    daemon::init_tracing(&config.log_level)?;
    // Become the subreaper before any thread exists, so container processes whose runtime
    // parent exits are reparented to us and their exit codes can be collected.
    daemon::prepare_process()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(daemon::run(config))
}

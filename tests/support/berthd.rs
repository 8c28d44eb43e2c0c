//! The real `berthd` binary, one per test: private root, state, socket and metrics port.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::mounts::unmount_all_under;
use crate::process::{free_port, kill_processes_mentioning, kill9, spawn_logged, tail, terminate};

/// How long berthd gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long berthd gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The berthd binary: `$BERTHD_BIN`, else `berthd` next to the test's `deps` directory
/// (`target/debug/deps/images-xxxx` → `target/debug/berthd`, or `berth-berthd` while the
/// binary still carries the package name).
pub fn berthd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BERTHD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no target/<profile> dir")?;
    // The package is `berth-berthd`; its binary is `berthd` once named so in Cargo.toml.
    let bin = ["berthd", "berth-berthd"]
        .iter()
        .map(|n| profile_dir.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| profile_dir.join("berthd"));
    if !bin.exists() {
        bail!("{} missing: run `cargo build -p berth-berthd` or set BERTHD_BIN", bin.display());
    }
    static WARN_STALE: Once = Once::new();
    WARN_STALE.call_once(|| warn_if_stale(&bin));
    Ok(bin)
}

/// `cargo test -p berth-e2e` does not rebuild berthd: say so when its sources are newer.
fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else { return };
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut stack = vec![crates];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "toml")
                && e.metadata().and_then(|m| m.modified()).is_ok_and(|m| m > built)
            {
                eprintln!(
                    "berth-e2e: WARNING: {} is newer than {}; run `cargo build -p berth-berthd`",
                    p.display(),
                    bin.display()
                );
                return;
            }
        }
    }
}

/// What goes into `berth.toml` for one daemon.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `[registry.mirrors]`: host → mirror endpoints.
    pub mirrors: Vec<(String, Vec<String>)>,
    /// `[registry] insecure`.
    pub insecure: Vec<String>,
    /// `[image] max_concurrent_downloads`.
    pub max_concurrent_downloads: Option<usize>,
    /// Extra TOML appended verbatim (sections other tests need; not `[runtime]`, which the
    /// fields below write).
    pub extra_toml: String,
    /// `[runtime] shim`: `"embedded"` or `"external"`; `None`: `$BERTH_TEST_SHIM` if set
    /// (so a whole suite can run on either shim), else berthd's default.
    pub shim: Option<String>,
    /// `[runtime] cgroup_parent`; `None`: berthd's default. A unique one per daemon lets a
    /// test check that nothing leaks under it.
    pub cgroup_parent: Option<String>,
    /// `[runtime] shim_binary`; `None`: `berth-shim` next to berthd.
    pub shim_binary: Option<PathBuf>,
}

impl Options {
    fn to_toml(&self) -> String {
        let q = |s: &str| format!("{s:?}");
        let mut t = String::from("# written by berth-e2e\n[registry]\n");
        let insecure: Vec<String> = self.insecure.iter().map(|s| q(s)).collect();
        let _ = writeln!(t, "insecure = [{}]", insecure.join(", "));
        t.push_str("\n[registry.mirrors]\n");
        for (host, eps) in &self.mirrors {
            let eps: Vec<String> = eps.iter().map(|s| q(s)).collect();
            let _ = writeln!(t, "{} = [{}]", q(host), eps.join(", "));
        }
        if let Some(n) = self.max_concurrent_downloads {
            let _ = write!(t, "\n[image]\nmax_concurrent_downloads = {n}\n");
        }
        let shim = self.shim.clone().or_else(|| std::env::var("BERTH_TEST_SHIM").ok());
        if shim.is_some() || self.cgroup_parent.is_some() || self.shim_binary.is_some() {
            t.push_str("\n[runtime]\n");
            if let Some(shim) = &shim {
                let _ = writeln!(t, "shim = {}", q(shim));
            }
            if let Some(parent) = &self.cgroup_parent {
                let _ = writeln!(t, "cgroup_parent = {}", q(parent));
            }
            if let Some(bin) = &self.shim_binary {
                let _ = writeln!(t, "shim_binary = {}", q(&bin.to_string_lossy()));
            }
        }
        t.push('\n');
        t.push_str(&self.extra_toml);
        t
    }
}

/// A running berthd; stopped, unmounted and removed on drop.
pub struct Berthd {
    child: Option<Child>,
    // A short path under /tmp: the socket path must stay below 108 bytes.
    dir: TempDir,
    bin: PathBuf,
    metrics_port: u16,
    /// Removes the daemon's bridge and NAT table after it stopped (fields drop after `drop`).
    _net: Option<crate::netkit::NetGuard>,
    /// The daemon's own cgroup parent: whatever is left in it goes when the daemon does.
    cgroup_parent: String,
}

impl Berthd {
    /// Starts berthd with the default (empty) configuration.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts berthd with `options` written to its config file.
    pub async fn start_with(mut options: Options) -> Result<Self> {
        let bin = berthd_bin()?;
        let dir = tempfile::Builder::new().prefix("berth").tempdir_in("/tmp")?;
        // Unless the test configures networking itself, a private bridge, subnet and nft
        // table: parallel daemons must not share (or leave behind) the host-wide defaults.
        let net = (!options.extra_toml.contains("[network]")).then(|| {
            let names = crate::netkit::NetNames::unique(24);
            options.extra_toml.push_str(&format!("\n{}", names.bridge_toml()));
            crate::netkit::NetGuard::new(names)
        });
        // A cgroup parent of its own, so a failed test's containers can be found and killed.
        let cgroup_parent =
            options.cgroup_parent.get_or_insert_with(crate::cgroups::unique_parent).clone();
        std::fs::write(dir.path().join("berth.toml"), options.to_toml())?;
        let mut d = Self { child: None, dir, bin, metrics_port: 0, _net: net, cgroup_parent };
        let mut last = None;
        // A metrics port lost to a parallel test makes berthd exit at once: retry then.
        for _ in 0..3 {
            d.metrics_port = free_port()?;
            match d.spawn(true).await {
                Ok(()) => return Ok(d),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("berthd did not start")))
    }

    /// Starts the process; returns once the socket answers (and, with `wait_ready`, once
    /// recovery has finished: CRI calls no longer answer `Unavailable`).
    async fn spawn(&mut self, wait_ready: bool) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .arg("--listen")
            .arg(self.socket())
            .arg("--config")
            .arg(self.config_path())
            .arg("--metrics-address")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--log-level")
            .arg("debug");
        let _ =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).and_then(
                |mut f| {
                    use std::io::Write;
                    writeln!(f, "==== berth-e2e: starting {cmd:?}")
                },
            );
        self.child = Some(spawn_logged(&mut cmd, &self.log_path())?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("berthd exited during startup ({status}):\n{}", self.log_tail(30));
            }
            if tokio::net::UnixStream::connect(self.socket()).await.is_ok()
                && (!wait_ready || self.ready().await)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                if let Some(mut c) = self.child.take() {
                    terminate(&mut c, STOP_GRACE);
                }
                bail!("berthd did not open {}:\n{}", self.socket().display(), self.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether berthd serves CRI calls: Version answers. `Unavailable` (recovery still
    /// running) is not ready, and neither is a transport error: a daemon that dies during
    /// recovery must show up as an exit, with its log, not as "ready".
    pub async fn ready(&self) -> bool {
        let Ok(mut c) = self.runtime().await else { return false };
        c.version(k8s_cri::v1::VersionRequest::default()).await.is_ok()
    }

    /// The private temp dir holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `--root`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `--state`.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `--listen`: the CRI socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("berthd.sock")
    }

    /// `--config`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("berth.toml")
    }

    /// berthd's stdout + stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("berthd.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// `http://127.0.0.1:<port>/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// `[runtime] cgroup_parent` of this daemon (unique to it, removed on drop).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// An `ImageService` client.
    pub async fn images(&self) -> Result<ImageServiceClient<Channel>> {
        crate::cri::image_client(&self.socket()).await
    }

    /// A `RuntimeService` client.
    pub async fn runtime(&self) -> Result<RuntimeServiceClient<Channel>> {
        crate::cri::runtime_client(&self.socket()).await
    }

    /// SIGTERM and wait (SIGKILL after 10 s). Returns whether it exited on its own.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        let started = Instant::now();
        terminate(&mut c, STOP_GRACE);
        started.elapsed() < STOP_GRACE
    }

    /// SIGKILL: a crash without any cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(&mut c);
        }
    }

    /// Stops berthd (SIGTERM) and starts it again on the same directories and config.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_again().await
    }

    /// Starts berthd again after [`Berthd::stop`] or [`Berthd::kill9`].
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("berthd still running");
        }
        self.spawn(true).await
    }

    /// Like [`Berthd::start_again`], but returns as soon as the socket is bound, while
    /// recovery may still be running.
    pub async fn start_again_unready(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("berthd still running");
        }
        self.spawn(false).await
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- berthd log ({}), last lines ----\n{}\n----",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        self.stop();
        // Shims and other helpers berthd started carry our dir in their arguments.
        let marker = self.dir.path().to_string_lossy().into_owned();
        kill_processes_mentioning(&marker);
        // Containers first: their processes may hold the mounts below.
        let left = crate::cgroups::remove_parent(&self.cgroup_parent);
        if !left.is_empty() {
            eprintln!("berth-e2e: removed leftovers in {}: {left:?}", self.cgroup_parent);
        }
        let left = unmount_all_under(self.dir.path());
        if !left.is_empty() {
            eprintln!("berth-e2e: unmounted leftovers of berthd: {left:?}");
        }
    }
}

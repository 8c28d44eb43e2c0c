//! `berth.toml`: every setting with its default, so that no config file is needed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Persistent data: content, snapshots, metadata.
    pub root: PathBuf,
    /// Volatile state: sockets, bundles, namespace pins.
    pub state: PathBuf,
    /// The CRI unix socket.
    pub listen: PathBuf,
    /// Log filter (`info`, `debug`, `berth_image=debug,info`, ...).
    pub log_level: String,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The streaming server for Exec and PortForward.
    pub stream: StreamSection,
    /// Image pulls.
    pub image: ImageSection,
    /// Registry mirrors and plain-HTTP hosts (the image library's own config type).
    pub registry: berth_image::RegistryConfig,
    /// Pods and containers: OCI runtimes, seccomp profiles, cgroups.
    pub runtime: RuntimeSection,
    /// Pod networking: the built-in bridge or CNI plugins (the network library's own
    /// config type is the section).
    pub network: berth_net::NetworkConfig,
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// The handler used when a pod names none (`runtime_handler` "").
    pub default_handler: String,
    /// Runtime handlers (RuntimeClass handlers): name → OCI runtime binary; a bare name is
    /// looked up in `PATH`.
    pub handlers: BTreeMap<String, PathBuf>,
    /// Directory that relative Localhost seccomp profiles are resolved in.
    pub seccomp_profile_root: PathBuf,
    /// Parent cgroup (cgroupfs) of pods whose config names none; each gets `pod-<id>` in it.
    pub cgroup_parent: String,
    /// Who runs the containers: `"external"` (the default: one `berth-shim` process per pod,
    /// which outlives berthd: after a restart berthd reattaches, and exits, logs and OOM
    /// kills it missed are exact) or `"embedded"` (inside berthd: no extra process;
    /// containers survive a berthd restart and stay reachable, but what happened to them
    /// while it was down, their exit codes and their output after it, is lost).
    pub shim: ShimKind,
    /// The `berth-shim` binary for `shim = "external"`; empty: `berth-shim` next to berthd.
    pub shim_binary: PathBuf,
}

/// `[runtime] shim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShimKind {
    /// Containers run under berthd itself.
    Embedded,
    /// One `berth-shim` process per pod.
    #[default]
    External,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            default_handler: "runc".to_string(),
            handlers: BTreeMap::from([
                ("runc".to_string(), PathBuf::from("runc")),
                ("crun".to_string(), PathBuf::from("crun")),
            ]),
            seccomp_profile_root: PathBuf::from("/var/lib/kubelet/seccomp"),
            cgroup_parent: "/berth".to_string(),
            shim: ShimKind::External,
            shim_binary: PathBuf::new(),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on; empty disables it.
    pub address: String,
}

/// `[stream]`: where Exec and PortForward URLs point. The kubelet (or crictl) connects there,
/// so it must be reachable from them; the default keeps it on loopback, as containerd does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSection {
    /// IP address to listen on.
    pub address: String,
    /// TCP port; 0 picks a free one at each start.
    pub port: u16,
    /// PEM certificate chain for TLS; with `tls_key_file` the server speaks only TLS and
    /// its URLs are `https://`. Empty: plain HTTP.
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`'s leaf.
    pub tls_key_file: PathBuf,
}

impl Default for StreamSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".to_string(),
            port: 0,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
    }
}

impl StreamSection {
    /// The TLS files, when both are set.
    pub fn tls(&self) -> Option<berth_stream::TlsFiles> {
        let (cert, key) = (&self.tls_cert_file, &self.tls_key_file);
        (!cert.as_os_str().is_empty() && !key.as_os_str().is_empty())
            .then(|| berth_stream::TlsFiles { cert: cert.clone(), key: key.clone() })
    }
}

/// `[image]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageSection {
    /// Layers of one pull downloaded at once.
    pub max_concurrent_downloads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/berth"),
            state: PathBuf::from("/run/berth"),
            listen: PathBuf::from("/run/berth/berth.sock"),
            log_level: "info".to_string(),
            metrics: MetricsConfig::default(),
            stream: StreamSection::default(),
            image: ImageSection::default(),
            registry: berth_image::RegistryConfig::default(),
            runtime: RuntimeSection::default(),
            network: berth_net::NetworkConfig::default(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { address: "127.0.0.1:9464".to_string() }
    }
}

impl Default for ImageSection {
    fn default() -> Self {
        Self { max_concurrent_downloads: 3 }
    }
}

impl Config {
    /// Reads `path`; a missing file is an error (the user named it).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    /// The default configuration as a commented TOML document.
    pub fn default_toml() -> anyhow::Result<String> {
        let body = toml::to_string_pretty(&Config::default())?;
        Ok(format!(
            "# berth.toml: the configuration of berthd. Every key is optional; these are the defaults.\n\
             # [registry.mirrors] maps a registry host to mirror endpoints tried in order, e.g.\n\
             #   \"docker.io\" = [\"http://127.0.0.1:5001\"]\n\
             \n{body}"
        ))
    }

    /// The metrics address, or `None` when disabled.
    pub fn metrics_address(&self) -> anyhow::Result<Option<SocketAddr>> {
        let address = self.metrics.address.trim();
        if address.is_empty() {
            return Ok(None);
        }
        let parsed = address
            .parse()
            .with_context(|| format!("metrics.address {address:?} is not host:port"))?;
        Ok(Some(parsed))
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.root.is_absolute(), "root must be an absolute path");
        anyhow::ensure!(self.state.is_absolute(), "state must be an absolute path");
        anyhow::ensure!(
            self.image.max_concurrent_downloads > 0,
            "image.max_concurrent_downloads must be at least 1"
        );
        self.metrics_address()?;
        anyhow::ensure!(
            self.runtime.handlers.contains_key(&self.runtime.default_handler),
            "runtime.default_handler {:?} is not in runtime.handlers",
            self.runtime.default_handler
        );
        anyhow::ensure!(
            self.runtime.cgroup_parent.starts_with('/'),
            "runtime.cgroup_parent must start with /"
        );
        anyhow::ensure!(
            self.stream.tls_cert_file.as_os_str().is_empty()
                == self.stream.tls_key_file.as_os_str().is_empty(),
            "stream.tls_cert_file and stream.tls_key_file go together"
        );
        self.network.validate().context("invalid [network] section")?;
        for (host, endpoints) in &self.registry.mirrors {
            for endpoint in endpoints {
                anyhow::ensure!(
                    endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                    "mirror {endpoint:?} for {host} must start with http:// or https://"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_parses_back_to_the_defaults() {
        let text = Config::default_toml().expect("render");
        let parsed: Config = toml::from_str(&text).expect("parse");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn shipped_deploy_config_is_the_default() {
        // deploy/berth.toml is `berthd config default`; this keeps the two from drifting.
        let shipped: Config =
            toml::from_str(include_str!("../../../deploy/berth.toml")).expect("parse");
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("roots = \"/x\"").is_err());
    }

    #[test]
    fn runtime_section_parses() {
        let config: Config = toml::from_str(
            "[runtime]\ndefault_handler = \"crun\"\n[runtime.handlers]\ncrun = \"/usr/bin/crun\"\n",
        )
        .expect("parse");
        assert_eq!(config.runtime.handlers["crun"], PathBuf::from("/usr/bin/crun"));
        config.validate().expect("valid");
        let bad: Config = toml::from_str("[runtime]\ndefault_handler = \"kata\"\n").expect("parse");
        assert!(bad.validate().is_err());
    }

    #[test]
    fn network_section_parses() {
        let config: Config = toml::from_str(
            "[network]\nmode = \"cni\"\nbridge = \"br-test\"\nsubnet = \"10.201.3.0/24\"\n\
             nat_table = \"t1\"\ncni_bin_dirs = [\"/x\"]\n",
        )
        .expect("parse");
        config.validate().expect("valid");
        let n = &config.network;
        assert_eq!(n.mode, berth_net::Mode::Cni);
        assert_eq!(n.bridge_name, "br-test");
        assert_eq!(n.subnet.to_string(), "10.201.3.0/24");
        assert_eq!(n.nat_table_name, "t1");
        assert_eq!(n.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        let bad: Config =
            toml::from_str("[network]\nbridge = \"a-name-far-too-long\"\n").expect("parse");
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Config>("[network]\nsubnet = \"nope\"\n").is_err());
        assert!(toml::from_str::<Config>("[network]\nbridge_name = \"b\"\n").is_err());
    }

    #[test]
    fn shim_kind_parses() {
        let config: Config = toml::from_str(
            "[runtime]\nshim = \"external\"\nshim_binary = \"/usr/bin/berth-shim\"\n",
        )
        .expect("parse");
        assert_eq!(config.runtime.shim, ShimKind::External);
        assert_eq!(config.runtime.shim_binary, PathBuf::from("/usr/bin/berth-shim"));
        assert_eq!(Config::default().runtime.shim, ShimKind::External);
        assert!(toml::from_str::<Config>("[runtime]\nshim = \"conmon\"\n").is_err());
    }

    #[test]
    fn mirrors_parse() {
        let config: Config =
            toml::from_str("[registry.mirrors]\n\"docker.io\" = [\"http://127.0.0.1:5001\"]\n")
                .expect("parse");
        assert_eq!(config.registry.mirrors["docker.io"], vec!["http://127.0.0.1:5001"]);
        config.validate().expect("valid");
    }
}

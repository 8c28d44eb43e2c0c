//! Configuration and the data types exchanged with the runtime.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::error::NetworkError;

/// How pods get their network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The built-in Linux bridge, configured over netlink, with our own IPAM and NAT.
    #[default]
    Bridge,
    /// CNI plugins, configured by the first network config in the conf dir.
    Cni,
}

/// Pod networking configuration: this struct is the `[network]` section of `berth.toml`
/// (berthd embeds it as is), so its serde names are the keys users write and every key is
/// optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// `"bridge"` (built in: a Linux bridge, our own IPAM and NAT) or `"cni"` (the first
    /// network config in `cni_conf_dir`).
    pub mode: Mode,
    /// Name of the built-in bridge (at most 15 bytes). Key `bridge`.
    #[serde(rename = "bridge")]
    pub bridge_name: String,
    /// Subnet of the built-in bridge; its first address is the gateway. The pod CIDR the
    /// kubelet sends (UpdateRuntimeConfig) replaces it for new pods.
    pub subnet: IpNet,
    /// Optional IPv6 subnet for dual-stack pods (built-in bridge).
    pub subnet_v6: Option<IpNet>,
    /// CNI network configurations (`.conflist`, `.conf`), watched for changes.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries are looked up, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Masquerade pod traffic leaving the bridge subnet (built-in bridge only).
    pub masquerade: bool,
    /// Name of our nftables table (`inet <name>`), or the prefix of our iptables chains.
    /// Key `nat_table`.
    #[serde(rename = "nat_table")]
    pub nat_table_name: String,
    /// How long one CNI plugin or firewall command may run, in seconds.
    pub plugin_timeout_secs: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: Mode::Bridge,
            bridge_name: "berth0".to_owned(),
            subnet: IpNet::V4(ipnet::Ipv4Net::new_assert([10, 88, 0, 0].into(), 16)),
            subnet_v6: None,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            masquerade: true,
            nat_table_name: "berth".to_owned(),
            plugin_timeout_secs: 60,
        }
    }
}

impl NetworkConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), NetworkError> {
        let name = &self.bridge_name;
        if name.is_empty()
            || name.len() > 15
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(NetworkError::InvalidConfig {
                field: "bridge",
                reason: format!("bridge name {name:?} must be 1-15 of [A-Za-z0-9._-]"),
            });
        }
        let t = &self.nat_table_name;
        if t.is_empty()
            || t.len() > 20
            || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(NetworkError::InvalidConfig {
                field: "nat_table",
                reason: format!("nat table name {t:?} must be 1-20 of [A-Za-z0-9_-]"),
            });
        }
        check_subnet(&self.subnet)?;
        if let Some(v6) = &self.subnet_v6 {
            check_subnet(v6)?;
        }
        Ok(())
    }
}

/// Checks that a subnet is usable: a network address, room for a gateway and a pod.
pub(crate) fn check_subnet(subnet: &IpNet) -> Result<(), NetworkError> {
    let max = match subnet {
        IpNet::V4(_) => 30,
        IpNet::V6(_) => 126,
    };
    if subnet.prefix_len() > max {
        return Err(NetworkError::InvalidSubnet {
            cidr: subnet.to_string(),
            reason: format!("prefix longer than /{max} leaves no room for pods"),
        });
    }
    if subnet.trunc() != *subnet {
        return Err(NetworkError::InvalidSubnet {
            cidr: subnet.to_string(),
            reason: format!("host bits set (did you mean {}?)", subnet.trunc()),
        });
    }
    Ok(())
}

/// Transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The lowercase name used by nft, iptables and CNI.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A hostPort mapping of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Protocol.
    pub protocol: Protocol,
    /// Port inside the pod.
    pub container_port: u16,
    /// Port on the host.
    pub host_port: u16,
    /// Host address to bind to; `None` means every local address.
    pub host_ip: Option<IpAddr>,
}

/// DNS settings handed to CNI plugins that declare the `dns` capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DnsConfig {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// Traffic shaping handed to CNI plugins that declare the `bandwidth` capability (bits/s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BandwidthConfig {
    /// Ingress rate in bits per second.
    pub ingress_rate: u64,
    /// Ingress burst in bits.
    pub ingress_burst: u64,
    /// Egress rate in bits per second.
    pub egress_rate: u64,
    /// Egress burst in bits.
    pub egress_burst: u64,
}

/// What the runtime knows about a pod when it sets up its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// Sandbox id ([A-Za-z0-9_.-], at most 100 characters).
    pub pod_id: String,
    /// Pod name (metadata.name).
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// Path of the pod's pinned network namespace.
    pub netns: PathBuf,
    /// hostPort mappings.
    pub port_mappings: Vec<PortMapping>,
    /// DNS settings (CNI only).
    pub dns: Option<DnsConfig>,
    /// Traffic shaping (CNI only).
    pub bandwidth: Option<BandwidthConfig>,
}

/// The result of setting up a pod's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetworkStatus {
    /// The pod's primary IP.
    pub ip: IpAddr,
    /// Further IPs (e.g. the IPv6 one of a dual-stack pod).
    pub additional_ips: Vec<IpAddr>,
    /// The interface inside the pod (`eth0`).
    pub interface: String,
}

/// Whether the network is ready, as reported in the CRI `Status` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Ready or not.
    pub ready: bool,
    /// Short CamelCase reason when not ready (`NetworkPluginNotReady`).
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Checks that a pod id is safe to use in file names, nft comments and CNI arguments.
pub(crate) fn check_pod_id(pod_id: &str) -> Result<(), NetworkError> {
    let bad = |reason| Err(NetworkError::InvalidPodId { pod_id: pod_id.to_owned(), reason });
    if pod_id.is_empty() || pod_id.len() > 100 {
        return bad("must be 1 to 100 characters");
    }
    if pod_id.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !pod_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return bad("only [A-Za-z0-9_.-] allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = NetworkConfig::default();
        c.validate().unwrap();
        assert_eq!(c.subnet.to_string(), "10.88.0.0/16");
    }

    #[test]
    fn config_from_json_with_defaults() {
        let c: NetworkConfig =
            serde_json::from_str(r#"{"mode":"cni","subnet":"10.1.0.0/24"}"#).unwrap();
        assert_eq!(c.mode, Mode::Cni);
        assert_eq!(c.bridge_name, "berth0");
        assert_eq!(c.subnet.to_string(), "10.1.0.0/24");
        // The keys are berth.toml's.
        let c: NetworkConfig =
            serde_json::from_str(r#"{"bridge":"br1","nat_table":"t1"}"#).unwrap();
        assert_eq!((c.bridge_name.as_str(), c.nat_table_name.as_str()), ("br1", "t1"));
        assert!(serde_json::from_str::<NetworkConfig>(r#"{"bridge_name":"br1"}"#).is_err());
    }

    #[test]
    fn bad_names_refused() {
        let mut c =
            NetworkConfig { bridge_name: "a-very-long-bridge-name".into(), ..Default::default() };
        assert!(c.validate().is_err());
        c.bridge_name = "ok0".into();
        c.nat_table_name = "x; flush ruleset".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn subnets_need_room_and_no_host_bits() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        check_subnet(&net("10.1.0.0/30")).unwrap();
        check_subnet(&net("fd00::/126")).unwrap();
        assert!(check_subnet(&net("10.1.0.0/31")).is_err());
        assert!(check_subnet(&net("fd00::/127")).is_err());
        assert!(check_subnet(&net("10.1.0.1/24")).is_err());
        let c = NetworkConfig { subnet_v6: Some(net("fd00::1/64")), ..Default::default() };
        assert!(c.validate().is_err());
    }

    #[test]
    fn pod_ids() {
        check_pod_id("abc123-def_4.5").unwrap();
        assert!(check_pod_id("").is_err());
        assert!(check_pod_id("..").is_err());
        assert!(check_pod_id("a/b").is_err());
        assert!(check_pod_id("a\"b").is_err());
        assert!(check_pod_id(&"a".repeat(101)).is_err());
    }
}

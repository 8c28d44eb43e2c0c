//! Pod networking as the pod lifecycle sees it: which [`NetworkManager`] berthd opened it with,
//! what RunPodSandbox hands it (port mappings, DNS), teardown on stop/remove, the pod IPs in
//! PodSandboxStatus, and NetworkReady / the kubelet's pod CIDR.

use std::path::Path;
use std::sync::Arc;

use berth_net::network::{DnsConfig, PodNetwork, PortMapping, Protocol, Readiness};
use berth_net::{NetworkError, NetworkManager};
use berth_shim::Shim;
use k8s_cri::v1::PodSandboxConfig;

use crate::Runtime;
use crate::error::{Result, RuntimeError};
use crate::records::SandboxMeta;

/// The pod's hostPort mappings in the network library's terms. Mappings without a host port
/// (the kubelet sends every declared containerPort) are kept: the library skips them.
pub(crate) fn port_mappings(config: &PodSandboxConfig) -> Result<Vec<PortMapping>> {
    config
        .port_mappings
        .iter()
        .map(|p| {
            let protocol = match k8s_cri::v1::Protocol::try_from(p.protocol) {
                Ok(k8s_cri::v1::Protocol::Tcp) => Protocol::Tcp,
                Ok(k8s_cri::v1::Protocol::Udp) => Protocol::Udp,
                Ok(k8s_cri::v1::Protocol::Sctp) => Protocol::Sctp,
                Err(_) => {
                    return Err(RuntimeError::Invalid {
                        field: "port_mappings.protocol",
                        reason: format!("unknown protocol {}", p.protocol),
                    });
                }
            };
            let port = |field, value: i32| {
                u16::try_from(value).map_err(|_| RuntimeError::Invalid {
                    field,
                    reason: format!("{value} is not a port number"),
                })
            };
            let host_ip = match p.host_ip.trim() {
                "" => None,
                ip => Some(ip.parse().map_err(|_| RuntimeError::Invalid {
                    field: "port_mappings.host_ip",
                    reason: format!("{ip:?} is not an IP address"),
                })?),
            };
            Ok(PortMapping {
                protocol,
                container_port: port("port_mappings.container_port", p.container_port)?,
                host_port: port("port_mappings.host_port", p.host_port)?,
                host_ip,
            })
        })
        .collect()
}

impl<S: Shim + 'static> Runtime<S> {
    /// Tears down what the network holds for pods that no longer exist (a crash between
    /// network setup and the sandbox record, or during removal). Part of recovery.
    pub(crate) async fn release_vanished_networks(&self) {
        let Some(manager) = self.network() else {
            return;
        };
        let held = match manager.pods() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list pods holding network resources");
                return;
            }
        };
        for id in held {
            if self.sandbox(&id).is_some() {
                continue;
            }
            match manager.teardown(&id, None).await {
                Ok(()) => tracing::info!(pod_id = %id, "released the network of a vanished pod"),
                Err(e) => {
                    tracing::warn!(pod_id = %id, error = %e, "cannot release the network of a vanished pod")
                }
            }
        }
    }

    /// The network manager, if berthd configured one.
    pub fn network(&self) -> Option<&Arc<NetworkManager>> {
        self.network.as_ref()
    }

    /// Whether pods can get a network now (CRI `NetworkReady`).
    pub fn network_readiness(&self) -> Readiness {
        match self.network() {
            Some(n) => n.readiness(),
            None => Readiness {
                ready: false,
                reason: "NetworkPluginNotReady".into(),
                message: "berth: no pod network configured".into(),
            },
        }
    }

    /// The kubelet's pod CIDR (UpdateRuntimeConfig); empty means no change.
    pub fn update_pod_cidr(&self, cidr: &str) -> Result<()> {
        let Some(n) = self.network() else {
            return Ok(());
        };
        n.update_pod_cidr(cidr).map_err(|source| RuntimeError::PodCidr {
            cidr: cidr.to_owned(),
            source: Box::new(source),
        })
    }

    /// Sets up the network of pod `id` in its pinned netns.
    pub(crate) async fn setup_pod_network(
        &self,
        id: &str,
        config: &PodSandboxConfig,
        netns: &Path,
    ) -> Result<()> {
        let Some(manager) = self.network() else {
            return Ok(());
        };
        let meta = config.metadata.clone().unwrap_or_default();
        let pod = PodNetwork {
            pod_id: id.to_owned(),
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            netns: netns.to_path_buf(),
            port_mappings: port_mappings(config)?,
            dns: config.dns_config.as_ref().map(|d| DnsConfig {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }),
            bandwidth: None,
        };
        let status = manager.setup(&pod).await.map_err(|source| RuntimeError::Network {
            pod_id: id.to_owned(),
            action: "set up",
            source: Box::new(source),
        })?;
        tracing::debug!(pod_id = %id, ip = %status.ip, "pod network ready");
        Ok(())
    }

    /// Tears down the network of a pod (idempotent). Host-network pods have none. Bridge
    /// links are deleted, and their addresses released, in the background.
    pub(crate) async fn teardown_pod_network(&self, id: &str, netns: Option<&Path>) -> Result<()> {
        let (Some(manager), Some(netns)) = (self.network(), netns) else {
            return Ok(());
        };
        // The pin may be gone (reboot, or an earlier remove got past unpinning).
        let netns = Some(netns).filter(|p| p.exists());
        manager.teardown_deferred(id, netns).await.map_err(|source| RuntimeError::Network {
            pod_id: id.to_owned(),
            action: "tear down",
            source: Box::new(source),
        })
    }

    /// The pod's primary IP and further IPs, empty when it has no network (host network,
    /// torn down, or no network configured).
    pub(crate) fn pod_ips(&self, meta: &SandboxMeta) -> (String, Vec<String>) {
        let Some(manager) = self.network().filter(|_| meta.netns.is_some()) else {
            return (String::new(), Vec::new());
        };
        match manager.pod_status(&meta.id) {
            Ok(Some(s)) => {
                (s.ip.to_string(), s.additional_ips.iter().map(|ip| ip.to_string()).collect())
            }
            Ok(None) => (String::new(), Vec::new()),
            Err(e) => {
                log_status_error(&meta.id, &e);
                (String::new(), Vec::new())
            }
        }
    }
}

fn log_status_error(pod_id: &str, e: &NetworkError) {
    tracing::warn!(pod_id, error = %e, "cannot read the pod's network status");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_convert_and_validate() {
        let mut config = PodSandboxConfig {
            port_mappings: vec![k8s_cri::v1::PortMapping {
                protocol: k8s_cri::v1::Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            }],
            ..Default::default()
        };
        let got = port_mappings(&config).unwrap();
        assert_eq!(
            got,
            vec![PortMapping {
                protocol: Protocol::Udp,
                container_port: 53,
                host_port: 5353,
                host_ip: Some("127.0.0.1".parse().unwrap()),
            }]
        );
        config.port_mappings[0].host_port = 70000;
        assert!(port_mappings(&config).is_err());
        config.port_mappings[0].host_port = 80;
        config.port_mappings[0].host_ip = "nope".into();
        assert!(port_mappings(&config).is_err());
        config.port_mappings[0].host_ip = String::new();
        config.port_mappings[0].protocol = 9;
        assert!(port_mappings(&config).is_err());
    }
}

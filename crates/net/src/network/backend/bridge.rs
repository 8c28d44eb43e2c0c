//! The built-in bridge: a Linux bridge and a veth pair per pod over netlink, addresses from
//! our own IPAM (in redb, so teardown works after a restart), masquerade and hostPort DNAT
//! through nft or iptables.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;

use super::{Finish, NetworkBackend};
use crate::network::cni;
use crate::network::command::CommandRunner;
use crate::network::config::{NetworkConfig, PodNetwork, PodNetworkStatus, Readiness};
use crate::network::error::NetworkError;
use crate::network::ipam::{self, Ipam, PodRecord};
use crate::network::nat::{Backend, HostPortRule, Nat};
use crate::network::releasing::Releasing;
use crate::network::{bridge, veth};

/// What has been set up on the host for the built-in bridge since we started.
#[derive(Default)]
struct HostState {
    /// Subnets whose masquerade rules are in place; `None` until the first setup.
    nat_subnets: Option<Vec<IpNet>>,
}

/// The bridge as the last full check left it: its index and the gateway addresses put on
/// it. While the bridge of that index is up, a pod setup skips re-adding them (two netlink
/// round trips); a bridge deleted and re-made (new index) or set down gets the full check.
#[derive(Debug, Default)]
struct BridgeChecked {
    index: u32,
    gateways: Vec<IpNet>,
}

/// The built-in bridge backend.
pub(crate) struct Bridge {
    /// `bridge_name`, `masquerade`, `nat_table_name`, `plugin_timeout_secs` are ours.
    config: NetworkConfig,
    ipam: Ipam,
    /// Subnets for new allocations (config, or the kubelet's pod CIDR).
    subnets: RwLock<Vec<IpNet>>,
    runner: Arc<dyn CommandRunner>,
    nat: OnceLock<Nat>,
    host: tokio::sync::Mutex<HostState>,
    bridge_checked: std::sync::Mutex<Option<BridgeChecked>>,
    /// The manager's set of pods being torn down in the background: an allocation that
    /// finds the subnets full waits for their addresses.
    releasing: Releasing,
}

impl Bridge {
    /// Opens the IPAM tables in `db`; the subnets are the configured ones, replaced by the
    /// pod CIDR the kubelet sent before a restart. Does not touch the host.
    pub(crate) fn open(
        config: NetworkConfig,
        db: Arc<redb::Database>,
        runner: Arc<dyn CommandRunner>,
        releasing: Releasing,
    ) -> Result<Self, NetworkError> {
        let ipam = Ipam::open(db)?;
        let mut subnets: Vec<IpNet> =
            std::iter::once(config.subnet).chain(config.subnet_v6).collect();
        if let Some(cidr) = ipam.pod_cidr()? {
            match ipam::parse_pod_cidr(&cidr) {
                Ok(nets) => merge_subnets(&mut subnets, &nets),
                // A bad stored value must not keep berthd from starting.
                Err(e) => tracing::warn!(error = %e, "ignoring stored pod CIDR"),
            }
        }
        Ok(Bridge {
            config,
            ipam,
            subnets: RwLock::new(subnets),
            runner,
            nat: OnceLock::new(),
            host: tokio::sync::Mutex::new(HostState::default()),
            bridge_checked: std::sync::Mutex::new(None),
            releasing,
        })
    }

    /// The subnets new allocations come from.
    pub(crate) fn current_subnets(&self) -> Vec<IpNet> {
        self.subnets.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn nat(&self) -> &Nat {
        self.nat.get_or_init(|| {
            Nat::new(
                Backend::detect(),
                self.config.nat_table_name.clone(),
                self.runner.clone(),
                Duration::from_secs(self.config.plugin_timeout_secs.max(1)),
            )
        })
    }

    /// Removes the bridge and our NAT table/chains from the host.
    pub(crate) async fn remove_host_setup(&self) -> Result<(), NetworkError> {
        let mut host = self.host.lock().await;
        host.nat_subnets = None;
        self.nat().remove_all().await?;
        let handle = bridge::connect(&self.config.bridge_name)?;
        bridge::delete_link(&handle, &self.config.bridge_name).await.map(drop)
    }

    /// Bridge, veth pair, pod side, NAT rules for one record.
    async fn plumb(&self, rec: &PodRecord) -> Result<(), NetworkError> {
        let gateway_nets: Vec<IpNet> = rec
            .addresses
            .iter()
            .zip(&rec.gateways)
            .filter_map(|(a, g)| IpNet::new(*g, a.prefix_len()).ok())
            .collect();
        let t0 = std::time::Instant::now();
        let handle = bridge::connect(&rec.pod_id)?;
        let bridge_index = self.bridge_index(&handle, &rec.bridge, &gateway_nets).await?;
        let v6 = rec.addresses.iter().any(|a| a.addr().is_ipv6());
        bridge::enable_forwarding(&rec.bridge, v6)?;
        self.ensure_nat(rec).await?;
        let t_host = t0.elapsed();
        veth::create_pair(&handle, &rec.pod_id, &rec.netns, &rec.host_veth, bridge_index).await?;
        let t_pair = t0.elapsed();
        veth::configure_pod_side(
            &rec.pod_id,
            &rec.netns,
            rec.addresses.clone(),
            rec.gateways.clone(),
        )
        .await?;
        tracing::trace!(pod_id = %rec.pod_id, host = ?t_host, pair = ?t_pair, pod_side = ?t0.elapsed(), "plumb timings");
        // Pods without hostPorts have no rules of their own: skipping nft for them keeps
        // two process spawns off every RunPodSandbox and StopPodSandbox.
        let rules = hostport_rules(rec);
        if !rules.is_empty() {
            self.nat().set_pod(&rec.pod_id, &rules).await?;
        }
        Ok(())
    }
    /// Makes sure the bridge exists, is up and carries `gateways`; returns its index. One
    /// netlink round trip while nothing changed since the last full check.
    async fn bridge_index(
        &self,
        handle: &rtnetlink::Handle,
        name: &str,
        gateways: &[IpNet],
    ) -> Result<u32, NetworkError> {
        let checked = |index: u32| {
            let last = self.bridge_checked.lock().unwrap_or_else(|e| e.into_inner());
            last.as_ref().is_some_and(|b| {
                b.index == index && gateways.iter().all(|g| b.gateways.contains(g))
            })
        };
        if let Some((index, true)) = bridge::link_state(handle, name).await?
            && checked(index)
        {
            return Ok(index);
        }
        let index = bridge::ensure_bridge(handle, name, gateways).await?;
        let mut last = self.bridge_checked.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_mut() {
            Some(b) if b.index == index => {
                for g in gateways {
                    if !b.gateways.contains(g) {
                        b.gateways.push(*g);
                    }
                }
            }
            _ => *last = Some(BridgeChecked { index, gateways: gateways.to_vec() }),
        }
        Ok(index)
    }

    /// Makes sure the masquerade rules cover the record's subnets, and no more than the
    /// subnets pods are handed addresses from plus those live pods still use: a pod CIDR
    /// the kubelet replaced keeps its rules only while pods from it remain.
    async fn ensure_nat(&self, rec: &PodRecord) -> Result<(), NetworkError> {
        let nat = self.nat();
        let mut host = self.host.lock().await;
        let current = self.current_subnets();
        let own: Vec<IpNet> = rec.addresses.iter().map(|a| a.trunc()).collect();
        // Subnets with rules that are neither current nor this pod's: keep those that other
        // pods still have addresses in. Only then is the pod table read, so the common case
        // (nothing stale) costs no lookups.
        let stale: Vec<IpNet> = match &host.nat_subnets {
            Some(installed) => installed
                .iter()
                .filter(|s| !current.contains(s) && !own.contains(s))
                .copied()
                .collect(),
            // First setup since start: every subnet a known pod uses is a candidate.
            None => vec![],
        };
        let mut wanted = current;
        wanted.extend(own);
        if host.nat_subnets.is_none() || !stale.is_empty() {
            for id in self.ipam.pods()? {
                if let Some(r) = self.ipam.get(&id)? {
                    wanted.extend(
                        r.addresses
                            .iter()
                            .map(|a| a.trunc())
                            .filter(|s| host.nat_subnets.is_none() || stale.contains(s)),
                    );
                }
            }
        }
        wanted.sort();
        wanted.dedup();
        if host.nat_subnets.as_ref() == Some(&wanted) {
            return Ok(());
        }
        if !nat.available() {
            if self.config.masquerade {
                tracing::warn!("neither nft nor iptables installed: pods get no outbound NAT");
            }
            host.nat_subnets = Some(wanted);
            return Ok(());
        }
        nat.ensure_base(&wanted, self.config.masquerade).await?;
        host.nat_subnets = Some(wanted);
        Ok(())
    }

    /// Undoes [`Self::plumb`] (NAT rules, veth pair). Idempotent.
    async fn unplumb(&self, rec: &PodRecord) -> Result<(), NetworkError> {
        let nat_result = self.remove_hostport_rules(rec).await;
        self.delete_links(rec).await?;
        nat_result
    }

    /// Removes the pod's hostPort DNAT rules, if it has any.
    async fn remove_hostport_rules(&self, rec: &PodRecord) -> Result<(), NetworkError> {
        // Rules exist only for pods with hostPorts (see `plumb`); the port mappings are part
        // of the immutable record, so this knows whether any were made.
        if hostport_rules(rec).is_empty() {
            return Ok(());
        }
        self.nat().remove_pod(&rec.pod_id).await
    }

    /// Deletes the pod's veth pair.
    async fn delete_links(&self, rec: &PodRecord) -> Result<(), NetworkError> {
        let handle = bridge::connect(&rec.pod_id)?;
        let existed = bridge::delete_link(&handle, &rec.host_veth).await?;
        // Deleting the host end takes the peer with it. If the host end was gone already
        // (interrupted setup), a peer may still sit in the netns.
        if !existed && let Err(e) = veth::delete_pod_side(&rec.pod_id, rec.netns.clone()).await {
            tracing::debug!(pod_id = %rec.pod_id, error = %e, "deleting eth0 in pod netns");
        }
        Ok(())
    }

    /// The pod's bridge IPAM record, with `netns` as its netns when given.
    fn bridge_record(
        &self,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<Option<PodRecord>, NetworkError> {
        let Some(mut rec) = self.ipam.get(pod_id)? else {
            return Ok(None);
        };
        if let Some(ns) = netns {
            rec.netns = ns.to_path_buf();
        }
        Ok(Some(rec))
    }

    /// Links, then the address: only once the link is gone may the address go to another pod.
    async fn finish_bridge_teardown(&self, rec: &PodRecord) -> Result<(), NetworkError> {
        self.delete_links(rec).await?;
        self.ipam.release(&rec.pod_id)?;
        tracing::info!(pod_id = %rec.pod_id, "pod network torn down");
        Ok(())
    }
}

#[async_trait]
impl NetworkBackend for Bridge {
    async fn setup(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
        if let Some(rec) = self.ipam.get(&pod.pod_id)?.filter(|r| r.complete) {
            return status_of(&rec);
        }
        // Fail before allocating or touching the host when the netns is not there.
        if let Err(source) = std::fs::metadata(&pod.netns) {
            return Err(NetworkError::Netns {
                pod_id: pod.pod_id.clone(),
                path: pod.netns.clone(),
                source,
            });
        }
        let template = PodRecord {
            pod_id: pod.pod_id.clone(),
            addresses: Vec::new(),
            gateways: Vec::new(),
            bridge: self.config.bridge_name.clone(),
            host_veth: veth::host_veth_name(&self.config.bridge_name, &pod.pod_id),
            netns: pod.netns.clone(),
            port_mappings: pod.port_mappings.clone(),
            complete: false,
        };
        let subnets = self.current_subnets();
        let t0 = std::time::Instant::now();
        let mut rec = match self.ipam.allocate(template.clone(), &subnets) {
            // Addresses of pods stopped a moment ago come free once their links are gone.
            Err(NetworkError::Exhausted { .. }) if !self.releasing.is_empty() => {
                self.releasing.settled().await;
                self.ipam.allocate(template, &subnets)?
            }
            other => other?,
        };
        // An interrupted earlier attempt may have left a record with other mappings.
        rec.port_mappings = pod.port_mappings.clone();
        rec.netns = pod.netns.clone();
        let t_allocate = t0.elapsed();
        match self.plumb(&rec).await {
            Ok(()) => {
                let t_plumb = t0.elapsed();
                rec.complete = true;
                self.ipam.update(&rec)?;
                tracing::debug!(pod_id = %pod.pod_id, allocate = ?t_allocate, plumb = ?t_plumb, total = ?t0.elapsed(), "bridge setup timings");
                tracing::info!(pod_id = %pod.pod_id, addresses = ?rec.addresses, "pod network set up");
                status_of(&rec)
            }
            Err(e) => {
                // Leave nothing behind, so that the kubelet's retry starts clean.
                if let Err(ce) = self.unplumb(&rec).await {
                    tracing::warn!(pod_id = %pod.pod_id, error = %ce, "cleanup after failed setup");
                }
                if let Err(ce) = self.ipam.release(&pod.pod_id) {
                    tracing::warn!(pod_id = %pod.pod_id, error = %ce, "release after failed setup");
                }
                Err(e)
            }
        }
    }

    async fn teardown(&self, pod_id: &str, netns: Option<&Path>) -> Result<(), NetworkError> {
        let Some(rec) = self.bridge_record(pod_id, netns)? else {
            return Ok(());
        };
        // A NAT failure keeps the address: its DNAT rules may still point there.
        self.unplumb(&rec).await?;
        self.ipam.release(pod_id)?;
        tracing::info!(pod_id, "pod network torn down");
        Ok(())
    }

    /// Removes the hostPort rules now; deleting the veth (the kernel spends ~20 ms of RCU
    /// grace periods on it) and then releasing the address are left to the background, so
    /// the address is not handed out again before the link is gone.
    async fn cut_off(
        self: Arc<Self>,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<Option<Finish>, NetworkError> {
        let Some(rec) = self.bridge_record(pod_id, netns)? else {
            return Ok(None);
        };
        self.remove_hostport_rules(&rec).await?;
        Ok(Some(Box::pin(async move { self.finish_bridge_teardown(&rec).await })))
    }

    fn status(&self, pod_id: &str) -> Result<Option<PodNetworkStatus>, NetworkError> {
        match self.ipam.get(pod_id)?.filter(|r| r.complete) {
            Some(rec) => status_of(&rec).map(Some),
            None => Ok(None),
        }
    }

    fn pods(&self) -> Result<Vec<String>, NetworkError> {
        self.ipam.pods()
    }

    fn readiness(&self) -> Readiness {
        Readiness { ready: true, reason: String::new(), message: String::new() }
    }

    /// New allocations come from `nets`; remembered across restarts.
    fn update_pod_cidr(&self, cidr: &str, nets: &[IpNet]) -> Result<(), NetworkError> {
        self.ipam.set_pod_cidr(cidr.trim())?;
        let mut subnets = self.subnets.write().unwrap_or_else(|e| e.into_inner());
        merge_subnets(&mut subnets, nets);
        Ok(())
    }
}

/// Replaces the subnet of each family in `subnets` by the one in `new`.
fn merge_subnets(subnets: &mut Vec<IpNet>, new: &[IpNet]) {
    for n in new {
        subnets.retain(|s| s.addr().is_ipv4() != n.addr().is_ipv4());
        subnets.push(*n);
    }
    subnets.sort_by_key(|s| s.addr().is_ipv6());
}

fn status_of(rec: &PodRecord) -> Result<PodNetworkStatus, NetworkError> {
    cni::status_from_ips(&rec.pod_id, rec.addresses.iter().map(|a| a.addr()).collect())
}

/// The DNAT rules for a record's hostPort mappings (hostPort 0 means none).
fn hostport_rules(rec: &PodRecord) -> Vec<HostPortRule> {
    rec.port_mappings
        .iter()
        .filter(|p| p.host_port != 0)
        .filter_map(|p| {
            let want_v6 = p.host_ip.is_some_and(|ip| ip.is_ipv6());
            let pod_ip: IpAddr =
                rec.addresses.iter().map(|a| a.addr()).find(|a| a.is_ipv6() == want_v6)?;
            Some(HostPortRule {
                protocol: p.protocol,
                host_ip: p.host_ip.filter(|ip| !ip.is_unspecified()),
                host_port: p.host_port,
                pod_ip,
                container_port: p.container_port,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::config::{PortMapping, Protocol};

    #[test]
    fn hostport_rules_pick_family() {
        let rec = PodRecord {
            pod_id: "p".into(),
            addresses: vec!["10.1.0.2/24".parse().unwrap(), "fd00::2/64".parse().unwrap()],
            gateways: vec![],
            bridge: "b".into(),
            host_veth: "v".into(),
            netns: "/x".into(),
            port_mappings: vec![
                PortMapping {
                    protocol: Protocol::Tcp,
                    container_port: 80,
                    host_port: 8080,
                    host_ip: None,
                },
                PortMapping {
                    protocol: Protocol::Udp,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: Some("::1".parse().unwrap()),
                },
                PortMapping {
                    protocol: Protocol::Tcp,
                    container_port: 9,
                    host_port: 0,
                    host_ip: None,
                },
            ],
            complete: true,
        };
        let rules = hostport_rules(&rec);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].pod_ip, "10.1.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(rules[1].pod_ip, "fd00::2".parse::<IpAddr>().unwrap());
    }
}

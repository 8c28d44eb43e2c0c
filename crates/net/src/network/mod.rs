//! Pod networking: the built-in bridge (netlink + our own IPAM and NAT) or CNI plugins.
//!
//! [`NetworkManager`] is the one door: the runtime calls [`NetworkManager::setup`] from
//! RunPodSandbox (after the pod's netns is pinned), [`NetworkManager::teardown_deferred`]
//! from StopPodSandbox/RemovePodSandbox, [`NetworkManager::teardown`] from startup repair,
//! [`NetworkManager::readiness`] from Status and
//! [`NetworkManager::update_pod_cidr`] from UpdateRuntimeConfig.
//!
//! Both modes keep what they need for teardown on disk (bridge: the IPAM record in redb;
//! CNI: the config and ADD result under `<state>/cni`), so teardown works after a restart
//! and even after the mode was switched.

pub mod bridge;
pub mod cni;
pub mod command;
pub mod config;
pub mod error;
pub mod ipam;
pub mod nat;
mod releasing;
pub mod veth;
pub mod watch;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use ipnet::IpNet;

pub use command::{CommandOutput, CommandRunner, StdCommandRunner};
pub use config::{
    BandwidthConfig, DnsConfig, Mode, NetworkConfig, PodNetwork, PodNetworkStatus, PortMapping,
    Protocol, Readiness,
};
pub use error::NetworkError;

use cni::{CniCache, CniCacheDir, CniExec};
use ipam::{Ipam, PodRecord};
use nat::{Backend, HostPortRule, Nat};
use releasing::Releasing;

/// Serialises setup/teardown per pod (different pods run in parallel).
#[derive(Default)]
struct PodLocks(std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>);

impl PodLocks {
    async fn lock(&self, pod_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 256 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(pod_id).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(pod_id.to_owned(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

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

/// Sets up and tears down pod networks.
pub struct NetworkManager {
    config: NetworkConfig,
    ipam: Ipam,
    /// Subnets for new allocations (config, or the kubelet's pod CIDR).
    subnets: RwLock<Vec<IpNet>>,
    runner: Arc<dyn CommandRunner>,
    nat: OnceLock<Nat>,
    host: tokio::sync::Mutex<HostState>,
    bridge_checked: std::sync::Mutex<Option<BridgeChecked>>,
    locks: PodLocks,
    /// Pods whose bridge links are being deleted in the background.
    releasing: Releasing,
    watcher: watch::ConfWatcher,
    cni_cache: CniCacheDir,
}

impl NetworkManager {
    /// A manager using `db` for IPAM and `state_dir` for the CNI cache. Does not touch the
    /// host: the bridge and NAT rules are created on the first setup. Helper programs are run
    /// with [`StdCommandRunner`]; berthd should use [`NetworkManager::with_runner`].
    pub fn new(
        config: NetworkConfig,
        db: Arc<redb::Database>,
        state_dir: &Path,
    ) -> Result<Self, NetworkError> {
        Self::with_runner(config, db, state_dir, Arc::new(StdCommandRunner))
    }

    /// Like [`NetworkManager::new`], running `nft`/`iptables`/CNI plugins through `runner`
    /// (berthd passes one that waits through its process-wide reaper).
    pub fn with_runner(
        config: NetworkConfig,
        db: Arc<redb::Database>,
        state_dir: &Path,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<Self, NetworkError> {
        config.validate()?;
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
        Ok(NetworkManager {
            watcher: watch::ConfWatcher::new(&config.cni_conf_dir),
            cni_cache: CniCacheDir::new(state_dir),
            config,
            ipam,
            subnets: RwLock::new(subnets),
            runner,
            nat: OnceLock::new(),
            host: tokio::sync::Mutex::new(HostState::default()),
            bridge_checked: std::sync::Mutex::new(None),
            locks: PodLocks::default(),
            releasing: Releasing::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The subnets new bridge allocations come from.
    pub fn current_subnets(&self) -> Vec<IpNet> {
        self.subnets.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.plugin_timeout_secs.max(1))
    }

    fn nat(&self) -> &Nat {
        self.nat.get_or_init(|| {
            Nat::new(
                Backend::detect(),
                self.config.nat_table_name.clone(),
                self.runner.clone(),
                self.timeout(),
            )
        })
    }

    /// Sets up the network of a pod whose netns exists at `pod.netns`. Calling it again for
    /// the same pod returns the existing setup.
    pub async fn setup(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
        config::check_pod_id(&pod.pod_id)?;
        let _guard = self.locks.lock(&pod.pod_id).await;
        match self.config.mode {
            Mode::Bridge => self.setup_bridge(pod).await,
            Mode::Cni => self.setup_cni(pod).await,
        }
    }

    /// Tears down the network of a pod: whatever the bridge or CNI set up for it. Idempotent;
    /// works after a restart. `netns` is the pod's netns if it still exists.
    pub async fn teardown(&self, pod_id: &str, netns: Option<&Path>) -> Result<(), NetworkError> {
        config::check_pod_id(pod_id)?;
        let _guard = self.locks.lock(pod_id).await;
        // Both, whatever the current mode: the mode may have changed since setup.
        self.teardown_bridge(pod_id, netns).await?;
        self.teardown_cni(pod_id, netns).await
    }

    /// Like [`Self::teardown`], but returns as soon as the pod is cut off: its hostPort
    /// rules are gone and CNI DEL has run. Deleting a bridge-mode veth costs the kernel
    /// ~20 ms of RCU grace periods, so that, and releasing the address afterwards, finish
    /// in the background; the address is not handed out again before the link is gone.
    /// A teardown already under way makes this return at once. A background failure is
    /// logged and leaves the record, so the next teardown (or startup repair) retries.
    pub async fn teardown_deferred(
        self: &Arc<Self>,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<(), NetworkError> {
        config::check_pod_id(pod_id)?;
        if self.releasing.contains(pod_id) {
            return Ok(());
        }
        let guard = self.locks.lock(pod_id).await;
        self.teardown_cni(pod_id, netns).await?;
        let Some(rec) = self.bridge_record(pod_id, netns)? else {
            return Ok(());
        };
        self.remove_hostport_rules(&rec).await?;
        let ticket = self.releasing.start(pod_id);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let _guard = guard;
            let _ticket = ticket;
            if let Err(e) = this.finish_bridge_teardown(&rec).await {
                tracing::warn!(pod_id = %rec.pod_id, error = %e, "background network teardown failed; the next teardown retries");
            }
        });
        Ok(())
    }

    /// Waits until no background teardown is under way (berthd's shutdown).
    pub async fn settle(&self) {
        self.releasing.settled().await;
    }

    /// The network status of a pod that was set up, from the IPAM record or CNI cache.
    pub fn pod_status(&self, pod_id: &str) -> Result<Option<PodNetworkStatus>, NetworkError> {
        config::check_pod_id(pod_id)?;
        if let Some(rec) = self.ipam.get(pod_id)?.filter(|r| r.complete) {
            return status_of(&rec).map(Some);
        }
        match self.cni_cache.load(pod_id)? {
            Some(CniCache { result: Some(result), .. }) => {
                let ips =
                    cni::result_ips(&result).map_err(|reason| NetworkError::PluginResult {
                        plugin: "cached result".into(),
                        pod_id: pod_id.to_owned(),
                        reason,
                    })?;
                cni::status_from_ips(pod_id, ips).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Ids of the pods holding network resources (IPAM records or CNI cache entries), so the
    /// runtime can tear down those whose sandbox is gone after a crash.
    pub fn pods(&self) -> Result<Vec<String>, NetworkError> {
        let mut ids = self.ipam.pods()?;
        if let Ok(entries) = std::fs::read_dir(self.cni_cache.dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                    ids.push(id.to_owned());
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Whether pods can get a network now (CRI `NetworkReady`).
    pub fn readiness(&self) -> Readiness {
        let ready = Readiness { ready: true, reason: String::new(), message: String::new() };
        if self.config.mode == Mode::Bridge {
            return ready;
        }
        let not_ready = |message: String| Readiness {
            ready: false,
            reason: "NetworkPluginNotReady".into(),
            message,
        };
        match self.watcher.current() {
            Ok(list) => {
                for p in &list.plugins {
                    let ty = p.get("type").and_then(|t| t.as_str()).unwrap_or_default();
                    let found = self
                        .config
                        .cni_bin_dirs
                        .iter()
                        .any(|d| command::is_executable(&d.join(ty)));
                    if !found {
                        return not_ready(format!(
                            "cni plugin {ty:?} of network {:?} not found in {:?}",
                            list.name, self.config.cni_bin_dirs
                        ));
                    }
                }
                ready
            }
            Err(e) => not_ready(format!("cni config uninitialized: {e}")),
        }
    }

    /// The kubelet's pod CIDR (UpdateRuntimeConfig): new bridge allocations come from it.
    /// `"a/n"` or dual stack `"a/n,b/m"`; empty means no change. Remembered across restarts.
    pub fn update_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError> {
        let nets = ipam::parse_pod_cidr(cidr)?;
        if nets.is_empty() {
            return Ok(());
        }
        self.ipam.set_pod_cidr(cidr.trim())?;
        let mut subnets = self.subnets.write().unwrap_or_else(|e| e.into_inner());
        merge_subnets(&mut subnets, &nets);
        tracing::info!(pod_cidr = cidr, "pod CIDR updated");
        Ok(())
    }

    /// Removes the built-in bridge and our NAT table/chains from the host (for tests and
    /// uninstall; pods still using them lose their network).
    pub async fn remove_host_setup(&self) -> Result<(), NetworkError> {
        let mut host = self.host.lock().await;
        host.nat_subnets = None;
        self.nat().remove_all().await?;
        let handle = bridge::connect(&self.config.bridge_name)?;
        bridge::delete_link(&handle, &self.config.bridge_name).await.map(drop)
    }

    // ---- built-in bridge ----

    async fn setup_bridge(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
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

    async fn teardown_bridge(
        &self,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<(), NetworkError> {
        let Some(rec) = self.bridge_record(pod_id, netns)? else {
            return Ok(());
        };
        // A NAT failure keeps the address: its DNAT rules may still point there.
        self.unplumb(&rec).await?;
        self.ipam.release(pod_id)?;
        tracing::info!(pod_id, "pod network torn down");
        Ok(())
    }

    // ---- CNI ----

    fn cni_exec(&self) -> CniExec<'_> {
        CniExec {
            bin_dirs: &self.config.cni_bin_dirs,
            runner: self.runner.as_ref(),
            timeout: self.timeout(),
        }
    }

    async fn setup_cni(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
        let exec = self.cni_exec();
        if let Some(cache) = self.cni_cache.load(&pod.pod_id)? {
            if let Some(result) = &cache.result {
                let ips = cni::result_ips(result).map_err(|reason| NetworkError::PluginResult {
                    plugin: "cached result".into(),
                    pod_id: pod.pod_id.clone(),
                    reason,
                })?;
                return cni::status_from_ips(&pod.pod_id, ips);
            }
            // An ADD that never finished: undo what it may have done before starting over.
            let _ = exec.del(&cache.network, &cache.pod, Some(&pod.netns), None).await;
        }
        let list = self.watcher.current()?;
        veth::loopback_up(&pod.pod_id, &pod.netns).await?;
        let mut cache = CniCache { pod: pod.clone(), network: (*list).clone(), result: None };
        // Written before ADD: a crash in the middle still leaves what DEL needs.
        self.cni_cache.store(&cache)?;
        let outcome = async {
            let result = exec.add(&list, pod).await?;
            let ips = cni::result_ips(&result).map_err(|reason| NetworkError::PluginResult {
                plugin: list
                    .plugins
                    .last()
                    .and_then(|p| p.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                pod_id: pod.pod_id.clone(),
                reason,
            })?;
            let status = cni::status_from_ips(&pod.pod_id, ips)?;
            Ok::<_, NetworkError>((result, status))
        }
        .await;
        match outcome {
            Ok((result, status)) => {
                cache.result = Some(result);
                self.cni_cache.store(&cache)?;
                tracing::info!(pod_id = %pod.pod_id, network = %list.name, ip = %status.ip, "pod network set up (CNI)");
                Ok(status)
            }
            Err(e) => {
                match exec.del(&list, pod, Some(&pod.netns), None).await {
                    Ok(()) => self.cni_cache.remove(&pod.pod_id)?,
                    Err(de) => {
                        tracing::warn!(pod_id = %pod.pod_id, error = %de, "CNI DEL after failed ADD")
                    }
                }
                Err(e)
            }
        }
    }

    async fn teardown_cni(&self, pod_id: &str, netns: Option<&Path>) -> Result<(), NetworkError> {
        let Some(cache) = self.cni_cache.load(pod_id)? else {
            return Ok(());
        };
        let netns = netns
            .map(Path::to_path_buf)
            .or_else(|| Some(cache.pod.netns.clone()))
            .filter(|p| p.exists());
        self.cni_exec()
            .del(&cache.network, &cache.pod, netns.as_deref(), cache.result.as_ref())
            .await?;
        self.cni_cache.remove(pod_id)?;
        tracing::info!(pod_id, "pod network torn down (CNI)");
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

    fn manager(dir: &Path, config: NetworkConfig) -> NetworkManager {
        let db = Arc::new(redb::Database::create(dir.join("db.redb")).unwrap());
        NetworkManager::new(config, db, dir).unwrap()
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), NetworkConfig::default());
        let pod = PodNetwork {
            pod_id: "p".into(),
            name: "n".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            netns: "/nonexistent".into(),
            port_mappings: vec![],
            dns: None,
            bandwidth: None,
        };
        send(m.setup(&pod));
        send(m.teardown("p", None));
    }

    #[test]
    fn pod_cidr_update_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = manager(dir.path(), NetworkConfig::default());
            assert_eq!(m.current_subnets(), vec!["10.88.0.0/16".parse::<IpNet>().unwrap()]);
            m.update_pod_cidr("").unwrap();
            m.update_pod_cidr("10.244.3.0/24,fd00:3::/64").unwrap();
            assert!(m.update_pod_cidr("bogus").is_err());
            assert_eq!(
                m.current_subnets(),
                vec!["10.244.3.0/24".parse::<IpNet>().unwrap(), "fd00:3::/64".parse().unwrap()]
            );
        }
        let m = manager(dir.path(), NetworkConfig::default());
        assert_eq!(m.current_subnets()[0], "10.244.3.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn readiness_by_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert!(manager(dir.path(), NetworkConfig::default()).readiness().ready);
        let conf = dir.path().join("net.d");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let m = manager(
            dir2.path(),
            NetworkConfig {
                mode: Mode::Cni,
                cni_conf_dir: conf.clone(),
                cni_bin_dirs: vec![bin.clone()],
                ..Default::default()
            },
        );
        let r = m.readiness();
        assert!(!r.ready);
        assert_eq!(r.reason, "NetworkPluginNotReady");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("10-x.conflist"),
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"fake"}]}"#,
        )
        .unwrap();
        let r = m.readiness();
        assert!(!r.ready);
        assert!(r.message.contains("fake"), "{}", r.message);
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(bin.join("fake"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("fake"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(m.readiness().ready);
    }

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

    #[tokio::test]
    async fn teardown_of_unknown_pod_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), NetworkConfig::default());
        m.teardown("never-set-up", None).await.unwrap();
        assert!(m.teardown("../x", None).await.is_err());
        assert!(m.pod_status("never-set-up").unwrap().is_none());
    }
}

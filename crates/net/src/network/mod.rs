//! Pod networking: the built-in bridge (netlink + our own IPAM and NAT) or CNI plugins.
//!
//! [`NetworkManager`] is the one door: the runtime calls [`NetworkManager::setup`] from
//! RunPodSandbox (after the pod's netns is pinned), [`NetworkManager::teardown_deferred`]
//! from StopPodSandbox/RemovePodSandbox, [`NetworkManager::teardown`] from startup repair,
//! [`NetworkManager::readiness`] from Status and
//! [`NetworkManager::update_pod_cidr`] from UpdateRuntimeConfig.
//!
//! Behind it, each mode is a backend (`backend`: the bridge and CNI implementations of one
//! trait). The manager sets pods up through the configured one, serialises the calls for
//! one pod, and tears a pod down through both: both keep what they need for teardown on
//! disk (bridge: the IPAM record in redb; CNI: the config and ADD result under
//! `<state>/cni`), so teardown works after a restart and even after the mode was switched.

mod backend;
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
use std::path::Path;
use std::sync::{Arc, Weak};

use ipnet::IpNet;

pub use command::{CommandOutput, CommandRunner, StdCommandRunner};
pub use config::{
    BandwidthConfig, DnsConfig, Mode, NetworkConfig, PodNetwork, PodNetworkStatus, PortMapping,
    Protocol, Readiness,
};
pub use error::NetworkError;

use backend::NetworkBackend;
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

/// Sets up and tears down pod networks.
pub struct NetworkManager {
    config: NetworkConfig,
    /// The built-in bridge, also for what only it has (subnets, host setup).
    bridge: Arc<backend::Bridge>,
    /// The backend `config.mode` names: it sets pods up and answers readiness.
    active: Arc<dyn NetworkBackend>,
    /// Every backend, in teardown order (CNI first, then the bridge).
    all: [Arc<dyn NetworkBackend>; 2],
    locks: PodLocks,
    /// Pods whose network is being torn down in the background.
    releasing: Releasing,
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
        let releasing = Releasing::default();
        let bridge =
            Arc::new(backend::Bridge::open(config.clone(), db, runner.clone(), releasing.clone())?);
        let cni = Arc::new(backend::Cni::new(config.clone(), state_dir, runner));
        Ok(Self::assemble(config, bridge, cni, releasing))
    }

    /// The manager over its two backends; `releasing` is the one the bridge waits on.
    fn assemble(
        config: NetworkConfig,
        bridge: Arc<backend::Bridge>,
        cni: Arc<dyn NetworkBackend>,
        releasing: Releasing,
    ) -> Self {
        let active: Arc<dyn NetworkBackend> = match config.mode {
            Mode::Bridge => bridge.clone(),
            Mode::Cni => cni.clone(),
        };
        NetworkManager {
            all: [cni, bridge.clone()],
            bridge,
            active,
            config,
            locks: PodLocks::default(),
            releasing,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The subnets new bridge allocations come from.
    pub fn current_subnets(&self) -> Vec<IpNet> {
        self.bridge.current_subnets()
    }

    /// Sets up the network of a pod whose netns exists at `pod.netns`. Calling it again for
    /// the same pod returns the existing setup.
    pub async fn setup(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
        config::check_pod_id(&pod.pod_id)?;
        let _guard = self.locks.lock(&pod.pod_id).await;
        self.active.setup(pod).await
    }

    /// Tears down the network of a pod: whatever the bridge or CNI set up for it. Idempotent;
    /// works after a restart. `netns` is the pod's netns if it still exists.
    pub async fn teardown(&self, pod_id: &str, netns: Option<&Path>) -> Result<(), NetworkError> {
        config::check_pod_id(pod_id)?;
        let _guard = self.locks.lock(pod_id).await;
        // Every backend, whatever the current mode: the mode may have changed since setup.
        for b in &self.all {
            b.teardown(pod_id, netns).await?;
        }
        Ok(())
    }

    /// Like [`Self::teardown`], but returns as soon as the pod is cut off: its hostPort
    /// rules are gone and CNI DEL has run. Deleting a bridge-mode veth costs the kernel
    /// ~20 ms of RCU grace periods, so that, and releasing the address afterwards, finish
    /// in the background; the address is not handed out again before the link is gone.
    /// A teardown already under way makes this return at once. A background failure is
    /// logged and leaves the record, so the next teardown (or startup repair) retries.
    pub async fn teardown_deferred(
        &self,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<(), NetworkError> {
        config::check_pod_id(pod_id)?;
        if self.releasing.contains(pod_id) {
            return Ok(());
        }
        let guard = self.locks.lock(pod_id).await;
        let mut rest = Vec::new();
        for b in &self.all {
            rest.extend(Arc::clone(b).cut_off(pod_id, netns).await?);
        }
        if rest.is_empty() {
            return Ok(());
        }
        let ticket = self.releasing.start(pod_id);
        let pod_id = pod_id.to_owned();
        tokio::spawn(async move {
            // The pod stays locked, and in the releasing set, until the work is done.
            let _guard = guard;
            let _ticket = ticket;
            for finish in rest {
                if let Err(e) = finish.await {
                    tracing::warn!(%pod_id, error = %e, "background network teardown failed; the next teardown retries");
                    break;
                }
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
        // The bridge first: its record is one redb read.
        for b in self.all.iter().rev() {
            if let Some(status) = b.status(pod_id)? {
                return Ok(Some(status));
            }
        }
        Ok(None)
    }

    /// Ids of the pods holding network resources (IPAM records or CNI cache entries), so the
    /// runtime can tear down those whose sandbox is gone after a crash.
    pub fn pods(&self) -> Result<Vec<String>, NetworkError> {
        let mut ids = Vec::new();
        for b in &self.all {
            ids.extend(b.pods()?);
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Whether pods can get a network now (CRI `NetworkReady`).
    pub fn readiness(&self) -> Readiness {
        self.active.readiness()
    }

    /// The kubelet's pod CIDR (UpdateRuntimeConfig): new bridge allocations come from it.
    /// `"a/n"` or dual stack `"a/n,b/m"`; empty means no change. Remembered across restarts,
    /// also in CNI mode (for a later switch back to the bridge).
    pub fn update_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError> {
        let nets = ipam::parse_pod_cidr(cidr)?;
        if nets.is_empty() {
            return Ok(());
        }
        for b in &self.all {
            b.update_pod_cidr(cidr, &nets)?;
        }
        tracing::info!(pod_cidr = cidr, "pod CIDR updated");
        Ok(())
    }

    /// Removes the built-in bridge and our NAT table/chains from the host (for tests and
    /// uninstall; pods still using them lose their network).
    pub async fn remove_host_setup(&self) -> Result<(), NetworkError> {
        self.bridge.remove_host_setup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(dir: &Path, config: NetworkConfig) -> NetworkManager {
        let db = Arc::new(redb::Database::create(dir.join("db.redb")).unwrap());
        NetworkManager::new(config, db, dir).unwrap()
    }

    /// A pod whose network namespace does not exist.
    fn test_pod() -> PodNetwork {
        PodNetwork {
            pod_id: "p".into(),
            name: "n".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            netns: "/nonexistent".into(),
            port_mappings: vec![],
            dns: None,
            bandwidth: None,
        }
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), NetworkConfig::default());
        let pod = test_pod();
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

    /// A backend that records what the manager asks of it; its background part waits for
    /// `release`.
    #[derive(Default)]
    struct Fake {
        calls: std::sync::Mutex<Vec<String>>,
        release: tokio::sync::Notify,
    }

    impl Fake {
        fn log(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl NetworkBackend for Fake {
        async fn setup(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
            self.log(format!("setup {}", pod.pod_id));
            Ok(PodNetworkStatus {
                ip: "10.9.0.2".parse().unwrap(),
                additional_ips: vec![],
                interface: "eth0".into(),
            })
        }
        async fn teardown(&self, pod_id: &str, _: Option<&Path>) -> Result<(), NetworkError> {
            self.log(format!("teardown {pod_id}"));
            Ok(())
        }
        async fn cut_off(
            self: Arc<Self>,
            pod_id: &str,
            _: Option<&Path>,
        ) -> Result<Option<backend::Finish>, NetworkError> {
            self.log(format!("cut_off {pod_id}"));
            let id = pod_id.to_owned();
            Ok(Some(Box::pin(async move {
                self.release.notified().await;
                self.log(format!("finished {id}"));
                Ok(())
            })))
        }
        fn status(&self, _: &str) -> Result<Option<PodNetworkStatus>, NetworkError> {
            Ok(None)
        }
        fn pods(&self) -> Result<Vec<String>, NetworkError> {
            Ok(vec!["b".into(), "a".into()])
        }
        fn readiness(&self) -> Readiness {
            Readiness { ready: false, reason: "Fake".into(), message: String::new() }
        }
    }

    #[tokio::test]
    async fn the_manager_sets_up_through_the_mode_and_tears_down_through_every_backend() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(redb::Database::create(dir.path().join("db.redb")).unwrap());
        let config = NetworkConfig { mode: Mode::Cni, ..Default::default() };
        let releasing = Releasing::default();
        let bridge = Arc::new(
            backend::Bridge::open(
                config.clone(),
                db,
                Arc::new(StdCommandRunner),
                releasing.clone(),
            )
            .unwrap(),
        );
        let fake = Arc::new(Fake::default());
        let m = NetworkManager::assemble(config, bridge, fake.clone(), releasing);
        assert_eq!(m.readiness().reason, "Fake");
        assert_eq!(m.pods().unwrap(), ["a", "b"]);
        let pod = test_pod();
        m.setup(&pod).await.unwrap();
        // The bridge holds nothing for "p": its teardown is a no-op, the fake's runs.
        m.teardown("p", None).await.unwrap();
        assert_eq!(fake.calls(), ["setup p", "teardown p"]);

        // Deferred: cut off now, the rest in the background; a second call while it runs
        // returns at once, and `settle` waits for the rest.
        m.teardown_deferred("p", None).await.unwrap();
        m.teardown_deferred("p", None).await.unwrap();
        assert_eq!(fake.calls()[2..], ["cut_off p"]);
        let settled = async {
            m.settle().await;
            fake.calls()
        };
        let release = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            fake.release.notify_one();
        };
        let (calls, ()) = tokio::join!(settled, release);
        assert_eq!(calls[2..], ["cut_off p", "finished p"]);
        m.teardown("p", None).await.unwrap();
        assert_eq!(fake.calls().last().unwrap(), "teardown p");
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

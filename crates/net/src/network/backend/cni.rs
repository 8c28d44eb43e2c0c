//! CNI plugins: the first network configuration in the conf dir (watched for changes), run
//! with ADD/DEL; the configuration and ADD result of each pod are cached under the root, so
//! DEL works after a restart, a reboot or a change of the configuration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Finish, NetworkBackend};
use crate::network::cni::{self, CniCache, CniCacheDir, CniExec};
use crate::network::command::{self, CommandRunner};
use crate::network::config::{NetworkConfig, PodNetwork, PodNetworkStatus, Readiness};
use crate::network::error::NetworkError;
use crate::network::{veth, watch};

/// The CNI backend.
pub(crate) struct Cni {
    /// `cni_conf_dir`, `cni_bin_dirs`, `plugin_timeout_secs` are ours.
    config: NetworkConfig,
    runner: Arc<dyn CommandRunner>,
    watcher: watch::ConfWatcher,
    cache: CniCacheDir,
}

impl Cni {
    /// Watches the conf dir; keeps the cache under `state_dir`.
    pub(crate) fn new(
        config: NetworkConfig,
        state_dir: &Path,
        runner: Arc<dyn CommandRunner>,
    ) -> Self {
        Cni {
            watcher: watch::ConfWatcher::new(&config.cni_conf_dir),
            cache: CniCacheDir::new(state_dir),
            config,
            runner,
        }
    }

    fn exec(&self) -> CniExec<'_> {
        CniExec {
            bin_dirs: &self.config.cni_bin_dirs,
            runner: self.runner.as_ref(),
            timeout: Duration::from_secs(self.config.plugin_timeout_secs.max(1)),
        }
    }
}

#[async_trait]
impl NetworkBackend for Cni {
    async fn setup(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError> {
        let exec = self.exec();
        if let Some(cache) = self.cache.load(&pod.pod_id)? {
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
        self.cache.store(&cache)?;
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
                self.cache.store(&cache)?;
                tracing::info!(pod_id = %pod.pod_id, network = %list.name, ip = %status.ip, "pod network set up (CNI)");
                Ok(status)
            }
            Err(e) => {
                match exec.del(&list, pod, Some(&pod.netns), None).await {
                    Ok(()) => self.cache.remove(&pod.pod_id)?,
                    Err(de) => {
                        tracing::warn!(pod_id = %pod.pod_id, error = %de, "CNI DEL after failed ADD")
                    }
                }
                Err(e)
            }
        }
    }

    async fn teardown(&self, pod_id: &str, netns: Option<&Path>) -> Result<(), NetworkError> {
        let Some(cache) = self.cache.load(pod_id)? else {
            return Ok(());
        };
        let netns = netns
            .map(Path::to_path_buf)
            .or_else(|| Some(cache.pod.netns.clone()))
            .filter(|p| p.exists());
        self.exec()
            .del(&cache.network, &cache.pod, netns.as_deref(), cache.result.as_ref())
            .await?;
        self.cache.remove(pod_id)?;
        tracing::info!(pod_id, "pod network torn down (CNI)");
        Ok(())
    }

    /// CNI DEL is the whole teardown: nothing is left for the background.
    async fn cut_off(
        self: Arc<Self>,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<Option<Finish>, NetworkError> {
        self.teardown(pod_id, netns).await.map(|()| None)
    }

    fn status(&self, pod_id: &str) -> Result<Option<PodNetworkStatus>, NetworkError> {
        match self.cache.load(pod_id)? {
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

    fn pods(&self) -> Result<Vec<String>, NetworkError> {
        let mut ids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.cache.dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                    ids.push(id.to_owned());
                }
            }
        }
        Ok(ids)
    }

    fn readiness(&self) -> Readiness {
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
                Readiness { ready: true, reason: String::new(), message: String::new() }
            }
            Err(e) => not_ready(format!("cni config uninitialized: {e}")),
        }
    }
}

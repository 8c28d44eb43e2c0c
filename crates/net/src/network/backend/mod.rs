//! The two ways a pod gets its network, behind one trait: the built-in bridge ([`Bridge`]:
//! netlink, our own IPAM and NAT) and CNI plugins ([`Cni`]). The [`NetworkManager`] picks
//! the backend that sets pods up (`mode`), holds the per-pod locks, and tears a pod down
//! through every backend, whatever the mode: the mode may have changed since the pod's
//! setup, and each backend keeps on disk what its own teardown needs.
//!
//! [`NetworkManager`]: super::NetworkManager

mod bridge;
mod cni;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::IpNet;

pub(crate) use bridge::Bridge;
pub(crate) use cni::Cni;

use super::config::{PodNetwork, PodNetworkStatus, Readiness};
use super::error::NetworkError;

/// The part of a teardown left to run in the background (see [`NetworkBackend::cut_off`]).
pub(crate) type Finish = Pin<Box<dyn Future<Output = Result<(), NetworkError>> + Send>>;

/// One way of giving pods a network. The manager serialises setup and teardown per pod (a
/// backend never runs two of them for one pod at once; the background part of a deferred
/// teardown still holds the pod's lock) and checks pod ids before they reach a backend.
#[async_trait]
pub(crate) trait NetworkBackend: Send + Sync {
    /// Sets up the network of a pod whose netns exists at `pod.netns`. A pod already set
    /// up gets its existing status back.
    async fn setup(&self, pod: &PodNetwork) -> Result<PodNetworkStatus, NetworkError>;

    /// Removes whatever this backend set up for the pod (nothing if it set up nothing).
    /// Idempotent; works after a restart. `netns` is the pod's netns if it still exists.
    async fn teardown(&self, pod_id: &str, netns: Option<&Path>) -> Result<(), NetworkError>;

    /// Cuts the pod off (no traffic reaches it through this backend any more) and returns
    /// what is left of the teardown, when that is worth finishing in the background. A
    /// failure of the returned part must leave enough behind for a later teardown to retry.
    async fn cut_off(
        self: Arc<Self>,
        pod_id: &str,
        netns: Option<&Path>,
    ) -> Result<Option<Finish>, NetworkError>;

    /// The status of a pod this backend set up completely, from what it keeps on disk.
    fn status(&self, pod_id: &str) -> Result<Option<PodNetworkStatus>, NetworkError>;

    /// Ids of the pods this backend holds resources for.
    fn pods(&self) -> Result<Vec<String>, NetworkError>;

    /// Whether this backend can set pods up now (CRI `NetworkReady`).
    fn readiness(&self) -> Readiness;

    /// The kubelet's pod CIDR (UpdateRuntimeConfig): `cidr` as the kubelet sent it, `nets`
    /// parsed from it (never empty). Backends that take addresses from elsewhere ignore it.
    fn update_pod_cidr(&self, _cidr: &str, _nets: &[IpNet]) -> Result<(), NetworkError> {
        Ok(())
    }
}

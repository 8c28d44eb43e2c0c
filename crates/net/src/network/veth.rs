//! A pod's veth pair: host end on the bridge, peer `eth0` inside the pod's netns.
//!
//! Netlink work inside the pod's namespace runs on a fresh OS thread that joins the netns
//! with `setns` and drives its own current-thread tokio runtime and netlink socket. The
//! thread then exits: a thread in a foreign namespace must never go back to a pool.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::bridge::{EEXIST, add_address, errno, link_index, set_up};
use super::error::NetworkError;

/// The interface name inside the pod.
pub const POD_IFNAME: &str = "eth0";

/// The host-side veth name of a pod: `bv` + 12 hex digits of a hash of bridge and pod id
/// (at most 15 bytes, stable across restarts, distinct per bridge).
pub fn host_veth_name(bridge: &str, pod_id: &str) -> String {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bridge.bytes().chain([b'/']).chain(pod_id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("bv{:012x}", h & 0xffff_ffff_ffff)
}

fn open_netns(pod_id: &str, netns: &Path) -> Result<std::fs::File, NetworkError> {
    std::fs::File::open(netns).map_err(|source| NetworkError::Netns {
        pod_id: pod_id.to_owned(),
        path: netns.to_path_buf(),
        source,
    })
}

/// Creates the veth pair `host` <-> `eth0`, with `eth0` created directly inside the pod's
/// netns (so no temporary name ever appears on the host), and `host` attached to the bridge
/// and up: one netlink request (the kernel applies the master and the flags at creation).
/// A leftover `host` link from an interrupted setup is replaced.
pub(crate) async fn create_pair(
    handle: &Handle,
    pod_id: &str,
    netns: &Path,
    host: &str,
    bridge_index: u32,
) -> Result<(), NetworkError> {
    let ns = open_netns(pod_id, netns)?;
    let build = || {
        // The peer cannot come up at creation (the kernel answers ENOTCONN when it lives in
        // another netns): `configure_pod_side` sets it up.
        let peer =
            LinkUnspec::new_with_name(POD_IFNAME).setns_by_fd(ns.as_fd().as_raw_fd()).build();
        LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_owned())
            .controller(bridge_index)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build()
    };
    match handle.link().add(build()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(EEXIST) => {
            // Left over from an interrupted setup of this pod (the name is derived from the
            // pod id); deleting the host end deletes its peer too. Then try once more.
            super::bridge::delete_link(handle, host).await?;
            handle.link().add(build()).execute().await.map_err(|e| {
                NetworkError::netlink("add veth", format!("{host} for pod {pod_id}"), e)
            })
        }
        Err(e) => Err(NetworkError::netlink("add veth", format!("{host} for pod {pod_id}"), e)),
    }
}

/// Runs `f` with a netlink handle inside the network namespace at `netns`, on a dedicated
/// thread that exits afterwards.
pub(crate) async fn in_netns<F, Fut, T>(pod_id: &str, netns: &Path, f: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send + 'static,
{
    let ns = open_netns(pod_id, netns)?;
    let subject = format!("netns {} of pod {pod_id}", netns.display());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_subject = subject.clone();
    std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(move || {
            let result = (|| {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| NetworkError::Sys {
                        call: "setns(CLONE_NEWNET)",
                        subject: thread_subject.clone(),
                        source: e.into(),
                    },
                )?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| NetworkError::Sys {
                        call: "build netns runtime",
                        subject: thread_subject.clone(),
                        source,
                    })?;
                rt.block_on(async move {
                    let handle = super::bridge::connect(&thread_subject)?;
                    f(handle).await
                })
            })();
            // The receiver is gone only if the caller was cancelled; nothing to tell then.
            let _ = tx.send(result);
        })
        .map_err(|source| NetworkError::Sys {
            call: "spawn netns thread",
            subject: subject.clone(),
            source,
        })?;
    rx.await.map_err(|_| NetworkError::Thread {
        subject,
        reason: "exited without a result (panicked)".into(),
    })?
}

/// Inside the pod: addresses on `eth0`, `eth0` and `lo` up, default routes via the gateways.
pub(crate) async fn configure_pod_side(
    pod_id: &str,
    netns: &Path,
    addresses: Vec<IpNet>,
    gateways: Vec<IpAddr>,
) -> Result<(), NetworkError> {
    let pod = pod_id.to_owned();
    in_netns(pod_id, netns, move |handle| async move {
        let eth0 =
            link_index(&handle, POD_IFNAME).await?.ok_or_else(|| NetworkError::LinkNotFound {
                name: POD_IFNAME.to_owned(),
                context: "in the pod's netns after creating the veth pair",
            })?;
        for addr in &addresses {
            add_address(&handle, eth0, addr, POD_IFNAME).await?;
        }
        set_up(&handle, eth0, POD_IFNAME).await?;
        if let Some(lo) = link_index(&handle, "lo").await? {
            set_up(&handle, lo, "lo").await?;
        }
        for gw in gateways {
            let route = match gw {
                IpAddr::V4(g) => {
                    RouteMessageBuilder::<Ipv4Addr>::new().gateway(g).output_interface(eth0).build()
                }
                IpAddr::V6(g) => {
                    RouteMessageBuilder::<Ipv6Addr>::new().gateway(g).output_interface(eth0).build()
                }
            };
            match handle.route().add(route).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(EEXIST) => {}
                Err(e) => {
                    return Err(NetworkError::netlink(
                        "add default route",
                        format!("via {gw} in pod {pod}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    })
    .await
}

/// Sets `lo` up inside the pod's netns (CNI mode: no pause process or loopback plugin
/// does it for us).
pub(crate) async fn loopback_up(pod_id: &str, netns: &Path) -> Result<(), NetworkError> {
    in_netns(pod_id, netns, |handle| async move {
        match link_index(&handle, "lo").await? {
            Some(lo) => set_up(&handle, lo, "lo").await,
            None => Ok(()),
        }
    })
    .await
}

/// Deletes `eth0` inside the pod's netns, if the netns is still there (used by teardown
/// when the host end is already gone but the pod side may not be).
pub(crate) async fn delete_pod_side(pod_id: &str, netns: PathBuf) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(pod_id, &netns, |handle| async move {
        super::bridge::delete_link(&handle, POD_IFNAME).await.map(drop)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_short_stable_and_distinct() {
        let a = host_veth_name("berth0", "0123456789abcdef0123456789abcdef");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("bv"));
        assert_eq!(a, host_veth_name("berth0", "0123456789abcdef0123456789abcdef"));
        assert_ne!(a, host_veth_name("berth1", "0123456789abcdef0123456789abcdef"));
        assert_ne!(a, host_veth_name("berth0", "0123456789abcdef0123456789abcdee"));
    }
}

//! The Linux bridge on the host, configured over netlink (no `ip` binary).

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use super::error::NetworkError;

/// `EEXIST`, as netlink reports it (negated errno).
pub(crate) const EEXIST: i32 = libc::EEXIST;
/// `ENODEV`.
pub(crate) const ENODEV: i32 = libc::ENODEV;

/// Opens a netlink connection in the calling thread's network namespace and drives it on
/// the current tokio runtime. The connection task ends when the handle is dropped.
pub(crate) fn connect(subject: &str) -> Result<Handle, NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetworkError::Sys {
        call: "open netlink socket",
        subject: subject.to_owned(),
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The errno of a netlink error reply, positive (`EEXIST`, `ENODEV`, ...).
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The index of link `name`, or `None` if there is none.
pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    Ok(link_state(handle, name).await?.map(|(index, _)| index))
}

/// The index of link `name` and whether it is up, or `None` if there is none.
pub(crate) async fn link_state(
    handle: &Handle,
    name: &str,
) -> Result<Option<(u32, bool)>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some((
            msg.header.index,
            msg.header.flags.contains(netlink_packet_route::link::LinkFlags::Up),
        ))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(NetworkError::netlink("get link", name, e)),
    }
}

/// Sets a link up.
pub(crate) async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| NetworkError::netlink("set link up", name, e))
}

/// Adds an address to a link; an address that is there already is fine.
pub(crate) async fn add_address(
    handle: &Handle,
    index: u32,
    addr: &IpNet,
    link: &str,
) -> Result<(), NetworkError> {
    let mut req = handle.address().add(index, addr.addr(), addr.prefix_len());
    if addr.addr().is_ipv6() {
        // No duplicate address detection on our own private link: the address is usable
        // at once, so routes via it can be added right away.
        req.message_mut().header.flags |= netlink_packet_route::address::AddressHeaderFlags::Nodad;
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        Err(e) => Err(NetworkError::netlink("add address", format!("{addr} on {link}"), e)),
    }
}

/// Makes sure bridge `name` exists, is up, and carries `gateways` (address + prefix of each
/// subnet's gateway). Returns its index.
pub(crate) async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    gateways: &[IpNet],
) -> Result<u32, NetworkError> {
    let index = match link_index(handle, name).await? {
        Some(i) => i,
        None => {
            match handle.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                // Someone else (a concurrent setup) was faster.
                Err(e) if errno(&e) == Some(EEXIST) => {}
                Err(e) => return Err(NetworkError::netlink("add bridge", name, e)),
            }
            link_index(handle, name).await?.ok_or_else(|| NetworkError::LinkNotFound {
                name: name.to_owned(),
                context: "right after creating it",
            })?
        }
    };
    for gw in gateways {
        add_address(handle, index, gw, name).await?;
    }
    set_up(handle, index, name).await?;
    Ok(index)
}

/// Deletes link `name`; a link that is not there is fine. Returns whether it was there.
pub(crate) async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetworkError> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(NetworkError::netlink("delete link", name, e)),
    }
}

/// Writes a sysctl, given as its path under `/proc/sys` (slashes, so that interface names
/// with dots stay intact).
pub(crate) fn sysctl(key: &str, value: &str) -> Result<(), NetworkError> {
    let path = std::path::Path::new("/proc/sys").join(key);
    // Skip the write when it is set already: /proc/sys may be read-only in some setups
    // where the administrator enabled forwarding for us.
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| NetworkError::File {
        action: "write sysctl",
        path,
        source,
    })
}

/// Enables forwarding (and, for hostPorts reached via 127.0.0.1, `route_localnet` on the
/// bridge).
pub(crate) fn enable_forwarding(bridge: &str, v6: bool) -> Result<(), NetworkError> {
    sysctl("net/ipv4/ip_forward", "1")?;
    sysctl(&format!("net/ipv4/conf/{bridge}/route_localnet"), "1")?;
    if v6 {
        sysctl("net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

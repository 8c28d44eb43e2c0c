//! CNI mode end to end with Debian's containernetworking-plugins (bridge, host-local,
//! portmap, loopback) from /usr/lib/cni. Needs root and the plugins.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use berth_net::network::{Mode, NetworkConfig, NetworkManager, PodNetwork, PortMapping, Protocol};
use common::*;

const BIN: &str = "/usr/lib/cni";

/// iptables chains portmap creates once per host (not removed by DEL); removed by the test
/// if they did not exist before it.
const PORTMAP_CHAINS: [&str; 3] =
    ["CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ"];

struct PortmapCleanup {
    existed: bool,
    /// Whether the nft tables iptables-nft uses (`ip nat`, `ip6 nat`) existed before.
    tables_existed: [bool; 2],
}

impl PortmapCleanup {
    fn new() -> Self {
        PortmapCleanup {
            existed: run("iptables", &["-t", "nat", "-S", "CNI-HOSTPORT-DNAT"]).0,
            tables_existed: [
                run("nft", &["list", "table", "ip", "nat"]).0,
                run("nft", &["list", "table", "ip6", "nat"]).0,
            ],
        }
    }
}

impl Drop for PortmapCleanup {
    fn drop(&mut self) {
        self.remove_chains();
        // iptables-nft creates these tables on first use; remove them again if they are
        // ours and hold no rules.
        for (family, existed) in ["ip", "ip6"].iter().zip(self.tables_existed) {
            let (ok, listing) = run("nft", &["list", "table", family, "nat"]);
            if !existed && ok && !listing.contains("jump") && !listing.contains("dnat") {
                let _ = run("nft", &["delete", "table", family, "nat"]);
            }
        }
    }
}

impl PortmapCleanup {
    fn remove_chains(&self) {
        if self.existed {
            return;
        }
        for (chain, jump) in [
            ("PREROUTING", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
            ("OUTPUT", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
            (
                "POSTROUTING",
                "-m comment --comment CNI portfwd requiring masquerade -j CNI-HOSTPORT-MASQ",
            ),
        ] {
            let _ = run("sh", &["-c", &format!("iptables -t nat -D {chain} {jump}")]);
            let _ = run(
                "sh",
                &[
                    "-c",
                    &format!(
                        "iptables -t nat -D {chain} -m comment --comment 'CNI portfwd requiring masquerade' -j CNI-HOSTPORT-MASQ"
                    ),
                ],
            );
        }
        for c in PORTMAP_CHAINS {
            let _ = run("iptables", &["-t", "nat", "-F", c]);
        }
        for c in PORTMAP_CHAINS {
            let _ = run("iptables", &["-t", "nat", "-X", c]);
        }
    }
}

fn write_conflist(dir: &Path, bridge: &str, subnet: &str, data_dir: &Path) {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("net-{bridge}"),
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false},
            {"type": "loopback"}
        ]
    });
    std::fs::write(dir.join("10-test.conflist"), serde_json::to_vec_pretty(&conf).unwrap())
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_bridge_portmap_with_restart() {
    if !is_root() || !Path::new(BIN).join("bridge").exists() {
        skipped(&format!("needs root and {BIN}"));
        return;
    }
    let tag = rand_hex(3);
    let bridge = format!("bt{tag}");
    let _cleanup = HostCleanup { links: vec![bridge.clone()], nft_table: None };
    let _portmap = PortmapCleanup::new();
    let subnet = format!("10.{}.{}.0/24", 200 + rand_byte() % 50, rand_byte());
    let tmp = tempfile::tempdir().unwrap();
    let conf_dir = tmp.path().join("net.d");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let db = Arc::new(redb::Database::create(tmp.path().join("db.redb")).unwrap());
    let config = NetworkConfig {
        mode: Mode::Cni,
        cni_conf_dir: conf_dir.clone(),
        cni_bin_dirs: vec!["/nonexistent/cni".into(), BIN.into()],
        ..Default::default()
    };
    let m = NetworkManager::new(config.clone(), db.clone(), &state).unwrap();

    // No config yet: not ready, and setup says why.
    let r = m.readiness();
    assert!(!r.ready);
    assert_eq!(r.reason, "NetworkPluginNotReady");
    std::fs::create_dir_all(&conf_dir).unwrap();
    write_conflist(&conf_dir, &bridge, &subnet, &tmp.path().join("ipam"));
    let r = m.readiness();
    assert!(r.ready, "{r:?}");

    let ns1 = TempNetns::new();
    let ns2 = TempNetns::new();
    let host_port = 20000 + u16::from(rand_byte()) * 100 + u16::from(rand_byte() % 100);
    let mk = |id: String, ns: &TempNetns, ports| PodNetwork {
        pod_id: id,
        name: "web".into(),
        namespace: "default".into(),
        uid: format!("uid-{tag}"),
        netns: ns.path(),
        port_mappings: ports,
        dns: None,
        bandwidth: None,
    };
    let p1 = mk(
        format!("c1-{tag}"),
        &ns1,
        vec![PortMapping { protocol: Protocol::Tcp, container_port: 80, host_port, host_ip: None }],
    );
    let p2 = mk(format!("c2-{tag}"), &ns2, vec![]);
    let s1 = m.setup(&p1).await.unwrap();
    let s2 = m.setup(&p2).await.unwrap();
    let base = subnet.trim_end_matches("0/24");
    assert_eq!(s1.interface, "eth0");
    assert!(s1.ip.to_string().starts_with(base), "{s1:?}");
    assert!(s2.ip.to_string().starts_with(base), "{s2:?}");
    assert_ne!(s1.ip, s2.ip);
    // Idempotent: the cached result.
    assert_eq!(m.setup(&p1).await.unwrap(), s1);
    assert!(state.join(format!("cni/{}.json", p1.pod_id)).exists());

    // Inside: address on eth0, lo up, pods reach each other.
    let (_, addr) = ns1.exec(&["ip", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&s1.ip.to_string()), "{addr}");
    let (_, lo) = ns1.exec(&["ip", "-o", "addr", "show", "lo"]);
    assert!(lo.contains("127.0.0.1"), "{lo}");
    let (ok, out) = ns1.exec(&["busybox", "ping", "-c1", "-W3", &s2.ip.to_string()]);
    assert!(ok, "ping: {out}");
    // portmap got the runtimeConfig: a DNAT to the pod's port exists.
    let (_, nat) = run("iptables", &["-t", "nat", "-S"]);
    assert!(nat.contains(&format!("{}:80", s1.ip)), "{nat}");

    // "Restart": a new manager tears down from the cache alone, even after the conf dir
    // changed (the cached config is used).
    drop(m);
    std::fs::remove_file(conf_dir.join("10-test.conflist")).unwrap();
    let m2 = NetworkManager::new(config, db, &state).unwrap();
    let mut pods = m2.pods().unwrap();
    pods.sort();
    assert_eq!(pods, vec![p1.pod_id.clone(), p2.pod_id.clone()]);
    assert_eq!(m2.pod_status(&p1.pod_id).unwrap().map(|s| s.ip), Some(s1.ip));
    m2.teardown(&p1.pod_id, Some(&p1.netns)).await.unwrap();
    m2.teardown(&p1.pod_id, Some(&p1.netns)).await.unwrap();
    // DEL after the netns is gone.
    let ns2_path = ns2.path();
    drop(ns2);
    m2.teardown(&p2.pod_id, Some(&ns2_path)).await.unwrap();
    assert!(m2.pods().unwrap().is_empty());

    let (_, nat) = run("iptables", &["-t", "nat", "-S"]);
    assert!(!nat.contains(&format!("{}:80", s1.ip)), "{nat}");
    let (_, links) = ns1.exec(&["ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
    // host-local released both addresses.
    let leases: Vec<_> = std::fs::read_dir(tmp.path().join("ipam").join(format!("net-{bridge}")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<IpAddr>().is_ok())
        .collect();
    assert!(leases.is_empty(), "{leases:?}");
}

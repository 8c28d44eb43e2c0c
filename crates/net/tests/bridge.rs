//! The built-in bridge end to end: two pods in real netns, addresses, routes, ping,
//! hostPort DNAT, teardown, restart. Needs root.

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use berth_net::network::{Mode, NetworkConfig, NetworkManager, PodNetwork, PortMapping, Protocol};
use common::*;

fn pod(id: &str, ns: &TempNetns, ports: Vec<PortMapping>) -> PodNetwork {
    PodNetwork {
        pod_id: id.into(),
        name: format!("name-{id}"),
        namespace: "default".into(),
        uid: format!("uid-{id}"),
        netns: ns.path(),
        port_mappings: ports,
        dns: None,
        bandwidth: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_on_the_bridge() {
    if !is_root() {
        skipped("needs root");
        return;
    }
    let tag = rand_hex(3);
    let bridge = format!("bt{tag}");
    let table = format!("bt{tag}");
    let _cleanup = HostCleanup { links: vec![bridge.clone()], nft_table: Some(table.clone()) };
    let subnet = format!("10.{}.{}.0/24", 200 + rand_byte() % 50, rand_byte());
    let state = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(state.path().join("db.redb")).unwrap());
    let config = NetworkConfig {
        mode: Mode::Bridge,
        bridge_name: bridge.clone(),
        subnet: subnet.parse().unwrap(),
        nat_table_name: table.clone(),
        ..Default::default()
    };
    let m = NetworkManager::new(config.clone(), db.clone(), state.path()).unwrap();
    // new() must not touch the host.
    assert!(!run("ip", &["link", "show", &bridge]).0);
    assert!(m.readiness().ready);

    let ns1 = TempNetns::new();
    let ns2 = TempNetns::new();
    let host_port = 20000 + u16::from(rand_byte()) * 100 + u16::from(rand_byte() % 100);
    let p1 = pod(
        &format!("p1-{tag}"),
        &ns1,
        vec![PortMapping {
            protocol: Protocol::Tcp,
            container_port: 8080,
            host_port,
            host_ip: None,
        }],
    );
    let p2 = pod(&format!("p2-{tag}"), &ns2, vec![]);

    let s1 = m.setup(&p1).await.unwrap();
    let s2 = m.setup(&p2).await.unwrap();
    let base = subnet.trim_end_matches("0/24");
    assert_eq!(s1.ip, format!("{base}2").parse::<IpAddr>().unwrap());
    assert_eq!(s2.ip, format!("{base}3").parse::<IpAddr>().unwrap());
    assert_eq!(s1.interface, "eth0");
    // Again: same answer, nothing new.
    assert_eq!(m.setup(&p1).await.unwrap(), s1);
    assert_eq!(m.pod_status(&p1.pod_id).unwrap(), Some(s1.clone()));

    // Inside the pod: address, lo up, default route via the gateway.
    let gw = format!("{base}1");
    let (_, addr) = ns1.exec(&["ip", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{}/24", s1.ip)), "{addr}");
    let (_, lo) = ns1.exec(&["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let (_, routes) = ns1.exec(&["ip", "route"]);
    assert!(routes.contains(&format!("default via {gw} dev eth0")), "{routes}");
    // Host side: the bridge carries the gateway.
    let (_, br) = run("ip", &["-o", "addr", "show", &bridge]);
    assert!(br.contains(&format!("{gw}/24")), "{br}");

    // Pod to pod, pod to gateway.
    let (ok, out) = ns1.exec(&["busybox", "ping", "-c1", "-W3", &s2.ip.to_string()]);
    assert!(ok, "ping p1 -> p2: {out}");
    let (ok, out) = ns2.exec(&["busybox", "ping", "-c1", "-W3", &gw]);
    assert!(ok, "ping p2 -> gateway: {out}");

    // hostPort: the DNAT rule is there, and 127.0.0.1:<hostPort> reaches the pod.
    let (_, rules) = run("nft", &["list", "table", "inet", &table]);
    assert!(rules.contains(&format!("berth:pod:{}", p1.pod_id)), "{rules}");
    assert!(rules.contains(&format!("dnat ip to {}:8080", s1.ip)), "{rules}");
    let mut server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns1.name,
            "busybox",
            "nc",
            "-l",
            "-p",
            "8080",
            "-e",
            "echo",
            "hello-from-pod",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut got = String::new();
    for _ in 0..50 {
        let (_, out) = run("busybox", &["nc", "-w", "2", "127.0.0.1", &host_port.to_string()]);
        if out.contains("hello-from-pod") {
            got = out;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(got.contains("hello-from-pod"), "hostPort via 127.0.0.1 did not reach the pod");

    // Teardown p1 now; p2 after a "restart" (a new manager on the same database).
    m.teardown(&p1.pod_id, Some(&p1.netns)).await.unwrap();
    m.teardown(&p1.pod_id, Some(&p1.netns)).await.unwrap();
    let (_, rules) = run("nft", &["list", "table", "inet", &table]);
    assert!(!rules.contains(&p1.pod_id), "{rules}");
    let (_, links) = ns1.exec(&["ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
    drop(m);

    let m2 = NetworkManager::new(config, db, state.path()).unwrap();
    assert_eq!(m2.pods().unwrap(), vec![p2.pod_id.clone()]);
    assert_eq!(m2.pod_status(&p2.pod_id).unwrap(), Some(s2.clone()));
    // A new pod continues after the last address handed out.
    let ns3 = TempNetns::new();
    let p3 = pod(&format!("p3-{tag}"), &ns3, vec![]);
    let s3 = m2.setup(&p3).await.unwrap();
    assert_eq!(s3.ip, format!("{base}4").parse::<IpAddr>().unwrap());
    let (ok, out) = ns3.exec(&["busybox", "ping", "-c1", "-W3", &s2.ip.to_string()]);
    assert!(ok, "ping p3 -> p2 after restart: {out}");
    m2.teardown(&p2.pod_id, None).await.unwrap();
    m2.teardown(&p3.pod_id, Some(&p3.netns)).await.unwrap();
    // A bridge set down, or deleted, behind our back is put right by the next setup (the
    // setup skips re-checking a bridge it checked before only while it is up and the same).
    assert!(run("ip", &["link", "set", &bridge, "down"]).0);
    let ns4 = TempNetns::new();
    let p4 = pod(&format!("p4-{tag}"), &ns4, vec![]);
    m2.setup(&p4).await.unwrap();
    let (_, br) = run("ip", &["-o", "link", "show", &bridge]);
    assert!(br.contains(",UP"), "{br}");
    m2.teardown(&p4.pod_id, Some(&p4.netns)).await.unwrap();
    assert!(run("ip", &["link", "del", &bridge]).0);
    let ns5 = TempNetns::new();
    let p5 = pod(&format!("p5-{tag}"), &ns5, vec![]);
    let s5 = m2.setup(&p5).await.unwrap();
    let (_, br) = run("ip", &["-o", "addr", "show", &bridge]);
    assert!(br.contains(&format!("{gw}/24")), "{br}");
    let (ok, out) = ns5.exec(&["busybox", "ping", "-c1", "-W3", &gw]);
    assert!(ok, "ping p5 ({}) -> gateway over the re-made bridge: {out}", s5.ip);
    m2.teardown(&p5.pod_id, Some(&p5.netns)).await.unwrap();
    assert!(m2.pods().unwrap().is_empty());
    let (_, links) = run("ip", &["-o", "link"]);
    assert!(!links.contains(&format!("master {bridge}")), "{links}");

    m2.remove_host_setup().await.unwrap();
    assert!(!run("ip", &["link", "show", &bridge]).0);
    assert!(!run("nft", &["list", "table", "inet", &table]).0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_failure_leaves_nothing() {
    if !is_root() {
        skipped("needs root");
        return;
    }
    let tag = rand_hex(3);
    let bridge = format!("bt{tag}");
    let table = format!("bt{tag}");
    let _cleanup = HostCleanup { links: vec![bridge.clone()], nft_table: Some(table.clone()) };
    let state = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(state.path().join("db.redb")).unwrap());
    let config = NetworkConfig {
        bridge_name: bridge.clone(),
        subnet: format!("10.{}.{}.0/24", 200 + rand_byte() % 50, rand_byte()).parse().unwrap(),
        nat_table_name: table,
        ..Default::default()
    };
    let m = NetworkManager::new(config, db, state.path()).unwrap();
    let missing = PodNetwork {
        pod_id: format!("gone-{tag}"),
        name: "x".into(),
        namespace: "y".into(),
        uid: "z".into(),
        netns: state.path().join("no-such-netns"),
        port_mappings: vec![],
        dns: None,
        bandwidth: None,
    };
    let err = m.setup(&missing).await.unwrap_err();
    assert!(err.to_string().contains("no-such-netns"), "{err}");
    // The address went back, and no veth was left on the bridge.
    assert!(m.pods().unwrap().is_empty());
    let (_, links) = run("ip", &["-o", "link"]);
    assert!(!links.contains(&format!("master {bridge}")), "{links}");
    m.remove_host_setup().await.unwrap();
}

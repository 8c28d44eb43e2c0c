//! End-to-end: pod networking through the CRI, on the built-in bridge and with Debian's CNI
//! plugins. Pods reach each other, the host reaches pods and their hostPorts, addresses are
//! released and reused, survive a berthd restart, NetworkReady follows the CNI conf dir, and
//! the network of a pod lost in a crash is released when berthd starts again.
//!
//! Every test uses its own bridge, subnet and nft table ([`NetNames::unique`]) and a
//! [`NetGuard`] that removes them even when the test fails. All traffic stays on this host.

#[path = "support/podkit.rs"]
mod podkit;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth_e2e::netkit::{NetGuard, NetNames};
use berth_e2e::process::free_port;
use berth_e2e::{Berthd, Options};
use k8s_cri::v1::*;
use podkit::{Env, eventually, skip, with_namespaces};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The page the server pod serves.
const PAGE: &str = "hello-from-berth-pod";

/// Starts a registry and berthd with `network_toml`, pulls busybox.
async fn start_env(network_toml: String) -> Result<Env> {
    Env::start_with(Options { extra_toml: network_toml, ..Default::default() }).await
}

/// The pod's IPs from PodSandboxStatus (primary first).
async fn pod_ips(env: &mut Env, id: &str) -> Result<Vec<String>> {
    let s = env
        .rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    let net = s.network.unwrap_or_default();
    let mut ips = Vec::new();
    if !net.ip.is_empty() {
        ips.push(net.ip);
    }
    ips.extend(net.additional_ips.into_iter().map(|p| p.ip));
    Ok(ips)
}

/// The pod's primary IP (an error when it has none).
async fn pod_ip(env: &mut Env, id: &str) -> Result<String> {
    pod_ips(env, id).await?.into_iter().next().with_context(|| format!("pod {id} has no IP"))
}

/// `GET /` over plain TCP from the test process; returns the whole response.
async fn http_get(addr: &str) -> Result<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: berth\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .with_context(|| format!("GET http://{addr}/ timed out"))?
        .with_context(|| format!("GET http://{addr}/"))
}

/// Polls `GET /` at `addr` until it serves [`PAGE`].
async fn wait_served(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = http_get(addr).await;
        if let Ok(body) = &last
            && body.contains(PAGE)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not serve the page within {timeout:?}: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs pod `name` with busybox httpd on port 8080 (`host_port` mapped to it, 0 = none).
/// Returns (pod id, pod config).
async fn run_server(
    env: &mut Env,
    name: &str,
    host_port: u16,
) -> Result<(String, PodSandboxConfig)> {
    let mut config = env.pod_config(name);
    if host_port != 0 {
        config.port_mappings = vec![PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port: 8080,
            host_port: i32::from(host_port),
            host_ip: String::new(),
        }];
    }
    let pod = env.run_pod(config.clone()).await?;
    let script = format!(
        "mkdir -p /tmp/www && echo {PAGE} > /tmp/www/index.html && \
         exec /bin/busybox httpd -f -p 8080 -h /tmp/www"
    );
    let c = env.container_config("httpd", &["/bin/busybox", "sh", "-c", &script]);
    env.run(&pod, &config, c).await?;
    Ok((pod, config))
}

/// Runs pod `name` with a sleeping container to exec into. Returns (pod id, container id).
async fn run_client(env: &mut Env, name: &str) -> Result<(String, String)> {
    let config = env.pod_config(name);
    let pod = env.run_pod(config.clone()).await?;
    let c = env.container_config("client", &["/bin/busybox", "sleep", "3600"]);
    let ctr = env.run(&pod, &config, c).await?;
    Ok((pod, ctr))
}

/// `wget -O- http://<target>/` inside container `ctr`; returns its stdout.
async fn wget_in(env: &mut Env, ctr: &str, target: &str) -> Result<String> {
    let url = format!("http://{target}/");
    let r = env
        // No `-T`: Debian's static busybox wget crashes on it; the exec timeout bounds it.
        .exec(ctr, &["/bin/busybox", "wget", "-q", "-O-", &url], 20)
        .await
        .context("exec wget")?;
    ensure!(
        r.exit_code == 0,
        "wget {url} exited {}: {}",
        r.exit_code,
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

/// The NetworkReady condition of `Status`.
async fn network_condition(
    env_rt: &mut runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
) -> Result<RuntimeCondition> {
    let status = env_rt.status(StatusRequest { verbose: false }).await?.into_inner();
    status
        .status
        .context("no status")?
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .context("no NetworkReady condition")
}

/// Checks pod-to-pod, host-to-pod and hostPort traffic for a server and a client pod, then
/// removes both. Shared by the bridge and the CNI test.
async fn check_traffic(env: &mut Env, names: &NetNames) -> Result<(String, String)> {
    ensure!(network_condition(&mut env.rt).await?.status, "NetworkReady is false");
    let host_port = free_port()?;
    let (server, _) = run_server(env, "server", host_port).await?;
    let (client, client_ctr) = run_client(env, "client").await?;
    let server_ip = pod_ip(env, &server).await?;
    let client_ip = pod_ip(env, &client).await?;
    ensure!(names.contains(&server_ip), "server IP {server_ip} not in {}", names.subnet());
    ensure!(names.contains(&client_ip), "client IP {client_ip} not in {}", names.subnet());
    ensure!(server_ip != client_ip, "both pods got {server_ip}");

    // The host reaches the pod IP (the bridge carries the gateway address).
    wait_served(&format!("{server_ip}:8080"), Duration::from_secs(30)).await?;

    // Pod to pod over the bridge.
    let body = wget_in(env, &client_ctr, &format!("{server_ip}:8080")).await?;
    ensure!(body.contains(PAGE), "client got {body:?}");

    // Inside the pod: eth0 with the address, default route via the gateway.
    let r =
        env.exec(&client_ctr, &["/bin/busybox", "ip", "-4", "addr", "show", "eth0"], 10).await?;
    let addrs = String::from_utf8_lossy(&r.stdout).into_owned();
    ensure!(addrs.contains(&client_ip), "eth0 in the client pod: {addrs}");
    let r = env.exec(&client_ctr, &["/bin/busybox", "ip", "route"], 10).await?;
    let routes = String::from_utf8_lossy(&r.stdout).into_owned();
    ensure!(routes.contains(&format!("default via {}", names.gateway())), "routes: {routes}");

    // hostPort, from the host: through localhost and through a host address.
    wait_served(&format!("127.0.0.1:{host_port}"), Duration::from_secs(10)).await?;
    wait_served(&format!("{}:{host_port}", names.gateway()), Duration::from_secs(10)).await?;

    ensure!(names.bridge_ports().len() == 2, "bridge ports: {:?}", names.bridge_ports());
    Ok((server, client))
}

#[tokio::test]
async fn bridge_pods_reach_each_other_the_host_and_hostports() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let names = NetNames::unique(24);
    // Declared before the daemon: dropped (cleaning up) after it.
    let _guard = NetGuard::new(names.clone());
    let mut env = start_env(names.bridge_toml()).await?;
    let (server, client) = check_traffic(&mut env, &names).await?;
    let table = names.nft_table();
    ensure!(table.contains(&format!("berth:pod:{server}")), "nft table: {table}");

    // A host-network pod gets no address and no veth.
    let host = with_namespaces(
        env.pod_config("hostnet"),
        NamespaceOption { network: NamespaceMode::Node as i32, ..Default::default() },
    );
    let host_pod = env.run_pod(host).await?;
    ensure!(pod_ips(&mut env, &host_pod).await?.is_empty(), "host-network pod has an IP");
    ensure!(names.bridge_ports().len() == 2, "bridge ports: {:?}", names.bridge_ports());
    env.remove_pod(&host_pod).await?;

    // Stop tears the network down (idempotently); the pod record stays until removal.
    for _ in 0..2 {
        env.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: server.clone() }).await?;
    }
    ensure!(pod_ips(&mut env, &server).await?.is_empty(), "stopped pod still has an IP");
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().len() == 1).await,
        "bridge ports: {:?}",
        names.bridge_ports()
    );
    let table = names.nft_table();
    ensure!(!table.contains(&format!("berth:pod:{server}")), "hostPort rule left: {table}");
    env.remove_pod(&server).await?;
    env.remove_pod(&client).await?;
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().is_empty()).await,
        "veths left: {:?}",
        names.bridge_ports()
    );
    Ok(())
}

#[tokio::test]
async fn bridge_addresses_are_released_reused_and_survive_restart() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // A /29: .1 is the gateway, .2-.6 are the five pod addresses.
    let names = NetNames::unique(29);
    let _guard = NetGuard::new(names.clone());
    let mut env = start_env(names.bridge_toml()).await?;
    let mut pods = Vec::new();
    for i in 0..5 {
        let id = env.run_pod(env.pod_config(&format!("p{i}"))).await?;
        let ip = pod_ip(&mut env, &id).await?;
        ensure!(names.contains(&ip), "{ip} not in {}", names.subnet());
        pods.push((id, ip));
    }
    let mut ips: Vec<&String> = pods.iter().map(|(_, ip)| ip).collect();
    ips.sort();
    ips.dedup();
    ensure!(ips.len() == 5, "addresses handed out twice: {pods:?}");

    // The subnet is full: the sixth pod fails and leaves nothing behind.
    let err = env.run_pod(env.pod_config("p5")).await.expect_err("subnet exhausted");
    ensure!(format!("{err:#}").contains("no free address"), "{err:#}");
    ensure!(names.bridge_ports().len() == 5, "bridge ports: {:?}", names.bridge_ports());

    // A restart keeps every assignment.
    env.d.restart().await?;
    env.rt = env.d.runtime().await?;
    for (id, ip) in &pods {
        ensure!(&pod_ip(&mut env, id).await? == ip, "pod {id} lost its address {ip}");
    }

    // Removing a pod frees its address for the next one.
    let (gone, freed) = pods.remove(1);
    env.remove_pod(&gone).await?;
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().len() == 4).await,
        "bridge ports: {:?}",
        names.bridge_ports()
    );
    let id = env.run_pod(env.pod_config("p5")).await?;
    ensure!(pod_ip(&mut env, &id).await? == freed, "the freed address {freed} was not reused");
    pods.push((id, freed));

    for (id, _) in &pods {
        env.remove_pod(id).await?;
    }
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().is_empty()).await,
        "veths left: {:?}",
        names.bridge_ports()
    );
    Ok(())
}

/// The host-local IPAM files holding `ip` under `ipam_dir` (one per allocated address).
fn ipam_holds(ipam_dir: &Path, ip: &str) -> bool {
    let Ok(nets) = std::fs::read_dir(ipam_dir) else { return false };
    nets.flatten().any(|n| n.path().join(ip).exists())
}

#[tokio::test]
async fn cni_pods_reach_each_other_and_survive_restart() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let names = NetNames::unique(24);
    let mut guard = NetGuard::new(names.clone());
    let dir = tempfile::Builder::new().prefix("berth-cni").tempdir_in("/tmp")?;
    guard.paths.push(dir.path().to_path_buf());
    let (conf_dir, ipam_dir) = (dir.path().join("net.d"), dir.path().join("ipam"));
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::write(conf_dir.join("10-berth-test.conflist"), names.cni_conflist(&ipam_dir))?;
    let mut env = start_env(names.cni_toml(&conf_dir)).await?;

    let (server, client) = check_traffic(&mut env, &names).await?;
    let server_ip = pod_ip(&mut env, &server).await?;
    ensure!(ipam_holds(&ipam_dir, &server_ip), "host-local has no record of {server_ip}");
    ensure!(names.portmap_jumps().len() == 1, "portmap: {:?}", names.portmap_jumps());

    // After a restart the cached ADD result still gives the address, and DEL still works.
    env.d.restart().await?;
    env.rt = env.d.runtime().await?;
    ensure!(pod_ip(&mut env, &server).await? == server_ip, "CNI pod lost its address");
    env.remove_pod(&server).await?;
    ensure!(!ipam_holds(&ipam_dir, &server_ip), "host-local still holds {server_ip}");
    let client_ip = pod_ip(&mut env, &client).await?;
    env.remove_pod(&client).await?;
    ensure!(!ipam_holds(&ipam_dir, &client_ip), "host-local still holds {client_ip}");
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().is_empty()).await,
        "veths left: {:?}",
        names.bridge_ports()
    );
    ensure!(names.iptables_rules().is_empty(), "portmap rules left: {:?}", names.iptables_rules());
    ensure!(names.portmap_jumps().is_empty(), "portmap chains left: {:?}", names.portmap_jumps());
    Ok(())
}

#[tokio::test]
async fn cni_network_ready_follows_the_conf_dir() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let names = NetNames::unique(24);
    let mut guard = NetGuard::new(names.clone());
    let dir = tempfile::Builder::new().prefix("berth-cni").tempdir_in("/tmp")?;
    guard.paths.push(dir.path().to_path_buf());
    let (conf_dir, ipam_dir) = (dir.path().join("net.d"), dir.path().join("ipam"));
    std::fs::create_dir_all(&conf_dir)?;
    let d =
        Berthd::start_with(Options { extra_toml: names.cni_toml(&conf_dir), ..Default::default() })
            .await?;
    let mut rt = d.runtime().await?;

    let c = network_condition(&mut rt).await?;
    ensure!(!c.status, "NetworkReady without any CNI config: {c:?}");
    ensure!(c.reason == "NetworkPluginNotReady", "{c:?}");
    ensure!(!c.message.is_empty(), "{c:?}");

    // A pod cannot get a network yet: RunPodSandbox fails and leaves nothing.
    let log_dir = dir.path().join("logs");
    let run = |name: &str| RunPodSandboxRequest {
        config: Some(podkit::pod_config(name, &log_dir)),
        runtime_handler: String::new(),
    };
    let err = rt.run_pod_sandbox(run("early")).await.expect_err("no network yet");
    ensure!(err.message().contains("network"), "{err:?}");
    let pods = rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?.into_inner();
    ensure!(pods.items.is_empty(), "{:?}", pods.items);

    // The config appears (as a DaemonSet would install it): ready without a restart.
    std::fs::write(conf_dir.join("10-berth-test.conflist"), names.cni_conflist(&ipam_dir))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = network_condition(&mut rt).await?;
        if c.status {
            break;
        }
        if Instant::now() > deadline {
            bail!("NetworkReady still false after the config appeared: {c:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = rt.run_pod_sandbox(run("late")).await?.into_inner().pod_sandbox_id;
    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }).await?;
    ensure!(eventually(Duration::from_secs(5), || names.bridge_ports().is_empty()).await);
    drop(d);
    Ok(())
}

#[tokio::test]
async fn pod_cidr_from_the_kubelet_is_used_for_new_pods() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let names = NetNames::unique(24);
    let cidr = NetNames::unique(24);
    let _guard = NetGuard::new(names.clone());
    let mut env = start_env(names.bridge_toml()).await?;
    let update = |pod_cidr: String| UpdateRuntimeConfigRequest {
        runtime_config: Some(RuntimeConfig { network_config: Some(NetworkConfig { pod_cidr }) }),
    };
    let err = env.rt.update_runtime_config(update("not-a-cidr".into())).await.expect_err("bad");
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");
    env.rt.update_runtime_config(update(cidr.subnet())).await?;
    let id = env.run_pod(env.pod_config("cidr")).await?;
    let ip = pod_ip(&mut env, &id).await?;
    ensure!(cidr.contains(&ip), "{ip} not in the kubelet's pod CIDR {}", cidr.subnet());
    env.remove_pod(&id).await?;
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().is_empty()).await,
        "veths left: {:?}",
        names.bridge_ports()
    );

    // The kubelet moves the node to another CIDR and back: once no pod uses a CIDR any
    // more, its masquerade rules go with the next pod's setup instead of piling up.
    let other = NetNames::unique(24);
    for (now, gone) in [(&other, &cidr), (&cidr, &other)] {
        env.rt.update_runtime_config(update(now.subnet())).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The last pod's address returns to the pool shortly after its veth is gone.
            let id = env.run_pod(env.pod_config("cidr")).await?;
            let table = names.nft_table();
            env.remove_pod(&id).await?;
            ensure!(table.contains(&now.subnet()), "no rules for {}:\n{table}", now.subnet());
            if !table.contains(&gone.subnet()) {
                break;
            }
            ensure!(Instant::now() < deadline, "rules of {} stay:\n{table}", gone.subnet());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ensure!(
        eventually(Duration::from_secs(5), || names.bridge_ports().is_empty()).await,
        "veths left: {:?}",
        names.bridge_ports()
    );
    Ok(())
}

/// A RunPodSandbox whose caller gives up before it fails (here: the subnet is full) must not
/// keep the pod's name: the kubelet's retry with the same metadata is served once an address
/// is free, not refused with "name is reserved" until berthd restarts.
#[tokio::test]
async fn run_pod_failing_after_its_deadline_releases_the_name() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // A /30: .1 is the gateway, .2 the only pod address.
    let names = NetNames::unique(30);
    let _guard = NetGuard::new(names.clone());
    let mut env = start_env(names.bridge_toml()).await?;
    let first = env.run_pod(env.pod_config("holder")).await?;

    let config = env.pod_config("late");
    let request =
        || RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: "".into() };
    let mut hasty = tonic::Request::new(request());
    hasty.set_timeout(Duration::from_millis(1));
    let e = env.rt.run_pod_sandbox(hasty).await.expect_err("the deadline passes first");
    ensure!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e:?}");

    // The abandoned create goes on and fails (no free address). Until it has, a retry is
    // told the name is taken; after, it must get the real error, not "reserved" for good.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match env.rt.run_pod_sandbox(request()).await {
            Err(e) if e.code() == tonic::Code::AlreadyExists && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => {
                ensure!(e.message().contains("no free address"), "retry: {e:?}");
                break;
            }
            Ok(r) => bail!("the subnet had room: {:?}", r.into_inner()),
        }
    }

    // Once the address is free, the same metadata runs.
    env.remove_pod(&first).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        match env.rt.run_pod_sandbox(request()).await {
            Ok(r) => break r.into_inner().pod_sandbox_id,
            Err(e) if e.message().contains("no free address") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => bail!("retry after the address was freed: {e:?}"),
        }
    };
    env.remove_pod(&id).await?;
    Ok(())
}

/// A CNI plugin that blocks ADD until `release` exists (then fails it) and records each DEL.
fn blocking_plugin(started: &Path, release: &Path, dels: &Path) -> String {
    format!(
        "#!/bin/sh\ncat >/dev/null\ncase \"$CNI_COMMAND\" in\n\
         ADD) touch '{started}'; i=0\n\
         \x20   while [ ! -e '{release}' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
         \x20   echo '{{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"blocked on purpose\"}}'; exit 1;;\n\
         DEL) echo \"DEL $CNI_CONTAINERID\" >> '{dels}';;\n\
         VERSION) echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}}';;\n\
         esac\n",
        started = started.display(),
        release = release.display(),
        dels = dels.display(),
    )
}

/// A crash while CNI ADD runs leaves the pod's network (its CNI cache, written before ADD)
/// but no pod record: the restarted berthd's recovery runs CNI DEL for it and drops the cache.
#[tokio::test]
async fn network_of_a_pod_lost_in_a_crash_is_released_on_restart() -> Result<()> {
    if skip() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    let names = NetNames::unique(24);
    let mut guard = NetGuard::new(names.clone());
    let dir = tempfile::Builder::new().prefix("berth-cni").tempdir_in("/tmp")?;
    guard.paths.push(dir.path().to_path_buf());
    let (conf_dir, bin_dir) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    let started = dir.path().join("add-started");
    let release = dir.path().join("release");
    let dels = dir.path().join("dels");
    let plugin = bin_dir.join("berth-test-block");
    std::fs::write(&plugin, blocking_plugin(&started, &release, &dels))?;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        conf_dir.join("10-block.conflist"),
        r#"{"cniVersion":"1.0.0","name":"block","plugins":[{"type":"berth-test-block"}]}"#,
    )?;
    let toml = format!(
        "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"{}\"]\n\
         bridge = \"{}\"\nnat_table = \"{}\"\n",
        conf_dir.display(),
        bin_dir.display(),
        names.bridge,
        names.table
    );
    let mut d = Berthd::start_with(Options { extra_toml: toml, ..Default::default() }).await?;
    let mut rt = d.runtime().await?;
    let log_dir = dir.path().join("logs");
    let run = tokio::spawn(async move {
        let config = podkit::pod_config("lost", &log_dir);
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: "".into(),
        })
        .await
    });
    ensure!(eventually(Duration::from_secs(10), || started.exists()).await, "CNI ADD never ran");
    let cache_dir = d.root().join("network").join("cni");
    let cached: Vec<String> = std::fs::read_dir(&cache_dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_owned))
        .collect();
    ensure!(cached.len() == 1, "CNI cache before the crash: {cached:?}");
    let pod_id = &cached[0];

    d.kill9();
    let _ = run.await;
    // The orphaned plugin gives up its ADD; nothing waits for it any more.
    std::fs::write(&release, "")?;
    d.start_again().await?;

    // Recovery (finished before berthd reports ready) ran DEL for the pod without a record.
    let deleted = || std::fs::read_to_string(&dels).unwrap_or_default();
    ensure!(
        eventually(Duration::from_secs(10), || deleted().contains(&format!("DEL {pod_id}"))).await,
        "no CNI DEL for {pod_id}: {:?}",
        deleted()
    );
    ensure!(
        eventually(Duration::from_secs(5), || !cache_dir.join(format!("{pod_id}.json")).exists())
            .await,
        "the CNI cache of {pod_id} is still there"
    );
    let mut rt = d.runtime().await?;
    let pods = rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await?.into_inner();
    ensure!(pods.items.is_empty(), "{:?}", pods.items);
    // Closed first: berthd's graceful shutdown waits for open connections.
    drop(rt);
    drop(d);
    Ok(())
}

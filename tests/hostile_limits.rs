//! End-to-end: hostile and broken requests (issue 12), one reproducer each. Every call must
//! get a precise code, never a panic, an `Internal` carrying runc's words and host paths, or
//! a broken stream; and berthd must keep serving afterwards.

#[path = "support/podkit.rs"]
mod podkit;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_e2e::cri::images;
use berth_e2e::fixtures::{self, Malice};
use berth_e2e::netkit::{NetGuard, NetNames};
use berth_e2e::{Berthd, Options, Registry};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podkit::{Env, skip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// The kubelet's gRPC receive limit.
const KUBELET_MAX_MESSAGE: usize = 16 << 20;

/// berthd still answers a plain call.
async fn still_serving(d: &Berthd) -> Result<()> {
    let v = d.runtime().await?.version(VersionRequest::default()).await?.into_inner();
    ensure!(v.runtime_name == "berth", "{v:?}");
    Ok(())
}

/// A pod and a running busybox container that sleeps.
async fn sleeper(env: &mut Env, name: &str) -> Result<(String, String)> {
    let pod_config = env.pod_config(name);
    let pod = env.run_pod(pod_config.clone()).await?;
    let config =
        env.container_config("c", &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]);
    let ctr = env.run(&pod, &pod_config, config).await?;
    Ok((pod, ctr))
}

#[tokio::test]
async fn exec_sync_survives_huge_timeouts_missing_binaries_and_floods() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "exec").await?;

    // A timeout near i64::MAX seconds panicked ("overflow when adding duration to instant").
    for timeout in [i64::MAX, i64::MAX - 1, i64::MAX / 1000] {
        let out = env.exec(&ctr, &["/bin/true"], timeout).await?;
        ensure!(out.exit_code == 0, "timeout {timeout}: {out:?}");
    }

    // A missing binary: what containerd answers (Unknown), with the runtime's reason and
    // neither its command line nor berthd's state paths.
    let e = env.exec(&ctr, &["/nope"], 10).await.expect_err("no such binary");
    ensure!(e.code() == Code::Unknown, "{:?}: {}", e.code(), e.message());
    let state = env.state().to_string_lossy().into_owned();
    ensure!(e.message().contains("/nope"), "{}", e.message());
    ensure!(!e.message().contains(&state) && !e.message().contains("--root"), "{}", e.message());

    // 2 × 20 MB of output: the answer must fit the kubelet's 16 MiB receive limit.
    let mut rt = RuntimeServiceClient::new(berth_e2e::cri::connect(&env.d.socket()).await?)
        .max_decoding_message_size(KUBELET_MAX_MESSAGE);
    let flood = "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero >&2";
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: ctr.clone(),
            cmd: vec!["/bin/sh".into(), "-c".into(), flood.into()],
            timeout: 120,
        })
        .await
        .context("the flood's answer must be readable by a 16 MiB client")?
        .into_inner();
    let total = out.stdout.len() + out.stderr.len();
    ensure!(total <= KUBELET_MAX_MESSAGE - 4096, "{total} bytes");
    ensure!(
        out.stdout.len() > 7 << 20 && out.stderr.len() > 7 << 20,
        "{} {}",
        out.stdout.len(),
        out.stderr.len()
    );
    ensure!(out.exit_code == 0, "{}", out.exit_code);

    // StopContainer's timeout is a request value too.
    env.rt
        .stop_container(StopContainerRequest { container_id: ctr.clone(), timeout: i64::MAX })
        .await?;
    ensure!(env.status(&ctr).await?.state == ContainerState::ContainerExited as i32);

    still_serving(&env.d).await?;
    env.remove_pod(&pod).await
}

/// Resources the kernel or runc refuse, with the field the answer must name.
fn bad_resources() -> Vec<(&'static str, LinuxContainerResources)> {
    let r = LinuxContainerResources::default;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let last_online: u32 =
        online.trim().rsplit([',', '-']).next().and_then(|n| n.parse().ok()).unwrap_or(0);
    vec![
        ("cpu_shares", LinuxContainerResources { cpu_shares: 1 << 62, ..r() }),
        ("cpu_period", LinuxContainerResources { cpu_period: 1, ..r() }),
        ("cpu_quota", LinuxContainerResources { cpu_quota: -5, ..r() }),
        ("memory_limit_in_bytes", LinuxContainerResources { memory_limit_in_bytes: 1, ..r() }),
        ("cpuset_cpus", LinuxContainerResources { cpuset_cpus: "0-99999".into(), ..r() }),
        ("cpuset_cpus", LinuxContainerResources { cpuset_cpus: "../../".into(), ..r() }),
        (
            "cpuset_cpus",
            LinuxContainerResources { cpuset_cpus: (last_online + 1).to_string(), ..r() },
        ),
        ("oom_score_adj", LinuxContainerResources { oom_score_adj: 1001, ..r() }),
        (
            "memory_swap_limit_in_bytes",
            LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                memory_swap_limit_in_bytes: 32 << 20,
                ..r()
            },
        ),
    ]
}

fn refused_by_field(e: &tonic::Status, field: &str) -> Result<()> {
    ensure!(e.code() == Code::InvalidArgument, "{field}: {:?}: {}", e.code(), e.message());
    ensure!(e.message().contains(field), "{field}: {}", e.message());
    ensure!(!e.message().contains("/sys/fs/cgroup"), "{field}: {}", e.message());
    Ok(())
}

#[tokio::test]
async fn out_of_range_resources_are_invalid_argument_naming_the_field() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let pod_config = env.pod_config("res");
    let pod = env.run_pod(pod_config.clone()).await?;
    for (i, (field, resources)) in bad_resources().into_iter().enumerate() {
        let mut config = env.container_config(&format!("bad{i}"), &["/bin/true"]);
        config.linux =
            Some(LinuxContainerConfig { resources: Some(resources), ..Default::default() });
        let e = env
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .expect_err(field);
        refused_by_field(&e, field)?;
    }

    // UpdateContainerResources on a running container: the same answers, and a valid
    // update still applies.
    let config =
        env.container_config("c", &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]);
    let ctr = env.run(&pod, &pod_config, config).await?;
    for (field, resources) in bad_resources() {
        let e = env
            .rt
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: ctr.clone(),
                linux: Some(resources),
                ..Default::default()
            })
            .await
            .expect_err(field);
        refused_by_field(&e, field)?;
    }
    env.rt
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: ctr.clone(),
            linux: Some(LinuxContainerResources {
                cpu_shares: 512,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    still_serving(&env.d).await?;
    env.remove_pod(&pod).await
}

#[tokio::test]
async fn hostile_pulls_are_refused_and_berthd_keeps_serving() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let reg = Registry::start().await?;
    let d = Berthd::start().await?;
    let mut c = d.images().await?;
    let busybox = fixtures::push_busybox(&reg).await?.reference();

    // A port above 65535 answered "Internal: could not clone request builder".
    let e = images::pull(&mut c, "127.0.0.1:99999/busybox:1").await.expect_err("port");
    ensure!(e.code() == Code::InvalidArgument && e.message().contains("port"), "{e:?}");

    // Credentials no header can carry made oci-client unwrap() an InvalidHeaderValue.
    let auth = |f: fn(&mut AuthConfig)| {
        let mut a = AuthConfig::default();
        f(&mut a);
        Some(a)
    };
    let cases: [(&str, Option<AuthConfig>); 5] = [
        ("auth.registry_token", auth(|a| a.registry_token = "tok\nen".into())),
        ("auth.identity_token", auth(|a| a.identity_token = "tok\0en".into())),
        ("auth.username", auth(|a| (a.username, a.password) = ("us\ner".into(), "p".into()))),
        ("auth.password", auth(|a| (a.username, a.password) = ("user".into(), "p\r\n".into()))),
        ("auth.password", auth(|a| a.auth = "dXNlcjpwAHc=".into())), // "user:p\0w"
    ];
    for (field, auth) in cases {
        let e = images::pull_with_auth(&mut c, &busybox, auth).await.expect_err(field);
        ensure!(e.code() == Code::InvalidArgument, "{field}: {e:?}");
        ensure!(e.message().contains(field), "{field}: {}", e.message());
    }

    // A megabyte of name: refused, and the echo stays small enough for any client.
    let huge = "a".repeat(1 << 20);
    let e = images::pull(&mut c, &huge).await.expect_err("huge name");
    ensure!(e.code() == Code::InvalidArgument, "{:?}", e.code());
    ensure!(e.message().len() <= 4096, "{} bytes echoed", e.message().len());
    let e = images::pull(&mut c, &format!("{huge}\u{e9}:x")).await.expect_err("huge name");
    ensure!(e.code() == Code::InvalidArgument, "{:?}", e.code());

    // Layers that try to escape: the image is refused, FailedPrecondition.
    let target = tempfile::Builder::new().prefix("berth-e2e-target").tempdir()?;
    let target = target.path().to_string_lossy().into_owned();
    for malice in [Malice::DotDot, Malice::HardlinkEscape] {
        let p = fixtures::push_malicious(&reg, malice, &target).await?;
        let e = images::pull(&mut c, &p.reference()).await.expect_err("escape");
        ensure!(e.code() == Code::FailedPrecondition, "{malice:?}: {:?} {}", e.code(), e.message());
    }

    ensure!(images::pull(&mut c, &busybox).await.is_ok(), "a valid pull still works");
    still_serving(&d).await
}

#[tokio::test]
async fn an_exhausted_pod_subnet_is_resource_exhausted() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // A /30: .1 is the gateway, .2 the only pod address.
    let names = NetNames::unique(30);
    let _guard = NetGuard::new(names.clone());
    let mut env =
        Env::start_with(Options { extra_toml: names.bridge_toml(), ..Default::default() }).await?;
    let first = env.run_pod(env.pod_config("p0")).await?;
    let e = env
        .rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(env.pod_config("p1")),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("subnet exhausted");
    ensure!(e.code() == Code::ResourceExhausted, "{:?}: {}", e.code(), e.message());
    ensure!(e.message().contains("no free address"), "{}", e.message());
    still_serving(&env.d).await?;
    env.remove_pod(&first).await
}

/// A raw HTTP/2 connection to berthd's socket.
async fn h2_client(d: &Berthd) -> Result<h2::client::SendRequest<bytes::Bytes>> {
    let io = tokio::net::UnixStream::connect(d.socket()).await?;
    let (client, conn) = h2::client::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() -> Result<()> {
    let d = Berthd::start().await?;
    for path in ["/runtime.v1.RuntimeService/Version", "/runtime.v1.RuntimeService/ListContainers"]
    {
        let mut client = h2_client(&d).await?.ready().await?;
        let request = http::Request::post(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut body) = client.send_request(request, false)?;
        // Field 1 (a string) whose length runs past the end of the message.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 2, 0x0a, 0x7f]), true)?;
        let response = response.await?;
        let mut status = response.headers().get("grpc-status").cloned();
        let mut body = response.into_body();
        while body.data().await.is_some() {}
        if status.is_none() {
            status = body.trailers().await?.and_then(|t| t.get("grpc-status").cloned());
        }
        let code = status.and_then(|s| s.to_str().ok()?.parse::<i32>().ok()).map(Code::from);
        ensure!(code == Some(Code::InvalidArgument), "{path}: {code:?}");
    }
    still_serving(&d).await
}

/// An HPACK string literal, not Huffman-coded (lengths below 127).
fn hpack_string(s: &[u8]) -> Vec<u8> {
    let mut out = vec![s.len() as u8];
    out.extend_from_slice(s);
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Calls Version twice on one connection as grpc-core does over a unix socket: `:authority`
/// is the percent-encoded socket path (the second call refers to the first's fields through
/// HPACK's dynamic table). Returns the streams answered with data, and those reset.
async fn version_with_authority(d: &Berthd, authority: &[u8]) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut block = vec![0x83, 0x86, 0x44]; // POST, http, :path (indexed name)
    block.extend(hpack_string(b"/runtime.v1.RuntimeService/Version"));
    block.push(0x41); // :authority (indexed name), with incremental indexing
    block.extend(hpack_string(authority));
    block.push(0x5f); // content-type
    block.extend(hpack_string(b"application/grpc"));
    block.push(0x40); // te: trailers, literal name
    block.extend(hpack_string(b"te"));
    block.extend(hpack_string(b"trailers"));
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    bytes.extend(frame(0x1, 0x4, 1, &block));
    bytes.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    // Newest first: te (62), content-type (63), :authority (64), :path (65).
    bytes.extend(frame(0x1, 0x4, 3, &[0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe]));
    bytes.extend(frame(0x0, 0x1, 3, &[0, 0, 0, 0, 0]));
    let mut io = tokio::net::UnixStream::connect(d.socket()).await?;
    io.write_all(&bytes).await?;
    let (mut answered, mut reset) = (Vec::new(), Vec::new());
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered.len() + reset.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = &buf[9..9 + len];
            match buf[3] {
                0x0 if payload.windows(5).any(|w| w == b"berth") => answered.push(stream),
                0x3 => reset.push(stream),
                _ => {}
            }
            buf.drain(..9 + len);
        }
    }
    Ok((answered, reset))
}

#[tokio::test]
async fn grpc_core_authorities_are_served() -> Result<()> {
    let d = Berthd::start().await?;
    let socket = d.socket().to_string_lossy().into_owned();
    let encoded = socket.replace('/', "%2F");
    for authority in [encoded.as_str(), socket.as_str(), "localhost"] {
        let (mut answered, reset) = version_with_authority(&d, authority.as_bytes()).await?;
        ensure!(reset.is_empty(), "{authority}: streams {reset:?} reset");
        // The two calls run concurrently: their answers may come in either order.
        answered.sort_unstable();
        ensure!(answered == [1, 3], "{authority}: answered {answered:?}");
    }
    still_serving(&d).await
}

/// crun refuses cgroup v1/v2 hybrid hosts whose unified hierarchy holds controllers.
fn crun_refuses_this_host() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| !c.trim().is_empty())
}

#[tokio::test]
async fn status_advertises_only_handlers_that_run() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let d = Berthd::start().await?;
    let status = d.runtime().await?.status(StatusRequest { verbose: false }).await?.into_inner();
    let names: Vec<&str> = status.runtime_handlers.iter().map(|h| h.name.as_str()).collect();
    ensure!(names.contains(&"runc"), "{names:?}");
    if crun_refuses_this_host() {
        ensure!(!names.contains(&"crun"), "crun cannot run here but is advertised: {names:?}");
    }
    Ok(())
}

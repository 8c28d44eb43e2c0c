//! End-to-end: Exec, Attach and PortForward through berthd's streaming server, driven by
//! small WebSocket and SPDY/3.1 clients speaking the Kubernetes protocols
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`, `v4.portforward.k8s.io`, `portforward.k8s.io`):
//! stdio, exit codes, tty and resize, stdin_once, single-use tokens, and no process left
//! behind by a client that goes away.

#[path = "support/podkit.rs"]
mod podkit;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_stream::spdy::{Frame, FrameReader, FrameWriter};
use futures::{SinkExt, StreamExt};
use k8s_cri::v1::*;
use podkit::{Env, skip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{WebSocketStream, client_async};

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket on `url` offering `protocol`.
async fn ws_connect(url: &str, protocol: &str) -> Result<Ws> {
    // The CRI hands out http:// URLs; the WebSocket client wants its own scheme.
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", protocol.parse()?);
    let host = req.uri().authority().context("no host in URL")?.as_str().to_owned();
    let tcp = TcpStream::connect(host).await?;
    let (ws, resp) = client_async(req, tcp).await?;
    let chosen = resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok());
    anyhow::ensure!(chosen == Some(protocol), "server chose {chosen:?}");
    Ok(ws)
}

/// Sends `data` on channel `ch`.
async fn send(ws: &mut Ws, ch: u8, data: &[u8]) -> Result<()> {
    let mut msg = vec![ch];
    msg.extend_from_slice(data);
    ws.send(Message::Binary(msg.into())).await?;
    Ok(())
}

/// Everything received per channel until the server closes the connection.
async fn collect<S>(ws: &mut WebSocketStream<S>) -> Result<HashMap<u8, Vec<u8>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Binary(b)) if !b.is_empty() => {
                    got.entry(b[0]).or_default().extend_from_slice(&b[1..])
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.context("session did not end")?;
    Ok(got)
}

fn text(got: &HashMap<u8, Vec<u8>>, ch: u8) -> String {
    String::from_utf8_lossy(got.get(&ch).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

async fn exec_url(env: &mut Env, req: ExecRequest) -> Result<String> {
    Ok(env.rt.exec(req).await?.into_inner().url)
}

fn exec_req(ctr: &str, cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        container_id: ctr.to_owned(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    }
}

/// A pod with a sleeping container to exec into: (pod, container).
async fn sleeper(env: &mut Env, name: &str) -> Result<(String, String)> {
    let config = env.pod_config(name);
    let pod = env.run_pod(config.clone()).await?;
    let c = env.container_config("c", &["/bin/busybox", "sleep", "3600"]);
    let ctr = env.run(&pod, &config, c).await?;
    Ok((pod, ctr))
}

#[tokio::test]
async fn exec_over_websocket_stdio_and_exit_code() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "wsexec").await?;

    let cmd = ["/bin/sh", "-c", "cat; echo oops >&2; exit 3"];
    let url = exec_url(&mut env, exec_req(&ctr, &cmd)).await?;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"hello ").await?;
    send(&mut ws, 0, b"world").await?;
    // v5: close stdin, so `cat` ends.
    ws.send(Message::Binary(vec![255, 0].into())).await?;
    let got = collect(&mut ws).await?;
    assert_eq!(text(&got, 1), "hello world");
    assert_eq!(text(&got, 2), "oops\n");
    let status: serde_json::Value = serde_json::from_str(&text(&got, 3))?;
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");

    // Success, on v4.
    let mut req = exec_req(&ctr, &["/bin/echo", "fine"]);
    req.stdin = false;
    let url = exec_url(&mut env, req).await?;
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await?;
    let got = collect(&mut ws).await?;
    assert_eq!(text(&got, 1), "fine\n");
    assert_eq!(text(&got, 3), r#"{"metadata":{},"status":"Success"}"#);

    env.remove_pod(&pod).await?;
    Ok(())
}

#[tokio::test]
async fn exec_with_a_tty_sees_resizes() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "wstty").await?;
    let mut req = exec_req(&ctr, &["/bin/sh", "-c", "stty size; read x; stty size; tty"]);
    req.tty = true;
    req.stderr = false;
    let url = exec_url(&mut env, req).await?;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    // The first size is there from the start; a later one applies while it runs.
    send(&mut ws, 4, br#"{"Width":123,"Height":45}"#).await?;
    collect_until(&mut ws, |g| text(g, 1).contains("45 123")).await?;
    send(&mut ws, 4, br#"{"Width":100,"Height":20}"#).await?;
    // Let the resize land before the shell reads its line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut ws, 0, b"go\n").await?;
    let got = collect(&mut ws).await?;
    let out = text(&got, 1);
    assert!(out.contains("20 100"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(!got.contains_key(&2), "a tty has no separate stderr");
    assert_eq!(text(&got, 3), r#"{"metadata":{},"status":"Success"}"#);
    env.remove_pod(&pod).await?;
    Ok(())
}

/// Closing stdin of a tty exec ends the process's input, as `^D` on a terminal does: `cat`
/// echoes what it got and exits.
#[tokio::test]
async fn closing_a_tty_execs_stdin_ends_its_input() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "ttyeof").await?;
    let mut req = exec_req(&ctr, &["/bin/sh", "-c", "cat; echo cat-ended"]);
    req.tty = true;
    req.stderr = false;
    let url = exec_url(&mut env, req).await?;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"line\n").await?;
    collect_until(&mut ws, |g| text(g, 1).matches("line").count() >= 2).await?;
    // v5: close the stdin channel.
    ws.send(Message::Binary(vec![255, 0].into())).await?;
    let got = collect(&mut ws).await?;
    assert!(text(&got, 1).contains("cat-ended"), "{:?}", text(&got, 1));
    assert_eq!(text(&got, 3), r#"{"metadata":{},"status":"Success"}"#);
    env.remove_pod(&pod).await?;
    Ok(())
}

#[tokio::test]
async fn tokens_are_single_use_and_bound_to_their_kind() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "tokens").await?;
    let url = exec_url(&mut env, exec_req(&ctr, &["/bin/true"])).await?;
    // The same token on another kind's path: refused, and it stays good for its own.
    let wrong = url.replace("/exec/", "/portforward/");
    assert!(ws_connect(&wrong, "v4.portforward.k8s.io").await.is_err());
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    ws.send(Message::Binary(vec![255, 0].into())).await?;
    let got = collect(&mut ws).await?;
    assert_eq!(text(&got, 3), r#"{"metadata":{},"status":"Success"}"#);
    // Used once: gone.
    let err = ws_connect(&url, "v5.channel.k8s.io").await.expect_err("second use");
    assert!(err.to_string().contains("404"), "{err}");
    // Made up: unknown.
    let (base, _) = url.rsplit_once('/').context("url")?;
    let err = ws_connect(&format!("{base}/madeup"), "v5.channel.k8s.io").await.expect_err("fake");
    assert!(err.to_string().contains("404"), "{err}");

    // Exec in an unknown container: no URL at all.
    let e = env.rt.exec(exec_req(&"f".repeat(64), &["/bin/true"])).await.expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    env.remove_pod(&pod).await?;
    Ok(())
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_no_process() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "gone").await?;
    let url = exec_url(&mut env, exec_req(&ctr, &["/bin/busybox", "sleep", "4242"])).await?;
    let ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    let mut seen = false;
    for _ in 0..50 {
        if sleeping(&mut env, &ctr).await? {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "exec process never started");
    drop(ws);
    let mut left = true;
    for _ in 0..100 {
        if !sleeping(&mut env, &ctr).await? {
            left = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!left, "exec process outlived its client");
    env.remove_pod(&pod).await?;
    Ok(())
}

/// Whether `sleep 4242` runs in `ctr`.
async fn sleeping(env: &mut Env, ctr: &str) -> Result<bool> {
    let out = env.exec(ctr, &["/bin/busybox", "ps"], 10).await?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("sleep 4242"))
}

#[tokio::test]
async fn port_forward_over_websocket() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("pf");
    let pod = env.run_pod(config.clone()).await?;
    let script = "mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && \
                  exec /bin/busybox httpd -f -p 8080 -h /tmp/www";
    let c = env.container_config("httpd", &["/bin/busybox", "sh", "-c", script]);
    let ctr = env.run(&pod, &config, c).await?;
    // Serving once wget inside the pod gets the page.
    for _ in 0..50 {
        let r = env
            .exec(&ctr, &["/bin/busybox", "wget", "-q", "-O-", "http://127.0.0.1:8080/"], 10)
            .await?;
        if r.exit_code == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let forward =
        |port: u16| PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![i32::from(port)] };
    let url = env.rt.port_forward(forward(8080)).await?.into_inner().url;
    let mut ws = ws_connect(&format!("{url}?ports=8080"), "v4.portforward.k8s.io").await?;
    send(&mut ws, 0, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await?;
    let got = collect_until(&mut ws, |g| text(g, 0).contains("forwarded")).await?;
    // Each channel starts with the port, little endian.
    assert_eq!(&got[&0][..2], &8080u16.to_le_bytes());
    assert_eq!(&got[&1][..2], &8080u16.to_le_bytes());
    let body = String::from_utf8_lossy(&got[&0][2..]).into_owned();
    assert!(body.starts_with("HTTP/1."), "{body}");
    drop(ws);

    // A port nobody listens on: an error on the error channel.
    let url = env.rt.port_forward(forward(8081)).await?.into_inner().url;
    let mut ws = ws_connect(&format!("{url}?ports=8081"), "v4.portforward.k8s.io").await?;
    let got = collect_until(&mut ws, |g| g.get(&1).is_some_and(|e| e.len() > 2)).await?;
    let err = String::from_utf8_lossy(&got[&1][2..]).into_owned();
    assert!(err.contains("8081"), "{err}");

    let e = env
        .rt
        .port_forward(PortForwardRequest { pod_sandbox_id: "f".repeat(64), port: vec![80] })
        .await;
    assert_eq!(e.expect_err("unknown pod").code(), tonic::Code::NotFound);
    env.remove_pod(&pod).await?;
    Ok(())
}

/// Receives until `done` says so (or the server closes).
async fn collect_until(
    ws: &mut Ws,
    done: impl Fn(&HashMap<u8, Vec<u8>>) -> bool,
) -> Result<HashMap<u8, Vec<u8>>> {
    let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Binary(b)) if !b.is_empty() => {
                    got.entry(b[0]).or_default().extend_from_slice(&b[1..])
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
            if done(&got) {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), read).await.is_err() {
        bail!("no answer: {got:?}");
    }
    Ok(got)
}

#[tokio::test]
async fn attach_over_websocket_with_stdin_once() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("attach");
    let pod = env.run_pod(config.clone()).await?;
    let mut c = env.container_config("sh", &["/bin/sh"]);
    c.stdin = true;
    c.stdin_once = true;
    let ctr = env.run(&pod, &config, c).await?;

    let req = AttachRequest {
        container_id: ctr.clone(),
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let url = env.rt.attach(req).await?.into_inner().url;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"echo attached; echo oops >&2\n").await?;
    let got =
        collect_until(&mut ws, |g| text(g, 1) == "attached\n" && text(g, 2) == "oops\n").await?;
    assert_eq!(text(&got, 1), "attached\n");
    // Closing stdin (stdin_once) ends the shell, and with it the session.
    ws.send(Message::Binary(vec![255, 0].into())).await?;
    let got = collect(&mut ws).await?;
    assert_eq!(text(&got, 3), r#"{"metadata":{},"status":"Success"}"#);
    let s = env.wait_exited(&ctr, Duration::from_secs(10)).await?;
    assert_eq!(s.exit_code, 0);

    // Output still went to the CRI log.
    let log = podkit::read_log(&env.log_dir("attach").join("sh/0.log"))?;
    assert!(log.contains(&("stdout".into(), "F".into(), "attached".into())), "{log:?}");

    // No attach with stdin to a container without it, nor to one that is not running.
    let req = AttachRequest { container_id: ctr.clone(), stdout: true, ..Default::default() };
    let e = env.rt.attach(req).await.expect_err("exited");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    env.remove_pod(&pod).await?;
    Ok(())
}

/// `stdin_once` with a tty: when the first attach closes stdin, the container's input ends
/// (the terminal's EOF), and a later attach cannot write to it.
#[tokio::test]
async fn attach_with_a_tty_honours_stdin_once() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("ttyonce");
    let pod = env.run_pod(config.clone()).await?;
    let mut c =
        env.container_config("cat", &["/bin/sh", "-c", "cat; echo input-ended; sleep 1000"]);
    c.stdin = true;
    c.stdin_once = true;
    c.tty = true;
    let ctr = env.run(&pod, &config, c).await?;
    let req = AttachRequest {
        container_id: ctr.clone(),
        stdin: true,
        stdout: true,
        tty: true,
        ..Default::default()
    };
    let url = env.rt.attach(req.clone()).await?.into_inner().url;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"first\n").await?;
    collect_until(&mut ws, |g| text(g, 1).matches("first").count() >= 2).await?;
    ws.send(Message::Binary(vec![255, 0].into())).await?;
    collect_until(&mut ws, |g| text(g, 1).contains("input-ended")).await?;
    drop(ws);
    // The container runs on; a second attach's input goes nowhere.
    let url = env.rt.attach(req).await?.into_inner().url;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"second\n").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(ws);
    let log = podkit::read_log(&env.log_dir("ttyonce").join("cat/0.log"))?;
    let all: String = log.iter().map(|(_, _, l)| l.as_str()).collect::<Vec<_>>().join("\n");
    assert!(all.contains("input-ended"), "{all:?}");
    assert!(!all.contains("second"), "{all:?}");
    env.remove_pod(&pod).await?;
    Ok(())
}

/// A minimal SPDY/3.1 client: the HTTP upgrade, then frames.
struct Spdy {
    io: TcpStream,
    r: FrameReader,
    w: FrameWriter,
}

impl Spdy {
    async fn connect(url: &str, protocol: &str) -> Result<Spdy> {
        let rest = url.strip_prefix("http://").context("not http")?;
        let (host, path) = rest.split_once('/').context("no path")?;
        let mut io = TcpStream::connect(host).await?;
        let req = format!(
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        );
        io.write_all(req.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if io.read(&mut b).await? == 0 {
                bail!("connection closed in the response head: {}", String::from_utf8_lossy(&head));
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        anyhow::ensure!(head.starts_with("http/1.1 101"), "{head}");
        anyhow::ensure!(head.contains(&format!("x-stream-protocol-version: {protocol}")), "{head}");
        Ok(Spdy { io, r: FrameReader::new(), w: FrameWriter::new()? })
    }

    async fn send(&mut self, f: Frame) -> Result<()> {
        let mut buf = Vec::new();
        self.w.encode(&f, &mut buf)?;
        self.io.write_all(&buf).await?;
        Ok(())
    }

    async fn open(&mut self, id: u32, headers: &[(&str, &str)], fin: bool) -> Result<()> {
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.send(Frame::SynStream {
            stream_id: id,
            associated: 0,
            priority: 0,
            fin,
            unidirectional: false,
            headers,
        })
        .await
    }

    async fn data(&mut self, id: u32, data: &[u8], fin: bool) -> Result<()> {
        self.send(Frame::Data { stream_id: id, fin, data: data.to_vec().into() }).await
    }

    /// Data per stream until `done` (or GOAWAY / the end).
    async fn collect(
        &mut self,
        done: impl Fn(&HashMap<u32, Vec<u8>>) -> bool,
    ) -> Result<HashMap<u32, Vec<u8>>> {
        let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
        let read = async {
            while let Some(f) = self.r.read(&mut self.io).await? {
                match f {
                    Frame::Data { stream_id, data, .. } => {
                        got.entry(stream_id).or_default().extend_from_slice(&data)
                    }
                    Frame::GoAway { .. } => break,
                    _ => {}
                }
                if done(&got) {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(60), read).await.context("no end")??;
        Ok(got)
    }
}

fn stream_text(got: &HashMap<u32, Vec<u8>>, id: u32) -> String {
    String::from_utf8_lossy(got.get(&id).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn exec_and_port_forward_over_spdy() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let config = env.pod_config("spdy");
    let pod = env.run_pod(config.clone()).await?;
    let script = "mkdir -p /tmp/www && echo spdy-page > /tmp/www/index.html && \
                  exec /bin/busybox httpd -f -p 8080 -h /tmp/www";
    let c = env.container_config("httpd", &["/bin/busybox", "sh", "-c", script]);
    let ctr = env.run(&pod, &config, c).await?;

    // Exec: streams opened as client-go's v4 does (error first).
    let url =
        exec_url(&mut env, exec_req(&ctr, &["/bin/sh", "-c", "cat; echo e >&2; exit 7"])).await?;
    let mut s = Spdy::connect(&url, "v4.channel.k8s.io").await?;
    s.open(1, &[("streamType", "error")], false).await?;
    s.open(3, &[("streamType", "stdin")], false).await?;
    s.open(5, &[("streamType", "stdout")], false).await?;
    s.open(7, &[("streamType", "stderr")], false).await?;
    s.data(3, b"via spdy", true).await?;
    let got = s.collect(|_| false).await?;
    assert_eq!(stream_text(&got, 5), "via spdy");
    assert_eq!(stream_text(&got, 7), "e\n");
    let status: serde_json::Value = serde_json::from_str(&stream_text(&got, 1))?;
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "7");

    // Port-forward: a data and an error stream per request id.
    for _ in 0..50 {
        let r = env
            .exec(&ctr, &["/bin/busybox", "wget", "-q", "-O-", "http://127.0.0.1:8080/"], 10)
            .await?;
        if r.exit_code == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let req = PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![8080] };
    let url = env.rt.port_forward(req).await?.into_inner().url;
    let mut s = Spdy::connect(&url, "portforward.k8s.io").await?;
    s.open(1, &[("streamType", "error"), ("port", "8080"), ("requestID", "0")], true).await?;
    s.open(3, &[("streamType", "data"), ("port", "8080"), ("requestID", "0")], false).await?;
    s.data(3, b"GET / HTTP/1.0\r\n\r\n", false).await?;
    let got = s.collect(|g| stream_text(g, 3).contains("spdy-page")).await?;
    assert!(stream_text(&got, 3).starts_with("HTTP/1."), "{got:?}");
    // A closed port: the error stream says so.
    s.open(5, &[("streamType", "error"), ("port", "9"), ("requestID", "1")], true).await?;
    s.open(7, &[("streamType", "data"), ("port", "9"), ("requestID", "1")], false).await?;
    let got = s.collect(|g| !stream_text(g, 5).is_empty()).await?;
    assert!(stream_text(&got, 5).contains("port 9"), "{got:?}");

    env.remove_pod(&pod).await?;
    Ok(())
}

/// berthd's resident memory in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

#[tokio::test]
async fn a_slow_reader_keeps_memory_bounded() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut env = Env::start().await?;
    let (pod, ctr) = sleeper(&mut env, "slow").await?;
    let pid = env.d.pid().context("berthd pid")?;
    let mut req = exec_req(&ctr, &["/bin/busybox", "cat", "/dev/zero"]);
    req.stdin = false;
    let url = exec_url(&mut env, req).await?;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    // Read a little, then stop reading while the process could write gigabytes.
    let got = collect_until(&mut ws, |g| g.get(&1).is_some_and(|d| d.len() > 1 << 20)).await?;
    assert!(got[&1].iter().all(|&b| b == 0));
    let before = rss_kib(pid)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid)?;
    assert!(after < before + 32 * 1024, "berthd grew from {before} KiB to {after} KiB");
    // And it is still streaming when the reader comes back.
    let more = collect_until(&mut ws, |g| g.get(&1).is_some_and(|d| d.len() > 4 << 20)).await?;
    assert!(more[&1].len() > 4 << 20);
    drop(ws);
    let mut gone = false;
    for _ in 0..100 {
        let out = env.exec(&ctr, &["/bin/busybox", "ps"], 10).await?;
        if !String::from_utf8_lossy(&out.stdout).contains("cat /dev/zero") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the exec outlived its client");
    env.remove_pod(&pod).await?;
    Ok(())
}

#[tokio::test]
async fn attach_survives_a_berthd_restart_with_the_external_shim() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let options = berth_e2e::Options { shim: Some("external".into()), ..Default::default() };
    let mut env = Env::start_with(options).await?;
    let config = env.pod_config("reattach");
    let pod = env.run_pod(config.clone()).await?;
    let mut c = env.container_config("sh", &["/bin/sh"]);
    c.stdin = true;
    let ctr = env.run(&pod, &config, c).await?;

    env.d.restart().await?;
    env.rt = env.d.runtime().await?;

    let attach = |ctr: &str| AttachRequest {
        container_id: ctr.to_owned(),
        stdin: true,
        stdout: true,
        stderr: false,
        tty: false,
    };
    let url = env.rt.attach(attach(&ctr)).await?.into_inner().url;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"echo after-restart\n").await?;
    collect_until(&mut ws, |g| text(g, 1).contains("after-restart")).await?;
    drop(ws);
    // Without stdin_once, stdin stays open for the next attach.
    let url = env.rt.attach(attach(&ctr)).await?.into_inner().url;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    send(&mut ws, 0, b"echo again; exit 4\n").await?;
    let got = collect(&mut ws).await?;
    assert!(text(&got, 1).contains("again"), "{got:?}");
    assert_eq!(env.wait_exited(&ctr, Duration::from_secs(10)).await?.exit_code, 4);
    env.remove_pod(&pod).await?;
    Ok(())
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, made by openssl in `dir`:
/// (CA certificate, server certificate, server key).
fn test_certificates(
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let p = |name: &str| dir.join(name);
    let run = |args: &[&str]| -> Result<()> {
        let status = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "openssl {args:?} failed");
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=berth-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    run(&ca)?;
    let mut csr = vec!["req", "-new", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&csr)?;
    std::fs::write(
        p("server.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ])?;
    Ok((p("ca.crt"), p("server.crt"), p("server.key")))
}

/// With `[stream] tls_cert_file`/`tls_key_file` the URLs are https:// and the server speaks
/// only TLS: an exec works over wss:// for a client that trusts the certificate, and a
/// plain-HTTP request gets no answer.
#[tokio::test]
async fn exec_over_tls_when_the_server_has_a_certificate() -> Result<()> {
    use rustls_pki_types::pem::PemObject;
    if skip() {
        return Ok(());
    }
    if std::process::Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED exec_over_tls_when_the_server_has_a_certificate: no openssl");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = test_certificates(dir.path())?;
    let mut env = Env::start_with(berth_e2e::Options {
        extra_toml: format!(
            "[stream]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        ..Default::default()
    })
    .await?;
    let (pod, ctr) = sleeper(&mut env, "tls").await?;
    let mut req = exec_req(&ctr, &["/bin/echo", "tls-hi"]);
    req.stdin = false;
    let url = exec_url(&mut env, req).await?;
    anyhow::ensure!(url.starts_with("https://127.0.0.1:"), "{url}");
    let authority = url.trim_start_matches("https://").split('/').next().context("host")?;

    // Plain HTTP on the TLS port: no HTTP answer.
    let mut plain = TcpStream::connect(authority).await?;
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    anyhow::ensure!(!buf.starts_with(b"HTTP/1.1"), "plain HTTP answered over the TLS port");

    // A client trusting the certificate.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(&ca)?)?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(authority).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    let tls = connector.connect(name, tcp).await?;
    let mut ws_req = url.replacen("https://", "wss://", 1).into_client_request()?;
    ws_req.headers_mut().insert("Sec-WebSocket-Protocol", "v5.channel.k8s.io".parse()?);
    let (mut ws, _) = client_async(ws_req, tls).await?;
    let got = collect(&mut ws).await?;
    assert_eq!(text(&got, 1), "tls-hi\n");
    assert_eq!(text(&got, 3), r#"{"metadata":{},"status":"Success"}"#);
    env.remove_pod(&pod).await?;
    Ok(())
}

//! The HTTP server: routes `/<kind>/<token>` to the request the token was made for, upgrades
//! the connection to SPDY/3.1 or WebSocket, and runs the session on it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_runtime::{Runtime, StreamExec};
use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::channel::OutStream;
use crate::exec::{ExecIo, StatusStyle};
use crate::spdy::Connection;
use crate::token::{Request, Tokens};
use crate::ws::WsConnection;
use crate::{StreamError, attach, exec, portforward};
use k8s_cri::v1::{AttachRequest, PortForwardRequest};

/// Exec/attach protocols over SPDY, best first.
const SPDY_EXEC: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// Port-forward protocols over SPDY.
const SPDY_PORTFORWARD: &[&str] = &["portforward.k8s.io"];
/// Exec/attach protocols over WebSocket, best first.
const WS_EXEC: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Port-forward protocols over WebSocket, best first.
const WS_PORTFORWARD: &[&str] =
    &["SPDY/3.1+portforward.k8s.io", "v4.portforward.k8s.io", "portforward.k8s.io"];
/// The WebSocket subprotocol prefix of SPDY tunnelled through binary messages.
const SPDY_TUNNEL: &str = "SPDY/3.1+";
/// How long the client gets to open the streams its request needs.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the streaming server listens.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// IP address to listen on.
    pub address: String,
    /// TCP port; 0 picks a free one.
    pub port: u16,
    /// PEM certificate chain and private key: with both, the server speaks TLS only and its
    /// URLs are `https://` (as containerd's `enable_tls_streaming`); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The streaming server's certificate chain and key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

impl TlsFiles {
    /// A TLS acceptor serving this chain and key.
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, StreamError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |path: &std::path::Path, reason: String| StreamError::Tls {
            path: path.to_path_buf(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&self.cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(&self.cert, "no certificate in the file".into()));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| bad(&self.key, e.to_string()))?;
        let provider =
            std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&self.cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(&self.cert, e.to_string()))?;
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
    }
}

/// The streaming server: hands out URLs and serves them.
pub struct StreamServer {
    tokens: Tokens,
    runtime: Arc<Runtime>,
    base_url: String,
    listener: std::sync::Mutex<Option<TcpListener>>,
    /// Set when the server speaks TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl StreamServer {
    /// Listens on `config`'s address.
    pub async fn bind(
        config: &StreamConfig,
        runtime: Arc<Runtime>,
    ) -> Result<Arc<Self>, StreamError> {
        let address = format!("{}:{}", config.address, config.port);
        let bind_err = |source| StreamError::Bind { address: address.clone(), source };
        let ip: std::net::IpAddr = config
            .address
            .parse()
            .map_err(|e| bind_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        // A certificate that cannot be used is an error before anything listens.
        let tls = config.tls.as_ref().map(TlsFiles::acceptor).transpose()?;
        let listener =
            TcpListener::bind(SocketAddr::new(ip, config.port)).await.map_err(bind_err)?;
        let bound = listener.local_addr().map_err(bind_err)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Arc::new(StreamServer {
            tokens: Tokens::default(),
            runtime,
            base_url: format!("{scheme}://{bound}"),
            listener: std::sync::Mutex::new(Some(listener)),
            tls,
        }))
    }

    /// `http://<address>:<port>` (`https://` with TLS) as bound.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// A fresh URL for `request`, good once within a minute.
    pub fn url_for(&self, request: Request) -> Result<String, StreamError> {
        let kind = request.kind();
        let token = self.tokens.insert(request)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }

    /// Serves connections until `shutdown` resolves (sessions under way are dropped with the
    /// runtime).
    pub async fn serve(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let listener = self.listener.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(listener) = listener else { return };
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "streaming server: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let server = self.clone();
            tokio::spawn(async move {
                match server.tls.clone() {
                    None => server.serve_connection(tcp, peer).await,
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => server.serve_connection(tls, peer).await,
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    },
                }
            });
        }
    }

    /// Serves HTTP/1.1 (with upgrades) on one accepted connection, plain or TLS.
    async fn serve_connection<IO>(self: Arc<Self>, io: IO, peer: SocketAddr)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req| {
            let server = self.clone();
            async move { Ok::<_, Infallible>(server.handle(req)) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "streaming connection ended");
        }
    }

    /// Answers one HTTP request: an upgrade on a valid token, else an error.
    fn handle(self: Arc<Self>, mut req: http::Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let Some((kind, token)) = path.split_once('/') else { return plain(StatusCode::NOT_FOUND) };
        if !["exec", "attach", "portforward"].contains(&kind) || token.contains('/') {
            return plain(StatusCode::NOT_FOUND);
        }
        let headers = req.headers();
        let upgrade = header_values(headers, header::UPGRADE.as_str());
        let exec_like = kind != "portforward";
        let (protocol, response) = if upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")) {
            let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
                return plain(StatusCode::BAD_REQUEST);
            };
            let offered = header_values(headers, header::SEC_WEBSOCKET_PROTOCOL.as_str());
            let ours = if exec_like { WS_EXEC } else { WS_PORTFORWARD };
            let Some(chosen) = ours.iter().find(|p| offered.iter().any(|o| o == *p)) else {
                return plain(StatusCode::BAD_REQUEST);
            };
            let r = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
                .header(header::SEC_WEBSOCKET_PROTOCOL, *chosen);
            (Protocol::Ws(chosen), r)
        } else if upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
            let offered = header_values(headers, "x-stream-protocol-version");
            let ours = if exec_like { SPDY_EXEC } else { SPDY_PORTFORWARD };
            // The client's order decides, as in the kubelet's handshake.
            let Some(chosen) = offered.iter().find_map(|o| ours.iter().find(|p| *p == o)) else {
                return plain(StatusCode::FORBIDDEN);
            };
            let r = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "SPDY/3.1")
                .header("X-Stream-Protocol-Version", *chosen);
            (Protocol::Spdy(chosen), r)
        } else {
            return plain(StatusCode::BAD_REQUEST);
        };
        // Only now is the token spent: a request we could not serve leaves it unused.
        let Some(request) = self.tokens.take(kind, token) else {
            return plain(StatusCode::NOT_FOUND);
        };
        let ports = query_ports(req.uri().query());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    self.session(TokioIo::new(upgraded), protocol, request, ports).await
                }
                Err(e) => tracing::debug!(error = %e, "stream upgrade failed"),
            }
        });
        response.body(Full::default()).unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR))
    }

    async fn session(
        &self,
        io: TokioIo<hyper::upgrade::Upgraded>,
        protocol: Protocol,
        request: Request,
        ports: Option<Vec<u16>>,
    ) {
        let _open = crate::channel::SessionGauge::open(request.kind());
        let job = match request {
            Request::Exec(r) => Job::Exec(StreamExec {
                container_id: r.container_id,
                cmd: r.cmd,
                tty: r.tty,
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                console_size: None,
            }),
            Request::Attach(r) => Job::Attach(r),
            Request::PortForward(r) => return self.port_forward(io, protocol, r, ports).await,
        };
        match protocol {
            Protocol::Spdy(version) => match Connection::start(io) {
                Ok(conn) => self.channel_spdy(job, version, conn).await,
                Err(e) => tracing::warn!(error = %e, "cannot start SPDY connection"),
            },
            Protocol::Ws(version) => {
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                let conn = WsConnection::start(ws, version.starts_with("v5."), &[0, 4]);
                self.channel_ws(job, conn).await;
            }
        }
    }

    async fn port_forward(
        &self,
        io: TokioIo<hyper::upgrade::Upgraded>,
        protocol: Protocol,
        r: PortForwardRequest,
        ports: Option<Vec<u16>>,
    ) {
        let net = self.runtime.pod_network(&r.pod_sandbox_id);
        match protocol {
            Protocol::Spdy(_) => match (net, Connection::start(io)) {
                (Ok(net), Ok(conn)) => portforward::serve_spdy(net, conn).await,
                (Err(e), _) => tracing::debug!(error = %e, "port forward to a pod that is gone"),
                (_, Err(e)) => tracing::warn!(error = %e, "cannot start SPDY connection"),
            },
            Protocol::Ws(p) if p.starts_with(SPDY_TUNNEL) => {
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                match (net, Connection::start(crate::ws::tunnel(ws))) {
                    (Ok(net), Ok(conn)) => portforward::serve_spdy(net, conn).await,
                    (Err(e), _) => {
                        tracing::debug!(error = %e, "port forward to a pod that is gone")
                    }
                    (_, Err(e)) => tracing::warn!(error = %e, "cannot start SPDY connection"),
                }
            }
            Protocol::Ws(_) => {
                let ports = ports.unwrap_or_else(|| {
                    r.port.iter().filter_map(|&p| u16::try_from(p).ok()).collect()
                });
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                let inputs: Vec<u8> = (0..ports.len()).map(|n| (2 * n) as u8).collect();
                let conn = WsConnection::start(ws, false, &inputs);
                match net {
                    Ok(net) => portforward::serve_ws(net, ports, conn).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "port forward to a pod that is gone");
                        conn.finish().await;
                    }
                }
            }
        }
    }

    /// Exec or attach over SPDY: waits for the streams the request needs, then runs it.
    async fn channel_spdy(&self, job: Job, version: &str, mut conn: Connection) {
        let style = if version.starts_with("v4.") || version.starts_with("v5.") {
            StatusStyle::Json
        } else {
            StatusStyle::Text
        };
        let (stdin, stdout, stderr, tty) = job.flags();
        // Resize streams came with v3.
        let resize = tty && (style == StatusStyle::Json || version.starts_with("v3."));
        let mut io =
            ExecIo { stdin: None, stdout: None, stderr: None, error: None, resize: None, style };
        let expected = 1
            + usize::from(stdin)
            + usize::from(stdout)
            + usize::from(stderr && !tty)
            + usize::from(resize);
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + STREAMS_TIMEOUT;
        while got < expected {
            let Ok(Some(s)) = tokio::time::timeout_at(deadline, conn.streams.recv()).await else {
                tracing::debug!(got, expected, "stream client did not open its streams");
                conn.finish().await;
                return;
            };
            let slot_in = |slot: &mut Option<_>, input| slot.replace(input).is_none();
            let slot_out = |slot: &mut Option<OutStream>, out| slot.replace(out).is_none();
            // Only the streams the request asked for count (and are used); others are
            // dropped, which ends them for the client.
            let new = match s.header("streamtype") {
                Some("stdin") if stdin => slot_in(&mut io.stdin, s.input),
                Some("resize") if resize => slot_in(&mut io.resize, s.input),
                Some("stdout") if stdout => slot_out(&mut io.stdout, s.output),
                Some("stderr") if stderr && !tty => slot_out(&mut io.stderr, s.output),
                Some("error") => slot_out(&mut io.error, s.output),
                _ => false,
            };
            got += usize::from(new);
        }
        let gone = conn.gone.clone();
        job.run(&self.runtime, io, gone).await;
        conn.finish().await;
    }

    /// Exec or attach over WebSocket: the channels exist from the start.
    async fn channel_ws(&self, job: Job, mut conn: WsConnection) {
        let (stdin, stdout, stderr, tty) = job.flags();
        let io = ExecIo {
            stdin: conn.inputs.remove(&0).filter(|_| stdin),
            stdout: stdout.then(|| conn.output(1)),
            stderr: (stderr && !tty).then(|| conn.output(2)),
            error: Some(conn.output(3)),
            resize: conn.inputs.remove(&4).filter(|_| tty),
            style: StatusStyle::Json,
        };
        let gone = conn.gone.clone();
        job.run(&self.runtime, io, gone).await;
        conn.finish().await;
    }
}

/// What a channel-protocol connection runs: both speak it alike.
enum Job {
    Exec(StreamExec),
    Attach(AttachRequest),
}

impl Job {
    /// Which of stdin, stdout, stderr and tty the request asked for.
    fn flags(&self) -> (bool, bool, bool, bool) {
        match self {
            Job::Exec(e) => (e.stdin, e.stdout, e.stderr, e.tty),
            Job::Attach(a) => (a.stdin, a.stdout, a.stderr, a.tty),
        }
    }

    async fn run(self, runtime: &Runtime, io: ExecIo, gone: tokio::sync::watch::Receiver<bool>) {
        match self {
            Job::Exec(e) => exec::run(runtime, e, io, gone).await,
            Job::Attach(a) => attach::run(runtime, &a.container_id, io, gone).await,
        }
    }
}

/// The protocol a connection was upgraded to, with the negotiated subprotocol.
enum Protocol {
    Spdy(&'static str),
    Ws(&'static str),
}

/// All values of a header, split at commas and trimmed.
fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

/// `ports=80,8080` from a query string (WebSocket port-forward names its ports there).
fn query_ports(query: Option<&str>) -> Option<Vec<u16>> {
    let ports: Vec<u16> = query?
        .split('&')
        .filter_map(|kv| kv.strip_prefix("ports="))
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.parse().ok())
        .collect();
    (!ports.is_empty()).then_some(ports)
}

fn plain(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::from(status.canonical_reason().unwrap_or("error")));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_query() {
        assert_eq!(query_ports(Some("ports=80,8080")), Some(vec![80, 8080]));
        assert_eq!(query_ports(Some("a=b&ports=1&ports=2")), Some(vec![1, 2]));
        assert_eq!(query_ports(Some("a=b")), None);
        assert_eq!(query_ports(None), None);
    }

    #[test]
    fn unusable_tls_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing =
            TlsFiles { cert: dir.path().join("none.crt"), key: dir.path().join("none.key") };
        assert!(
            matches!(missing.acceptor(), Err(StreamError::Tls { path, .. }) if path == missing.cert)
        );
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = TlsFiles { cert: empty.clone(), key: dir.path().join("none.key") };
        let err = files.acceptor().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no certificate"), "{err}");
    }
}

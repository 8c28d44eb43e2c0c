//! Test helpers: a scripted fake registry (for failure modes a real one won't produce), a
//! real `docker-registry` process, and image building.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What the fake registry answers for a path.
#[derive(Clone)]
pub enum Route {
    /// 200 with this content type and body.
    Ok(&'static str, Vec<u8>),
    /// This status with a body (and extra headers).
    Status(u16, Vec<(String, String)>, Vec<u8>),
    /// Announces `len` bytes, sends `body`, closes.
    Truncate(u64, Vec<u8>),
    /// Waits, then answers.
    Delay(Duration, Box<Route>),
}

/// A registry that answers from a script and logs requests.
pub struct FakeRegistry {
    pub addr: SocketAddr,
    pub routes: Arc<Mutex<HashMap<String, Route>>>,
    pub log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeRegistry {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, l) = (routes.clone(), log.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let (routes, log) = (r.clone(), l.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let mut words = head.split_whitespace();
                    let method = words.next().unwrap_or("").to_string();
                    let target = words.next().unwrap_or("").to_string();
                    let path = target.split('?').next().unwrap_or("").to_string();
                    log.lock().unwrap().push(format!("{method} {path}"));
                    let route = if path == "/v2/" {
                        Some(Route::Ok("application/json", b"{}".to_vec()))
                    } else {
                        routes.lock().unwrap().get(&path).cloned()
                    };
                    let mut route = route.unwrap_or_else(|| {
                        Route::Status(
                            404,
                            vec![],
                            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#
                                .to_vec(),
                        )
                    });
                    while let Route::Delay(d, inner) = route {
                        tokio::time::sleep(d).await;
                        route = *inner;
                    }
                    let head_only = method == "HEAD";
                    let (status, headers, body, declared) = match route {
                        Route::Ok(ct, body) => {
                            let len = body.len() as u64;
                            (200, vec![("Content-Type".to_string(), ct.to_string())], body, len)
                        }
                        Route::Status(code, headers, body) => {
                            let len = body.len() as u64;
                            (code, headers, body, len)
                        }
                        Route::Truncate(len, body) => (200, vec![], body, len),
                        Route::Delay(..) => unreachable!(),
                    };
                    let mut out = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {declared}\r\nConnection: close\r\n"
                    );
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    let _ = sock.write_all(out.as_bytes()).await;
                    if !head_only {
                        let _ = sock.write_all(&body).await;
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        Self { addr, routes, log, task }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), route);
    }

    pub fn requests(&self, path: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.ends_with(path)).count()
    }

    /// Serves a one-layer image `repo:tag` (layer bytes arbitrary) and returns
    /// (manifest digest, config digest, layer digest).
    pub fn serve_image(
        &self,
        repo: &str,
        tag: &str,
        layer: &[u8],
        layer_type: &str,
    ) -> (String, String, String) {
        let diff_id = sha(b"whatever-uncompressed");
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"User":"1000"}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
        )
        .into_bytes();
        let (config_digest, layer_digest) = (sha(&config), sha(layer));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"{layer_type}","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        )
        .into_bytes();
        let manifest_digest = sha(&manifest);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        self.route(&format!("/v2/{repo}/manifests/{tag}"), Route::Ok(mt, manifest.clone()));
        self.route(&format!("/v2/{repo}/manifests/{manifest_digest}"), Route::Ok(mt, manifest));
        self.route(
            &format!("/v2/{repo}/blobs/{config_digest}"),
            Route::Ok("application/octet-stream", config),
        );
        self.route(
            &format!("/v2/{repo}/blobs/{layer_digest}"),
            Route::Ok("application/octet-stream", layer.to_vec()),
        );
        (manifest_digest, config_digest, layer_digest)
    }
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A real `docker-registry` on a free loopback port with storage in `dir`; killed on drop.
pub struct RealRegistry {
    pub port: u16,
    child: Child,
}

impl RealRegistry {
    pub async fn start(dir: &Path) -> Self {
        let port = closed_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Self { port, child };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return registry;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("docker-registry did not come up on port {port}");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer to push: media type, blob bytes, diff ID.
pub struct TestLayer {
    pub media_type: &'static str,
    pub blob: Vec<u8>,
    pub diff_id: String,
}

pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// A layer holding `files` (path, content), compressed as asked.
pub fn layer(files: &[(&str, &str)], comp: Comp) -> TestLayer {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        builder.append_data(&mut header, path, content.as_bytes()).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let diff_id = sha(&tar);
    let (media_type, blob) = match comp {
        Comp::None => ("application/vnd.oci.image.layer.v1.tar", tar),
        Comp::Gzip => {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&tar).unwrap();
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", enc.finish().unwrap())
        }
        Comp::Zstd => {
            ("application/vnd.oci.image.layer.v1.tar+zstd", zstd::encode_all(&tar[..], 1).unwrap())
        }
    };
    TestLayer { media_type, blob, diff_id }
}

/// What `push_image` pushed.
pub struct Pushed {
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    pub config_digest: String,
    pub config_size: u64,
    pub layer_digests: Vec<String>,
    pub layer_sizes: u64,
}

fn http_client() -> oci_client::Client {
    oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes an image of `layers` to `host/repo:tag` (a Docker schema 2 manifest).
pub async fn push_image(
    host: &str,
    repo: &str,
    tag: &str,
    layers: &[TestLayer],
    arch: &str,
    user: &str,
) -> Pushed {
    let client = http_client();
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    let target =
        oci_client::Reference::with_tag(host.to_string(), repo.to_string(), tag.to_string());
    client.store_auth_if_needed(target.resolve_registry(), &auth).await;
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("\"{}\"", l.diff_id)).collect();
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"User":"{user}","Env":["PATH=/bin"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    )
    .into_bytes();
    let config_digest = sha(&config);
    client.push_blob(&target, config.clone(), &config_digest).await.unwrap();
    let mut layer_json = Vec::new();
    let mut layer_digests = Vec::new();
    for l in layers {
        let d = sha(&l.blob);
        client.push_blob(&target, l.blob.clone(), &d).await.unwrap();
        layer_json.push(format!(
            r#"{{"mediaType":"{}","digest":"{d}","size":{}}}"#,
            l.media_type,
            l.blob.len()
        ));
        layer_digests.push(d);
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layer_json.join(",")
    )
    .into_bytes();
    client
        .push_manifest_raw(
            &target,
            manifest.clone(),
            http::HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        )
        .await
        .unwrap();
    Pushed {
        manifest_digest: sha(&manifest),
        manifest,
        config_digest,
        config_size: config.len() as u64,
        layer_digests,
        layer_sizes: layers.iter().map(|l| l.blob.len() as u64).sum(),
    }
}

/// Pushes an index at `host/repo:tag` listing `(manifest digest, size, arch)`; returns its digest.
pub async fn push_index(host: &str, repo: &str, tag: &str, entries: &[(&Pushed, &str)]) -> String {
    let client = http_client();
    let target =
        oci_client::Reference::with_tag(host.to_string(), repo.to_string(), tag.to_string());
    client
        .store_auth_if_needed(
            target.resolve_registry(),
            &oci_client::secrets::RegistryAuth::Anonymous,
        )
        .await;
    let list: Vec<String> = entries
        .iter()
        .map(|(p, arch)| {
            format!(
                r#"{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                p.manifest_digest,
                p.manifest.len()
            )
        })
        .collect();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{}]}}"#,
        list.join(",")
    )
    .into_bytes();
    client
        .push_manifest_raw(
            &target,
            index.clone(),
            http::HeaderValue::from_static(
                "application/vnd.docker.distribution.manifest.list.v2+json",
            ),
        )
        .await
        .unwrap();
    sha(&index)
}

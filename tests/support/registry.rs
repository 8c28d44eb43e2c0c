//! A private CNCF distribution registry (`docker-registry`, Debian's package) per test, and
//! pushing in-memory images to it over the registry HTTP API.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{Method, StatusCode};
use tempfile::TempDir;

use crate::http::HttpClient;
use crate::oci::{Blob, Image, Index};
use crate::process::{free_port, spawn_logged, tail, terminate};

/// The registry binary; override with `BERTH_E2E_REGISTRY_BIN`.
pub fn registry_bin() -> PathBuf {
    std::env::var_os("BERTH_E2E_REGISTRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// User name accepted by a registry started with [`Registry::start_with_auth`].
pub const AUTH_USER: &str = "berth";
/// Password accepted by a registry started with [`Registry::start_with_auth`].
pub const AUTH_PASSWORD: &str = "secret";
/// bcrypt of [`AUTH_PASSWORD`] (cost 5), precomputed so that no `htpasswd` tool is needed.
const AUTH_BCRYPT: &str = "$2b$05$abcdefghijklmnopqrstuuOQiyCxlgf/oeuTqixKmWdcYUh4Hjl0a";

/// A running registry on 127.0.0.1 with its own storage; stopped and removed on drop.
pub struct Registry {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    auth: bool,
    http: HttpClient,
}

impl Registry {
    /// Starts a registry without authentication.
    pub async fn start() -> Result<Self> {
        Self::start_inner(false).await
    }

    /// Starts a registry that requires HTTP basic auth ([`AUTH_USER`] / [`AUTH_PASSWORD`]).
    pub async fn start_with_auth() -> Result<Self> {
        Self::start_inner(true).await
    }

    async fn start_inner(auth: bool) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-reg").tempdir().context("tempdir")?;
        std::fs::create_dir(dir.path().join("storage"))?;
        if auth {
            std::fs::write(dir.path().join("htpasswd"), format!("{AUTH_USER}:{AUTH_BCRYPT}\n"))?;
        }
        let mut reg = Self { child: None, dir, port: 0, auth, http: HttpClient::new() };
        let mut last_err = None;
        // The probed port may be taken by a parallel test before the registry binds it: retry.
        for _ in 0..5 {
            reg.port = free_port()?;
            let config = reg.dir.path().join("config.yml");
            std::fs::write(&config, reg.config_yaml())?;
            let mut cmd = Command::new(registry_bin());
            cmd.arg("serve").arg(&config);
            reg.child = Some(spawn_logged(&mut cmd, &reg.log_path())?);
            match reg.wait_ready().await {
                Ok(()) => return Ok(reg),
                Err(e) => {
                    if let Some(mut c) = reg.child.take() {
                        terminate(&mut c, Duration::from_secs(5));
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    fn config_yaml(&self) -> String {
        let auth = if self.auth {
            format!(
                "auth:\n  htpasswd:\n    realm: berth-e2e\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            )
        } else {
            String::new()
        };
        format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             {auth}\
             http:\n  addr: 127.0.0.1:{}\n",
            self.storage_dir().display(),
            self.port
        )
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("{}/v2/", self.url());
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("docker-registry exited ({status}): {}", tail(&self.log_path(), 20));
            }
            if let Ok(r) = self.http.get(&url).await {
                // 401 is a ready registry that wants credentials.
                if r.status == StatusCode::OK || r.status == StatusCode::UNAUTHORIZED {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("docker-registry not ready on {url}: {}", tail(&self.log_path(), 20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `127.0.0.1:<port>`: the registry host as it appears in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The registry's storage root (`rootdirectory`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of blob `digest`.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 5 s). Its port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5));
        }
    }

    fn auth_header(&self) -> Option<String> {
        use base64::Engine;
        let creds = format!("{AUTH_USER}:{AUTH_PASSWORD}");
        self.auth
            .then(|| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds)))
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<crate::http::Response> {
        let auth = self.auth_header();
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = auth.as_deref() {
            headers.push(("authorization", a));
        }
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        self.http.send(method, url, &headers, body).await
    }

    /// Uploads one blob to repository `repo` (monolithic upload: POST, then PUT with digest).
    pub async fn push_blob(&self, repo: &str, blob: &Blob) -> Result<()> {
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.url());
        let r = self.send(Method::POST, &start, None, Bytes::new()).await?;
        ensure!(r.status == StatusCode::ACCEPTED, "POST {start}: {} {}", r.status, r.text());
        let loc = r.header("location").context("upload without Location")?.to_string();
        let loc = if loc.starts_with('/') { format!("{}{loc}", self.url()) } else { loc };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={}", blob.digest);
        let r = self
            .send(Method::PUT, &put, Some("application/octet-stream"), blob.data.clone())
            .await?;
        ensure!(
            r.status == StatusCode::CREATED,
            "PUT blob {}: {} {}",
            blob.digest,
            r.status,
            r.text()
        );
        Ok(())
    }

    /// Uploads a manifest (or index) under `reference` (a tag or its digest).
    pub async fn push_manifest(&self, repo: &str, reference: &str, manifest: &Blob) -> Result<()> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let r =
            self.send(Method::PUT, &url, Some(&manifest.media_type), manifest.data.clone()).await?;
        ensure!(r.status == StatusCode::CREATED, "PUT {url}: {} {}", r.status, r.text());
        if let Some(d) = r.header("docker-content-digest") {
            ensure!(d == manifest.digest, "registry computed {d}, expected {}", manifest.digest);
        }
        Ok(())
    }

    /// Pushes config, layers and manifest of `image` as `repo:tag`.
    pub async fn push_image(&self, repo: &str, tag: &str, image: &Image) -> Result<Pushed> {
        self.push_blob(repo, &image.config).await?;
        for l in &image.layers {
            self.push_blob(repo, &l.blob).await?;
        }
        self.push_manifest(repo, tag, &image.manifest).await?;
        Ok(self.pushed(repo, tag, &image.manifest.digest, image))
    }

    /// Pushes every platform image by digest, then the index as `repo:tag`. The returned
    /// [`Pushed`] describes the first image of the index (by convention amd64).
    pub async fn push_index(&self, repo: &str, tag: &str, index: &Index) -> Result<Pushed> {
        for img in &index.images {
            self.push_blob(repo, &img.config).await?;
            for l in &img.layers {
                self.push_blob(repo, &l.blob).await?;
            }
            self.push_manifest(repo, &img.manifest.digest, &img.manifest).await?;
        }
        self.push_manifest(repo, tag, &index.index).await?;
        let first = index.images.first().context("empty index")?;
        Ok(self.pushed(repo, tag, &index.index.digest, first))
    }

    fn pushed(&self, repo: &str, tag: &str, digest: &str, image: &Image) -> Pushed {
        Pushed {
            host: self.host(),
            repo: repo.to_string(),
            tag: tag.to_string(),
            digest: digest.to_string(),
            image: image.clone(),
        }
    }

    /// Overwrites the stored bytes of blob `digest` with different bytes of the same length,
    /// so that the registry serves content that does not match its digest.
    pub fn tamper_blob(&self, digest: &str) -> Result<()> {
        let path = self.blob_data_path(digest);
        let mut data =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        for b in data.iter_mut() {
            *b = !*b;
        }
        std::fs::write(&path, data)?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An image as it sits in a registry, with the references that name it.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// Repository path, e.g. `busybox`.
    pub repo: String,
    /// The tag pushed.
    pub tag: String,
    /// The digest of the top manifest (the index for multi-platform images).
    pub digest: String,
    /// The (first / amd64) platform image.
    pub image: Image,
}

impl Pushed {
    /// `host/repo:tag`.
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.host, self.repo, self.tag)
    }

    /// `host/repo@sha256:...`.
    pub fn digest_reference(&self) -> String {
        format!("{}/{}@{}", self.host, self.repo, self.digest)
    }

    /// `host/repo`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.host, self.repo)
    }

    /// The same repository and tag under another registry host (for mirror tests).
    pub fn on_host(&self, host: &str) -> Self {
        Self { host: host.to_string(), ..self.clone() }
    }

    /// The image ID berth should report: the config digest.
    pub fn id(&self) -> &str {
        &self.image.config.digest
    }
}

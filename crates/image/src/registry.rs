//! Talking to registries with `oci-client`: which endpoints to try (mirrors first, then the
//! upstream), HTTP or HTTPS, credentials, fetching manifests and streaming blobs into the
//! content store, and turning the client's errors into precise [`ImageError`]s.
//!
//! Mirrors: every endpoint gets its own `oci_client::Reference` whose registry is the
//! endpoint's host, and its own `Client` whose protocol is the endpoint's scheme. (oci-client
//! 0.18 also has `Reference::set_mirror_registry`, but it is hidden and exempt from semver,
//! and a client's protocol is per client anyway, so one client per endpoint is simplest.)
//! Clients are kept between pulls per endpoint and credentials (`client_cache.rs`), so one
//! identity's credentials and tokens never serve another's pull.
//!
//! Credentials, as far as oci-client 0.18 goes:
//! - `Basic` becomes `RegistryAuth::Basic`: used for the token-server handshake when the
//!   registry answers with a Bearer challenge, or sent as HTTP Basic when it asks for Basic.
//! - `RegistryToken` becomes `RegistryAuth::Bearer`: sent as is, no handshake.
//! - `IdentityToken` also becomes `RegistryAuth::Bearer`. oci-client cannot do the OAuth2
//!   refresh-token exchange containerd does (POST `grant_type=refresh_token` to the realm),
//!   so this works only with registries that accept the identity token itself as a bearer.
//!
//! Like containerd's CRI plugin, the kubelet's credentials go to every endpoint of the
//! registry, mirrors included (mirrors are chosen by the operator).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::client_cache::ClientCache;
use crate::content::{ContentStore, Ingest};
use crate::digest::Digest;
use crate::error::ImageError;
use crate::manifest::ACCEPTED_MANIFESTS;
use crate::reference::{DEFAULT_DOMAIN, ImageReference, validate_domain};
use crate::{Credentials, RegistryConfig};

/// How long to wait for a TCP/TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one read may stall before the transfer counts as broken.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One place to fetch a registry's content from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// A configured mirror (as opposed to the upstream registry itself).
    pub mirror: bool,
}

/// Mirrors and plain-HTTP hosts, checked once when the store opens.
#[derive(Debug, Clone, Default)]
pub struct Registries {
    mirrors: HashMap<String, Vec<Endpoint>>,
    insecure: HashSet<String>,
    clients: ClientCache,
}

impl Registries {
    /// Validates the configuration's mirror endpoints.
    pub fn new(config: &RegistryConfig) -> Result<Self, ImageError> {
        let mut mirrors = HashMap::new();
        for (registry, endpoints) in &config.mirrors {
            let parsed = endpoints
                .iter()
                .map(|e| parse_mirror(registry, e))
                .collect::<Result<Vec<_>, _>>()?;
            mirrors.insert(normalize_registry(registry).to_string(), parsed);
        }
        let insecure = config.insecure.iter().map(|h| normalize_registry(h).to_string()).collect();
        Ok(Self { mirrors, insecure, clients: ClientCache::default() })
    }

    /// The endpoints to try for `domain`, in order: its mirrors, then itself.
    pub fn endpoints(&self, domain: &str) -> Vec<Endpoint> {
        let mut endpoints = self.mirrors.get(domain).cloned().unwrap_or_default();
        endpoints.push(Endpoint {
            host: domain.to_string(),
            plain_http: self.insecure.contains(domain) || is_loopback(domain),
            mirror: false,
        });
        endpoints
    }
}

/// `index.docker.io` is Docker Hub too.
fn normalize_registry(host: &str) -> &str {
    if host == "index.docker.io" { DEFAULT_DOMAIN } else { host }
}

/// `http://host[:port]`, `https://host[:port]` (or a bare host, meaning HTTPS); a trailing
/// `/` or `/v2` is tolerated, other paths are not supported.
fn parse_mirror(registry: &str, endpoint: &str) -> Result<Endpoint, ImageError> {
    let invalid = |reason: &str| ImageError::InvalidMirror {
        registry: registry.to_string(),
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let (plain_http, rest) = if let Some(rest) = endpoint.strip_prefix("http://") {
        (true, rest)
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        (false, rest)
    } else if endpoint.contains("://") {
        return Err(invalid("the scheme must be http or https"));
    } else {
        (false, endpoint)
    };
    let host = rest.trim_end_matches('/');
    let host = host.strip_suffix("/v2").unwrap_or(host);
    if host.contains('/') {
        return Err(invalid("paths are not supported, only scheme://host[:port]"));
    }
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    validate_domain(host).map_err(|why| invalid(&why))?;
    Ok(Endpoint { host: host.to_string(), plain_http, mirror: true })
}

/// Whether `domain` (`host[:port]`) is this machine: `localhost`, 127.0.0.0/8, `[::1]`.
pub fn is_loopback(domain: &str) -> bool {
    if let Some(bracketed) = domain.strip_prefix('[') {
        return bracketed
            .split_once(']')
            .and_then(|(v6, _)| v6.parse::<Ipv6Addr>().ok())
            .is_some_and(|ip| ip.is_loopback());
    }
    let host = domain.split_once(':').map_or(domain, |(host, _)| host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The oci-client credentials for the kubelet's.
pub fn registry_auth(credentials: Option<&Credentials>) -> RegistryAuth {
    match credentials {
        None => RegistryAuth::Anonymous,
        Some(Credentials::Basic { username, password }) => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Some(Credentials::RegistryToken(token) | Credentials::IdentityToken(token)) => {
            RegistryAuth::Bearer(token.clone())
        }
    }
}

/// A client bound to one endpoint for one pull.
#[derive(Clone)]
pub struct Session {
    client: Client,
    auth: RegistryAuth,
    /// Registry host as oci-client addresses it (the endpoint).
    registry: String,
    /// Repository path.
    repository: String,
    /// The normalised reference, for messages.
    reference: String,
}

/// A client speaking `endpoint`'s scheme (the pull of `image` is only for messages).
fn new_client(endpoint: &Endpoint, image: &ImageReference) -> Result<Client, ImageError> {
    let config = ClientConfig {
        protocol: if endpoint.plain_http { ClientProtocol::Http } else { ClientProtocol::Https },
        // We pick platforms ourselves, from the raw index.
        platform_resolver: None,
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| ImageError::Registry {
        reference: image.to_string(),
        registry: endpoint.host.clone(),
        status: None,
        message: format!("cannot set up the HTTP client: {e}"),
    })
}

impl Session {
    /// A session with `endpoint` for `image`, on the client cached for the endpoint and
    /// `auth` (or a new one).
    pub async fn new(
        endpoint: &Endpoint,
        image: &ImageReference,
        auth: RegistryAuth,
        clients: &ClientCache,
    ) -> Result<Self, ImageError> {
        let client = clients.get_or_build(&endpoint.host, endpoint.plain_http, &auth, || {
            new_client(endpoint, image)
        })?;
        let session = Self {
            client,
            auth,
            registry: endpoint.host.clone(),
            repository: image.path().to_string(),
            reference: image.to_string(),
        };
        // Blob requests take no credentials argument; they use the ones stored here.
        let target = session.target_by_tag("latest");
        session.client.store_auth_if_needed(target.resolve_registry(), &session.auth).await;
        Ok(session)
    }

    fn target_by_tag(&self, tag: &str) -> Reference {
        Reference::with_tag(self.registry.clone(), self.repository.clone(), tag.to_string())
    }

    fn target_by_digest(&self, digest: &Digest) -> Reference {
        Reference::with_digest(self.registry.clone(), self.repository.clone(), digest.to_string())
    }

    /// Fetches the manifest (or index) by tag, or by digest (verified).
    pub async fn fetch_manifest(
        &self,
        tag: Option<&str>,
        digest: Option<&Digest>,
    ) -> Result<(bytes::Bytes, Digest), ImageError> {
        let target = match (digest, tag) {
            (Some(digest), _) => self.target_by_digest(digest),
            (None, tag) => self.target_by_tag(tag.unwrap_or(crate::reference::DEFAULT_TAG)),
        };
        let what = match digest {
            Some(digest) => format!("manifest {digest}"),
            None => "manifest".to_string(),
        };
        let (body, _) = self
            .client
            .pull_manifest_raw(&target, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.map_error(e, &what))?;
        let actual = Digest::of(&body);
        if let Some(digest) = digest
            && actual != *digest
        {
            return Err(ImageError::DigestMismatch {
                reference: self.reference.clone(),
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok((body, actual))
    }

    /// Streams blob `digest` of `size` bytes into `store`, unless it is there already.
    /// Returns the bytes downloaded.
    pub async fn fetch_blob(
        &self,
        store: &ContentStore,
        digest: &Digest,
        size: u64,
    ) -> Result<u64, ImageError> {
        if store.has(digest) {
            return Ok(0);
        }
        let ingest = self.download(store, digest, size, None).await?;
        let written = ingest.written();
        ingest.commit().await?;
        Ok(written)
    }

    /// Streams blob `digest` of `size` bytes into a new [`Ingest`] of `store`, also handing
    /// every chunk to `tee` when given (a layer unpack reading the download as it arrives).
    /// The ingest is returned unverified; the caller verifies and commits it. If `tee`'s
    /// reader goes away (its unpack failed), the download stops early: the short ingest
    /// then cannot verify, and the caller reports the unpack's error.
    pub async fn download(
        &self,
        store: &ContentStore,
        digest: &Digest,
        size: u64,
        tee: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    ) -> Result<Ingest, ImageError> {
        let target = self.target_by_digest(digest);
        // A range request from offset 0 gets the whole blob, but oci-client hands back a
        // 206 answer's body without hashing it itself: the ingest hashes every byte anyway,
        // and a second sha256 pass over a big layer costs about as much as unpacking it.
        // A registry ignoring ranges answers 200, which oci-client verifies as before.
        let response = self
            .client
            .pull_blob_stream_partial(&target, digest.as_str(), 0, None)
            .await
            .map_err(|e| self.map_error(e, &format!("blob {digest}")))?;
        let mut stream = match response {
            BlobResponse::Partial(stream) => stream,
            BlobResponse::Full(stream) => {
                tracing::debug!(reference = %self.reference, %digest, "range ignored, whole blob");
                stream
            }
        };
        if let Some(length) = stream.content_length
            && length != size
        {
            return Err(ImageError::SizeMismatch {
                reference: self.reference.clone(),
                digest: digest.to_string(),
                expected: size,
                actual: length,
            });
        }
        let mut ingest = store.begin(&self.reference, digest, size).await?;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    ingest.write(&bytes).await?;
                    if let Some(tx) = &tee
                        && tx.send(bytes).await.is_err()
                    {
                        break;
                    }
                }
                Err(e) => return Err(self.stream_error(e, &ingest, digest)),
            }
        }
        tracing::debug!(
            reference = %self.reference, %digest, bytes = ingest.written(), "blob downloaded"
        );
        Ok(ingest)
    }

    /// An error in the middle of a blob: oci-client's own digest check at the end of the
    /// stream, or the transfer breaking off.
    fn stream_error(&self, e: std::io::Error, ingest: &Ingest, digest: &Digest) -> ImageError {
        let verification = e.get_ref().and_then(|inner| inner.downcast_ref::<DigestError>());
        match verification {
            Some(_) if ingest.written() != ingest.expected() => ImageError::SizeMismatch {
                reference: self.reference.clone(),
                digest: digest.to_string(),
                expected: ingest.expected(),
                actual: ingest.written(),
            },
            Some(DigestError::VerificationError { actual, .. }) => ImageError::DigestMismatch {
                reference: self.reference.clone(),
                digest: digest.to_string(),
                actual: actual.clone(),
            },
            _ => ImageError::Truncated {
                reference: self.reference.clone(),
                digest: digest.to_string(),
                expected: ingest.expected(),
                received: ingest.written(),
                source: Arc::new(e),
            },
        }
    }

    /// Turns oci-client's error about `what` into ours.
    fn map_error(&self, e: OciDistributionError, what: &str) -> ImageError {
        let reference = self.reference.clone();
        let registry = self.registry.clone();
        let not_found = || ImageError::NotFound { reference: reference.clone(), what: what.into() };
        match e {
            OciDistributionError::UnauthorizedError { url } => ImageError::Unauthorized {
                reference,
                registry,
                message: format!("401 Unauthorized for {url}"),
            },
            OciDistributionError::AuthenticationFailure(message) => {
                ImageError::Unauthorized { reference, registry, message }
            }
            OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
            OciDistributionError::RegistryError { envelope, url } => {
                let code = envelope.errors.first().map(|e| &e.code);
                match code {
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        ImageError::Unauthorized {
                            reference,
                            registry,
                            message: envelope.to_string(),
                        }
                    }
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::ManifestBlobUnknown,
                    ) => not_found(),
                    Some(OciErrorCode::Toomanyrequests) => ImageError::Registry {
                        reference,
                        registry,
                        status: Some(429),
                        message: format!("{envelope} ({url})"),
                    },
                    _ => ImageError::Registry {
                        reference,
                        registry,
                        status: None,
                        message: format!("{envelope} ({url})"),
                    },
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => not_found(),
            OciDistributionError::ServerError { code: code @ (401 | 403), url, message } => {
                ImageError::Unauthorized {
                    reference,
                    registry,
                    message: format!("HTTP {code} for {url}: {message}"),
                }
            }
            OciDistributionError::ServerError { code, url, message } => ImageError::Registry {
                reference,
                registry,
                status: Some(code),
                message: format!("{url}: {message}"),
            },
            OciDistributionError::RequestError(source) => {
                ImageError::Unreachable { reference, registry, source: Arc::new(source) }
            }
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => ImageError::DigestMismatch { reference, digest: expected, actual },
            other => ImageError::Registry {
                reference,
                registry,
                status: None,
                message: other.to_string(),
            },
        }
    }
}

/// Finds the manifest `image` names: tries each endpoint in order and stays with the first
/// that answers. Mirror failures are logged; the upstream's error is the one returned.
pub async fn resolve(
    registries: &Registries,
    image: &ImageReference,
    auth: &RegistryAuth,
) -> Result<(Session, bytes::Bytes, Digest), ImageError> {
    let mut endpoints = registries.endpoints(image.domain());
    // `endpoints` always ends with the upstream.
    let upstream = endpoints.pop();
    for endpoint in &endpoints {
        let session = Session::new(endpoint, image, auth.clone(), &registries.clients).await?;
        match session.fetch_manifest(image.tag(), image.digest()).await {
            Ok((body, digest)) => return Ok((session, body, digest)),
            Err(e) => tracing::warn!(
                reference = %image, mirror = %endpoint.host, error = %e,
                "mirror failed, trying the next endpoint"
            ),
        }
    }
    let upstream = upstream.unwrap_or_else(|| Endpoint {
        host: image.domain().to_string(),
        plain_http: is_loopback(image.domain()),
        mirror: false,
    });
    let session = Session::new(&upstream, image, auth.clone(), &registries.clients).await?;
    let (body, digest) = session.fetch_manifest(image.tag(), image.digest()).await?;
    Ok((session, body, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:5000",
            "LOCALHOST:1",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in
            ["docker.io", "10.0.0.1:5000", "[fe80::1]:5000", "localhost.example:5000", "128.0.0.1"]
        {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn endpoints_mirrors_then_upstream() {
        let config = RegistryConfig {
            mirrors: BTreeMap::from([(
                "docker.io".to_string(),
                vec!["http://127.0.0.1:5001".to_string(), "https://mirror.example/".to_string()],
            )]),
            insecure: vec!["registry.lan:5000".to_string()],
        };
        let registries = Registries::new(&config).unwrap();
        let hub = registries.endpoints("docker.io");
        assert_eq!(
            hub,
            vec![
                Endpoint { host: "127.0.0.1:5001".into(), plain_http: true, mirror: true },
                Endpoint { host: "mirror.example".into(), plain_http: false, mirror: true },
                Endpoint { host: "docker.io".into(), plain_http: false, mirror: false },
            ]
        );
        assert_eq!(
            registries.endpoints("registry.lan:5000"),
            vec![Endpoint { host: "registry.lan:5000".into(), plain_http: true, mirror: false }]
        );
        assert!(registries.endpoints("localhost:5000")[0].plain_http);
        assert!(registries.endpoints("[::1]:5000")[0].plain_http);
        assert!(!registries.endpoints("quay.io")[0].plain_http);
    }

    #[test]
    fn mirror_endpoints_are_validated() {
        let bad = |endpoint: &str| {
            let config = RegistryConfig {
                mirrors: BTreeMap::from([("docker.io".to_string(), vec![endpoint.to_string()])]),
                insecure: vec![],
            };
            Registries::new(&config).map(|_| ()).unwrap_err().to_string()
        };
        assert!(bad("ftp://x").contains("scheme"));
        assert!(bad("https://x/some/path").contains("paths"));
        assert!(bad("http://").contains("no host"));
        assert!(bad("http://bad_host:1").contains("host name"));
        let ok = RegistryConfig {
            mirrors: BTreeMap::from([(
                "index.docker.io".to_string(),
                vec!["mirror.example:443/v2/".to_string()],
            )]),
            insecure: vec![],
        };
        let registries = Registries::new(&ok).unwrap();
        assert_eq!(registries.endpoints("docker.io")[0].host, "mirror.example:443");
    }

    #[test]
    fn credentials_map_to_registry_auth() {
        assert_eq!(registry_auth(None), RegistryAuth::Anonymous);
        assert_eq!(
            registry_auth(Some(&Credentials::Basic { username: "u".into(), password: "p".into() })),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        assert_eq!(
            registry_auth(Some(&Credentials::RegistryToken("t".into()))),
            RegistryAuth::Bearer("t".into())
        );
        assert_eq!(
            registry_auth(Some(&Credentials::IdentityToken("i".into()))),
            RegistryAuth::Bearer("i".into())
        );
    }
}

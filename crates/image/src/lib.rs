//! berth-image: image references, the registry client, the content-addressed blob store and
//! image metadata. `ImageStore` is the one type the rest of berth uses: pull, list, look up,
//! remove, and report disk usage.
//!
//! Modules, one job each: [`reference`] parses and normalises names, `registry` talks to
//! registries (mirrors, auth, HTTP/HTTPS), `manifest` and `platform` read manifests and pick
//! this host's, [`content`] stores verified blobs, `meta` keeps records in redb, `pull`
//! orchestrates a pull (single flight, each layer unpacked while it downloads, through the
//! bounded channel in `tee`), `gc` collects what removed images leave behind.

// No unsafe code in this crate.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use berth_snapshot::Snapshotter;

mod client_cache;
pub mod content;
mod digest;
mod error;
mod gc;
mod manifest;
mod meta;
mod platform;
mod pull;
pub mod reference;
mod registry;
mod tee;

pub use digest::Digest;
pub use error::{ErrorClass, ImageError, TransportError};
pub use gc::{GcStats, SnapshotUsers};
pub use platform::Platform;
pub use pull::PullStats;
pub use reference::ImageReference;

use content::ContentStore;
use meta::MetaStore;
use registry::Registries;

/// Layer downloads of one pull running at once, when the config says 0.
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: usize = 3;

/// Credentials for a registry, as the CRI `AuthConfig` carries them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credentials {
    /// Username and password.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An identity token (OAuth2 refresh token) to exchange for a bearer token.
    /// oci-client cannot do that exchange; the token is presented as a bearer token as is.
    IdentityToken(String),
    /// A bearer token to send as it is.
    RegistryToken(String),
}

impl Credentials {
    /// Checks that the credentials can be sent in an HTTP header at all. oci-client puts
    /// tokens into an `Authorization` header with `unwrap()`, so a control character (a
    /// newline, a NUL) in one would panic inside it; a `:` in a user name cannot survive
    /// HTTP Basic. The message names the field, never its value.
    pub fn validate(&self) -> Result<(), ImageError> {
        let invalid = |field: &'static str, reason: &'static str| {
            Err(ImageError::InvalidCredentials { field, reason })
        };
        let has_control = |s: &str| s.chars().any(|c| c.is_ascii_control());
        match self {
            Credentials::Basic { username, password } => {
                if has_control(username) {
                    return invalid("auth.username", "contains a control character");
                }
                if username.contains(':') {
                    return invalid("auth.username", "contains ':', which HTTP Basic cannot carry");
                }
                if has_control(password) {
                    return invalid("auth.password", "contains a control character");
                }
            }
            Credentials::IdentityToken(token) if has_control(token) => {
                return invalid("auth.identity_token", "contains a control character");
            }
            Credentials::RegistryToken(token) if has_control(token) => {
                return invalid("auth.registry_token", "contains a control character");
            }
            Credentials::IdentityToken(_) | Credentials::RegistryToken(_) => {}
        }
        Ok(())
    }
}

/// Registry settings: this struct is the `[registry]` section of `berth.toml` (berthd
/// embeds it as is); every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Hosts (`host:port`) spoken to over plain HTTP. Loopback hosts always are.
    pub insecure: Vec<String>,
    /// Per registry host (`docker.io`, `registry.example:5000`): mirror endpoints
    /// (`http://127.0.0.1:5001`, `https://mirror.example`), tried in order before the upstream.
    pub mirrors: BTreeMap<String, Vec<String>>,
}

/// How the image store is set up.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Where blobs live (`<root>/content`).
    pub content_dir: PathBuf,
    /// Registry mirrors and plain-HTTP hosts.
    pub registry: RegistryConfig,
    /// How many layers of one pull download at once (0 means the default, 3).
    pub max_concurrent_downloads: usize,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            content_dir: PathBuf::from("/var/lib/berth/content"),
            registry: RegistryConfig::default(),
            max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
        }
    }
}

/// One image as berth knows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Image {
    /// The config digest (`sha256:...`): the image ID.
    pub id: String,
    /// Normalised `name:tag` references pointing at it.
    pub repo_tags: Vec<String>,
    /// Normalised `name@sha256:...` references (manifest digests).
    pub repo_digests: Vec<String>,
    /// Compressed size of the layers plus config (what containerd reports).
    pub size: u64,
    /// The image config blob (`application/vnd.oci.image.config.v1+json`) as stored.
    pub config_json: String,
    /// The layers' diff IDs, bottom first.
    pub diff_ids: Vec<String>,
    /// The chain ID of the top layer: the snapshot a container's rootfs is built on.
    pub chain_id: String,
    /// The image's USER, if any (`1000`, `nobody`, `1000:1000`).
    pub user: Option<String>,
    /// Pinned images are never garbage collected by the kubelet.
    pub pinned: bool,
}

/// The store's state, shared with the tasks that run pulls.
pub(crate) struct Inner {
    meta: MetaStore,
    content: ContentStore,
    snapshots: Arc<Snapshotter>,
    registries: Registries,
    platform: Platform,
    max_downloads: usize,
    pulls: pull::PullMap,
    in_use: gc::SharedInUse,
    snapshot_users: RwLock<Option<Arc<dyn SnapshotUsers>>>,
}

/// Images: pulled from registries, kept on disk, recorded in the metadata database.
///
/// Names: pulling by tag records `name:tag` and `name@<digest>` (the digest the tag resolved
/// to: the index's for a multi-platform image). Pulling the same image under another name
/// adds names. Pulling a different image under an existing tag moves the tag; the old image
/// keeps its other names (at least its `name@digest`) and stays listed until removed.
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl ImageStore {
    /// Opens the store on the shared metadata database and the snapshotter.
    pub fn open(
        db: Arc<redb::Database>,
        snapshots: Arc<Snapshotter>,
        config: ImageConfig,
    ) -> Result<Self, ImageError> {
        let registries = Registries::new(&config.registry)?;
        let content = ContentStore::open(&config.content_dir)?;
        let meta = MetaStore::open(db)?;
        let max_downloads = match config.max_concurrent_downloads {
            0 => DEFAULT_MAX_CONCURRENT_DOWNLOADS,
            n => n,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                meta,
                content,
                snapshots,
                registries,
                platform: Platform::host(),
                max_downloads,
                pulls: Mutex::default(),
                in_use: Arc::default(),
                snapshot_users: RwLock::new(None),
            }),
        })
    }

    /// Pulls `reference` (normalised first), unpacks its layers, and records it.
    /// Concurrent pulls of the same reference share one download.
    pub async fn pull(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
    ) -> Result<Image, ImageError> {
        self.pull_with_stats(reference, credentials).await.map(|(image, _)| image)
    }

    /// [`ImageStore::pull`], also saying how many bytes it downloaded and how long it took
    /// (for the pull metrics). A caller that joined another's pull gets `joined: true`.
    pub async fn pull_with_stats(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
    ) -> Result<(Image, PullStats), ImageError> {
        pull::pull_shared(&self.inner, reference, credentials).await
    }

    /// Records an image made on this node, whose layers are unpacked into the snapshotter
    /// already (its top layer is `image.chain_id`), under the names in `image.repo_tags`
    /// (normalised). The store keeps no blobs for it: removing it frees its snapshots only.
    /// This is how tests (the runtime's, with no registry) give the runtime an image.
    pub fn record_unpacked(&self, mut image: Image) -> Result<Image, ImageError> {
        let mut names = Vec::new();
        for tag in std::mem::take(&mut image.repo_tags) {
            names.push(ImageReference::parse(&tag)?.lookup_key());
        }
        let record = meta::ImageRecord { image, manifest_digest: String::new(), blobs: Vec::new() };
        Ok(self.inner.meta.record_pull(record, &names)?.image)
    }

    /// Every image, in no particular order.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        Ok(self.inner.meta.list()?.into_iter().map(|r| r.image).collect())
    }

    /// Looks an image up by ID (`sha256:...` or the bare hex), by name (normalised), by
    /// digest reference, or by a unique prefix of its ID (`crictl inspecti 5f8a`), names
    /// first, as containerd resolves them. `Ok(None)` when there is no such image; an ID
    /// prefix that several images share is an error.
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        Ok(self.find(reference)?.map(|r| r.image))
    }

    fn find(&self, reference: &str) -> Result<Option<meta::ImageRecord>, ImageError> {
        let reference = reference.trim();
        if reference.strip_prefix("sha256:").is_some_and(digest::is_sha256_hex) {
            return self.inner.meta.get(reference);
        }
        if digest::is_sha256_hex(reference) {
            return self.inner.meta.get(&format!("sha256:{reference}"));
        }
        if let Ok(name) = ImageReference::parse(reference)
            && let Some(id) = self.inner.meta.resolve(&name.lookup_key())?
        {
            return self.inner.meta.get(&id);
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.is_empty() || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Ok(None);
        }
        match self.inner.meta.ids_with_prefix(&format!("sha256:{hex}"), 2)?.as_slice() {
            [id] => self.inner.meta.get(id),
            [] => Ok(None),
            _ => Err(ImageError::AmbiguousId { prefix: reference.to_string() }),
        }
    }

    /// Removes the image named by `reference` (as `get` finds it) with all its names, and the
    /// blobs and snapshots no other image uses. `Ok(false)` if there was no such image.
    /// Garbage that cannot be deleted now is logged and left for [`ImageStore::gc`].
    pub fn remove(&self, reference: &str) -> Result<bool, ImageError> {
        let Some(record) = self.find(reference)? else {
            return Ok(false);
        };
        let Some(removed) = self.inner.meta.remove(&record.image.id)? else {
            // Removed by someone else in between.
            return Ok(false);
        };
        tracing::info!(id = %removed.image.id, "image removed");
        match self.collector().after_remove(&removed) {
            Ok(stats) => tracing::debug!(?stats, "garbage collected"),
            Err(e) => tracing::warn!(error = %e, "garbage collection after image removal failed"),
        }
        Ok(true)
    }

    /// Deletes every blob and layer snapshot that no image, pull in progress, or container
    /// (see [`ImageStore::set_snapshot_users`]) uses. For startup repair.
    pub fn gc(&self) -> Result<GcStats, ImageError> {
        self.collector().sweep()
    }

    /// Lets GC ask whether a container still builds on a layer snapshot.
    pub fn set_snapshot_users(&self, users: Arc<dyn SnapshotUsers>) {
        let mut slot = self.inner.snapshot_users.write().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(users);
    }

    fn collector(&self) -> gc::Collector<'_> {
        let users =
            self.inner.snapshot_users.read().unwrap_or_else(PoisonError::into_inner).clone();
        gc::Collector {
            meta: &self.inner.meta,
            content: &self.inner.content,
            snapshots: &self.inner.snapshots,
            in_use: &self.inner.in_use,
            users,
        }
    }

    /// Bytes and inodes used by content and snapshots, and the directory they live on.
    pub fn fs_usage(&self) -> Result<FsUsage, ImageError> {
        let (content_bytes, content_inodes) = self.inner.content.usage()?;
        let snapshots = self.inner.snapshots.usage()?;
        let root = self.inner.content.root();
        Ok(FsUsage {
            mountpoint: root.parent().unwrap_or(root).to_path_buf(),
            bytes: content_bytes + snapshots.bytes,
            inodes: content_inodes + snapshots.inodes,
        })
    }

    /// Where the blob `digest` is stored (present or not).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.content.path(digest)
    }
}

/// Disk used by images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    /// The directory (mountpoint identifier) reported to the kubelet.
    pub mountpoint: PathBuf,
    /// Bytes used.
    pub bytes: u64,
    /// Inodes used.
    pub inodes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_that_cannot_be_a_header_are_refused_by_field() {
        let basic =
            |u: &str, p: &str| Credentials::Basic { username: u.into(), password: p.into() };
        assert!(basic("user", "pa ss:wörd").validate().is_ok());
        assert!(Credentials::RegistryToken("eyJhbGciOi.x-y_z+/=".into()).validate().is_ok());
        let field = |c: Credentials| match c.validate() {
            Err(ImageError::InvalidCredentials { field, .. }) => field,
            other => panic!("{c:?}: {other:?}"),
        };
        assert_eq!(field(basic("us\ner", "p")), "auth.username");
        assert_eq!(field(basic("us:er", "p")), "auth.username");
        assert_eq!(field(basic("user", "p\0")), "auth.password");
        assert_eq!(field(Credentials::RegistryToken("a\nb".into())), "auth.registry_token");
        assert_eq!(field(Credentials::IdentityToken("a\rb".into())), "auth.identity_token");
        assert_eq!(field(Credentials::IdentityToken("\x7f".into())), "auth.identity_token");
        // The secret itself is never part of the message.
        let e = Credentials::RegistryToken("secret\n".into()).validate().unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(e.grpc_class(), ErrorClass::InvalidArgument);
    }
}

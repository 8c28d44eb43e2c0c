//! `ImageError`: everything an image operation can fail with, and the class of each failure
//! (`ErrorClass`) that `crates/cri` turns into a gRPC code.
//!
//! The error is `Clone` (its sources sit behind `Arc`) because one single-flight pull hands
//! the same result to every caller that joined it.

use std::path::PathBuf;
use std::sync::Arc;

use berth_snapshot::SnapshotError;

/// Any error that can sit under an `Unreachable` (transport errors of the HTTP client, I/O).
pub type TransportError = Arc<dyn std::error::Error + Send + Sync>;

/// What went wrong with an image operation. `crates/cri` maps these to gRPC codes through
/// [`ImageError::grpc_class`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    /// The reference does not follow the distribution grammar.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An image ID prefix that more than one image's ID starts with.
    #[error("image ID prefix {prefix:?} is ambiguous: more than one image's ID starts with it")]
    AmbiguousId {
        /// The prefix as given.
        prefix: String,
    },
    /// The request's registry credentials cannot be used (they would not fit an HTTP
    /// header). The value is never echoed.
    #[error("invalid {field}: {reason}")]
    InvalidCredentials {
        /// The CRI field, e.g. `auth.registry_token`.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The registry has no such manifest or blob (HTTP 404, `MANIFEST_UNKNOWN`, ...).
    #[error("image {reference}: {what} not found")]
    NotFound {
        /// The normalised reference being pulled.
        reference: String,
        /// What was missing (`manifest`, `blob sha256:...`).
        what: String,
    },
    /// The registry refused our credentials or wants some (HTTP 401/403).
    #[error("image {reference}: registry {registry} denied access: {message}")]
    Unauthorized {
        /// The normalised reference being pulled.
        reference: String,
        /// The registry host (or mirror) that refused.
        registry: String,
        /// The registry's words.
        message: String,
    },
    /// The registry could not be reached (connection refused, DNS, TLS, timeout).
    #[error("image {reference}: registry {registry} unreachable: {source}")]
    Unreachable {
        /// The normalised reference being pulled.
        reference: String,
        /// The registry host (or mirror) tried last.
        registry: String,
        /// The transport error.
        #[source]
        source: TransportError,
    },
    /// The connection broke off in the middle of a blob.
    #[error(
        "image {reference}: download of {digest} broke off after {received} of {expected} bytes: {source}"
    )]
    Truncated {
        /// The normalised reference being pulled.
        reference: String,
        /// The blob being downloaded.
        digest: String,
        /// Bytes the descriptor announced.
        expected: u64,
        /// Bytes received before the break.
        received: u64,
        /// The transport error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Content did not hash to the digest it was fetched by.
    #[error("image {reference}: content for {digest} has digest {actual}")]
    DigestMismatch {
        /// The normalised reference being pulled.
        reference: String,
        /// The digest asked for.
        digest: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A blob's length differs from its descriptor's size.
    #[error("image {reference}: blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        /// The normalised reference being pulled.
        reference: String,
        /// The blob.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// Bytes received (at least; a download that overruns stops early).
        actual: u64,
    },
    /// A manifest, config or layer of a kind berth does not handle (schema 1 manifests,
    /// foreign/non-distributable layers, artifacts that are not container images).
    #[error("image {reference}: unsupported media type {media_type:?}: {reason}")]
    UnsupportedMediaType {
        /// The normalised reference being pulled.
        reference: String,
        /// The media type found.
        media_type: String,
        /// Why it is refused.
        reason: String,
    },
    /// The image index has no manifest for this host's platform.
    #[error("image {reference}: no manifest for platform {wanted}; the index offers [{available}]")]
    NoMatchingPlatform {
        /// The normalised reference being pulled.
        reference: String,
        /// The platform looked for (`linux/amd64`).
        wanted: String,
        /// The platforms the index lists, comma separated.
        available: String,
    },
    /// A manifest or index that does not parse or contradicts itself.
    #[error("image {reference}: invalid manifest {digest}: {reason}")]
    InvalidManifest {
        /// The normalised reference being pulled.
        reference: String,
        /// The manifest's digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// An image config that does not parse or does not match the manifest.
    #[error("image {reference}: invalid image config {digest}: {reason}")]
    InvalidConfig {
        /// The normalised reference being pulled.
        reference: String,
        /// The config's digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// Any other answer of the registry we cannot act on (5xx, 429, odd 4xx, bad tokens).
    #[error("image {reference}: registry {registry} failed{}: {message}", status.map(|s| format!(" with HTTP {s}")).unwrap_or_default())]
    Registry {
        /// The normalised reference being pulled.
        reference: String,
        /// The registry host (or mirror).
        registry: String,
        /// The HTTP status, when there was one.
        status: Option<u16>,
        /// The registry's words or the client's description.
        message: String,
    },
    /// A mirror endpoint in the configuration is not `http(s)://host[:port]`.
    #[error("invalid mirror endpoint {endpoint:?} for registry {registry}: {reason}")]
    InvalidMirror {
        /// The registry the mirror is for.
        registry: String,
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// Unpacking a layer failed.
    #[error("image {reference}: unpacking layer {digest}: {source}")]
    Unpack {
        /// The normalised reference being pulled.
        reference: String,
        /// The layer blob's digest.
        digest: String,
        /// The snapshotter's error.
        #[source]
        source: Arc<SnapshotError>,
    },
    /// The snapshotter failed outside an unpack (removal, usage).
    #[error("snapshotter: {0}")]
    Snapshot(#[source] Arc<SnapshotError>),
    /// The metadata database failed.
    #[error("image metadata database, {op}: {source}")]
    Db {
        /// What we were doing.
        op: &'static str,
        /// redb's error.
        #[source]
        source: Arc<redb::Error>,
    },
    /// A record in the metadata database does not deserialise.
    #[error("image metadata record {key:?} is corrupt: {source}")]
    CorruptRecord {
        /// The record's key.
        key: String,
        /// The JSON error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// A file system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The task running a pull panicked or was cancelled (a bug, or runtime shutdown).
    #[error("image {reference}: pull task ended abnormally: {message}")]
    PullTask {
        /// The normalised reference being pulled.
        reference: String,
        /// The join error.
        message: String,
    },
}

/// The kind of failure, as a gRPC status code would express it, without gRPC types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The caller sent something malformed.
    InvalidArgument,
    /// The image, manifest or blob does not exist.
    NotFound,
    /// Credentials missing or refused.
    Unauthenticated,
    /// A registry could not be reached or broke off; retrying may help.
    Unavailable,
    /// Content arrived corrupted.
    DataLoss,
    /// The image exists but berth refuses its content (a hostile layer).
    FailedPrecondition,
    /// Anything else.
    Internal,
}

impl ImageError {
    /// The class of this error; `crates/cri` maps it to the gRPC status code.
    pub fn grpc_class(&self) -> ErrorClass {
        match self {
            Self::InvalidReference { .. }
            | Self::InvalidCredentials { .. }
            | Self::AmbiguousId { .. } => ErrorClass::InvalidArgument,
            Self::NotFound { .. } => ErrorClass::NotFound,
            Self::Unauthorized { .. } => ErrorClass::Unauthenticated,
            Self::Unreachable { .. } | Self::Truncated { .. } => ErrorClass::Unavailable,
            // Throttling and server errors are worth a retry, as the kubelet's back-off does.
            Self::Registry { status: Some(s), .. } if *s == 429 || *s >= 500 => {
                ErrorClass::Unavailable
            }
            Self::DigestMismatch { .. } | Self::SizeMismatch { .. } => ErrorClass::DataLoss,
            // A layer berth refuses to unpack (an escape attempt, a device node, an entry
            // type it cannot apply): the image as published is unusable, whoever asks.
            // containerd answers Unknown (a plain error); retrying cannot help until the
            // image changes, which is what FailedPrecondition says.
            Self::Unpack { source, .. }
                if matches!(
                    **source,
                    SnapshotError::UnsafeEntry { .. } | SnapshotError::UnsupportedEntry { .. }
                ) =>
            {
                ErrorClass::FailedPrecondition
            }
            // The uncompressed layer is not what the config's diff ID promised.
            Self::Unpack { source, .. }
                if matches!(**source, SnapshotError::DigestMismatch { .. }) =>
            {
                ErrorClass::DataLoss
            }
            Self::UnsupportedMediaType { .. }
            | Self::NoMatchingPlatform { .. }
            | Self::InvalidManifest { .. }
            | Self::InvalidConfig { .. }
            | Self::Registry { .. }
            | Self::InvalidMirror { .. }
            | Self::Unpack { .. }
            | Self::Snapshot(_)
            | Self::Db { .. }
            | Self::CorruptRecord { .. }
            | Self::Io { .. }
            | Self::PullTask { .. } => ErrorClass::Internal,
        }
    }

    /// An `Io` error for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source: Arc::new(source) }
    }

    /// A `Db` error while doing `op`.
    pub(crate) fn db(op: &'static str, source: impl Into<redb::Error>) -> Self {
        Self::Db { op, source: Arc::new(source.into()) }
    }
}

impl From<SnapshotError> for ImageError {
    fn from(e: SnapshotError) -> Self {
        Self::Snapshot(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_containerd_codes() {
        let r = || "docker.io/library/busybox:latest".to_string();
        assert_eq!(
            ImageError::InvalidReference { reference: r(), reason: "x".into() }.grpc_class(),
            ErrorClass::InvalidArgument
        );
        assert_eq!(
            ImageError::NotFound { reference: r(), what: "manifest".into() }.grpc_class(),
            ErrorClass::NotFound
        );
        assert_eq!(
            ImageError::Registry {
                reference: r(),
                registry: "r".into(),
                status: Some(503),
                message: String::new()
            }
            .grpc_class(),
            ErrorClass::Unavailable
        );
        assert_eq!(
            ImageError::Registry {
                reference: r(),
                registry: "r".into(),
                status: Some(400),
                message: String::new()
            }
            .grpc_class(),
            ErrorClass::Internal
        );
        assert_eq!(
            ImageError::DigestMismatch { reference: r(), digest: "a".into(), actual: "b".into() }
                .grpc_class(),
            ErrorClass::DataLoss
        );
    }

    #[test]
    fn refused_layers_are_failed_precondition_and_bad_layers_data_loss() {
        let unpack = |source: SnapshotError| ImageError::Unpack {
            reference: "r".into(),
            digest: "d".into(),
            source: Arc::new(source),
        };
        let escape = SnapshotError::UnsafeEntry {
            entry: "../x".into(),
            reason: berth_snapshot::UnsafeReason::ParentDirEscape,
        };
        assert_eq!(unpack(escape).grpc_class(), ErrorClass::FailedPrecondition);
        let sparse = SnapshotError::UnsupportedEntry { entry: "s".into(), kind: 'S' };
        assert_eq!(unpack(sparse).grpc_class(), ErrorClass::FailedPrecondition);
        let diff = SnapshotError::DigestMismatch { expected: "a".into(), actual: "b".into() };
        assert_eq!(unpack(diff).grpc_class(), ErrorClass::DataLoss);
        let io = SnapshotError::ReadLayer { blob: "b".into(), source: std::io::Error::other("x") };
        assert_eq!(unpack(io).grpc_class(), ErrorClass::Internal);
    }

    #[test]
    fn messages_name_reference_and_cause() {
        let e = ImageError::Registry {
            reference: "docker.io/library/busybox:latest".into(),
            registry: "docker.io".into(),
            status: Some(500),
            message: "boom".into(),
        };
        assert_eq!(
            e.to_string(),
            "image docker.io/library/busybox:latest: registry docker.io failed with HTTP 500: boom"
        );
    }
}

//! The snapshotter's error type.

use std::io;
use std::path::PathBuf;

/// What went wrong in the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A digest (diff ID) is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    /// A chain ID is not `sha256:<64 lowercase hex>`.
    #[error("invalid chain id {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidChainId(String),
    /// A writable-layer key is empty, too long or holds characters other than
    /// `[A-Za-z0-9_.-]` (or starts with a dot).
    #[error("invalid snapshot key {0:?}")]
    InvalidKey(String),
    /// The layer snapshot does not exist.
    #[error("layer snapshot {0} not found")]
    LayerNotFound(String),
    /// The parent layer named for an unpack is not unpacked yet.
    #[error("parent layer snapshot {0} not found")]
    ParentNotFound(String),
    /// The writable layer does not exist.
    #[error("writable layer {0:?} not found")]
    ActiveNotFound(String),
    /// A writable layer with this key exists already on top of a different image.
    #[error("writable layer {key:?} already exists on top of {existing}, not {requested}")]
    KeyConflict {
        /// The key asked for.
        key: String,
        /// The chain ID the existing writable layer sits on.
        existing: String,
        /// The chain ID asked for.
        requested: String,
    },
    /// Following `parent` files from a layer never reached a bottom layer.
    #[error("layer chain of {0} is deeper than {max} layers (corrupt parent files?)", max = crate::layout::MAX_DEPTH)]
    ChainTooDeep(String),
    /// The uncompressed layer does not hash to its diff ID.
    #[error("layer digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The diff ID the image config promised.
        expected: String,
        /// What the uncompressed tar actually hashes to.
        actual: String,
    },
    /// Reading or decompressing the layer stream failed (corrupt blob, truncated tar...).
    #[error("reading layer {blob}: {source}")]
    ReadLayer {
        /// The blob being unpacked.
        blob: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A tar entry would write outside its layer directory or is not allowed.
    #[error("unsafe tar entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The entry name as found in the tar.
        entry: String,
        /// Why it was refused.
        reason: UnsafeReason,
    },
    /// A tar entry has a type we cannot unpack (e.g. GNU sparse files).
    #[error("unsupported tar entry {entry:?} of type {kind:?}")]
    UnsupportedEntry {
        /// The entry name.
        entry: String,
        /// The raw tar type flag.
        kind: char,
    },
    /// Writing a tar entry to disk failed.
    #[error("unpacking tar entry {entry:?}: {action}: {source}")]
    ApplyEntry {
        /// The entry name.
        entry: String,
        /// The step that failed ("create file", "chown", ...).
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A filesystem operation on the snapshot tree failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Mounting the root filesystem failed.
    #[error("mounting {kind} at {target}: {source}{}", kernel_message(.detail))]
    Mount {
        /// `overlay` or `bind`.
        kind: &'static str,
        /// The mount point.
        target: PathBuf,
        /// Messages the kernel logged on the filesystem context, if any.
        detail: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The overlay option string would exceed a page and the new mount API is missing.
    #[error(
        "overlay mount options for {layers} layers are {len} bytes, over the {max}-byte limit of mount(2)"
    )]
    MountOptionsTooLong {
        /// How many lower layers.
        layers: usize,
        /// Length of the option string.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Unmounting the root filesystem failed.
    #[error("unmounting {target}: {source}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn kernel_message(detail: &str) -> String {
    if detail.is_empty() { String::new() } else { format!(" (kernel: {detail})") }
}

/// Why a tar entry was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafeReason {
    /// The name climbs out of the layer with `..`.
    ParentDirEscape,
    /// The way to the entry goes through a symlink loop (or a chain of more than 40
    /// symlinks). Symlinks never lead outside: absolute targets and `..` resolve inside the
    /// image's root file system.
    SymlinkEscape,
    /// A hard link's target climbs out of the layer with `..`.
    HardlinkOutside,
    /// A hard link's target path goes through a symlink.
    HardlinkThroughSymlink,
    /// A hard link points at the layer root.
    HardlinkToRoot,
    /// The name is not a usable file name (NUL byte, whiteout of `.`/`..`, empty whiteout).
    InvalidName,
    /// A device node, and the snapshotter was told to refuse them.
    DeviceNode,
}

impl std::fmt::Display for UnsafeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ParentDirEscape => "path escapes the layer through '..'",
            Self::SymlinkEscape => "path goes through a symlink loop",
            Self::HardlinkOutside => "hard link target is outside the layer",
            Self::HardlinkThroughSymlink => "hard link target goes through a symlink",
            Self::HardlinkToRoot => "hard link target is the layer root",
            Self::InvalidName => "not a valid file name",
            Self::DeviceNode => "device nodes are not allowed",
        })
    }
}

//! Where things live under the snapshot root, and the names we accept.
//!
//! ```text
//! layers/<chain-id-hex>/fs        the layer's files
//! layers/<chain-id-hex>/parent    chain ID of the layer below (absent for a bottom layer)
//! layers/.tmp-*                   unpacks and removals in progress
//! active/<key>/parent             chain ID the writable layer sits on
//! active/<key>/{upper,work}       overlayfs upper and work dirs (absent when read-only)
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::SnapshotError;
use crate::chain::chain_hex;

/// Deepest layer chain followed (overlayfs itself stacks at most 500 lower layers).
pub(crate) const MAX_DEPTH: usize = 500;
/// Prefix of temporary directories under `layers/`.
pub(crate) const TMP_PREFIX: &str = ".tmp-";
/// Longest writable-layer key accepted (a file name).
const MAX_KEY_LEN: usize = 255;

/// Paths under one snapshot root.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub(crate) fn active(&self) -> PathBuf {
        self.root.join("active")
    }

    /// `layers/<hex>` for a chain ID (checked).
    pub(crate) fn layer(&self, chain_id: &str) -> Result<PathBuf, SnapshotError> {
        Ok(self.layers().join(chain_hex(chain_id)?))
    }

    /// `active/<key>` for a key (checked).
    pub(crate) fn active_dir(&self, key: &str) -> Result<PathBuf, SnapshotError> {
        check_key(key)?;
        Ok(self.active().join(key))
    }

    /// A fresh, unique name `layers/.tmp-<pid>-<nanos>-<n>`; the caller creates it with
    /// `create_dir` (which fails rather than reuse).
    pub(crate) fn temp(&self) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        self.layers().join(format!("{TMP_PREFIX}{}-{nanos}-{n}", std::process::id()))
    }

    /// The chain ID of the layer below `chain_id`, from its `parent` file.
    pub(crate) fn parent_of(&self, chain_id: &str) -> Result<Option<String>, SnapshotError> {
        let path = self.layer(chain_id)?.join("parent");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let parent = text.trim().to_owned();
                chain_hex(&parent)?;
                Ok(Some(parent))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SnapshotError::Io { action: "read", path, source }),
        }
    }

    /// The `fs` dirs of `chain_id` and all layers below it, top-most first (overlayfs'
    /// lowerdir order).
    pub(crate) fn lower_dirs(&self, chain_id: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut next = Some(chain_id.to_owned());
        while let Some(id) = next {
            if out.len() >= MAX_DEPTH {
                return Err(SnapshotError::ChainTooDeep(chain_id.to_owned()));
            }
            let fs = self.layer(&id)?.join("fs");
            if !fs.is_dir() {
                return Err(SnapshotError::LayerNotFound(id));
            }
            out.push(fs);
            next = self.parent_of(&id)?;
        }
        Ok(out)
    }
}

/// Keys become directory names: allow `[A-Za-z0-9_.-]`, no leading dot (no `.`/`..`, no
/// hidden temp names), at most 255 bytes.
pub(crate) fn check_key(key: &str) -> Result<(), SnapshotError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && !key.starts_with('.')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok { Ok(()) } else { Err(SnapshotError::InvalidKey(key.to_owned())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(check_key("abc-123_x.y").is_ok());
        assert!(check_key(&"f".repeat(64)).is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "a\0"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_key(&"a".repeat(256)).is_err());
    }

    #[test]
    fn temp_names_are_unique() {
        let l = Layout::new(PathBuf::from("/x"));
        assert_ne!(l.temp(), l.temp());
        assert!(l.temp().file_name().unwrap().to_string_lossy().starts_with(TMP_PREFIX));
    }
}

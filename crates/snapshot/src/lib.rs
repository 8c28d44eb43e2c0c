//! berth-snapshot: unpacks image layers into directories keyed by chain ID and assembles
//! overlayfs root filesystems for containers on top of them.
//!
//! Layout under the snapshot root (`<berth root>/snapshots`):
//! `layers/<chain-id-hex>/fs` holds one layer's files (OCI whiteouts already turned into
//! overlayfs whiteouts), `layers/<chain-id-hex>/parent` the chain ID of the layer below,
//! `active/<key>/{upper,work}` holds a container's writable layer.
//!
//! A layer is applied onto its parents, as if its tar were extracted onto the root file
//! system they make up: names resolve through the merged view of the layers (symlinks of
//! lower layers included), and a hard link to a lower layer's file copies that file up into
//! the new layer first. Layer tars may end early, as Go's archive/tar allows.
//!
//! Layer tars are untrusted: nothing is written outside the layer directory (`..` and
//! hard-link escapes are refused, see [`UnsafeReason`]; symlinks resolve inside the image's
//! root file system, as in a chroot). Device nodes are allowed by
//! default (berthd runs as root and images such as those with `/dev` entries carry them);
//! [`Snapshotter::allow_device_nodes`] turns them off. There is no copying fallback for
//! hosts without overlayfs yet.
//!
//! Everything here is blocking; async callers use `spawn_blocking`.

// Unsafe code only in the modules allowed by name below.
#![deny(unsafe_code)]

mod apply;
mod beneath;
mod chain;
mod digest;
mod error;
mod layout;
mod lenient;
mod merged;
// unsafe: the new mount API syscalls (fsopen, fsconfig, fsmount).
#[allow(unsafe_code)]
mod overlay;
mod pipe;
mod unpack;
mod usage;
mod whiteout;

#[cfg(test)]
mod tests;

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, info};

pub use chain::chain_ids;
pub use error::{SnapshotError, UnsafeReason};

use apply::Policy;
use chain::{chain_hex, child_chain_id, diff_hex, sha256_hex};
use layout::{Layout, TMP_PREFIX};
use overlay::Overlay;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`, Docker's `rootfs.diff.tar.gzip`).
    Gzip,
    /// zstd (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

/// Bytes and inodes used by a set of snapshots.
///
/// `bytes` counts allocated blocks (`st_blocks * 512`, as `du` does); hard-linked inodes
/// count once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes on disk.
    pub bytes: u64,
    /// Inodes (files, directories, links).
    pub inodes: u64,
}

/// A layer unpacked and verified into a temp dir by [`Snapshotter::prepare_layer`], not yet
/// visible. Dropping it without [`Snapshotter::commit_layer`] removes the temp dir (a crash
/// leaves it for [`Snapshotter::open`] to sweep).
#[derive(Debug)]
pub struct PreparedLayer {
    /// The temp dir; `None` once committed.
    tmp: Option<PathBuf>,
    chain_id: String,
    parent: Option<String>,
}

impl PreparedLayer {
    /// The chain ID the layer will have.
    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }
}

impl Drop for PreparedLayer {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            unpack::remove_quietly(&tmp);
        }
    }
}

/// Layer snapshots and container root filesystems under one directory.
#[derive(Debug)]
pub struct Snapshotter {
    layout: Layout,
    policy: Policy,
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { action, path: path.to_owned(), source }
}

/// Lists the entry names of `dir` (missing dir: none).
fn list(dir: &Path) -> Result<Vec<String>, SnapshotError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

impl Snapshotter {
    /// Opens (creating if needed) the snapshotter rooted at `root` and removes half-finished
    /// unpacks left by a crash.
    ///
    /// Call it once per root at startup: temp dirs of unpacks running right now in another
    /// `Snapshotter` on the same root would be swept too.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SnapshotError> {
        let layout = Layout::new(root.into());
        for dir in [layout.layers(), layout.active()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&dir)
                .map_err(io_err("create", &dir))?;
        }
        let layers = layout.layers();
        for name in list(&layers)? {
            if name.starts_with(TMP_PREFIX) {
                let path = layers.join(&name);
                info!(path = %path.display(), "removing half-finished layer unpack");
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(Self { layout, policy: Policy { allow_device_nodes: true } })
    }

    /// Whether layers may create character and block device nodes (default: yes; FIFOs are
    /// always allowed). With `false`, a layer holding one fails to unpack with
    /// [`UnsafeReason::DeviceNode`].
    pub fn allow_device_nodes(mut self, allow: bool) -> Self {
        self.policy.allow_device_nodes = allow;
        self
    }

    /// The directory this snapshotter lives in.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Whether the layer snapshot `chain_id` exists (fully unpacked).
    pub fn has(&self, chain_id: &str) -> bool {
        // Layer dirs appear by an atomic rename of a finished unpack, so existence is enough.
        self.layout.layer(chain_id).map(|p| p.join("fs").is_dir()).unwrap_or(false)
    }

    /// The chain ID of the layer below `chain_id`, `None` for a bottom layer.
    pub fn parent(&self, chain_id: &str) -> Result<Option<String>, SnapshotError> {
        if !self.has(chain_id) {
            chain_hex(chain_id)?;
            return Err(SnapshotError::LayerNotFound(chain_id.to_owned()));
        }
        self.layout.parent_of(chain_id)
    }

    /// Unpacks the layer blob at `blob` on top of `parent` (chain ID of the layers below, or
    /// `None` for the bottom layer), verifying that the uncompressed tar's sha256 equals
    /// `diff_id`. Returns the new chain ID. Idempotent, and safe to call concurrently for the
    /// same layer: the work happens in a temp dir that is renamed into place.
    pub fn unpack_layer(
        &self,
        parent: Option<&str>,
        diff_id: &str,
        blob: &Path,
        compression: Compression,
    ) -> Result<String, SnapshotError> {
        self.check_unpack(parent, diff_id)?;
        let chain_id = child_chain_id(parent, diff_id);
        if self.has(&chain_id) {
            debug!(%chain_id, "layer already unpacked");
            return Ok(chain_id);
        }
        let reader = unpack::open_blob(blob)?;
        self.unpack_layer_from_reader(parent, diff_id, blob, reader, compression)
    }

    /// [`Snapshotter::unpack_layer`] from a byte stream instead of a file: `reader` yields the
    /// (compressed) layer blob, `origin` names it in error messages. `parent` must exist.
    /// Unpacks even if the layer exists already (the caller has the stream in hand; the
    /// final rename then keeps the existing copy).
    pub fn unpack_layer_from_reader(
        &self,
        parent: Option<&str>,
        diff_id: &str,
        origin: &Path,
        reader: impl Read + Send,
        compression: Compression,
    ) -> Result<String, SnapshotError> {
        self.check_unpack(parent, diff_id)?;
        let prepared = self.prepare_layer(parent, diff_id, origin, reader, compression)?;
        self.commit_layer(prepared)
    }

    /// The first half of an unpack, for pipelines that unpack a layer while its bytes are
    /// still arriving: unpacks `reader` into a temp dir on top of `parent` (which must be in
    /// place: a layer's names resolve through the layers below it) and verifies `diff_id`,
    /// but does not make the layer visible. [`Snapshotter::commit_layer`] does, once the
    /// caller has checked whatever else it must (the compressed digest); dropping the
    /// [`PreparedLayer`] instead removes it.
    pub fn prepare_layer(
        &self,
        parent: Option<&str>,
        diff_id: &str,
        origin: &Path,
        reader: impl Read + Send,
        compression: Compression,
    ) -> Result<PreparedLayer, SnapshotError> {
        self.check_unpack(parent, diff_id)?;
        let lowers = match parent {
            Some(p) => self.layout.lower_dirs(p)?,
            None => Vec::new(),
        };
        let chain_id = child_chain_id(parent, diff_id);
        let started = std::time::Instant::now();
        let tmp = unpack::prepare(
            &self.layout,
            parent,
            &lowers,
            diff_id,
            origin,
            reader,
            compression,
            self.policy,
        )?;
        debug!(%chain_id, %diff_id, elapsed_ms = started.elapsed().as_millis() as u64, "layer prepared");
        Ok(PreparedLayer { tmp: Some(tmp), chain_id, parent: parent.map(str::to_owned) })
    }

    /// Puts a prepared layer in place and returns its chain ID. Its parent must still exist
    /// ([`SnapshotError::ParentNotFound`] otherwise, and the layer is removed).
    pub fn commit_layer(&self, mut layer: PreparedLayer) -> Result<String, SnapshotError> {
        if let Some(p) = &layer.parent
            && !self.has(p)
        {
            return Err(SnapshotError::ParentNotFound(p.clone()));
        }
        let Some(tmp) = layer.tmp.take() else {
            return Ok(layer.chain_id.clone());
        };
        let result = unpack::commit(&self.layout, &layer.chain_id, &tmp);
        if result.is_err() {
            unpack::remove_quietly(&tmp);
        }
        result?;
        info!(chain_id = %layer.chain_id, "layer unpacked");
        Ok(layer.chain_id.clone())
    }

    /// Checks the arguments of an unpack whose parent must exist now.
    fn check_unpack(&self, parent: Option<&str>, diff_id: &str) -> Result<(), SnapshotError> {
        diff_hex(diff_id)?;
        if let Some(p) = parent {
            chain_hex(p)?;
            if !self.has(p) {
                return Err(SnapshotError::ParentNotFound(p.to_owned()));
            }
        }
        Ok(())
    }

    /// Removes the layer snapshot `chain_id` (callers make sure no image or container uses
    /// it). Removing a missing snapshot is not an error.
    pub fn remove(&self, chain_id: &str) -> Result<(), SnapshotError> {
        let dir = self.layout.layer(chain_id)?;
        // Rename first so `has` never sees a half-removed layer; a crash leaves a temp dir
        // that `open` sweeps.
        let trash = self.layout.temp();
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("remove", &dir)(e)),
        }
        fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))
    }

    /// Bytes and inodes of one layer snapshot.
    pub fn layer_usage(&self, chain_id: &str) -> Result<Usage, SnapshotError> {
        let dir = self.layout.layer(chain_id)?;
        if !self.has(chain_id) {
            return Err(SnapshotError::LayerNotFound(chain_id.to_owned()));
        }
        usage::disk_usage(&dir.join("fs"))
    }

    /// Bytes and inodes of everything under the snapshot root (for `ImageFsInfo`).
    pub fn usage(&self) -> Result<Usage, SnapshotError> {
        usage::disk_usage(self.layout.root())
    }

    /// Mounts an overlay root filesystem at `target`: the layers of `chain_id` (and its
    /// parents) as lower dirs, a fresh writable layer `active/<key>` as upper (none when
    /// `readonly`). `target` must exist.
    ///
    /// An existing writable layer `key` on the same `chain_id` is reused with its contents
    /// (remounting after a host reboot); on another chain ID it is [`SnapshotError::KeyConflict`].
    pub fn prepare_rootfs(
        &self,
        key: &str,
        chain_id: &str,
        target: &Path,
        readonly: bool,
    ) -> Result<(), SnapshotError> {
        let active = self.layout.active_dir(key)?;
        chain_hex(chain_id)?;
        let lowers = self.layout.lower_dirs(chain_id)?;
        let parent_file = active.join("parent");
        let created = match fs::read_to_string(&parent_file) {
            Ok(existing) if existing.trim() == chain_id => false,
            Ok(existing) => {
                return Err(SnapshotError::KeyConflict {
                    key: key.to_owned(),
                    existing: existing.trim().to_owned(),
                    requested: chain_id.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o711)
                    .create(&active)
                    .map_err(io_err("create", &active))?;
                fs::write(&parent_file, chain_id).map_err(io_err("write", &parent_file))?;
                true
            }
            Err(e) => return Err(io_err("read", &parent_file)(e)),
        };
        let result = self.mount_rootfs(&active, &lowers, target, readonly);
        if result.is_err() && created {
            unpack::remove_quietly(&active);
        }
        result
    }

    fn mount_rootfs(
        &self,
        active: &Path,
        lowers: &[PathBuf],
        target: &Path,
        readonly: bool,
    ) -> Result<(), SnapshotError> {
        if readonly {
            return match lowers {
                [single] => overlay::bind_readonly(single, target),
                _ => overlay::mount_overlay(&Overlay { lowers, upper: None }, target),
            };
        }
        let upper = active.join("upper");
        let work = active.join("work");
        if !upper.is_dir() {
            fs::create_dir(&upper).map_err(io_err("create", &upper))?;
            // The merged root takes the upper dir's owner and mode: copy the image's.
            if let Some(top) = lowers.first() {
                let meta = fs::metadata(top).map_err(io_err("stat", top))?;
                std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))
                    .map_err(io_err("chown", &upper))?;
                fs::set_permissions(&upper, fs::Permissions::from_mode(meta.mode() & 0o7777))
                    .map_err(io_err("chmod", &upper))?;
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&work)
            .map_err(io_err("create", &work))?;
        // A volatile mount leaves this marker, and overlayfs refuses to mount the layer
        // again while it exists. Reusing a layer (see `prepare_rootfs`) accepts that its
        // unsynced writes may be lost after a host crash.
        let marker = work.join("work/incompat/volatile");
        if let Err(e) = fs::remove_dir_all(&marker)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(io_err("remove", &marker)(e));
        }
        overlay::mount_overlay(&Overlay { lowers, upper: Some((&upper, &work)) }, target)
    }

    /// Unmounts `target` (if mounted) and removes the writable layer `key`. Idempotent.
    pub fn remove_rootfs(&self, key: &str, target: &Path) -> Result<(), SnapshotError> {
        let active = self.layout.active_dir(key)?;
        overlay::unmount_all(target)?;
        match fs::remove_dir_all(&active) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &active)(e)),
        }
    }

    /// Bytes and inodes of the writable layer `key` (container stats). A read-only rootfs
    /// has no writable layer and uses nothing.
    pub fn rootfs_usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let active = self.layout.active_dir(key)?;
        if !active.is_dir() {
            return Err(SnapshotError::ActiveNotFound(key.to_owned()));
        }
        usage::disk_usage(&active.join("upper"))
    }

    /// Keys of all writable layers present (for startup repair).
    pub fn active_keys(&self) -> Result<Vec<String>, SnapshotError> {
        Ok(list(&self.layout.active())?
            .into_iter()
            .filter(|k| layout::check_key(k).is_ok())
            .collect())
    }

    /// Chain IDs of all layer snapshots present (for garbage collection).
    pub fn layer_ids(&self) -> Result<Vec<String>, SnapshotError> {
        Ok(list(&self.layout.layers())?
            .into_iter()
            .map(|hex| format!("sha256:{hex}"))
            .filter(|id| sha256_hex(id).is_some())
            .collect())
    }
}

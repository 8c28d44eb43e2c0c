//! Garbage collection of blobs and layer snapshots no image uses any more.
//!
//! What is kept: every blob listed in a remaining image record, every chain ID among
//! `chain_ids(diff_ids)` of a remaining image (layers are shared between images), whatever a
//! pull in progress has announced (its [`Protection`]), and snapshots a container still
//! builds on (asked through [`SnapshotUsers`]). GC holds the protection lock from deciding to
//! deleting, so a pull cannot start using a blob in between.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use berth_snapshot::{Snapshotter, chain_ids};

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::error::ImageError;
use crate::meta::{ImageRecord, MetaStore};

/// Tells GC whether a layer snapshot is still under a container's root filesystem.
/// The runtime implements this; without one, every snapshot no image uses is removed.
pub trait SnapshotUsers: Send + Sync {
    /// Whether `chain_id` (`sha256:...`) is a lower layer of some container.
    fn in_use(&self, chain_id: &str) -> bool;
}

/// What a GC run removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs deleted.
    pub blobs: usize,
    /// Layer snapshots removed.
    pub snapshots: usize,
}

/// Blobs and chain IDs that pulls in progress use, counted (two pulls may share one).
#[derive(Debug, Default)]
pub struct InUse {
    blobs: HashMap<String, usize>,
    chains: HashMap<String, usize>,
}

/// The shared in-progress set.
pub type SharedInUse = Arc<Mutex<InUse>>;

fn lock(in_use: &Mutex<InUse>) -> MutexGuard<'_, InUse> {
    // A panic while holding the lock leaves plain counters behind; they stay usable.
    in_use.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One pull's claim on blobs and chains; released when dropped.
pub struct Protection {
    in_use: SharedInUse,
    blobs: Vec<String>,
    chains: Vec<String>,
}

impl Protection {
    /// An empty claim on `in_use`.
    pub fn new(in_use: SharedInUse) -> Self {
        Self { in_use, blobs: Vec::new(), chains: Vec::new() }
    }

    /// Claims blobs. Waits while a GC run is deleting.
    pub fn blobs<'a>(&mut self, digests: impl IntoIterator<Item = &'a Digest>) {
        let mut in_use = lock(&self.in_use);
        for digest in digests {
            *in_use.blobs.entry(digest.to_string()).or_default() += 1;
            self.blobs.push(digest.to_string());
        }
    }

    /// Claims layer snapshots.
    pub fn chains(&mut self, chains: &[String]) {
        let mut in_use = lock(&self.in_use);
        for chain in chains {
            *in_use.chains.entry(chain_key(chain).to_string()).or_default() += 1;
            self.chains.push(chain_key(chain).to_string());
        }
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        let mut in_use = lock(&self.in_use);
        let InUse { blobs, chains } = &mut *in_use;
        for (map, keys) in [(blobs, &self.blobs), (chains, &self.chains)] {
            for key in keys {
                if let Some(count) = map.get_mut(key) {
                    *count -= 1;
                    if *count == 0 {
                        map.remove(key);
                    }
                }
            }
        }
    }
}

/// Chain IDs compare by hex, whatever prefix the snapshotter reports them with.
fn chain_key(chain: &str) -> &str {
    chain.strip_prefix("sha256:").unwrap_or(chain)
}

/// Everything GC needs.
pub struct Collector<'a> {
    /// Image records.
    pub meta: &'a MetaStore,
    /// Blobs.
    pub content: &'a ContentStore,
    /// Layer snapshots.
    pub snapshots: &'a Snapshotter,
    /// Pulls in progress.
    pub in_use: &'a Mutex<InUse>,
    /// Containers' layers.
    pub users: Option<Arc<dyn SnapshotUsers>>,
}

impl Collector<'_> {
    /// Deletes what `removed` owned and no remaining image or pull uses; snapshots top first.
    pub fn after_remove(&self, removed: &ImageRecord) -> Result<GcStats, ImageError> {
        let mut chains = chain_ids(&removed.image.diff_ids);
        chains.reverse();
        let blobs = removed.blobs.iter().filter_map(|b| Digest::parse(b).ok()).collect();
        self.collect(blobs, chains)
    }

    /// Deletes every blob and snapshot no image, pull or container uses (repair after a
    /// crash between removing a record and collecting its garbage).
    pub fn sweep(&self) -> Result<GcStats, ImageError> {
        let blobs = self.content.list()?;
        let chains = self.snapshots.layer_ids()?;
        self.collect(blobs, chains)
    }

    fn collect(&self, blobs: Vec<Digest>, chains: Vec<String>) -> Result<GcStats, ImageError> {
        let in_use = lock(self.in_use);
        let mut keep_blobs: HashSet<String> = in_use.blobs.keys().cloned().collect();
        let mut keep_chains: HashSet<String> = in_use.chains.keys().cloned().collect();
        for record in self.meta.list()? {
            keep_blobs.extend(record.blobs.iter().cloned());
            keep_chains
                .extend(chain_ids(&record.image.diff_ids).iter().map(|c| chain_key(c).to_string()));
        }
        let mut stats = GcStats::default();
        for digest in blobs {
            if !keep_blobs.contains(digest.as_str()) && self.content.delete(&digest)? {
                tracing::debug!(%digest, "blob collected");
                stats.blobs += 1;
            }
        }
        for chain in chains {
            if keep_chains.contains(chain_key(&chain)) {
                continue;
            }
            if self.users.as_ref().is_some_and(|u| u.in_use(&chain)) {
                tracing::debug!(%chain, "snapshot kept: a container uses it");
                continue;
            }
            self.snapshots.remove(&chain)?;
            tracing::debug!(%chain, "snapshot collected");
            stats.snapshots += 1;
        }
        drop(in_use);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_counts_and_releases() {
        let in_use: SharedInUse = Arc::default();
        let d = Digest::of(b"x");
        let mut a = Protection::new(in_use.clone());
        let mut b = Protection::new(in_use.clone());
        a.blobs([&d]);
        b.blobs([&d]);
        a.chains(&["sha256:abc".to_string()]);
        assert_eq!(lock(&in_use).blobs.get(d.as_str()), Some(&2));
        assert_eq!(lock(&in_use).chains.get("abc"), Some(&1));
        drop(a);
        assert_eq!(lock(&in_use).blobs.get(d.as_str()), Some(&1));
        assert!(lock(&in_use).chains.is_empty());
        drop(b);
        assert!(lock(&in_use).blobs.is_empty());
    }
}

//! The content-addressed blob store: `blobs/sha256/<hex>` under the content directory.
//!
//! A blob is streamed into `ingest/<unique>` while it is hashed and counted, checked against
//! its descriptor's digest and size, fsynced, and only then renamed into place, so a blob that
//! exists is always complete and correct. Two downloads of one digest racing each other are
//! harmless: each writes its own temp file and the renames put identical bytes in place.
//! An [`Ingest`] dropped before [`Ingest::commit`] (error, cancelled task) removes its temp
//! file; whatever a crash leaves in `ingest/` is removed by [`ContentStore::open`].

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncWriteExt, BufWriter};

use crate::digest::{Digest, Hasher};
use crate::error::ImageError;

/// Sequence for unique ingest file names within this process.
static INGEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// Buffer between the network and the temp file, so a write is not one syscall per chunk.
const WRITE_BUFFER: usize = 1 << 20;

/// Blobs on disk, by digest.
#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    /// Opens (creating) the store under `root` and removes temp files a crash left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        let blobs = root.join("blobs").join("sha256");
        let ingest = root.join("ingest");
        for dir in [&blobs, &ingest] {
            std::fs::create_dir_all(dir).map_err(|e| ImageError::io(dir, e))?;
        }
        let entries = std::fs::read_dir(&ingest).map_err(|e| ImageError::io(&ingest, e))?;
        for entry in entries {
            let path = entry.map_err(|e| ImageError::io(&ingest, e))?.path();
            tracing::info!(path = %path.display(), "removing half-written blob");
            remove_file_if_exists(&path)?;
        }
        Ok(Self { root, blobs, ingest })
    }

    /// The content directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether the blob is present (present blobs are always complete and verified).
    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The blob's bytes.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.path(digest);
        std::fs::read(&path).map_err(|e| ImageError::io(path, e))
    }

    /// Starts writing the blob `digest` of `size` bytes, fetched for `reference`.
    pub async fn begin(
        &self,
        reference: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<Ingest, ImageError> {
        let name = format!(
            "{}-{}-{}",
            std::process::id(),
            INGEST_SEQ.fetch_add(1, Ordering::Relaxed),
            digest.hex()
        );
        let temp = self.ingest.join(name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(|e| ImageError::io(&temp, e))?;
        Ok(Ingest {
            reference: reference.to_string(),
            digest: digest.clone(),
            expected: size,
            temp,
            target: self.path(digest),
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            hasher: Hasher::new(),
            written: 0,
            verified: false,
            committed: false,
        })
    }

    /// Writes a small blob held in memory (manifests), verified like a streamed one.
    pub async fn write_bytes(
        &self,
        reference: &str,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        let mut ingest = self.begin(reference, digest, bytes.len() as u64).await?;
        ingest.write(bytes).await?;
        ingest.commit().await
    }

    /// Deletes the blob; `Ok(false)` if it was not there.
    pub fn delete(&self, digest: &Digest) -> Result<bool, ImageError> {
        remove_file_if_exists(&self.path(digest))
    }

    /// Digests of every blob present (names that are not digests are ignored).
    pub fn list(&self) -> Result<Vec<Digest>, ImageError> {
        let entries = std::fs::read_dir(&self.blobs).map_err(|e| ImageError::io(&self.blobs, e))?;
        let mut digests = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io(&self.blobs, e))?;
            if let Some(name) = entry.file_name().to_str()
                && let Ok(digest) = Digest::parse(&format!("sha256:{name}"))
            {
                digests.push(digest);
            }
        }
        Ok(digests)
    }

    /// Bytes on disk (allocated blocks) and inodes of the whole content directory.
    pub fn usage(&self) -> Result<(u64, u64), ImageError> {
        let mut bytes = 0;
        let mut inodes = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                // A directory removed under us is no usage.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::io(&dir, e)),
            };
            let meta = std::fs::symlink_metadata(&dir).map_err(|e| ImageError::io(&dir, e))?;
            bytes += meta.blocks() * 512;
            inodes += 1;
            for entry in entries {
                let entry = entry.map_err(|e| ImageError::io(&dir, e))?;
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(ImageError::io(entry.path(), e)),
                };
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    bytes += meta.blocks() * 512;
                    inodes += 1;
                }
            }
        }
        Ok((bytes, inodes))
    }
}

/// A blob being written. Dropping it without [`Ingest::commit`] removes the temp file.
#[derive(Debug)]
pub struct Ingest {
    reference: String,
    digest: Digest,
    expected: u64,
    temp: PathBuf,
    target: PathBuf,
    file: BufWriter<tokio::fs::File>,
    hasher: Hasher,
    written: u64,
    /// [`Ingest::verify`] succeeded (the hasher is spent).
    verified: bool,
    committed: bool,
}

impl Ingest {
    /// Appends `chunk`. Fails with `SizeMismatch` as soon as the blob outgrows its size,
    /// so a misbehaving server cannot fill the disk.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        let written = self.written + chunk.len() as u64;
        if written > self.expected {
            return Err(ImageError::SizeMismatch {
                reference: self.reference.clone(),
                digest: self.digest.to_string(),
                expected: self.expected,
                actual: written,
            });
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).await.map_err(|e| ImageError::io(&self.temp, e))?;
        self.written = written;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The size the blob must have.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Verifies size and digest and fsyncs, without putting the blob in place yet (a
    /// streamed pull does this while the layer's unpack finishes, and renames only once
    /// both check out). Calling it again after success does nothing.
    pub async fn verify(&mut self) -> Result<(), ImageError> {
        if self.verified {
            return Ok(());
        }
        if self.written != self.expected {
            return Err(ImageError::SizeMismatch {
                reference: self.reference.clone(),
                digest: self.digest.to_string(),
                expected: self.expected,
                actual: self.written,
            });
        }
        let actual = Digest::from_hasher(std::mem::replace(&mut self.hasher, Hasher::new()));
        if actual != self.digest {
            return Err(ImageError::DigestMismatch {
                reference: self.reference.clone(),
                digest: self.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        self.file.flush().await.map_err(|e| ImageError::io(&self.temp, e))?;
        self.file.get_ref().sync_all().await.map_err(|e| ImageError::io(&self.temp, e))?;
        self.verified = true;
        Ok(())
    }

    /// Verifies size and digest, fsyncs, and renames the blob into place.
    pub async fn commit(mut self) -> Result<(), ImageError> {
        self.verify().await?;
        tokio::fs::rename(&self.temp, &self.target)
            .await
            .map_err(|e| ImageError::io(&self.target, e))?;
        self.committed = true;
        // Make the rename itself durable.
        if let Some(dir) = self.target.parent() {
            let dir = dir.to_path_buf();
            let synced = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| (dir, e))
            })
            .await;
            if let Ok(Err((dir, e))) = synced {
                return Err(ImageError::io(dir, e));
            }
        }
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = std::fs::remove_file(&self.temp)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(path = %self.temp.display(), error = %e, "cannot remove temp blob");
        }
    }
}

/// Removes `path`; `Ok(false)` if it did not exist.
fn remove_file_if_exists(path: &Path) -> Result<bool, ImageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ImageError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest_is_empty(store: &ContentStore) -> bool {
        std::fs::read_dir(store.root().join("ingest")).unwrap().next().is_none()
    }

    #[tokio::test]
    async fn write_verify_rename() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path().join("content")).unwrap();
        let data = b"hello blob".repeat(1000);
        let digest = Digest::of(&data);
        assert!(!store.has(&digest));
        let mut ingest = store.begin("ref", &digest, data.len() as u64).await.unwrap();
        for chunk in data.chunks(333) {
            ingest.write(chunk).await.unwrap();
        }
        assert_eq!(ingest.written(), data.len() as u64);
        ingest.commit().await.unwrap();
        assert!(store.has(&digest));
        assert_eq!(store.read(&digest).unwrap(), data);
        assert_eq!(store.path(&digest), dir.path().join("content/blobs/sha256").join(digest.hex()));
        assert_eq!(store.list().unwrap(), vec![digest.clone()]);
        assert!(ingest_is_empty(&store));
        let (bytes, inodes) = store.usage().unwrap();
        assert!(bytes >= data.len() as u64);
        // content, blobs, blobs/sha256, ingest, the blob.
        assert_eq!(inodes, 5);
        assert!(store.delete(&digest).unwrap());
        assert!(!store.delete(&digest).unwrap());
        assert!(!store.has(&digest));
    }

    #[tokio::test]
    async fn digest_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"expected");
        let mut ingest = store.begin("ref", &digest, 8).await.unwrap();
        ingest.write(b"xpected!").await.unwrap();
        let err = ingest.commit().await.unwrap_err();
        assert!(
            matches!(err, ImageError::DigestMismatch { ref actual, .. } if *actual == Digest::of(b"xpected!").to_string()),
            "{err}"
        );
        assert!(!store.has(&digest));
        assert!(ingest_is_empty(&store));
    }

    #[tokio::test]
    async fn short_and_long_bodies_are_size_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"12345");
        let mut ingest = store.begin("ref", &digest, 5).await.unwrap();
        ingest.write(b"123").await.unwrap();
        let err = ingest.commit().await.unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { expected: 5, actual: 3, .. }), "{err}");
        let mut ingest = store.begin("ref", &digest, 5).await.unwrap();
        ingest.write(b"123").await.unwrap();
        let err = ingest.write(b"456").await.unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { expected: 5, actual: 6, .. }), "{err}");
        drop(ingest);
        assert!(ingest_is_empty(&store));
        assert!(!store.has(&digest));
    }

    #[tokio::test]
    async fn dropped_ingest_is_removed_and_open_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"abc");
        let mut ingest = store.begin("ref", &digest, 3).await.unwrap();
        ingest.write(b"ab").await.unwrap();
        drop(ingest);
        assert!(ingest_is_empty(&store));
        std::fs::write(dir.path().join("ingest/crashed"), b"half").unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        assert!(ingest_is_empty(&store));
    }

    #[tokio::test]
    async fn concurrent_writes_of_one_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ContentStore::open(dir.path()).unwrap());
        let data = vec![7u8; 300_000];
        let digest = Digest::of(&data);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (store, data, digest) = (store.clone(), data.clone(), digest.clone());
            tasks.push(tokio::spawn(async move { store.write_bytes("ref", &digest, &data).await }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(store.read(&digest).unwrap(), data);
        assert!(ingest_is_empty(&store));
    }
}

//! Pull orchestration: resolve the reference, pick the platform manifest, fetch the config,
//! download layers concurrently while unpacking them in order (each onto the ones below),
//! record the image.
//!
//! Single flight: a pull runs in its own task, keyed by normalised reference and
//! credentials; every caller asking for the same key while it runs awaits the same result.
//! Because the pull is a task of its own, it finishes even if the kubelet gives up on its
//! request, and the kubelet's retry then finds the image (or joins the pull still running).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use berth_snapshot::{Compression, PreparedLayer, chain_ids};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::digest::Digest;
use crate::error::ImageError;
use crate::gc::Protection;
use crate::manifest::{self, Manifest, PlatformSpec};
use crate::meta::ImageRecord;
use crate::platform;
use crate::reference::ImageReference;
use crate::registry::{self, Session};
use crate::tee;
use crate::{Credentials, Image, Inner};

/// What one pull cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullStats {
    /// Bytes fetched from the registry (manifests, config, layers not already present).
    pub bytes_downloaded: u64,
    /// Wall time of the pull.
    pub duration: Duration,
    /// This caller joined a pull another caller had started (its bytes are counted there).
    pub joined: bool,
}

type PullResult = Result<(Image, PullStats), ImageError>;

/// Pulls in progress, by key, with a generation number so a finished pull removes only its
/// own entry.
pub(crate) type PullMap = Mutex<HashMap<PullKey, (u64, Shared<BoxFuture<'static, PullResult>>)>>;

/// Generation numbers for [`PullMap`] entries.
static PULL_GENERATION: AtomicU64 = AtomicU64::new(0);

/// What makes two pulls the same pull. Credentials are part of it: a pull that fails for
/// lack of credentials must not answer a caller that has them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PullKey {
    reference: String,
    credentials: Option<Credentials>,
}

/// Removes a pull's map entry when its task ends, however it ends.
struct Deregister {
    inner: Arc<Inner>,
    key: PullKey,
    generation: u64,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        let mut pulls = self.inner.pulls.lock().unwrap_or_else(PoisonError::into_inner);
        if pulls.get(&self.key).is_some_and(|(g, _)| *g == self.generation) {
            pulls.remove(&self.key);
        }
    }
}

/// Pulls `reference`, joining a pull of the same key already running.
pub(crate) async fn pull_shared(
    inner: &Arc<Inner>,
    reference: &str,
    credentials: Option<Credentials>,
) -> PullResult {
    let image = ImageReference::parse(reference)?;
    if let Some(credentials) = &credentials {
        credentials.validate()?;
    }
    let key = PullKey { reference: image.to_string(), credentials: credentials.clone() };
    let (shared, joined) = {
        let mut pulls = inner.pulls.lock().unwrap_or_else(PoisonError::into_inner);
        match pulls.get(&key) {
            Some((_, shared)) => (shared.clone(), true),
            None => {
                let generation = PULL_GENERATION.fetch_add(1, Ordering::Relaxed);
                let deregister = Deregister { inner: inner.clone(), key: key.clone(), generation };
                let task_inner = inner.clone();
                let name = image.to_string();
                let handle = tokio::spawn(async move {
                    let _deregister = deregister;
                    pull(task_inner, image, credentials).await
                });
                let shared = async move {
                    handle.await.unwrap_or_else(|e| {
                        Err(ImageError::PullTask { reference: name, message: e.to_string() })
                    })
                }
                .boxed()
                .shared();
                pulls.insert(key, (generation, shared.clone()));
                (shared, false)
            }
        }
    };
    let (image, mut stats) = shared.await?;
    stats.joined = joined;
    Ok((image, stats))
}

/// Aborts layer downloads still running when the pull fails early.
struct AbortOnDrop(Vec<JoinHandle<Result<Fetched, ImageError>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One layer to fetch and unpack.
struct Layer {
    digest: Digest,
    size: u64,
    compression: Compression,
}

/// The pull itself.
async fn pull(
    inner: Arc<Inner>,
    image: ImageReference,
    credentials: Option<Credentials>,
) -> PullResult {
    let started = Instant::now();
    let reference = image.to_string();
    tracing::info!(%reference, "pulling image");
    let auth = registry::registry_auth(credentials.as_ref());
    let (session, top_body, top_digest) =
        registry::resolve(&inner.registries, &image, &auth).await?;
    let mut downloaded = top_body.len() as u64;
    let mut protection = Protection::new(inner.in_use.clone());
    protection.blobs([&top_digest]);
    let mut blobs = vec![top_digest.clone()];
    store_small(&inner, &reference, &top_digest, &top_body).await?;

    let (manifest_digest, image_manifest) =
        match manifest::parse_manifest(&reference, &top_digest, &top_body)? {
            Manifest::Image(m) => (top_digest.clone(), m),
            Manifest::Index(index) => {
                let Some(entry) = platform::select(&index, &inner.platform) else {
                    return Err(ImageError::NoMatchingPlatform {
                        reference,
                        wanted: inner.platform.to_string(),
                        available: platform::available(&index),
                    });
                };
                let (digest, _) = manifest::checked(&reference, &top_digest, entry)?;
                protection.blobs([&digest]);
                blobs.push(digest.clone());
                let body = if inner.content.has(&digest) {
                    inner.content.read(&digest)?
                } else {
                    let (body, _) = session.fetch_manifest(None, Some(&digest)).await?;
                    downloaded += body.len() as u64;
                    store_small(&inner, &reference, &digest, &body).await?;
                    body.to_vec()
                };
                match manifest::parse_manifest(&reference, &digest, &body)? {
                    Manifest::Image(m) => (digest, m),
                    Manifest::Index(_) => {
                        return Err(ImageError::UnsupportedMediaType {
                            reference,
                            media_type: entry.media_type.clone(),
                            reason: "an index inside an index is not supported".into(),
                        });
                    }
                }
            }
        };

    // Check everything the manifest promises before downloading anything big.
    manifest::check_config_type(&reference, &image_manifest.config)?;
    let (config_digest, config_size) =
        manifest::checked(&reference, &manifest_digest, &image_manifest.config)?;
    let mut layers = Vec::with_capacity(image_manifest.layers.len());
    for descriptor in &image_manifest.layers {
        let compression = manifest::layer_compression(&reference, &descriptor.media_type)?;
        let (digest, size) = manifest::checked(&reference, &manifest_digest, descriptor)?;
        layers.push(Layer { digest, size, compression });
    }
    protection.blobs(std::iter::once(&config_digest).chain(layers.iter().map(|l| &l.digest)));
    blobs.push(config_digest.clone());
    blobs.extend(layers.iter().map(|l| l.digest.clone()));

    downloaded += session.fetch_blob(&inner.content, &config_digest, config_size).await?;
    let config_bytes = inner.content.read(&config_digest)?;
    let config = manifest::parse_config(&reference, &config_digest, &config_bytes, layers.len())?;
    check_config_platform(&inner, &reference, &config)?;
    let diff_ids = config.rootfs.diff_ids.clone();
    let chains = chain_ids(&diff_ids);
    protection.chains(&chains);

    downloaded +=
        fetch_and_unpack(&inner, &session, &reference, &layers, &diff_ids, &chains).await?;

    let config_json = String::from_utf8(config_bytes).map_err(|_| ImageError::InvalidConfig {
        reference: reference.clone(),
        digest: config_digest.to_string(),
        reason: "not UTF-8".into(),
    })?;
    let record = ImageRecord {
        image: Image {
            id: config_digest.to_string(),
            repo_tags: Vec::new(),
            repo_digests: Vec::new(),
            size: layers.iter().map(|l| l.size).sum::<u64>() + config_size,
            config_json,
            diff_ids,
            chain_id: chains.last().cloned().unwrap_or_default(),
            user: config.config.and_then(|c| c.user).filter(|u| !u.is_empty()),
            pinned: false,
        },
        manifest_digest: manifest_digest.to_string(),
        blobs: dedup(blobs.iter().map(Digest::to_string)),
    };
    // Pulled by tag: name:tag and name@digest; by digest: name@digest; by both: both.
    let mut names: Vec<String> = image.tagged_name().into_iter().collect();
    names.push(image.digested_name(&top_digest));
    let meta = inner.meta.clone();
    let stored =
        tokio::task::spawn_blocking(move || meta.record_pull(record, &names)).await.map_err(
            |e| ImageError::PullTask { reference: reference.clone(), message: e.to_string() },
        )??;
    drop(protection);

    let stats =
        PullStats { bytes_downloaded: downloaded, duration: started.elapsed(), joined: false };
    tracing::info!(
        %reference, id = %stored.image.id, bytes_downloaded = stats.bytes_downloaded,
        duration_ms = stats.duration.as_millis() as u64, "image pulled"
    );
    Ok((stored.image, stats))
}

/// Downloads and unpacks the layers, at most `max_downloads` downloads at once, and puts
/// the unpacked layers in place bottom up. A layer is applied onto the layers below it (its
/// names resolve through them), so it is unpacked only once they are in place: while it
/// downloads if they are by then (see [`fetch_layer`]), from the stored blob otherwise.
/// Returns the bytes downloaded.
async fn fetch_and_unpack(
    inner: &Arc<Inner>,
    session: &Session,
    reference: &str,
    layers: &[Layer],
    diff_ids: &[String],
    chains: &[String],
) -> Result<u64, ImageError> {
    let semaphore = Arc::new(Semaphore::new(inner.max_downloads));
    let mut tasks = AbortOnDrop(Vec::with_capacity(layers.len()));
    // `in_place[i]` turns true once layer i is in place; layer i + 1 waits for it.
    let mut in_place = Vec::with_capacity(layers.len());
    let mut below: Option<watch::Receiver<bool>> = None;
    for (i, layer) in layers.iter().enumerate() {
        let (inner, session, semaphore) = (inner.clone(), session.clone(), semaphore.clone());
        let (placed, placed_rx) = watch::channel(false);
        in_place.push(placed);
        let job = LayerJob {
            reference: reference.to_string(),
            digest: layer.digest.clone(),
            size: layer.size,
            compression: layer.compression,
            diff_id: diff_ids[i].clone(),
            chain: chains[i].clone(),
            parent: i.checked_sub(1).map(|below| chains[below].clone()),
            parent_placed: below.replace(placed_rx),
        };
        tasks.0.push(tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await.map_err(|e| ImageError::PullTask {
                reference: job.reference.clone(),
                message: e.to_string(),
            })?;
            fetch_layer(&inner, &session, job, permit).await
        }));
    }
    let mut downloaded = 0;
    for (i, layer) in layers.iter().enumerate() {
        let task_error = |e: tokio::task::JoinError| ImageError::PullTask {
            reference: reference.to_string(),
            message: e.to_string(),
        };
        let (bytes, prepared) = (&mut tasks.0[i]).await.map_err(task_error)??;
        downloaded += bytes;
        if let Some(prepared) = prepared {
            // The layer below is in place by now (earlier iterations), as committing requires.
            let snapshots = inner.snapshots.clone();
            let made = tokio::task::spawn_blocking(move || snapshots.commit_layer(prepared))
                .await
                .map_err(task_error)?
                .map_err(|e| ImageError::Unpack {
                    reference: reference.to_string(),
                    digest: layer.digest.to_string(),
                    source: Arc::new(e),
                })?;
            if made != chains[i] {
                tracing::warn!(%reference, expected = %chains[i], %made, "snapshotter chain ID differs");
            }
        }
        // Nobody waiting (the layer above was in place already, or is done): fine.
        let _ = in_place[i].send(true);
    }
    Ok(downloaded)
}

/// One layer for [`fetch_layer`].
struct LayerJob {
    reference: String,
    digest: Digest,
    size: u64,
    compression: Compression,
    diff_id: String,
    /// The layer's chain ID.
    chain: String,
    /// The chain ID of the layer below.
    parent: Option<String>,
    /// Turns true when the layer below is in place (`None` for the bottom layer).
    parent_placed: Option<watch::Receiver<bool>>,
}

/// Result of [`fetch_layer`]: bytes downloaded, and the unpacked layer waiting to be put in
/// place (none if its snapshot existed already).
type Fetched = (u64, Option<PreparedLayer>);

/// Gets one layer's blob into the content store and its files into a prepared (not yet
/// visible) snapshot.
///
/// A blob not yet in the store is unpacked while it downloads: each chunk goes to the
/// ingest file (hashed for the blob digest) and through a channel to a blocking thread that
/// decompresses, hashes the tar for the diff ID and writes the files. The blob is renamed
/// into place only when both digests check out; any failure removes both the ingest file
/// and the unpacked files. That needs the layers below in place; when they are not yet,
/// the blob is only downloaded (`permit`, one of the pull's download slots, is then given
/// back), and unpacked from the store once they are. The caller commits the prepared layers
/// bottom up.
async fn fetch_layer(
    inner: &Arc<Inner>,
    session: &Session,
    mut job: LayerJob,
    permit: OwnedSemaphorePermit,
) -> Result<Fetched, ImageError> {
    let unpack_error = |e| ImageError::Unpack {
        reference: job.reference.clone(),
        digest: job.digest.to_string(),
        source: Arc::new(e),
    };
    let task_error = |e: tokio::task::JoinError| ImageError::PullTask {
        reference: job.reference.clone(),
        message: e.to_string(),
    };
    if inner.snapshots.has(&job.chain) {
        // Unpacked already (another image shares it): the blob is all that may be missing.
        let bytes = session.fetch_blob(&inner.content, &job.digest, job.size).await?;
        return Ok((bytes, None));
    }
    let mut bytes = 0;
    if let Some(placed) = job.parent_placed.as_mut()
        && !job.parent.as_ref().is_some_and(|p| inner.snapshots.has(p))
    {
        bytes = session.fetch_blob(&inner.content, &job.digest, job.size).await?;
        drop(permit);
        // Err: the pull gave up on the layers below (and is aborting this task anyway).
        placed.wait_for(|placed| *placed).await.map_err(|_| ImageError::PullTask {
            reference: job.reference.clone(),
            message: "the layer below was not unpacked".into(),
        })?;
    }
    let snapshots = inner.snapshots.clone();
    let origin = inner.content.path(&job.digest);
    let (parent, diff_id, compression) = (job.parent.clone(), job.diff_id.clone(), job.compression);
    if inner.content.has(&job.digest) {
        let prepared = tokio::task::spawn_blocking(move || {
            let reader = std::fs::File::open(&origin).map_err(|source| {
                berth_snapshot::SnapshotError::Io {
                    action: "open layer blob",
                    path: origin.clone(),
                    source,
                }
            })?;
            snapshots.prepare_layer(parent.as_deref(), &diff_id, &origin, reader, compression)
        })
        .await
        .map_err(task_error)?
        .map_err(unpack_error)?;
        return Ok((bytes, Some(prepared)));
    }
    let (tx, reader) = tee::channel();
    let unpack = tokio::task::spawn_blocking(move || {
        snapshots.prepare_layer(parent.as_deref(), &diff_id, &origin, reader, compression)
    });
    // On a download error the sender is gone and the unpack sees the end of its input;
    // waiting for it means its temp dir is gone when the pull reports the error.
    let downloaded = session.download(&inner.content, &job.digest, job.size, Some(tx)).await;
    let mut ingest = match downloaded {
        Ok(ingest) => ingest,
        Err(e) => {
            drop(unpack.await);
            return Err(e);
        }
    };
    // The blob's digest check and fsync overlap the end of the unpack.
    let (prepared, verified) = tokio::join!(unpack, ingest.verify());
    // A corrupt blob also fails to unpack; its digest is the error that says why.
    verified?;
    let prepared = prepared.map_err(task_error)?.map_err(unpack_error)?;
    let bytes = ingest.written();
    ingest.commit().await?;
    tracing::debug!(reference = %job.reference, digest = %job.digest, bytes, "layer fetched and unpacked");
    Ok((bytes, Some(prepared)))
}

/// Writes a manifest held in memory to the store, unless it is there.
async fn store_small(
    inner: &Inner,
    reference: &str,
    digest: &Digest,
    body: &[u8],
) -> Result<(), ImageError> {
    if inner.content.has(digest) {
        return Ok(());
    }
    inner.content.write_bytes(reference, digest, body).await
}

/// An image config that states its platform must state one this host runs.
fn check_config_platform(
    inner: &Inner,
    reference: &str,
    config: &manifest::ImageConfigFile,
) -> Result<(), ImageError> {
    let (Some(os), Some(architecture)) = (&config.os, &config.architecture) else {
        return Ok(());
    };
    if os.is_empty() || architecture.is_empty() {
        return Ok(());
    }
    let spec = PlatformSpec {
        os: os.clone(),
        architecture: architecture.clone(),
        variant: config.variant.clone(),
    };
    if platform::matches(&spec, &inner.platform) {
        Ok(())
    } else {
        Err(ImageError::NoMatchingPlatform {
            reference: reference.to_string(),
            wanted: inner.platform.to_string(),
            available: format!("{os}/{architecture}"),
        })
    }
}

/// Keeps the first of each.
fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

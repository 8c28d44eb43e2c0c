//! Unpacking one layer: byte stream (a blob file, or a download in flight) → decompressor →
//! sha256 → tar entries, into a temp dir that is renamed into place only once the digest
//! checks out (and, for a streamed download, once the compressed digest does too).

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tracing::{debug, warn};

use crate::apply::{self, Policy};
use crate::digest::HashingReader;
use crate::layout::Layout;
use crate::lenient::Lenient;
use crate::pipe::decode_in_thread;
use crate::{Compression, SnapshotError};

/// Read buffer between the blob file and the decompressor.
const READ_BUF: usize = 256 * 1024;

/// Unpacks the layer stream `reader` into a fresh temp dir under `layers/` (whose `parent`
/// file names `parent`) on top of the parent layers' directories `lowers` (top first), and
/// checks its diff ID. Returns the temp dir; on error nothing is left behind. `origin` names
/// the blob in messages.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prepare(
    layout: &Layout,
    parent: Option<&str>,
    lowers: &[PathBuf],
    diff_id: &str,
    origin: &Path,
    reader: impl Read + Send,
    compression: Compression,
    policy: Policy,
) -> Result<PathBuf, SnapshotError> {
    let tmp = layout.temp();
    fs::create_dir(&tmp).map_err(|source| SnapshotError::Io {
        action: "create temp dir",
        path: tmp.clone(),
        source,
    })?;
    match fill(&tmp, parent, lowers, diff_id, origin, reader, compression, policy) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            remove_quietly(&tmp);
            Err(e)
        }
    }
}

/// Renames the finished temp dir `tmp` into place as `chain_id`. Safe against concurrent
/// unpacks of the same layer: the loser of the rename drops its copy. On error `tmp` is
/// left for the caller to remove.
pub(crate) fn commit(layout: &Layout, chain_id: &str, tmp: &Path) -> Result<(), SnapshotError> {
    let dest = layout.layer(chain_id)?;
    match fs::rename(tmp, &dest) {
        Ok(()) => Ok(()),
        // Someone else finished the same layer first; theirs is as good as ours.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
            debug!(chain_id, "layer unpacked concurrently, dropping our copy");
            remove_quietly(tmp);
            Ok(())
        }
        Err(source) => Err(SnapshotError::Io { action: "rename into place", path: dest, source }),
    }
}

/// Writes `fs/` and `parent` into the temp dir.
#[allow(clippy::too_many_arguments)]
fn fill(
    tmp: &Path,
    parent: Option<&str>,
    lowers: &[PathBuf],
    diff_id: &str,
    origin: &Path,
    reader: impl Read + Send,
    compression: Compression,
    policy: Policy,
) -> Result<(), SnapshotError> {
    let fs_dir = tmp.join("fs");
    fs::create_dir(&fs_dir).map_err(|source| SnapshotError::Io {
        action: "create",
        path: fs_dir.clone(),
        source,
    })?;
    unpack_stream(&fs_dir, lowers, origin, reader, compression, diff_id, policy)?;
    if let Some(parent) = parent {
        let path = tmp.join("parent");
        fs::write(&path, parent).map_err(|source| SnapshotError::Io {
            action: "write",
            path,
            source,
        })?;
    }
    Ok(())
}

/// Opens the layer blob file at `blob` for [`prepare`] (which buffers it).
pub(crate) fn open_blob(blob: &Path) -> Result<File, SnapshotError> {
    File::open(blob).map_err(|source| SnapshotError::Io {
        action: "open layer blob",
        path: blob.to_owned(),
        source,
    })
}

/// Streams the layer through decompression and hashing into `fs_dir`, then checks the
/// digest of the whole uncompressed stream against `diff_id`.
fn unpack_stream(
    fs_dir: &Path,
    lowers: &[PathBuf],
    origin: &Path,
    reader: impl Read + Send,
    compression: Compression,
    diff_id: &str,
    policy: Policy,
) -> Result<(), SnapshotError> {
    // Buffered whatever the source: tar reads headers 512 bytes at a time, decoders read
    // their input in small pieces too.
    let buffered = BufReader::with_capacity(READ_BUF, reader);
    let untar = |plain| untar(fs_dir, lowers, origin, plain, diff_id, policy);
    match compression {
        Compression::None => untar(Box::new(buffered)),
        // Multi-member: some writers (pigz, concatenated streams) emit several gzip members.
        Compression::Gzip => decode_in_thread(
            origin,
            buffered,
            |r| Ok(MultiGzDecoder::new(r)),
            |p| untar(Box::new(p)),
        ),
        Compression::Zstd => {
            decode_in_thread(origin, buffered, zstd::stream::read::Decoder::with_buffer, |p| {
                untar(Box::new(p))
            })
        }
    }
}

/// Writes the tar stream `plain` into `fs_dir` while hashing it, then checks the hash.
fn untar(
    fs_dir: &Path,
    lowers: &[PathBuf],
    origin: &Path,
    plain: Box<dyn Read + '_>,
    diff_id: &str,
    policy: Policy,
) -> Result<(), SnapshotError> {
    // Hashing below the lenient reader: the diff ID is over the bytes as they are, never
    // over the padding it makes up for a stream that ends early.
    let (lenient, end) = Lenient::new(HashingReader::new(plain));
    let mut archive = tar::Archive::new(lenient);
    apply::apply(&mut archive, fs_dir, lowers, &end, origin, policy)?;
    // The tar end marker is not the end of the stream: zero padding up to the record size
    // follows, and it counts in the diff ID.
    let actual = archive
        .into_inner()
        .into_inner()
        .finish()
        .map_err(|source| SnapshotError::ReadLayer { blob: origin.to_owned(), source })?;
    if actual != diff_id {
        return Err(SnapshotError::DigestMismatch { expected: diff_id.to_owned(), actual });
    }
    Ok(())
}

/// Best-effort removal of a temp dir; what is left is swept by the next `open`.
pub(crate) fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "could not remove temp dir");
    }
}

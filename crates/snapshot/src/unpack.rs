//! Unpacking one layer blob: blob file → decompressor → sha256 → tar entries, into a
//! temp dir that is renamed into place only once the digest checks out.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::Path;

use tracing::{debug, warn};

use crate::apply::{self, Policy};
use crate::digest::HashingReader;
use crate::layout::Layout;
use crate::{Compression, SnapshotError};

/// Read buffer between the blob file and the decompressor.
const READ_BUF: usize = 256 * 1024;

/// Unpacks `blob` as the layer `chain_id` (whose `parent` is already present), unless it
/// exists. Safe against concurrent calls for the same layer: each works in its own temp dir
/// and the loser of the final rename drops its copy.
pub(crate) fn unpack(
    layout: &Layout,
    chain_id: &str,
    parent: Option<&str>,
    diff_id: &str,
    blob: &Path,
    compression: Compression,
    policy: Policy,
) -> Result<(), SnapshotError> {
    let dest = layout.layer(chain_id)?;
    let tmp = layout.temp();
    fs::create_dir(&tmp).map_err(|source| SnapshotError::Io {
        action: "create temp dir",
        path: tmp.clone(),
        source,
    })?;
    let result = fill(&tmp, parent, diff_id, blob, compression, policy);
    let result = result.and_then(|()| match fs::rename(&tmp, &dest) {
        Ok(()) => Ok(()),
        // Someone else finished the same layer first; theirs is as good as ours.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
            debug!(chain_id, "layer unpacked concurrently, dropping our copy");
            remove_quietly(&tmp);
            Ok(())
        }
        Err(source) => Err(SnapshotError::Io { action: "rename into place", path: dest, source }),
    });
    if result.is_err() {
        remove_quietly(&tmp);
    }
    result
}

/// Writes `fs/` and `parent` into the temp dir.
fn fill(
    tmp: &Path,
    parent: Option<&str>,
    diff_id: &str,
    blob: &Path,
    compression: Compression,
    policy: Policy,
) -> Result<(), SnapshotError> {
    let fs_dir = tmp.join("fs");
    fs::create_dir(&fs_dir).map_err(|source| SnapshotError::Io {
        action: "create",
        path: fs_dir.clone(),
        source,
    })?;
    unpack_stream(&fs_dir, blob, compression, diff_id, policy)?;
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

/// Streams the blob through decompression and hashing into `fs_dir`, then checks the
/// digest of the whole uncompressed stream against `diff_id`.
pub(crate) fn unpack_stream(
    fs_dir: &Path,
    blob: &Path,
    compression: Compression,
    diff_id: &str,
    policy: Policy,
) -> Result<(), SnapshotError> {
    let read_err = |source| SnapshotError::ReadLayer { blob: blob.to_owned(), source };
    let file = File::open(blob).map_err(|source| SnapshotError::Io {
        action: "open layer blob",
        path: blob.to_owned(),
        source,
    })?;
    let buffered = BufReader::with_capacity(READ_BUF, file);
    let plain: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        // Multi-member: some writers (pigz, concatenated streams) emit several gzip members.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(read_err)?)
        }
    };
    let mut archive = tar::Archive::new(HashingReader::new(plain));
    apply::apply(&mut archive, fs_dir, blob, policy)?;
    // The tar end marker is not the end of the stream: zero padding up to the record size
    // follows, and it counts in the diff ID.
    let actual = archive.into_inner().finish().map_err(read_err)?;
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

//! Disk usage of a directory tree.
//!
//! Bytes are allocated blocks (`st_blocks * 512`, what `du` reports), not apparent sizes:
//! that is what fills the disk, and sparse files or tiny files in whole blocks count
//! truthfully. Inodes count every file, directory and symlink once; a hard-linked inode is
//! counted once however many names it has. The walk never follows symlinks and stays on
//! the filesystem it started on (like `du -x`), so a mounted rootfs is not counted twice.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{SnapshotError, Usage};

/// Size of the unit `st_blocks` counts in.
const BLOCK: u64 = 512;

/// Bytes and inodes under `root` (included). A missing `root` uses nothing. Entries that
/// vanish during the walk (concurrent removal) are skipped.
pub(crate) fn disk_usage(root: &Path) -> Result<Usage, SnapshotError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { action: "measure", path, source }
    };
    let top = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Usage::default()),
        Err(e) => return Err(err(root)(e)),
    };
    let dev = top.dev();
    let mut usage = Usage::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    count(&top, &mut usage, &mut seen);
    if !top.is_dir() {
        return Ok(usage);
    }
    let mut stack: Vec<PathBuf> = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(&dir)(e)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(&dir)(e)),
            };
            // DirEntry::metadata is an lstat: symlinks are measured, not followed.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(&entry.path())(e)),
            };
            if meta.dev() != dev {
                continue;
            }
            count(&meta, &mut usage, &mut seen);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

fn count(meta: &fs::Metadata, usage: &mut Usage, seen: &mut HashSet<(u64, u64)>) {
    if !meta.is_dir() && meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
        return;
    }
    usage.inodes += 1;
    usage.bytes += meta.blocks() * BLOCK;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hardlinks_once_and_symlinks_unfollowed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), vec![1u8; 10_000]).unwrap();
        fs::hard_link(root.join("d/f"), root.join("h")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("s")).unwrap();
        let u = disk_usage(&root).unwrap();
        // r, d, f (=h), s
        assert_eq!(u.inodes, 4);
        let f = fs::metadata(root.join("d/f")).unwrap();
        assert!(u.bytes >= f.blocks() * 512);
        assert!(u.bytes < 1_000_000, "symlink to /usr followed? {u:?}");
        assert_eq!(disk_usage(&tmp.path().join("missing")).unwrap(), Usage::default());
    }
}

//! Tests of the snapshotter as a whole: unpack real tars (built in memory), mount overlays.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::*;

/// Builds layer tars, including malformed entries the `tar` crate would refuse to write.
struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Self { b: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: EntryType, size: u64, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    /// Appends with the name (and link name) written as raw bytes into the header.
    fn raw(mut self, mut h: Header, name: &str, link: Option<&str>, data: &[u8]) -> Self {
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        let h = Self::header(EntryType::Regular, data.len() as u64, 0o644);
        self.raw(h, name, None, data)
    }

    fn dir(self, name: &str) -> Self {
        let h = Self::header(EntryType::Directory, 0, 0o755);
        self.raw(h, name, None, &[])
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        let h = Self::header(EntryType::Symlink, 0, 0o777);
        self.raw(h, name, Some(target), &[])
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        let h = Self::header(EntryType::Link, 0, 0o644);
        self.raw(h, name, Some(target), &[])
    }

    fn with(self, h: Header, name: &str, data: &[u8]) -> Self {
        self.raw(h, name, None, data)
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.b.append_pax_extensions(records.iter().copied()).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

struct Env {
    tmp: tempfile::TempDir,
    snap: Snapshotter,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let snap = Snapshotter::open(tmp.path().join("snapshots")).unwrap();
        Self { tmp, snap }
    }

    fn blob(&self, data: &[u8]) -> PathBuf {
        let path = self.tmp.path().join(format!("blob-{}", &digest(data)[7..19]));
        fs::write(&path, data).unwrap();
        path
    }

    fn unpack_as(
        &self,
        parent: Option<&str>,
        tar: &[u8],
        c: Compression,
    ) -> Result<String, SnapshotError> {
        let blob = self.blob(&compress(tar, c));
        self.snap.unpack_layer(parent, &digest(tar), &blob, c)
    }

    fn unpack(&self, parent: Option<&str>, tar: &[u8]) -> Result<String, SnapshotError> {
        self.unpack_as(parent, tar, Compression::Gzip)
    }

    fn fs(&self, chain_id: &str) -> PathBuf {
        self.snap.root().join("layers").join(&chain_id[7..]).join("fs")
    }

    /// Everything in `layers/` (to check nothing is left behind).
    fn layer_dir_names(&self) -> Vec<String> {
        list(&self.snap.root().join("layers")).unwrap()
    }

    /// A directory outside the snapshot root that malicious layers aim at.
    fn outside(&self) -> PathBuf {
        let p = self.tmp.path().join("outside");
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("secret"), b"host data").unwrap();
        p
    }
}

fn assert_unsafe(r: Result<String, SnapshotError>, want: UnsafeReason) {
    match r {
        Err(SnapshotError::UnsafeEntry { reason, .. }) => assert_eq!(reason, want),
        other => panic!("expected UnsafeEntry({want:?}), got {other:?}"),
    }
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

fn opaque(p: &Path) -> bool {
    xattr::get(p, "trusted.overlay.opaque").unwrap().as_deref() == Some(&b"y"[..])
}

#[test]
fn round_trip_every_compression() {
    let env = Env::new();
    for (i, c) in [Compression::None, Compression::Gzip, Compression::Zstd].into_iter().enumerate()
    {
        let content = format!("content {i}");
        let tar = Layer::new()
            .dir("./")
            .dir("etc/")
            .file("etc/hostname", content.as_bytes())
            .file("/abs/file", b"abs")
            .finish();
        let id = env.unpack_as(None, &tar, c).unwrap();
        assert_eq!(id, digest(&tar));
        assert!(env.snap.has(&id));
        let fs = env.fs(&id);
        assert_eq!(fs::read_to_string(fs.join("etc/hostname")).unwrap(), content);
        // Absolute names land inside the layer, as Docker does.
        assert_eq!(fs::read(fs.join("abs/file")).unwrap(), b"abs");
        // Idempotent.
        assert_eq!(env.unpack_as(None, &tar, c).unwrap(), id);
    }
    assert_eq!(env.snap.layer_ids().unwrap().len(), 3);
}

#[test]
fn trailing_padding_counts_in_digest() {
    let env = Env::new();
    let mut tar = Layer::new().file("a", b"1").finish();
    tar.extend_from_slice(&[0u8; 8192]);
    let id = env.unpack(None, &tar).unwrap();
    assert!(env.snap.has(&id));

    // A diff ID over the tar without its padding must not match.
    let without = &tar[..tar.len() - 8192];
    let blob = env.blob(&tar);
    let r = env.snap.unpack_layer(None, &digest(without), &blob, Compression::None);
    assert!(matches!(r, Err(SnapshotError::DigestMismatch { .. })), "{r:?}");
}

#[test]
fn digest_mismatch_leaves_nothing() {
    let env = Env::new();
    let tar = Layer::new().dir("d/").file("d/f", b"data").finish();
    let blob = env.blob(&tar);
    let wrong = digest(b"something else");
    let r = env.snap.unpack_layer(None, &wrong, &blob, Compression::None);
    match r {
        Err(SnapshotError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, digest(&tar));
        }
        other => panic!("{other:?}"),
    }
    assert!(env.layer_dir_names().is_empty(), "{:?}", env.layer_dir_names());
    assert!(!env.snap.has(&wrong));
}

#[test]
fn corrupt_blob_is_a_read_error() {
    let env = Env::new();
    let tar = Layer::new().file("f", &[7u8; 4000]).finish();
    let mut gz = compress(&tar, Compression::Gzip);
    let len = gz.len();
    gz.truncate(len / 2);
    let blob = env.blob(&gz);
    let r = env.snap.unpack_layer(None, &digest(&tar), &blob, Compression::Gzip);
    assert!(matches!(r, Err(SnapshotError::ReadLayer { .. })), "{r:?}");
    assert!(env.layer_dir_names().is_empty());
}

#[test]
fn bad_ids_are_refused() {
    let env = Env::new();
    let blob = env.blob(b"");
    let r = env.snap.unpack_layer(None, "sha256:../../x", &blob, Compression::None);
    assert!(matches!(r, Err(SnapshotError::InvalidDigest(_))));
    let d = digest(b"x");
    let r = env.snap.unpack_layer(Some("nope"), &d, &blob, Compression::None);
    assert!(matches!(r, Err(SnapshotError::InvalidChainId(_))));
    let r = env.snap.unpack_layer(Some(&digest(b"missing")), &d, &blob, Compression::None);
    assert!(matches!(r, Err(SnapshotError::ParentNotFound(_))));
    assert!(!env.snap.has("sha256:../.."));
}

#[test]
fn metadata_is_preserved() {
    let env = Env::new();
    let mut h = Layer::header(EntryType::Regular, 3, 0o4755);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_mtime(1_000_000_000);
    let mut dh = Layer::header(EntryType::Directory, 0, 0o1777);
    dh.set_mtime(1_100_000_000);
    dh.set_uid(42);
    let mut sh = Layer::header(EntryType::Symlink, 0, 0o777);
    sh.set_uid(7);
    sh.set_gid(8);
    let mut ch = Layer::header(EntryType::Char, 0, 0o666);
    ch.set_device_major(1).unwrap();
    ch.set_device_minor(3).unwrap();
    let fifo = Layer::header(EntryType::Fifo, 0, 0o600);
    let tar = Layer::new()
        .with(dh, "d/", &[])
        .with(h, "d/suid", b"bin")
        .raw(sh, "d/link", Some("suid"), &[])
        .hardlink("d/hard", "d/suid")
        .with(ch, "dev/null", &[])
        .with(fifo, "fifo", &[])
        .pax(&[
            ("SCHILY.xattr.trusted.berth", b"v1"),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/evil"),
        ])
        .file("x", b"x")
        .finish();
    let id = env.unpack(None, &tar).unwrap();
    let fs = env.fs(&id);

    let m = fs::metadata(fs.join("d/suid")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(m.mtime(), 1_000_000_000);
    assert_eq!(m.nlink(), 2);
    assert_eq!(fs::metadata(fs.join("d/hard")).unwrap().ino(), m.ino());

    // Directory time is set after its children were written.
    let d = fs::metadata(fs.join("d")).unwrap();
    assert_eq!(d.mtime(), 1_100_000_000);
    assert_eq!(d.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(d.uid(), 42);

    let l = fs::symlink_metadata(fs.join("d/link")).unwrap();
    assert!(l.file_type().is_symlink());
    assert_eq!((l.uid(), l.gid()), (7, 8));
    assert_eq!(fs::read_link(fs.join("d/link")).unwrap(), Path::new("suid"));

    let c = fs::symlink_metadata(fs.join("dev/null")).unwrap();
    assert!(c.file_type().is_char_device());
    assert_eq!(c.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(fs::symlink_metadata(fs.join("fifo")).unwrap().file_type().is_fifo());

    assert_eq!(xattr::get(fs.join("x"), "trusted.berth").unwrap().as_deref(), Some(&b"v1"[..]));
    assert_eq!(xattr::get(fs.join("x"), "trusted.overlay.redirect").unwrap(), None);
}

#[test]
fn device_nodes_can_be_refused() {
    let env = Env::new();
    let snap = Snapshotter::open(env.tmp.path().join("strict")).unwrap().allow_device_nodes(false);
    let mut ch = Layer::header(EntryType::Block, 0, 0o600);
    ch.set_device_major(8).unwrap();
    ch.set_device_minor(0).unwrap();
    let tar = Layer::new().with(ch, "sda", &[]).finish();
    let blob = env.blob(&tar);
    let r = snap.unpack_layer(None, &digest(&tar), &blob, Compression::None);
    assert_unsafe(r, UnsafeReason::DeviceNode);
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    let env = Env::new();
    let tar = Layer::new()
        .file(".wh.gone", b"")
        .file("deep/dir/.wh.x", b"")
        .file("kept", b"k")
        .file(".wh.kept", b"")
        .file(".wh..wh.plnk", b"")
        .finish();
    let id = env.unpack(None, &tar).unwrap();
    let fs = env.fs(&id);
    assert!(is_whiteout(&fs.join("gone")));
    assert!(is_whiteout(&fs.join("deep/dir/x")));
    assert!(!fs.join(".wh.gone").exists());
    // Same-layer entries are not hidden by a later whiteout.
    assert_eq!(fs::read(fs.join("kept")).unwrap(), b"k");
    assert!(!fs.join(".wh..wh.plnk").exists());
}

#[test]
fn opaque_markers_in_any_order() {
    let env = Env::new();
    let tar = Layer::new()
        .file("before/.wh..wh..opq", b"")
        .dir("before/")
        .file("before/f", b"1")
        .dir("after/")
        .file("after/f", b"2")
        .file("after/.wh..wh..opq", b"")
        // A whiteout and a directory of the same name in one layer: the dir must hide the
        // lower one's contents, so it becomes opaque.
        .file(".wh.replaced", b"")
        .dir("replaced/")
        .dir("dir-then-wh/")
        .file(".wh.dir-then-wh", b"")
        .finish();
    let id = env.unpack(None, &tar).unwrap();
    let fs = env.fs(&id);
    for d in ["before", "after", "replaced", "dir-then-wh"] {
        assert!(fs.join(d).is_dir(), "{d}");
        assert!(opaque(&fs.join(d)), "{d} not opaque");
    }
    assert_eq!(fs::read(fs.join("before/f")).unwrap(), b"1");
    assert_eq!(fs::read(fs.join("after/f")).unwrap(), b"2");
    assert!(!fs.join("before/.wh..wh..opq").exists());
}

#[test]
fn later_entries_replace_earlier_ones() {
    let env = Env::new();
    let tar = Layer::new()
        .dir("a/")
        .file("a/inner", b"x")
        .file("a", b"now a file")
        .symlink("s", "target")
        .file("s", b"now a file too")
        .finish();
    let id = env.unpack(None, &tar).unwrap();
    let fs = env.fs(&id);
    assert_eq!(fs::read(fs.join("a")).unwrap(), b"now a file");
    assert_eq!(fs::read(fs.join("s")).unwrap(), b"now a file too");
}

#[test]
fn in_layer_relative_symlinks_are_followed_for_parents() {
    let env = Env::new();
    let tar =
        Layer::new().dir("usr/lib/").symlink("lib", "usr/lib").file("lib/libc.so", b"c").finish();
    let id = env.unpack(None, &tar).unwrap();
    assert_eq!(fs::read(env.fs(&id).join("usr/lib/libc.so")).unwrap(), b"c");
}

#[test]
fn dotdot_escapes_are_refused() {
    let env = Env::new();
    let outside = env.outside();
    for name in ["../x", "a/../../x", "/../x", "./../outside/secret"] {
        let tar = Layer::new().file("ok", b"1").file(name, b"evil").finish();
        assert_unsafe(env.unpack(None, &tar), UnsafeReason::ParentDirEscape);
    }
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host data");
    assert!(!env.tmp.path().join("x").exists());
    assert!(env.layer_dir_names().is_empty(), "{:?}", env.layer_dir_names());
}

#[test]
fn symlink_escapes_stay_inside() {
    let env = Env::new();
    let outside = env.outside();
    let abs = outside.to_str().unwrap();
    let rel = format!("{}{}", "../".repeat(20), abs.trim_start_matches('/'));
    // As in a chroot: an absolute target starts at the layer's root, `..` stops there.
    let inside = abs.trim_start_matches('/');
    for (target, lands) in [(abs, inside), (rel.as_str(), inside), ("/etc", "etc")] {
        // Write through a symlinked directory.
        let tar = Layer::new().symlink("evil", target).file("evil/passwd", b"pwned").finish();
        let id = env.unpack(None, &tar).unwrap();
        assert_eq!(fs::read(env.fs(&id).join(lands).join("passwd")).unwrap(), b"pwned");
        // Create a directory through it.
        let tar = Layer::new().symlink("evil", target).dir("evil/sub/").finish();
        let id = env.unpack(None, &tar).unwrap();
        assert!(env.fs(&id).join(lands).join("sub").is_dir());
        // Whiteout through it.
        let tar = Layer::new().symlink("evil", target).file("evil/.wh.secret", b"").finish();
        let id = env.unpack(None, &tar).unwrap();
        assert!(is_whiteout(&env.fs(&id).join(lands).join("secret")));
    }
    // A symlink to a file outside, then a regular file of the same name: replaced, not
    // written through.
    let target = outside.join("secret");
    let tar = Layer::new().symlink("s", target.to_str().unwrap()).file("s", b"overwrite").finish();
    let id = env.unpack(None, &tar).unwrap();
    assert_eq!(fs::read(env.fs(&id).join("s")).unwrap(), b"overwrite");

    // A symlink loop is refused.
    let tar = Layer::new().symlink("a", "b").symlink("b", "a").file("a/x", b"x").finish();
    assert_unsafe(env.unpack(None, &tar), UnsafeReason::SymlinkEscape);

    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host data");
    assert_eq!(list(&outside).unwrap(), ["secret"]);
    assert!(!Path::new("/etc/passwd-berth-test").exists());
    assert_eq!(env.layer_dir_names().len(), 10);
}

#[test]
fn hardlink_escapes_are_refused() {
    let env = Env::new();
    let outside = env.outside();
    let tar = Layer::new().hardlink("h", "../outside/secret").finish();
    assert_unsafe(env.unpack(None, &tar), UnsafeReason::HardlinkOutside);

    let tar =
        Layer::new().symlink("s", outside.to_str().unwrap()).hardlink("h", "s/secret").finish();
    assert_unsafe(env.unpack(None, &tar), UnsafeReason::HardlinkThroughSymlink);

    // In-layer symlink: still refused for hard links.
    let tar =
        Layer::new().dir("d/").file("d/f", b"1").symlink("s", "d").hardlink("h", "s/f").finish();
    assert_unsafe(env.unpack(None, &tar), UnsafeReason::HardlinkThroughSymlink);

    let tar = Layer::new().hardlink("h", "./").finish();
    assert_unsafe(env.unpack(None, &tar), UnsafeReason::HardlinkToRoot);

    // Absolute targets are layer-relative: /etc/passwd of the host is never linked.
    let tar = Layer::new().hardlink("h", "/etc/passwd").finish();
    let r = env.unpack(None, &tar);
    assert!(matches!(r, Err(SnapshotError::ApplyEntry { .. })), "{r:?}");

    assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
    assert!(env.layer_dir_names().is_empty(), "{:?}", env.layer_dir_names());
}

#[test]
fn concurrent_unpacks_of_one_layer() {
    let env = Env::new();
    let mut l = Layer::new();
    for i in 0..200 {
        l = l.file(&format!("dir{}/file{i}", i % 10), format!("{i}").as_bytes());
    }
    let tar = l.finish();
    let blob = env.blob(&compress(&tar, Compression::Gzip));
    let diff = digest(&tar);
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| env.snap.unpack_layer(None, &diff, &blob, Compression::Gzip)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert!(ids.iter().all(|i| *i == diff));
    assert_eq!(env.layer_dir_names(), [diff[7..].to_owned()]);
    assert_eq!(fs::read(env.fs(&diff).join("dir3/file123")).unwrap(), b"123");
}

#[test]
fn chains_parents_and_removal() {
    let env = Env::new();
    let t1 = Layer::new().file("a", b"1").finish();
    let t2 = Layer::new().file("b", b"2").finish();
    let c1 = env.unpack(None, &t1).unwrap();
    let c2 = env.unpack(Some(&c1), &t2).unwrap();
    assert_eq!(chain_ids(&[digest(&t1), digest(&t2)]), [c1.clone(), c2.clone()]);
    assert_eq!(env.snap.parent(&c2).unwrap(), Some(c1.clone()));
    assert_eq!(env.snap.parent(&c1).unwrap(), None);
    let mut ids = env.snap.layer_ids().unwrap();
    ids.sort();
    let mut want = vec![c1.clone(), c2.clone()];
    want.sort();
    assert_eq!(ids, want);
    let lowers = env.snap.layout.lower_dirs(&c2).unwrap();
    assert_eq!(lowers, [env.fs(&c2), env.fs(&c1)]);

    let u = env.snap.layer_usage(&c1).unwrap();
    assert_eq!(u.inodes, 2);
    assert!(env.snap.usage().unwrap().inodes > u.inodes);

    env.snap.remove(&c2).unwrap();
    env.snap.remove(&c2).unwrap();
    assert!(!env.snap.has(&c2));
    assert!(matches!(env.snap.layer_usage(&c2), Err(SnapshotError::LayerNotFound(_))));
    assert_eq!(env.snap.layer_ids().unwrap(), [c1]);
}

#[test]
fn open_sweeps_stale_temp_dirs() {
    let env = Env::new();
    let stale = env.snap.root().join("layers/.tmp-123-456-0/fs/etc");
    fs::create_dir_all(&stale).unwrap();
    let snap = Snapshotter::open(env.snap.root()).unwrap();
    assert!(list(&snap.root().join("layers")).unwrap().is_empty());
}

/// Unmounts on drop so a failing test leaves no mount behind.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs a mount; `None` (test skipped) when we may not mount.
fn try_mount(r: Result<(), SnapshotError>) -> Option<()> {
    match r {
        Ok(()) => Some(()),
        Err(SnapshotError::Mount { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("mount not permitted, skipping: {source}");
            None
        }
        Err(e) => panic!("mount failed: {e}"),
    }
}

fn is_mounted(target: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let canonical = target.canonicalize().unwrap();
    info.lines().any(|l| l.split(' ').nth(4).map(Path::new) == Some(canonical.as_path()))
}

/// The super options of the mount at `target` (mountinfo's last field).
fn super_options(target: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let canonical = target.canonicalize().unwrap();
    info.lines()
        .filter(|l| l.split(' ').nth(4).map(Path::new) == Some(canonical.as_path()))
        .filter_map(|l| l.rsplit(' ').next())
        .next_back()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn writable_rootfs_is_volatile_and_can_be_mounted_again() {
    let env = Env::new();
    let base = Layer::new().dir("./").file("etc/os-release", b"base").finish();
    let c1 = env.unpack(None, &base).unwrap();
    let target = env.tmp.path().join("rootfs");
    fs::create_dir(&target).unwrap();
    let _guard = MountGuard(target.clone());
    if try_mount(env.snap.prepare_rootfs("vol", &c1, &target, false)).is_none() {
        return;
    }
    fs::write(target.join("kept"), b"data").unwrap();
    // Only kernels with the new mount API path get volatile (see overlay.rs); newer ones
    // show it as fsync=volatile.
    let options = super_options(&target);
    let volatile = options.split(',').any(|o| o == "volatile" || o == "fsync=volatile");
    let marker = env.snap.root().join("active/vol/work/work/incompat/volatile");
    assert_eq!(volatile, marker.exists(), "options {options}");
    overlay::unmount_all(&target).unwrap();
    assert!(!is_mounted(&target));
    // The same writable layer mounts again (its volatile marker is cleared) with its data.
    env.snap.prepare_rootfs("vol", &c1, &target, false).unwrap();
    assert_eq!(fs::read(target.join("kept")).unwrap(), b"data");
    env.snap.remove_rootfs("vol", &target).unwrap();
    assert!(!is_mounted(&target));
}

#[test]
fn overlay_prepare_and_remove() {
    let env = Env::new();
    let base = Layer::new()
        .dir("./")
        .file("etc/os-release", b"base")
        .file("etc/removed", b"x")
        .file("opq/old", b"old")
        .finish();
    let top = Layer::new()
        .file("etc/.wh.removed", b"")
        .file("opq/.wh..wh..opq", b"")
        .file("opq/new", b"new")
        .finish();
    let c1 = env.unpack(None, &base).unwrap();
    let c2 = env.unpack(Some(&c1), &top).unwrap();
    let target = env.tmp.path().join("rootfs");
    fs::create_dir(&target).unwrap();
    let _guard = MountGuard(target.clone());

    if try_mount(env.snap.prepare_rootfs("ctr1", &c2, &target, false)).is_none() {
        return;
    }
    assert!(is_mounted(&target));
    assert_eq!(fs::read(target.join("etc/os-release")).unwrap(), b"base");
    assert!(!target.join("etc/removed").exists());
    assert!(!target.join("opq/old").exists());
    assert_eq!(fs::read(target.join("opq/new")).unwrap(), b"new");
    fs::write(target.join("written"), vec![1u8; 8192]).unwrap();
    let upper = env.snap.root().join("active/ctr1/upper");
    assert!(upper.join("written").exists());
    assert!(env.snap.rootfs_usage("ctr1").unwrap().bytes >= 8192);
    assert_eq!(env.snap.active_keys().unwrap(), ["ctr1"]);

    // Same key on another image is a conflict.
    let r = env.snap.prepare_rootfs("ctr1", &c1, &target, false);
    assert!(matches!(r, Err(SnapshotError::KeyConflict { .. })), "{r:?}");

    // Keep a file open on the rootfs: the unmount falls back to a lazy detach.
    let busy = fs::File::open(target.join("etc/os-release")).unwrap();
    env.snap.remove_rootfs("ctr1", &target).unwrap();
    drop(busy);
    assert!(!is_mounted(&target));
    assert!(!env.snap.root().join("active/ctr1").exists());
    env.snap.remove_rootfs("ctr1", &target).unwrap();
    assert!(matches!(env.snap.rootfs_usage("ctr1"), Err(SnapshotError::ActiveNotFound(_))));
    assert!(env.snap.active_keys().unwrap().is_empty());
}

#[test]
fn readonly_rootfs() {
    let env = Env::new();
    let c1 = env.unpack(None, &Layer::new().file("a", b"1").finish()).unwrap();
    let c2 = env.unpack(Some(&c1), &Layer::new().file("b", b"2").finish()).unwrap();
    for (key, chain) in [("ro-single", &c1), ("ro-double", &c2)] {
        let target = env.tmp.path().join(key);
        fs::create_dir(&target).unwrap();
        let _guard = MountGuard(target.clone());
        if try_mount(env.snap.prepare_rootfs(key, chain, &target, true)).is_none() {
            return;
        }
        assert_eq!(fs::read(target.join("a")).unwrap(), b"1");
        let err = fs::write(target.join("new"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}");
        assert_eq!(env.snap.rootfs_usage(key).unwrap(), Usage::default());
        env.snap.remove_rootfs(key, &target).unwrap();
        assert!(!is_mounted(&target));
    }
}

#[test]
fn many_layers_exceed_the_option_page() {
    let env = Env::new();
    // Long root path: 60 layers * ~150 bytes is well over one page of mount options.
    let deep = env.tmp.path().join("x".repeat(80));
    let snap = Snapshotter::open(&deep).unwrap();
    let mut parent: Option<String> = None;
    for i in 0..60 {
        let tar = Layer::new().file(&format!("f{i}"), format!("{i}").as_bytes()).finish();
        let blob = env.blob(&tar);
        let id =
            snap.unpack_layer(parent.as_deref(), &digest(&tar), &blob, Compression::None).unwrap();
        parent = Some(id);
    }
    let top = parent.unwrap();
    let lowers = snap.layout.lower_dirs(&top).unwrap();
    let ov = overlay::Overlay { lowers: &lowers, upper: None };
    assert!(overlay::legacy_options(&ov).len() > 4096);
    let target = env.tmp.path().join("many");
    fs::create_dir(&target).unwrap();
    let _guard = MountGuard(target.clone());
    if try_mount(snap.prepare_rootfs("many", &top, &target, false)).is_none() {
        return;
    }
    assert_eq!(fs::read(target.join("f0")).unwrap(), b"0");
    assert_eq!(fs::read(target.join("f59")).unwrap(), b"59");
    snap.remove_rootfs("many", &target).unwrap();
    assert!(!is_mounted(&target));
}

#[test]
fn invalid_keys_are_refused() {
    let env = Env::new();
    let t = env.tmp.path();
    assert!(matches!(
        env.snap.prepare_rootfs("../x", &digest(b"a"), t, false),
        Err(SnapshotError::InvalidKey(_))
    ));
    assert!(matches!(env.snap.remove_rootfs("a/b", t), Err(SnapshotError::InvalidKey(_))));
    assert!(matches!(
        env.snap.prepare_rootfs("k", &digest(b"a"), t, false),
        Err(SnapshotError::LayerNotFound(_))
    ));
    assert!(!env.snap.root().join("active/k").exists());
}

#[test]
fn unpack_from_reader_in_every_compression() {
    let env = Env::new();
    let tar = Layer::new().dir("etc/").file("etc/motd", b"streamed").finish();
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let blob = compress(&tar, c);
        let chain = env
            .snap
            .unpack_layer_from_reader(None, &digest(&tar), Path::new("stream"), &blob[..], c)
            .unwrap();
        assert_eq!(chain, digest(&tar));
        let motd = env.snap.layout.layer(&chain).unwrap().join("fs/etc/motd");
        assert_eq!(fs::read(motd).unwrap(), b"streamed");
    }
}

#[test]
fn prepared_layers_need_their_parent_and_vanish_when_dropped() {
    let env = Env::new();
    let base = Layer::new().file("base", b"b").finish();
    let top = Layer::new().file("top", b"t").finish();
    let base_chain = digest(&base);
    // A layer applies onto its parents: they must be in place before it is prepared.
    let gz = compress(&top, Compression::Gzip);
    let err = env
        .snap
        .prepare_layer(Some(&base_chain), &digest(&top), Path::new("t"), &gz[..], Compression::Gzip)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::ParentNotFound(ref p) if *p == base_chain), "{err}");
    assert!(env.layer_dir_names().is_empty());
    let prepared_base = env
        .snap
        .prepare_layer(None, &digest(&base), Path::new("b"), &base[..], Compression::None)
        .unwrap();
    assert_eq!(env.snap.commit_layer(prepared_base).unwrap(), base_chain);
    let prepared_top = env
        .snap
        .prepare_layer(Some(&base_chain), &digest(&top), Path::new("t"), &gz[..], Compression::Gzip)
        .unwrap();
    let top_chain = prepared_top.chain_id().to_owned();
    assert!(!env.snap.has(&top_chain));
    assert_eq!(env.snap.commit_layer(prepared_top).unwrap(), top_chain);
    assert_eq!(env.snap.parent(&top_chain).unwrap().as_deref(), Some(base_chain.as_str()));
    // A parent removed before the commit: refused, and the refused layer is removed.
    let other_top = Layer::new().file("other-top", b"t").finish();
    let prepared = env
        .snap
        .prepare_layer(
            Some(&top_chain),
            &digest(&other_top),
            Path::new("t"),
            &other_top[..],
            Compression::None,
        )
        .unwrap();
    env.snap.remove(&top_chain).unwrap();
    let err = env.snap.commit_layer(prepared).unwrap_err();
    assert!(matches!(err, SnapshotError::ParentNotFound(ref p) if *p == top_chain), "{err}");
    // A prepared layer that is dropped leaves nothing.
    let other = Layer::new().file("other", b"o").finish();
    let dropped = env
        .snap
        .prepare_layer(None, &digest(&other), Path::new("o"), &other[..], Compression::None)
        .unwrap();
    drop(dropped);
    assert_eq!(list(&env.snap.layout.layers()).unwrap(), [base_chain[7..].to_owned()]);
}

#[test]
fn streamed_diff_id_mismatch_leaves_nothing() {
    let env = Env::new();
    let tar = Layer::new().file("f", b"x").finish();
    let gz = compress(&tar, Compression::Gzip);
    let wrong = digest(b"something else");
    let err = env
        .snap
        .prepare_layer(None, &wrong, Path::new("s"), &gz[..], Compression::Gzip)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::DigestMismatch { .. }), "{err}");
    assert!(list(&env.snap.layout.layers()).unwrap().is_empty());
    // A truncated gzip stream is a read error, also leaving nothing.
    let err = env
        .snap
        .prepare_layer(None, &digest(&tar), Path::new("s"), &gz[..gz.len() / 2], Compression::Gzip)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::ReadLayer { .. }), "{err}");
    assert!(list(&env.snap.layout.layers()).unwrap().is_empty());
}

impl Env {
    /// Unpacks `tars` bottom up, each on the one before; returns their chain IDs.
    fn stack(&self, tars: &[Vec<u8>]) -> Result<Vec<String>, SnapshotError> {
        let mut chains: Vec<String> = Vec::new();
        for tar in tars {
            let id = self.unpack(chains.last().map(String::as_str), tar)?;
            chains.push(id);
        }
        Ok(chains)
    }
}

/// A tar (two files, `a` of 600 bytes and `b` of 100) cut to each tail shape writers leave.
#[test]
fn layers_ending_early_unpack_and_keep_their_digest() {
    let env = Env::new();
    let tar = Layer::new().file("a", &[b'a'; 600]).file("b", &[b'b'; 100]).finish();
    // header a, two blocks of a, header b, one block of b, two end blocks.
    assert_eq!(tar.len(), 512 * 7);
    let b_end = 512 * 4 + 100;
    for (what, len) in [
        ("whole", tar.len()),
        ("one end block", tar.len() - 512),
        ("no end blocks", tar.len() - 1024),
        ("partial padding", b_end + 200),
        ("no padding", b_end),
    ] {
        let cut = &tar[..len];
        for c in [Compression::None, Compression::Gzip] {
            // The diff ID is over the bytes as they are.
            let id = env.unpack_as(None, cut, c).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(fs::read(env.fs(&id).join("a")).unwrap(), [b'a'; 600], "{what}");
            assert_eq!(fs::read(env.fs(&id).join("b")).unwrap(), [b'b'; 100], "{what}");
        }
    }
    // Cut inside b's data, inside a's data, inside b's header: errors, nothing left.
    for len in [b_end - 1, 512 + 300, 512 * 3 + 100] {
        let r = env.unpack_as(None, &tar[..len], Compression::Gzip);
        assert!(matches!(r, Err(SnapshotError::ReadLayer { .. })), "{len}: {r:?}");
    }
    assert_eq!(env.layer_dir_names().len(), 5);
    // And a bad checksum is still one.
    let mut bad = tar[..b_end].to_vec();
    bad[512 * 3 + 148] ^= 1;
    let r = env.unpack_as(None, &bad, Compression::None);
    assert!(matches!(r, Err(SnapshotError::ReadLayer { .. })), "{r:?}");
}

#[test]
fn entries_resolve_through_lower_symlinks() {
    let env = Env::new();
    let mut usr = Layer::header(EntryType::Directory, 0, 0o750);
    usr.set_uid(42);
    usr.set_mtime(1_200_000_000);
    let base = Layer::new()
        .with(usr, "usr/", &[])
        .dir("usr/lib/")
        .symlink("lib", "usr/lib")
        .symlink("abslib", "/usr/lib")
        .symlink("usr/lib64", "lib")
        .finish();
    let top = Layer::new()
        .file("lib/foo.so", b"foo")
        .file("abslib/bar.so", b"bar")
        .dir("usr/lib64/sub/")
        .file("usr/lib64/sub/baz.so", b"baz")
        // The entry's own name is never followed: a lower symlink is replaced.
        .file("abslib", b"now a file")
        .finish();
    let chains = env.stack(&[base, top]).unwrap();
    let fs = env.fs(&chains[1]);
    assert_eq!(fs::read(fs.join("usr/lib/foo.so")).unwrap(), b"foo");
    assert_eq!(fs::read(fs.join("usr/lib/bar.so")).unwrap(), b"bar");
    assert_eq!(fs::read(fs.join("usr/lib/sub/baz.so")).unwrap(), b"baz");
    assert!(!fs.join("lib").exists());
    assert!(!fs.join("usr/lib64").exists());
    assert_eq!(fs::read(fs.join("abslib")).unwrap(), b"now a file");
    // Directories created for the way keep what the lower layer had (overlayfs shows the
    // upper's directory).
    let m = fs::metadata(fs.join("usr")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777, m.mtime()), (42, 0o750, 1_200_000_000));
    // The lower layer is untouched.
    assert!(!env.fs(&chains[0]).join("usr/lib/foo.so").exists());
}

#[test]
fn escapes_through_lower_symlinks_stay_inside() {
    let env = Env::new();
    let outside = env.outside();
    let abs = outside.to_str().unwrap();
    let base = Layer::new()
        .symlink("evil", "/../../etc")
        .symlink("up", "../../../")
        .symlink("abs", abs)
        .symlink("d/deep", "../../../../outside")
        .finish();
    let top = Layer::new()
        .file("evil/passwd", b"1")
        .file("up/x", b"2")
        .file("abs/secret", b"3")
        .file("d/deep/y", b"4")
        .finish();
    let chains = env.stack(&[base, top]).unwrap();
    let fs = env.fs(&chains[1]);
    assert_eq!(fs::read(fs.join("etc/passwd")).unwrap(), b"1");
    assert_eq!(fs::read(fs.join("x")).unwrap(), b"2");
    assert_eq!(fs::read(fs.join(abs.trim_start_matches('/')).join("secret")).unwrap(), b"3");
    assert_eq!(fs::read(fs.join("outside/y")).unwrap(), b"4");
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host data");
    assert_eq!(list(&outside).unwrap(), ["secret"]);
}

#[test]
fn whiteouts_and_opaque_dirs_hide_lower_symlinks() {
    let env = Env::new();
    let l1 = Layer::new()
        .dir("usr/lib/")
        .symlink("lib", "usr/lib")
        .symlink("d/link", "../usr/lib")
        .finish();
    let l2 = Layer::new().file(".wh.lib", b"").file("d/.wh..wh..opq", b"").finish();
    let l3 = Layer::new().file("lib/foo", b"f").file("d/link/bar", b"b").finish();
    let chains = env.stack(&[l1, l2, l3]).unwrap();
    let fs = env.fs(&chains[2]);
    assert_eq!(fs::read(fs.join("lib/foo")).unwrap(), b"f");
    assert_eq!(fs::read(fs.join("d/link/bar")).unwrap(), b"b");
    assert!(!fs.join("usr").exists());
    // A directory this layer makes where it whited a lower symlink out hides it.
    let l4 = Layer::new().file(".wh.lib", b"").file("lib/baz", b"z").finish();
    let c4 = env.unpack(Some(&chains[0]), &l4).unwrap();
    let fs4 = env.fs(&c4);
    assert_eq!(fs::read(fs4.join("lib/baz")).unwrap(), b"z");
    assert!(opaque(&fs4.join("lib")));
    assert!(!fs4.join("usr").exists());
}

#[test]
fn hard_links_to_lower_files_copy_them_up() {
    let env = Env::new();
    let mut a = Layer::header(EntryType::Regular, 5, 0o4751);
    a.set_uid(7);
    a.set_gid(8);
    a.set_mtime(1_300_000_000);
    let base = Layer::new()
        .dir("usr/")
        .dir("usr/bin/")
        .pax(&[("SCHILY.xattr.trusted.berth", b"cap")])
        .with(a, "usr/bin/a", b"hello")
        .symlink("usr/bin/sl", "a")
        .finish();
    let top = Layer::new()
        .hardlink("usr/bin/b", "usr/bin/a")
        .hardlink("/other", "/usr/bin/a")
        .hardlink("sl2", "usr/bin/sl")
        .finish();
    let chains = env.stack(&[base, top]).unwrap();
    let fs = env.fs(&chains[1]);
    let a = fs::metadata(fs.join("usr/bin/a")).unwrap();
    assert_eq!(fs::read(fs.join("usr/bin/a")).unwrap(), b"hello");
    assert_eq!((a.uid(), a.gid(), a.mode() & 0o7777, a.mtime()), (7, 8, 0o4751, 1_300_000_000));
    assert_eq!(a.nlink(), 3);
    assert_eq!(fs::metadata(fs.join("usr/bin/b")).unwrap().ino(), a.ino());
    assert_eq!(fs::metadata(fs.join("other")).unwrap().ino(), a.ino());
    assert_eq!(
        xattr::get(fs.join("usr/bin/b"), "trusted.berth").unwrap().as_deref(),
        Some(&b"cap"[..])
    );
    assert_eq!(fs::read_link(fs.join("sl2")).unwrap(), Path::new("a"));
    assert_eq!(fs::read_link(fs.join("usr/bin/sl")).unwrap(), Path::new("a"));
    // The lower file is untouched.
    assert_eq!(fs::metadata(env.fs(&chains[0]).join("usr/bin/a")).unwrap().nlink(), 1);
}

#[test]
fn hard_links_to_lower_files_cannot_escape() {
    let env = Env::new();
    let outside = env.outside();
    let base = Layer::new()
        .symlink("s", outside.to_str().unwrap())
        .dir("d/")
        .file("d/f", b"1")
        .symlink("ds", "d")
        .file("gone", b"g")
        .finish();
    let c1 = env.unpack(None, &base).unwrap();
    for (target, want) in [
        ("s/secret", UnsafeReason::HardlinkThroughSymlink),
        ("ds/f", UnsafeReason::HardlinkThroughSymlink),
        ("../outside/secret", UnsafeReason::HardlinkOutside),
        ("./", UnsafeReason::HardlinkToRoot),
    ] {
        let top = Layer::new().hardlink("h", target).finish();
        assert_unsafe(env.unpack(Some(&c1), &top), want);
    }
    // A lower file a middle layer whited out is not there to link to.
    let c2 = env.unpack(Some(&c1), &Layer::new().file(".wh.gone", b"").finish()).unwrap();
    let r = env.unpack(Some(&c2), &Layer::new().hardlink("h", "gone").finish());
    match r {
        Err(SnapshotError::ApplyEntry { action, source, .. }) => {
            assert!(action.contains("neither"), "{action}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
    assert_eq!(env.layer_dir_names().len(), 2, "{:?}", env.layer_dir_names());
}

#[test]
fn merged_rootfs_shows_files_written_through_lower_symlinks() {
    let env = Env::new();
    let base = Layer::new()
        .dir("./")
        .dir("usr/lib/")
        .symlink("lib", "usr/lib")
        .file("usr/lib/a", b"a")
        .finish();
    let top = Layer::new().file("lib/b", b"b").hardlink("lib/c", "usr/lib/a").finish();
    let chains = env.stack(&[base, top]).unwrap();
    let target = env.tmp.path().join("rootfs");
    fs::create_dir(&target).unwrap();
    let _guard = MountGuard(target.clone());
    if try_mount(env.snap.prepare_rootfs("merged", &chains[1], &target, true)).is_none() {
        return;
    }
    assert_eq!(fs::read(target.join("lib/b")).unwrap(), b"b");
    assert_eq!(fs::read(target.join("lib/c")).unwrap(), b"a");
    assert_eq!(fs::read(target.join("usr/lib/a")).unwrap(), b"a");
    env.snap.remove_rootfs("merged", &target).unwrap();
    assert!(!is_mounted(&target));
}

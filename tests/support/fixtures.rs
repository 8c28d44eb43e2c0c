//! The fixture images the tests pull. Each `push_*` builds the image in memory and pushes it
//! to a registry, returning where it now lives.

use anyhow::{Context, Result};

use crate::oci::{
    Compression, Format, Image, ImageConfig, Index, LayerBuilder, layer, pseudo_random_bytes,
};
use crate::registry::{Pushed, Registry};

/// Where Debian's busybox-static installs the binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// The applets symlinked in the busybox fixture.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "true", "false", "id", "env", "ps", "mount", "touch",
    "mkdir", "rm", "stat", "test", "grep", "wc", "head", "tail", "hostname", "kill", "top", "ping",
    "ip", "wget", "nc", "sync", "yes", "dd", "df", "uname", "whoami", "readlink",
];

/// `/etc/passwd` of the busybox fixture.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
    app:x:1000:1000:app:/home/app:/bin/sh\n\
    nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";

/// `/etc/group` of the busybox fixture.
pub const GROUP: &str = "root:x:0:\ndaemon:x:1:\napp:x:1000:\nnogroup:x:65534:\n";

/// An env var in every fixture config, so tests can find the config in verbose output.
pub const MARKER_ENV: &str = "BERTH_FIXTURE";

/// The root filesystem of the busybox fixture as an uncompressed tar.
pub fn busybox_tar() -> Result<Vec<u8>> {
    let bin = std::fs::read(HOST_BUSYBOX)
        .with_context(|| format!("reading {HOST_BUSYBOX} (apt install busybox-static)"))?;
    let mut l = LayerBuilder::new();
    for d in ["bin", "etc", "dev", "proc", "sys", "root", "home", "home/app", "var", "run"] {
        l = l.dir(d, 0o755);
    }
    l = l.dir("tmp", 0o1777).file("bin/busybox", 0o755, &bin);
    for a in BUSYBOX_APPLETS {
        l = l.symlink(&format!("bin/{a}"), "busybox");
    }
    l = l
        .file("etc/passwd", 0o644, PASSWD.as_bytes())
        .file("etc/group", 0o644, GROUP.as_bytes())
        .file("etc/hostname", 0o644, b"busybox\n");
    Ok(l.finish())
}

fn config(name: &str) -> ImageConfig {
    let mut c = ImageConfig::default();
    c.env.push(format!("{MARKER_ENV}={name}"));
    c
}

/// (1) `busybox:1.0`: a static busybox with applet links and passwd/group; Cmd `/bin/sh`.
pub fn busybox_image(format: Format) -> Result<Image> {
    let l = layer(&busybox_tar()?, Compression::Gzip, format)?;
    Ok(Image::build(format, &config("busybox"), vec![l]))
}

/// Pushes (1) as `busybox:1.0` (OCI manifest).
pub async fn push_busybox(reg: &Registry) -> Result<Pushed> {
    reg.push_image("busybox", "1.0", &busybox_image(Format::Oci)?).await
}

/// (2) `whiteouts:1.0`, two layers. Lower: `data/{keep,gone}`, `opq/{lower1,sub/lower2}`.
/// Upper: whiteout of `data/gone`, opaque `opq/` with `opq/upper`, plus `data/new`.
pub fn whiteouts_image() -> Result<Image> {
    let lower = LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/keep", 0o644, b"keep\n")
        .file("data/gone", 0o644, b"gone\n")
        .dir("opq", 0o755)
        .file("opq/lower1", 0o644, b"lower1\n")
        .dir("opq/sub", 0o755)
        .file("opq/sub/lower2", 0o644, b"lower2\n")
        .finish();
    let upper = LayerBuilder::new()
        .dir("data", 0o755)
        .whiteout("data/gone")
        .file("data/new", 0o644, b"new\n")
        .dir("opq", 0o755)
        .opaque("opq")
        .file("opq/upper", 0o644, b"upper\n")
        .finish();
    let layers = vec![
        layer(&lower, Compression::Gzip, Format::Oci)?,
        layer(&upper, Compression::Gzip, Format::Oci)?,
    ];
    Ok(Image::build(Format::Oci, &config("whiteouts"), layers))
}

/// Pushes (2) as `whiteouts:1.0`.
pub async fn push_whiteouts(reg: &Registry) -> Result<Pushed> {
    reg.push_image("whiteouts", "1.0", &whiteouts_image()?).await
}

/// Pushes (3) `zstd:1.0`: busybox with a zstd-compressed layer plus a small uncompressed one.
pub async fn push_zstd(reg: &Registry) -> Result<Pushed> {
    let extra = LayerBuilder::new().dir("etc", 0o755).file("etc/zstd", 0o644, b"zstd\n").finish();
    let layers = vec![
        layer(&busybox_tar()?, Compression::Zstd, Format::Oci)?,
        layer(&extra, Compression::None, Format::Oci)?,
    ];
    reg.push_image("zstd", "1.0", &Image::build(Format::Oci, &config("zstd"), layers)).await
}

/// Pushes (4) `multiarch:1.0`: an index of amd64 and arm64/v8 images whose configs differ in
/// `BERTH_FIXTURE` (`multiarch-amd64` / `multiarch-arm64`) and a label. The returned
/// [`Pushed`] describes the amd64 image; `format` picks OCI index or Docker manifest list.
pub async fn push_multiarch(reg: &Registry, format: Format) -> Result<Pushed> {
    let mut images = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let tar = LayerBuilder::new()
            .dir("etc", 0o755)
            .file("etc/arch", 0o644, format!("{arch}\n").as_bytes())
            .finish();
        let mut c = config(&format!("multiarch-{arch}"));
        c.architecture = arch.into();
        c.variant = variant.map(String::from);
        c.labels.push(("org.berth.arch".into(), arch.into()));
        images.push(Image::build(format, &c, vec![layer(&tar, Compression::Gzip, format)?]));
    }
    reg.push_index("multiarch", "1.0", &Index::build(format, images)?).await
}

/// Size of the big layer's one file.
pub const BIG_FILE_SIZE: usize = 50 * 1024 * 1024;

/// Pushes (5) `big:1.0`: one uncompressed layer with a 50 MiB incompressible file.
/// Uncompressed, because compressing 50 MiB in an unoptimised test build takes too long.
pub async fn push_big(reg: &Registry) -> Result<Pushed> {
    let data = pseudo_random_bytes(BIG_FILE_SIZE, 0x0062_6572_7468);
    let tar = LayerBuilder::new().dir("data", 0o755).file("data/big.bin", 0o644, &data).finish();
    let l = layer(&tar, Compression::None, Format::Oci)?;
    reg.push_image("big", "1.0", &Image::build(Format::Oci, &config("big"), vec![l])).await
}

/// The malicious layers of (6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malice {
    /// A file named `../../../…/tmp/<target>`.
    DotDot,
    /// `link -> /tmp/<target>` and then `link/pwned` (resolves inside the image: the file
    /// lands in its own `tmp/<target>`).
    SymlinkWriteThrough,
    /// A hardlink `evil` to `../../etc/passwd`.
    HardlinkEscape,
}

/// Pushes (6) `evil-<n>:1.0` with the malicious layer `malice`. `target` is an absolute
/// directory path (under /tmp) the layer tries to write into; it must exist for the symlink
/// case to be dangerous. Every layer starts with a harmless `ok.txt` so that a partial unpack
/// leaves evidence.
pub async fn push_malicious(reg: &Registry, malice: Malice, target: &str) -> Result<Pushed> {
    let rel = target.trim_start_matches('/');
    let l = LayerBuilder::new().file("ok.txt", 0o644, b"ok\n");
    let (repo, l) = match malice {
        Malice::DotDot => (
            "evil-dotdot",
            l.file(&format!("../../../../../../../../../../{rel}/escape"), 0o644, b"escaped\n"),
        ),
        Malice::SymlinkWriteThrough => {
            ("evil-symlink", l.symlink("link", target).file("link/pwned", 0o644, b"pwned\n"))
        }
        Malice::HardlinkEscape => {
            ("evil-hardlink", l.hardlink("evil", "../../etc/passwd").file("evil2", 0o644, b"x"))
        }
    };
    let l = layer(&l.finish(), Compression::Gzip, Format::Oci)?;
    reg.push_image(repo, "1.0", &Image::build(Format::Oci, &config(repo), vec![l])).await
}

/// Pushes (7) `tampered:1.0`: busybox whose layer blob the registry then serves with other
/// bytes of the same length. Returns the image; the bad digest is its layer's.
pub async fn push_tampered(reg: &Registry) -> Result<Pushed> {
    let p = reg.push_image("tampered", "1.0", &busybox_image(Format::Oci)?).await?;
    let layer = p.image.layers.first().context("no layer")?;
    reg.tamper_blob(&layer.blob.digest)?;
    Ok(p)
}

/// Cuts a finished tar as umoci writes its layers: the stream ends right after the last
/// entry's data (`last_len` bytes), with no padding to the block and no end-of-archive
/// blocks. Go's archive/tar reads that as a whole archive.
pub fn umoci_tail(mut tar: Vec<u8>, last_len: usize) -> Vec<u8> {
    let padding = (512 - last_len % 512) % 512;
    tar.truncate(tar.len() - 1024 - padding);
    tar
}

/// What (8) `layered:1.0` holds in `/usr/bin/a` (hard-linked as `/usr/bin/b` by layer 3).
pub const LAYERED_A: &[u8] = b"layer two\n";
/// What (8) puts at `/lib/foo.so`, through layer 2's `lib -> usr/lib`.
pub const LAYERED_FOO: &[u8] = b"foo from layer three\n";

/// Pushes (8) `layered:1.0`: busybox, then layers that only make sense on top of the ones
/// below, both ending without padding or end blocks (see [`umoci_tail`]). Layer 2 (gzip):
/// `usr/lib/`, `lib -> usr/lib`, `usr/bin/a`. Layer 3 (uncompressed): `lib/foo.so` (lands
/// in `usr/lib/foo.so`) and `usr/bin/b`, a hard link to layer 2's `usr/bin/a`.
pub async fn push_layered(reg: &Registry) -> Result<Pushed> {
    let two = LayerBuilder::new()
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .dir("usr/bin", 0o755)
        .file("usr/bin/a", 0o755, LAYERED_A)
        .finish();
    let three = LayerBuilder::new()
        .hardlink("usr/bin/b", "usr/bin/a")
        .file("lib/foo.so", 0o644, LAYERED_FOO)
        .finish();
    let layers = vec![
        layer(&busybox_tar()?, Compression::Gzip, Format::Oci)?,
        layer(&umoci_tail(two, LAYERED_A.len()), Compression::Gzip, Format::Oci)?,
        layer(&umoci_tail(three, LAYERED_FOO.len()), Compression::None, Format::Oci)?,
    ];
    reg.push_image("layered", "1.0", &Image::build(Format::Oci, &config("layered"), layers)).await
}

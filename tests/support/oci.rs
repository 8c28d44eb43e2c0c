//! Building OCI / Docker schema2 images in memory: tar layers with exact headers, compressed
//! blobs, image configs, manifests and indexes. Nothing touches the disk or the network here;
//! `push` sends the result to a registry.

use std::io::Write;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The mtime of every entry: fixed so that fixtures are reproducible.
const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The chain IDs of layers given their diff IDs, bottom first (as the snapshotter names them).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => sha256_digest(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Builds one uncompressed layer tar. Entry names are written into the header verbatim
/// (no normalisation, `..` and absolute paths allowed) so that malicious layers can be built.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self { tar: tar::Builder::new(Vec::new()) }
    }

    fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        let raw = name.as_bytes();
        // ustar: name up to 100 bytes; our fixtures never need the prefix field.
        assert!(raw.len() < 100, "fixture path too long: {name}");
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..raw.len()].copy_from_slice(raw);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        if let Some(u) = h.as_ustar_mut() {
            u.uname = [0; 32];
            u.uname[..4].copy_from_slice(b"root");
            u.gname = [0; 32];
            u.gname[..4].copy_from_slice(b"root");
        }
        h
    }

    fn set_link(h: &mut tar::Header, target: &str) {
        let raw = target.as_bytes();
        assert!(raw.len() < 100, "fixture link target too long: {target}");
        let old = h.as_old_mut();
        old.linkname = [0; 100];
        old.linkname[..raw.len()].copy_from_slice(raw);
    }

    fn append(&mut self, mut h: tar::Header, data: &[u8]) {
        h.set_cksum();
        self.tar.append(&h, data).expect("writing into a Vec cannot fail");
    }

    /// A directory (`name` without trailing slash is fine; one is added).
    pub fn dir(mut self, name: &str, mode: u32) -> Self {
        let name = if name.ends_with('/') { name.to_string() } else { format!("{name}/") };
        let h = Self::header(&name, tar::EntryType::Directory, mode, 0);
        self.append(h, &[]);
        self
    }

    /// A regular file.
    pub fn file(mut self, name: &str, mode: u32, content: &[u8]) -> Self {
        let h = Self::header(name, tar::EntryType::Regular, mode, content.len() as u64);
        self.append(h, content);
        self
    }

    /// A symlink `name -> target`.
    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(name, tar::EntryType::Symlink, 0o777, 0);
        Self::set_link(&mut h, target);
        self.append(h, &[]);
        self
    }

    /// A hard link `name` to the earlier entry `target`.
    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(name, tar::EntryType::Link, 0o644, 0);
        Self::set_link(&mut h, target);
        self.append(h, &[]);
        self
    }

    /// An OCI whiteout deleting `path` of a lower layer (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), 0o644, &[])
    }

    /// An OCI opaque whiteout: hides everything lower layers have in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{}/.wh..wh..opq", dir.trim_end_matches('/')), 0o644, &[])
    }

    /// The finished (uncompressed) tar.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().expect("writing into a Vec cannot fail")
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Which manifest flavour to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OCI image manifest / index.
    Oci,
    /// Docker image manifest v2 schema 2 / manifest list.
    Docker,
}

impl Format {
    fn manifest_type(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.manifest.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }
    fn index_type(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.index.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }
    fn config_type(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.config.v1+json",
            Format::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    fn layer_type(self, c: Compression) -> &'static str {
        match (self, c) {
            (Format::Docker, Compression::Gzip) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
            (Format::Docker, Compression::None) => "application/vnd.docker.image.rootfs.diff.tar",
            (_, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
            (_, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (_, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Content with its digest and media type.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The media type the referring manifest gives it.
    pub media_type: String,
    /// `sha256:<hex>` of `data`.
    pub digest: String,
    /// The bytes.
    pub data: Bytes,
}

impl Blob {
    /// A blob of `data` with `media_type`.
    pub fn new(media_type: &str, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self { media_type: media_type.to_string(), digest: sha256_digest(&data), data }
    }

    /// The OCI descriptor (`mediaType`, `digest`, `size`) pointing at this blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// A compressed layer blob plus the digest of its uncompressed tar.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The blob as pushed.
    pub blob: Blob,
    /// `sha256` of the uncompressed tar.
    pub diff_id: String,
}

/// Compresses `tar` into a layer blob.
pub fn layer(tar: &[u8], compression: Compression, format: Format) -> Result<Layer> {
    let diff_id = sha256_digest(tar);
    let data = match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(tar).context("gzip")?;
            enc.finish().context("gzip")?
        }
        Compression::Zstd => zstd::encode_all(tar, 1).context("zstd")?,
    };
    Ok(Layer { blob: Blob::new(format.layer_type(compression), data), diff_id })
}

/// What goes into an image config (the parts tests look at).
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8` for arm64, usually none.
    pub variant: Option<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.User`.
    pub user: String,
    /// `config.WorkingDir`.
    pub working_dir: String,
    /// `config.Labels`.
    pub labels: Vec<(String, String)>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            architecture: "amd64".into(),
            variant: None,
            cmd: vec!["/bin/sh".into()],
            entrypoint: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            user: String::new(),
            working_dir: String::new(),
            labels: Vec::new(),
        }
    }
}

/// A complete single-platform image: config, layers, manifest.
#[derive(Debug, Clone)]
pub struct Image {
    /// The config blob; its digest is the image ID.
    pub config: Blob,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// The manifest blob; its digest is what `name@digest` names.
    pub manifest: Blob,
}

impl Image {
    /// Builds config and manifest around `layers`.
    pub fn build(format: Format, cfg: &ImageConfig, layers: Vec<Layer>) -> Self {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let labels: serde_json::Map<String, Value> =
            cfg.labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let mut config = json!({
            "architecture": cfg.architecture,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {
                "Cmd": cfg.cmd,
                "Env": cfg.env,
                "User": cfg.user,
                "WorkingDir": cfg.working_dir,
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().enumerate()
                .map(|(i, _)| json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("berth-e2e layer {i}")}))
                .collect::<Vec<_>>(),
        });
        if !cfg.entrypoint.is_empty() {
            config["config"]["Entrypoint"] = json!(cfg.entrypoint);
        }
        if let Some(v) = &cfg.variant {
            config["variant"] = json!(v);
        }
        let config = Blob::new(format.config_type(), serde_json::to_vec(&config).expect("json"));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": format.manifest_type(),
            "config": config.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
        });
        let manifest =
            Blob::new(format.manifest_type(), serde_json::to_vec(&manifest).expect("json"));
        Self { config, layers, manifest }
    }

    /// Diff IDs, bottom first.
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }

    /// Total compressed size of layers plus config.
    pub fn size(&self) -> u64 {
        (self.config.data.len() + self.layers.iter().map(|l| l.blob.data.len()).sum::<usize>())
            as u64
    }
}

/// A multi-platform image: one manifest per platform and the index naming them.
#[derive(Debug, Clone)]
pub struct Index {
    /// The platform images, in index order.
    pub images: Vec<Image>,
    /// The index blob.
    pub index: Blob,
}

impl Index {
    /// Builds the index of `images`; each image's platform is read from its config.
    pub fn build(format: Format, images: Vec<Image>) -> Result<Self> {
        let mut manifests = Vec::new();
        for img in &images {
            let cfg: Value = serde_json::from_slice(&img.config.data)?;
            let mut platform = json!({"architecture": cfg["architecture"], "os": cfg["os"]});
            if let Some(v) = cfg.get("variant") {
                platform["variant"] = v.clone();
            }
            ensure!(img.manifest.media_type == format.manifest_type(), "mixed manifest formats");
            let mut d = img.manifest.descriptor();
            d["platform"] = platform;
            manifests.push(d);
        }
        let index = json!({
            "schemaVersion": 2,
            "mediaType": format.index_type(),
            "manifests": manifests,
        });
        let index = Blob::new(format.index_type(), serde_json::to_vec(&index)?);
        Ok(Self { images, index })
    }
}

/// Fast deterministic pseudo-random bytes (xorshift64*): incompressible for gzip/zstd.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed | 1;
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let d = vec!["sha256:a".to_string(), "sha256:b".to_string()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(c[1], sha256_digest(b"sha256:a sha256:b"));
    }

    #[test]
    fn layers_keep_raw_names_and_root_ownership() {
        let tar = LayerBuilder::new()
            .dir("etc", 0o755)
            .file("etc/passwd", 0o644, b"root:x:0:0::/:/bin/sh\n")
            .file("../escape", 0o644, b"x")
            .symlink("link", "/tmp/xyz")
            .hardlink("evil", "../../etc/passwd")
            .whiteout("etc/gone")
            .opaque("opq")
            .finish();
        let mut ar = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.uid().unwrap(), 0);
            assert_eq!(h.gid().unwrap(), 0);
            assert_eq!(h.mtime().unwrap(), MTIME);
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let link = e.link_name_bytes().map(|l| String::from_utf8(l.into_owned()).unwrap());
            seen.push((name, link));
        }
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["etc/", "etc/passwd", "../escape", "link", "evil", "etc/.wh.gone", "opq/.wh..wh..opq"]
        );
        assert_eq!(seen[3].1.as_deref(), Some("/tmp/xyz"));
        assert_eq!(seen[4].1.as_deref(), Some("../../etc/passwd"));
    }

    #[test]
    fn compressed_layers_round_trip_to_the_diff_id() {
        let tar = LayerBuilder::new().file("a", 0o644, b"hello").finish();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let l = layer(&tar, c, Format::Oci).unwrap();
            let raw = match c {
                Compression::None => l.blob.data.to_vec(),
                Compression::Gzip => {
                    let mut out = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::GzDecoder::new(&l.blob.data[..]),
                        &mut out,
                    )
                    .unwrap();
                    out
                }
                Compression::Zstd => zstd::decode_all(&l.blob.data[..]).unwrap(),
            };
            assert_eq!(sha256_digest(&raw), l.diff_id);
            assert_eq!(l.blob.digest, sha256_digest(&l.blob.data));
        }
    }

    #[test]
    fn image_config_and_manifest_agree() {
        let tar = LayerBuilder::new().file("a", 0o644, b"hello").finish();
        let l = layer(&tar, Compression::Gzip, Format::Docker).unwrap();
        let img = Image::build(Format::Docker, &ImageConfig::default(), vec![l.clone()]);
        let cfg: Value = serde_json::from_slice(&img.config.data).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"][0], json!(l.diff_id));
        assert_eq!(cfg["config"]["Cmd"], json!(["/bin/sh"]));
        let m: Value = serde_json::from_slice(&img.manifest.data).unwrap();
        assert_eq!(m["config"]["digest"], json!(img.config.digest));
        assert_eq!(
            m["layers"][0]["mediaType"],
            json!("application/vnd.docker.image.rootfs.diff.tar.gzip")
        );
        let idx = Index::build(Format::Docker, vec![img]).unwrap();
        let i: Value = serde_json::from_slice(&idx.index.data).unwrap();
        assert_eq!(i["manifests"][0]["platform"]["architecture"], json!("amd64"));
    }

    #[test]
    fn pseudo_random_bytes_are_deterministic_and_incompressible() {
        let a = pseudo_random_bytes(1 << 16, 7);
        assert_eq!(a, pseudo_random_bytes(1 << 16, 7));
        assert_ne!(a, pseudo_random_bytes(1 << 16, 8));
        assert!(zstd::encode_all(&a[..], 1).unwrap().len() > a.len() * 99 / 100);
    }
}

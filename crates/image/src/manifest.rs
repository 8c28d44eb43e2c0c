//! Manifests, indexes and image configs as they come from a registry: Docker schema 2 and OCI
//! image manifests, Docker manifest lists and OCI image indexes. Parsing, media-type checks,
//! and which compression a layer uses.

use berth_snapshot::Compression;
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::ImageError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The manifest types a pull accepts, for the `Accept` header.
pub const ACCEPTED_MANIFESTS: &[&str] =
    &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

/// Image config media types of container images.
const CONFIG_TYPES: &[&str] =
    &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// A content descriptor (`mediaType`, `digest`, `size`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the content is.
    #[serde(default)]
    pub media_type: String,
    /// Its digest (validated when used).
    pub digest: String,
    /// Its length in bytes.
    pub size: i64,
    /// In an index: the platform the manifest is for.
    #[serde(default)]
    pub platform: Option<PlatformSpec>,
}

/// `platform` of an index entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PlatformSpec {
    /// CPU architecture (`amd64`, `arm64`, ...).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// CPU variant (`v7`, `v8`).
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    /// The per-platform manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// A single-platform image manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageManifest {
    /// The image config.
    pub config: Descriptor,
    /// The layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// What a manifest body turned out to be.
#[derive(Debug, Clone)]
pub enum Manifest {
    /// A list of per-platform manifests.
    Index(Index),
    /// One image.
    Image(ImageManifest),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Versioned {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

/// Parses a manifest or index body fetched for `reference`.
pub fn parse_manifest(
    reference: &str,
    digest: &Digest,
    body: &[u8],
) -> Result<Manifest, ImageError> {
    let invalid = |reason: String| ImageError::InvalidManifest {
        reference: reference.to_string(),
        digest: digest.to_string(),
        reason,
    };
    let versioned: Versioned =
        serde_json::from_slice(body).map_err(|e| invalid(format!("not a manifest: {e}")))?;
    if versioned.schema_version == Some(1) {
        return Err(ImageError::UnsupportedMediaType {
            reference: reference.to_string(),
            media_type: versioned
                .media_type
                .unwrap_or_else(|| "application/vnd.docker.distribution.manifest.v1+json".into()),
            reason: "Docker schema 1 manifests are not supported".into(),
        });
    }
    // OCI lets `mediaType` be absent; then the shape tells an index from a manifest.
    let is_index = match versioned.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        None => versioned.manifests.is_some(),
        Some(other) => {
            return Err(ImageError::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: other.to_string(),
                reason: "not an image manifest or index".into(),
            });
        }
    };
    if is_index {
        let index: Index =
            serde_json::from_slice(body).map_err(|e| invalid(format!("bad index: {e}")))?;
        Ok(Manifest::Index(index))
    } else {
        let manifest: ImageManifest =
            serde_json::from_slice(body).map_err(|e| invalid(format!("bad manifest: {e}")))?;
        Ok(Manifest::Image(manifest))
    }
}

/// A descriptor's digest and size, checked, or `InvalidManifest`.
pub fn checked(
    reference: &str,
    manifest_digest: &Digest,
    descriptor: &Descriptor,
) -> Result<(Digest, u64), ImageError> {
    let invalid = |reason: String| ImageError::InvalidManifest {
        reference: reference.to_string(),
        digest: manifest_digest.to_string(),
        reason,
    };
    let digest = Digest::parse(&descriptor.digest).map_err(invalid)?;
    let size = u64::try_from(descriptor.size)
        .map_err(|_| invalid(format!("descriptor {digest} has negative size")))?;
    Ok((digest, size))
}

/// Checks that the config descriptor is a container image config.
pub fn check_config_type(reference: &str, descriptor: &Descriptor) -> Result<(), ImageError> {
    if CONFIG_TYPES.contains(&descriptor.media_type.as_str()) {
        Ok(())
    } else {
        Err(ImageError::UnsupportedMediaType {
            reference: reference.to_string(),
            media_type: descriptor.media_type.clone(),
            reason: "the config is not a container image config (an artifact?)".into(),
        })
    }
}

/// How a layer of `media_type` is compressed; foreign, non-distributable and unknown layer
/// types are refused.
pub fn layer_compression(reference: &str, media_type: &str) -> Result<Compression, ImageError> {
    let unsupported = |reason: &str| ImageError::UnsupportedMediaType {
        reference: reference.to_string(),
        media_type: media_type.to_string(),
        reason: reason.to_string(),
    };
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        t if t.contains("nondistributable") || t.contains("foreign") => {
            Err(unsupported("foreign / non-distributable layers are not fetched"))
        }
        _ => Err(unsupported("not a layer type berth can unpack")),
    }
}

/// The parts of an image config berth uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: Option<String>,
    /// Operating system.
    #[serde(default)]
    pub os: Option<String>,
    /// CPU variant.
    #[serde(default)]
    pub variant: Option<String>,
    /// The runtime config (`User`, `Env`, ...).
    #[serde(default)]
    pub config: Option<RuntimeConfig>,
    /// The layers' uncompressed digests.
    pub rootfs: RootFs,
}

/// `config` of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    /// `USER`.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// sha256 of each uncompressed layer tar, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Parses an image config and checks its diff IDs against the manifest's layer count.
pub fn parse_config(
    reference: &str,
    digest: &Digest,
    body: &[u8],
    layer_count: usize,
) -> Result<ImageConfigFile, ImageError> {
    let invalid = |reason: String| ImageError::InvalidConfig {
        reference: reference.to_string(),
        digest: digest.to_string(),
        reason,
    };
    let config: ImageConfigFile =
        serde_json::from_slice(body).map_err(|e| invalid(format!("does not parse: {e}")))?;
    if !config.rootfs.kind.is_empty() && config.rootfs.kind != "layers" {
        return Err(invalid(format!("rootfs type {:?} is not \"layers\"", config.rootfs.kind)));
    }
    if config.rootfs.diff_ids.len() != layer_count {
        return Err(invalid(format!(
            "{} diff_ids for {layer_count} layers",
            config.rootfs.diff_ids.len()
        )));
    }
    for diff_id in &config.rootfs.diff_ids {
        Digest::parse(diff_id).map_err(|why| invalid(format!("diff_id: {why}")))?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_index_from_manifest() {
        let d = Digest::of(b"x");
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(parse_manifest("r", &d, index), Ok(Manifest::Index(_))));
        let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert!(matches!(parse_manifest("r", &d, list), Ok(Manifest::Index(_))));
        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
        assert!(matches!(parse_manifest("r", &d, manifest), Ok(Manifest::Image(_))));
        let schema1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            parse_manifest("r", &d, schema1),
            Err(ImageError::UnsupportedMediaType { .. })
        ));
        let artifact = br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#;
        assert!(matches!(
            parse_manifest("r", &d, artifact),
            Err(ImageError::UnsupportedMediaType { .. })
        ));
        assert!(matches!(
            parse_manifest("r", &d, b"<html>"),
            Err(ImageError::InvalidManifest { .. })
        ));
    }

    #[test]
    fn layer_types() {
        use Compression::*;
        for (t, c) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            ("application/vnd.docker.image.rootfs.diff.tar", None),
        ] {
            assert_eq!(layer_compression("r", t).unwrap(), c, "{t}");
        }
        for t in [
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.wasm.content.layer.v1+wasm",
        ] {
            assert!(
                matches!(layer_compression("r", t), Err(ImageError::UnsupportedMediaType { .. })),
                "{t}"
            );
        }
    }

    #[test]
    fn config_needs_one_diff_id_per_layer() {
        let d = Digest::of(b"c");
        let diff = Digest::of(b"layer");
        let body = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"User":"1000:1000"}},"rootfs":{{"type":"layers","diff_ids":["{diff}"]}}}}"#
        );
        let config = parse_config("r", &d, body.as_bytes(), 1).unwrap();
        assert_eq!(config.config.unwrap().user.as_deref(), Some("1000:1000"));
        assert_eq!(config.rootfs.diff_ids, vec![diff.to_string()]);
        assert!(matches!(
            parse_config("r", &d, body.as_bytes(), 2),
            Err(ImageError::InvalidConfig { .. })
        ));
    }
}

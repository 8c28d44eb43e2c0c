//! Picking this host's manifest out of an image index, as containerd's default platform
//! matcher does: `linux` and the host architecture; for ARM the variant too (an exact variant
//! beats none, and an older ARM variant is still runnable).

use std::fmt;

use crate::manifest::{Descriptor, Index, PlatformSpec};

/// An OS / architecture / variant triple in OCI spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, `arm`, ...
    pub architecture: String,
    /// `v7`, `v8`, or none.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform berth runs on, from `std::env::consts::ARCH` in GOARCH spelling.
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            // No cheap way to tell v6 from v7 here; v7 is what distributions ship.
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            "loongarch64" => ("loong64", None),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
            other => (other, None),
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_string),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// Architecture names as they appear in the wild, in GOARCH spelling, with the variant a
/// name implies.
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.filter(|v| !v.is_empty()).map(str::to_ascii_lowercase);
    match arch.as_str() {
        "x86_64" | "x86-64" => ("amd64".into(), variant),
        "i386" => ("386".into(), None),
        // arm64 has only v8 in practice; "no variant" means v8.
        "aarch64" | "arm64" => ("arm64".into(), Some(variant.unwrap_or_else(|| "v8".into()))),
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        _ => (arch, variant),
    }
}

/// Whether a platform (an index entry's, or an image config's) runs on `wanted`.
pub fn matches(entry: &PlatformSpec, wanted: &Platform) -> bool {
    score(entry, wanted).is_some()
}

/// How well an index entry fits `wanted`: higher is better, `None` is no fit.
fn score(entry: &PlatformSpec, wanted: &Platform) -> Option<u32> {
    if !entry.os.eq_ignore_ascii_case(&wanted.os) {
        return None;
    }
    let (arch, variant) = normalize_arch(&entry.architecture, entry.variant.as_deref());
    let (want_arch, want_variant) = normalize_arch(&wanted.architecture, wanted.variant.as_deref());
    if arch != want_arch {
        return None;
    }
    match (variant.as_deref(), want_variant.as_deref()) {
        (a, b) if a == b => Some(100),
        (None, _) => Some(50),
        // An ARM v7 host runs v6 and v5 code, preferring the newest.
        (Some(v), Some(w)) if arch == "arm" => {
            let num = |s: &str| s.trim_start_matches('v').parse::<u32>().ok();
            match (num(v), num(w)) {
                (Some(v), Some(w)) if v < w => Some(v),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The best manifest of `index` for `wanted`; the first one wins among equals.
pub fn select<'a>(index: &'a Index, wanted: &Platform) -> Option<&'a Descriptor> {
    let mut best: Option<(u32, &Descriptor)> = None;
    for entry in &index.manifests {
        let Some(platform) = &entry.platform else { continue };
        if let Some(s) = score(platform, wanted)
            && best.is_none_or(|(b, _)| s > b)
        {
            best = Some((s, entry));
        }
    }
    best.map(|(_, entry)| entry)
}

/// The platforms an index offers, for error messages.
pub fn available(index: &Index) -> String {
    index
        .manifests
        .iter()
        .filter_map(|m| m.platform.as_ref())
        .map(|p| match p.variant.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest list as Docker Hub serves it for a multi-arch image, with attestations.
    const INDEX: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.oci.image.index.v1+json",
      "manifests": [
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000001","platform":{"architecture":"arm","os":"linux","variant":"v5"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000002","platform":{"architecture":"arm","os":"linux","variant":"v6"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000003","platform":{"architecture":"arm","os":"linux","variant":"v7"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000004","platform":{"architecture":"arm64","os":"linux","variant":"v8"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000005","platform":{"architecture":"amd64","os":"windows","os.version":"10.0.17763.5122"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000006","platform":{"architecture":"amd64","os":"linux"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000007","platform":{"architecture":"unknown","os":"unknown"},"annotations":{"vnd.docker.reference.type":"attestation-manifest"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000008","platform":{"architecture":"s390x","os":"linux"}}
      ]
    }"#;

    fn index() -> Index {
        serde_json::from_str(INDEX).unwrap()
    }

    fn pick(os: &str, arch: &str, variant: Option<&str>) -> Option<char> {
        let wanted = Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(str::to_string),
        };
        let index = index();
        select(&index, &wanted).and_then(|d| d.digest.chars().last())
    }

    #[test]
    fn picks_linux_and_arch() {
        assert_eq!(pick("linux", "amd64", None), Some('6'));
        assert_eq!(pick("linux", "arm64", Some("v8")), Some('4'));
        assert_eq!(pick("linux", "arm64", None), Some('4'));
        assert_eq!(pick("linux", "aarch64", None), Some('4'));
        assert_eq!(pick("linux", "s390x", None), Some('8'));
        assert_eq!(pick("windows", "amd64", None), Some('5'));
        assert_eq!(pick("linux", "riscv64", None), None);
    }

    #[test]
    fn arm_variants() {
        assert_eq!(pick("linux", "arm", Some("v7")), Some('3'));
        assert_eq!(pick("linux", "arm", Some("v6")), Some('2'));
        assert_eq!(pick("linux", "arm", Some("v5")), Some('1'));
        // A v8 32-bit host takes the newest older variant.
        assert_eq!(pick("linux", "arm", Some("v8")), Some('3'));
        let mut index = index();
        index.manifests.retain(|m| !m.digest.ends_with('3'));
        let wanted =
            Platform { os: "linux".into(), architecture: "arm".into(), variant: Some("v7".into()) };
        assert!(select(&index, &wanted).is_some_and(|d| d.digest.ends_with('2')));
    }

    #[test]
    fn host_is_linux_and_matches_its_own_index_entry() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host.to_string(), "linux/amd64");
            assert_eq!(select(&index(), &host).map(|d| d.digest.ends_with('6')), Some(true));
        }
    }

    #[test]
    fn lists_available_platforms() {
        let text = available(&index());
        assert!(text.starts_with("linux/arm/v5, linux/arm/v6"), "{text}");
        assert!(text.contains("linux/amd64"));
    }
}

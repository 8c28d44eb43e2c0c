//! Content digests. Only `sha256:<64 lowercase hex>` is accepted: it is what every registry
//! serves, and refusing anything else keeps digests safe to use as file names.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// Incremental sha256 for big blobs. aws-lc's assembly (AVX2, SHA-NI where present) is
/// 2-3x faster than the `sha2` crate's portable code on CPUs without SHA-NI, and hashing is
/// most of a pull's CPU time; the crate is already built for rustls.
pub(crate) struct Hasher(aws_lc_rs::digest::Context);

impl Hasher {
    /// A fresh hasher.
    pub(crate) fn new() -> Self {
        Self(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }

    /// Feeds `bytes`.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher(sha256)")
    }
}

/// A validated `sha256:<hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `s`, or says why it is not a sha256 digest.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(format!("digest {s:?} has no algorithm"));
        };
        if algorithm != "sha256" {
            return Err(format!("digest algorithm {algorithm:?} is not supported (only sha256)"));
        }
        if !is_sha256_hex(hex) {
            return Err(format!("digest {s:?} is not 64 lowercase hex digits"));
        }
        Ok(Self(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The digest a finished hasher stands for.
    pub(crate) fn from_hasher(hasher: Hasher) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.0.finish().as_ref())))
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The whole `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `s` is exactly 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_sha256() {
        let d = Digest::of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(d.as_str()), Ok(d.clone()));
        assert_eq!(d.hex().len(), 64);
        assert!(Digest::parse("sha512:abcd").is_err());
        assert!(Digest::parse("sha256:ABCDEF").is_err());
        assert!(Digest::parse(&d.as_str().to_uppercase()).is_err());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Digest::parse(d.hex()).is_err());
    }

    #[test]
    fn hasher_matches_one_shot() {
        let data = b"some bytes to hash".repeat(1000);
        let mut hasher = Hasher::new();
        for chunk in data.chunks(77) {
            hasher.update(chunk);
        }
        assert_eq!(Digest::from_hasher(hasher), Digest::of(&data));
    }
}

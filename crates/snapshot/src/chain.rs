//! Chain IDs (OCI image spec, "Layer ChainID") and digest string checks.

use sha2::{Digest, Sha256};

use crate::SnapshotError;

/// The only digest algorithm images use in practice (and the one chain IDs are defined with).
const SHA256_PREFIX: &str = "sha256:";

/// Returns the hex part of `sha256:<64 lowercase hex>`, or `None` if `digest` is not that.
pub(crate) fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix(SHA256_PREFIX)?;
    let ok =
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some(hex)
}

/// Checks a chain ID and returns its hex part (the directory name of the layer).
pub(crate) fn chain_hex(chain_id: &str) -> Result<&str, SnapshotError> {
    sha256_hex(chain_id).ok_or_else(|| SnapshotError::InvalidChainId(chain_id.to_owned()))
}

/// Checks a diff ID and returns its hex part.
pub(crate) fn diff_hex(diff_id: &str) -> Result<&str, SnapshotError> {
    sha256_hex(diff_id).ok_or_else(|| SnapshotError::InvalidDigest(diff_id.to_owned()))
}

/// The chain ID of layer `diff_id` on top of the layers whose chain ID is `parent`.
pub(crate) fn child_chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_owned(),
        Some(parent) => {
            let mut h = Sha256::new();
            h.update(parent.as_bytes());
            h.update(b" ");
            h.update(diff_id.as_bytes());
            format!("{SHA256_PREFIX}{}", hex::encode(h.finalize()))
        }
    }
}

/// The chain IDs of an image's layers, bottom first, from its `rootfs.diff_ids`
/// (`chain[0] = diff[0]`, `chain[n] = sha256(chain[n-1] + " " + diff[n])`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = child_chain_id(out.last().map(String::as_str), diff);
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn empty_input_gives_no_chain() {
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn chain_follows_the_spec() {
        let d: Vec<String> = ["a", "b", "c"].iter().map(|s| digest(s.as_bytes())).collect();
        let c = chain_ids(&d);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], d[0]);
        // Computed by hand from the definition: sha256 of the text "<chain> <diff>".
        let c1 = digest(format!("{} {}", d[0], d[1]).as_bytes());
        let c2 = digest(format!("{} {}", c1, d[2]).as_bytes());
        assert_eq!(c[1], c1);
        assert_eq!(c[2], c2);
    }

    #[test]
    fn known_vector() {
        // Fixed vector, computed outside Rust with
        // `printf 'sha256:aaa… sha256:bbb…' | sha256sum`.
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c");
    }

    #[test]
    fn digest_validation() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(sha256_hex(&good).is_some());
        assert!(sha256_hex("sha256:abc").is_none());
        assert!(sha256_hex(&good.to_uppercase()).is_none());
        assert!(sha256_hex(&format!("sha512:{}", "a".repeat(64))).is_none());
        assert!(sha256_hex(&format!("sha256:../{}", "a".repeat(61))).is_none());
        assert!(matches!(chain_hex("nope"), Err(SnapshotError::InvalidChainId(_))));
        assert!(matches!(diff_hex("nope"), Err(SnapshotError::InvalidDigest(_))));
    }
}

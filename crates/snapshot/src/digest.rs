//! A reader that hashes what passes through it.

use std::io::{self, Read};

use aws_lc_rs::digest::{Context, SHA256};

/// Hashes every byte read through it with sha256 (the uncompressed layer, for its diff ID).
///
/// aws-lc's sha256 (AVX2 / SHA-NI assembly) rather than the `sha2` crate: on CPUs without
/// SHA-NI it is 2-3x faster, and hashing the uncompressed layer is a large share of an unpack.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Context,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: R) -> Self {
        Self { inner, hasher: Context::new(&SHA256) }
    }

    /// Reads `inner` to its end (tar padding after the end-of-archive blocks is part of the
    /// diff ID) and returns the digest as `sha256:<hex>`.
    pub(crate) fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(format!("sha256:{}", hex::encode(self.hasher.finish().as_ref())))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn hashes_everything_including_unread_tail() {
        let data = b"abcdef";
        let mut r = HashingReader::new(&data[..]);
        let mut first = [0u8; 2];
        r.read_exact(&mut first).unwrap();
        let want = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        assert_eq!(r.finish().unwrap(), want);
    }
}

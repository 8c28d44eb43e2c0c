//! Reading layer tars that end early, as Go's `archive/tar` (containerd, CRI-O) accepts them.
//!
//! Some writers (umoci, which builds critest's test images) end the stream right after the
//! last entry's data: no zero padding up to the 512-byte block, no end-of-archive blocks.
//! The `tar` crate already takes a stream that ends at a header boundary, or after one zero
//! block, as the end of the archive; what it refuses is an end inside the padding after an
//! entry's data ("unexpected EOF during skip"). [`Lenient`] supplies that padding: when the
//! stream ends inside the padding of the entry being read, it yields the missing zeros, so
//! the tar reader reaches the next header boundary and sees a clean end there.
//!
//! Only padding is made up. The tar reader tells where the current entry's data ends
//! ([`EntryEnd::set`], from the entry's position and size), so an end *inside* the data is
//! still an error, and so is an end inside a header (the tar reader finds a partial block).
//! The zeros are added above the hashing reader: the diff ID covers the real bytes only.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// Tar block size: headers and data are padded to it.
const BLOCK: u64 = 512;

/// A tar stream reader that pads a stream ending inside an entry's padding (see the module
/// docs).
pub(crate) struct Lenient<R> {
    inner: R,
    /// Bytes handed out so far, made-up zeros included (the tar reader's position).
    pos: u64,
    /// Where the data of the entry being read ends, shared with [`EntryEnd`].
    data_end: Rc<Cell<u64>>,
    /// Made-up zeros still to hand out.
    zeros: u64,
    /// `inner` has ended: never read it again.
    ended: bool,
}

/// The tar reader's side: tells [`Lenient`] where the current entry's data ends.
#[derive(Clone)]
pub(crate) struct EntryEnd(Rc<Cell<u64>>);

impl EntryEnd {
    /// Records that the entry just read has `size` bytes of data from offset `file_pos`.
    pub(crate) fn set(&self, file_pos: u64, size: u64) {
        self.0.set(file_pos.saturating_add(size));
    }
}

impl<R: Read> Lenient<R> {
    /// Wraps the tar stream `inner`; feed the returned [`EntryEnd`] every entry.
    pub(crate) fn new(inner: R) -> (Self, EntryEnd) {
        let data_end = Rc::new(Cell::new(0));
        let end = EntryEnd(data_end.clone());
        (Self { inner, pos: 0, data_end, zeros: 0, ended: false }, end)
    }

    /// The wrapped stream (to read what follows the archive).
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Called at the end of `inner`: zeros to make up, or an error for an end inside data.
    fn at_end(&mut self) -> io::Result<u64> {
        let data_end = self.data_end.get();
        if self.pos < data_end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "layer tar ends inside an entry's data (at byte {}, data runs to byte {data_end})",
                    self.pos
                ),
            ));
        }
        let padded = data_end.div_ceil(BLOCK) * BLOCK;
        // Only the padding right after the current entry's data; anywhere else (a header
        // boundary: a clean end; inside a header: the tar reader reports the partial block)
        // the end stays as it is.
        Ok(padded.saturating_sub(self.pos))
    }
}

impl<R: Read> Read for Lenient<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.ended {
            let n = self.inner.read(buf)?;
            if n > 0 {
                self.pos += n as u64;
                return Ok(n);
            }
            self.ended = true;
            self.zeros = self.at_end()?;
        }
        let n = usize::try_from(self.zeros).unwrap_or(usize::MAX).min(buf.len());
        buf[..n].fill(0);
        self.zeros -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `tar` through [`Lenient`] and returns the file names and contents.
    fn read(tar: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
        let (lenient, end) = Lenient::new(tar);
        let mut archive = tar::Archive::new(lenient);
        let mut out = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            end.set(entry.raw_file_position(), entry.size());
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            out.push((name, data));
        }
        Ok(out)
    }

    /// A tar of `a` (600 bytes: one full block and 88 bytes of a second) and `b` (100
    /// bytes), with its two end blocks.
    fn sample() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, len) in [("a", 600usize), ("b", 100)] {
            let mut h = tar::Header::new_ustar();
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &vec![b'x'; len][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn want() -> Vec<(String, Vec<u8>)> {
        vec![("a".into(), vec![b'x'; 600]), ("b".into(), vec![b'x'; 100])]
    }

    #[test]
    fn whole_and_shortened_tails_read_alike() {
        let tar = sample();
        // header a, 2 blocks of a, header b, 1 block of b, 2 end blocks.
        assert_eq!(tar.len(), 512 * 7);
        let b_data_end = 512 * 4 + 100;
        for (what, len) in [
            ("whole", tar.len()),
            ("one end block", tar.len() - 512),
            ("no end blocks", tar.len() - 1024),
            ("partial padding", b_data_end + 200),
            ("no padding", b_data_end),
        ] {
            assert_eq!(read(&tar[..len]).unwrap(), want(), "{what}");
        }
    }

    #[test]
    fn truncated_data_is_an_error() {
        let tar = sample();
        for len in [512 * 4 + 99, 512 * 4 + 1, 512 + 600 - 1, 512 + 10] {
            let err = read(&tar[..len]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{len}: {err}");
        }
    }

    #[test]
    fn truncated_header_is_an_error() {
        let tar = sample();
        // Inside b's header, and inside a's own header.
        for len in [512 * 3 + 100, 511, 1] {
            assert!(read(&tar[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn unread_data_is_checked_too() {
        // The reader skips the data itself (here: we never read it).
        let tar = sample();
        let (lenient, end) = Lenient::new(&tar[..512 * 4 + 50]);
        let mut archive = tar::Archive::new(lenient);
        let mut result = Ok(());
        for entry in archive.entries().unwrap() {
            match entry {
                Ok(e) => end.set(e.raw_file_position(), e.size()),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        assert!(result.is_err());
        // And unread data that is all there, padding missing: fine.
        let (lenient, end) = Lenient::new(&tar[..512 * 4 + 100]);
        let mut archive = tar::Archive::new(lenient);
        let mut n = 0;
        for entry in archive.entries().unwrap() {
            let e = entry.unwrap();
            end.set(e.raw_file_position(), e.size());
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn bad_checksum_is_still_an_error() {
        let mut tar = sample();
        tar[512 * 3 + 148] ^= 1;
        assert!(read(&tar[..512 * 4 + 100]).is_err());
    }
}

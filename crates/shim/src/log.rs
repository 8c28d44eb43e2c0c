//! CRI log files: `<RFC3339Nano> <stream> <F|P> <content>\n`.
//!
//! Each stream (stdout, stderr) is split into lines; a line longer than
//! [`MAX_LINE`] bytes is written as `P` (partial) chunks of exactly that size followed by
//! the rest, and content still without a newline at EOF is written as `P` too (as
//! containerd does; the kubelet joins `P` records with the next one). Both streams append to
//! one file opened with `O_APPEND`, one `write(2)` per record, so records never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe::Receiver;

use crate::ShimError;

/// Longest line content in one record (the kubelet's and containerd's default, 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

/// Read size of a log copier. Each stream of each container holds one for its whole life
/// (in the external shim: per pod), and every record costs a `write(2)` anyway, so a bigger
/// read saves little; conmon reads 8 KiB too. Lines longer than this are joined by
/// [`LineSplitter`].
const COPY_BUF: usize = 8 * 1024;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The container's standard output.
    Stdout,
    /// The container's standard error.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Whether a record ends a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// The content ends a line (`F`).
    Full,
    /// The line continues in the next record (`P`).
    Partial,
}

/// Splits a byte stream into CRI log records. Pure: feed it chunks as they arrive.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    pending: Vec<u8>,
}

impl LineSplitter {
    /// A splitter with records of at most `max` content bytes (`max > 0`).
    pub fn new(max: usize) -> Self {
        LineSplitter { max: max.max(1), pending: Vec::new() }
    }

    /// Feeds `data`; calls `emit` for every complete record (content without the newline).
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            // Invariant: pending.len() <= max. A line of exactly `max` bytes followed by a
            // newline is one full record, so look one byte further than the room left.
            let room = self.max - self.pending.len();
            let window = &data[..data.len().min(room + 1)];
            if let Some(i) = window.iter().position(|&b| b == b'\n') {
                self.emit_joined(Tag::Full, &data[..i], &mut emit);
                data = &data[i + 1..];
            } else if window.len() == room + 1 {
                // No newline within max+1 bytes: the first `max` make a partial record.
                self.emit_joined(Tag::Partial, &data[..room], &mut emit);
                data = &data[room..];
            } else {
                self.pending.extend_from_slice(data);
                data = &[];
            }
        }
    }

    /// At EOF: emits what is left (a line without newline) as a partial record.
    pub fn finish(&mut self, mut emit: impl FnMut(Tag, &[u8])) {
        if !self.pending.is_empty() {
            emit(Tag::Partial, &self.pending);
            self.pending.clear();
        }
    }

    fn emit_joined(&mut self, tag: Tag, tail: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        if self.pending.is_empty() {
            emit(tag, tail);
        } else {
            self.pending.extend_from_slice(tail);
            emit(tag, &self.pending);
            self.pending.clear();
        }
    }
}

/// Formats one record: `<timestamp> <stream> <F|P> <content>\n`.
pub fn format_record(timestamp: &str, stream: Stream, tag: Tag, content: &[u8]) -> Vec<u8> {
    let tag = match tag {
        Tag::Full => "F",
        Tag::Partial => "P",
    };
    let mut line = Vec::with_capacity(timestamp.len() + content.len() + 12);
    line.extend_from_slice(timestamp.as_bytes());
    line.push(b' ');
    line.extend_from_slice(stream.as_str().as_bytes());
    line.push(b' ');
    line.extend_from_slice(tag.as_bytes());
    line.push(b' ');
    line.extend_from_slice(content);
    line.push(b'\n');
    line
}

/// Now, as the CRI log format wants it: `2016-10-06T00:17:09.669794202Z`.
pub fn timestamp_now() -> String {
    format_timestamp(SystemTime::now())
}

/// `t` in RFC 3339 with nanoseconds, in UTC (Go's `RFC3339Nano` but always with nine
/// fraction digits, as containerd writes CRI logs): `2016-10-06T00:17:09.669794202Z`.
/// Our own few lines rather than a date library: the external shim pays for every byte of
/// code it maps, and UTC needs no time zone data.
pub fn format_timestamp(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).map_or(i64::MIN, |s| -s);
            match d.subsec_nanos() {
                0 => (secs, 0),
                n => (secs.saturating_sub(1), 1_000_000_000 - n),
            }
        }
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (hour, min, sec) = (rem / 3600, rem / 60 % 60, rem % 60);
    if !(0..=9999).contains(&year) {
        // Not a date a log will carry; still well-formed (RFC 3339 has four-digit years).
        let year = year.clamp(0, 9999);
        return format!("{year:04}-{month:02}-{day:02}T{hour:02}:{min:02}:{sec:02}.{nanos:09}Z");
    }
    let mut out = [0u8; 30];
    let fields: [(usize, u64, usize); 7] = [
        (0, year as u64, 4),
        (5, u64::from(month), 2),
        (8, u64::from(day), 2),
        (11, hour as u64, 2),
        (14, min as u64, 2),
        (17, sec as u64, 2),
        (20, u64::from(nanos), 9),
    ];
    for (at, mut value, width) in fields {
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    for (at, sep) in
        [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (29, b'Z')]
    {
        out[at] = sep;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

/// The proleptic Gregorian date (year, month 1-12, day 1-31) `days` after 1970-01-01
/// (Howard Hinnant's `civil_from_days`: eras of 400 years, years starting in March so the
/// leap day comes last).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A task's CRI log file, shared by its stdout and stderr copiers.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: Mutex<File>,
}

/// What a file that is not a regular file is, for error messages.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown file type"
    }
}

/// Opens the log for appending, creating it, and refuses anything but a regular file there.
///
/// The path is the kubelet's, but what sits at it may have been put there by anyone who can
/// write the pod's log directory: `O_NOFOLLOW` keeps a symlink from sending the container's
/// output into whatever host file it names (the open fails with `ELOOP`), and `O_NONBLOCK`
/// keeps a FIFO from blocking the open until a reader comes (it fails with `ENXIO`, or opens
/// when there is a reader, and the fstat refuses it). `O_NONBLOCK` is then cleared: it means
/// nothing for a regular file, and the log must never see short writes.
fn open_log(path: &Path) -> Result<File, ShimError> {
    let io = |action| move |source| ShimError::Io { action, path: path.to_owned(), source };
    // A look first, so that a device node there is never opened (opening some has side
    // effects); the flags and the fstat below cover what is swapped in meanwhile.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.file_type().is_file()
    {
        return Err(not_regular(path, meta.file_type()));
    }
    let file = match OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(source) => {
            // ELOOP, ENXIO, EISDIR and the like: say what is there rather than the errno.
            if let Ok(meta) = std::fs::symlink_metadata(path)
                && !meta.file_type().is_file()
            {
                return Err(not_regular(path, meta.file_type()));
            }
            return Err(io("open log file")(source));
        }
    };
    let meta = file.metadata().map_err(io("stat log file"))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    let sys = |source| ShimError::Sys { call: "fcntl on the log file", source };
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).map_err(sys)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(sys)?;
    Ok(file)
}

fn not_regular(path: &Path, t: std::fs::FileType) -> ShimError {
    ShimError::LogNotRegular { path: path.to_owned(), kind: file_kind(t).to_string() }
}

impl LogWriter {
    /// Opens (creating) `path` for appending; creates its directory if missing. Refuses a
    /// path holding anything but a regular file (a symlink, a FIFO, a directory), without
    /// blocking.
    pub fn open(path: &Path) -> Result<Self, ShimError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| ShimError::Io {
                action: "create log directory",
                path: dir.to_owned(),
                source,
            })?;
        }
        Ok(LogWriter { path: path.to_owned(), file: Mutex::new(open_log(path)?) })
    }

    /// Reopens the file at the same path (the kubelet rotated it away), with the checks of
    /// [`LogWriter::open`]; on refusal the old file stays in use.
    pub fn reopen(&self) -> Result<(), ShimError> {
        let new = open_log(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// Appends one record in a single `write(2)`.
    pub fn write_record(&self, stream: Stream, tag: Tag, content: &[u8]) {
        let line = format_record(&timestamp_now(), stream, tag, content);
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // A regular file in O_APPEND mode takes the whole buffer in one write unless the disk
        // is full; then the record is lost either way.
        if let Err(e) = file.write_all(&line) {
            tracing::warn!(path = %self.path.display(), error = %e, "writing container log");
        }
    }
}

/// Copies one stream of a container into its log file (`None`: discards it) until EOF.
/// A trailing `\r` is dropped from full lines (as containerd does): terminals end lines
/// with `\r\n`.
pub(crate) async fn copy_stream(
    mut rx: Receiver,
    stream: Stream,
    log: Option<std::sync::Arc<LogWriter>>,
    attach: Option<crate::attach::Output>,
) {
    let kind = match stream {
        Stream::Stdout => crate::attach::FRAME_STDOUT,
        Stream::Stderr => crate::attach::FRAME_STDERR,
    };
    let mut splitter = LineSplitter::new(MAX_LINE);
    let mut buf = vec![0u8; COPY_BUF];
    let write = |tag: Tag, content: &[u8]| {
        if let Some(log) = &log {
            let content = match tag {
                Tag::Full => content.strip_suffix(b"\r").unwrap_or(content),
                Tag::Partial => content,
            };
            log.write_record(stream, tag, content);
        }
    };
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                // Attached clients get it as read; nobody attached costs no copy.
                if let Some(tx) = &attach
                    && tx.receiver_count() > 0
                {
                    let _ = tx.send((kind, buf[..n].into()));
                }
                splitter.push(&buf[..n], write)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once the last slave fd is closed: that is its EOF.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                tracing::warn!(error = %e, stream = stream.as_str(), "reading container output");
                break;
            }
        }
    }
    splitter.finish(write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(Tag, Vec<u8>)> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |t, b| out.push((t, b.to_vec())));
        }
        s.finish(|t, b| out.push((t, b.to_vec())));
        out
    }

    fn f(s: &str) -> (Tag, Vec<u8>) {
        (Tag::Full, s.as_bytes().to_vec())
    }
    fn p(s: &str) -> (Tag, Vec<u8>) {
        (Tag::Partial, s.as_bytes().to_vec())
    }

    #[test]
    fn full_lines() {
        assert_eq!(split(16, &[b"a\nbb\n"]), vec![f("a"), f("bb")]);
    }

    #[test]
    fn empty_lines_and_empty_input() {
        assert_eq!(split(16, &[b"\n\n"]), vec![f(""), f("")]);
        assert_eq!(split(16, &[]), vec![]);
        assert_eq!(split(16, &[b"", b""]), vec![]);
    }

    #[test]
    fn line_spread_over_chunks() {
        assert_eq!(
            split(16, &[b"he", b"llo", b" world\nnext", b"\n"]),
            vec![f("hello world"), f("next")]
        );
    }

    #[test]
    fn trailing_content_without_newline_is_partial() {
        assert_eq!(split(16, &[b"a\nlast"]), vec![f("a"), p("last")]);
    }

    #[test]
    fn long_line_is_split_into_max_chunks() {
        assert_eq!(split(4, &[b"abcdefghij\n"]), vec![p("abcd"), p("efgh"), f("ij")]);
    }

    #[test]
    fn long_line_split_across_chunk_boundaries() {
        assert_eq!(
            split(4, &[b"ab", b"cde", b"f", b"ghij", b"k\n"]),
            vec![p("abcd"), p("efgh"), f("ijk")]
        );
    }

    #[test]
    fn line_of_exactly_max_is_full() {
        assert_eq!(split(4, &[b"abcd\n"]), vec![f("abcd")]);
        // Even when the newline arrives in a later chunk.
        assert_eq!(split(4, &[b"abcd", b"\nx\n"]), vec![f("abcd"), f("x")]);
    }

    #[test]
    fn line_of_exactly_max_at_eof_is_partial() {
        assert_eq!(split(4, &[b"abcd"]), vec![p("abcd")]);
    }

    #[test]
    fn multiple_of_max_without_newline() {
        assert_eq!(split(2, &[b"abcd"]), vec![p("ab"), p("cd")]);
        assert_eq!(split(2, &[b"abcd\n"]), vec![p("ab"), f("cd")]);
    }

    #[test]
    fn max_plus_one_then_newline() {
        assert_eq!(split(4, &[b"abcde\n"]), vec![p("abcd"), f("e")]);
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input: Vec<u8> =
            (0..200u8).map(|i| if i % 37 == 0 { b'\n' } else { b'a' + i % 26 }).collect();
        let whole = split(8, &[&input]);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split(8, &bytes), whole);
        let sevens: Vec<&[u8]> = input.chunks(7).collect();
        assert_eq!(split(8, &sevens), whole);
        // Reassembling gives the input back (the final newline-less rest is partial).
        let mut back = Vec::new();
        for (t, b) in whole {
            back.extend_from_slice(&b);
            if t == Tag::Full {
                back.push(b'\n');
            }
        }
        assert_eq!(back, input);
    }

    #[test]
    fn carriage_returns_and_binary_are_kept() {
        assert_eq!(split(16, &[b"a\r\n\x00\xff\n"]), vec![f("a\r"), (Tag::Full, vec![0, 0xff])]);
    }

    #[test]
    fn default_max_is_16k() {
        let line = vec![b'x'; MAX_LINE * 2 + 5];
        let mut input = line.clone();
        input.push(b'\n');
        let out = split(MAX_LINE, &[&input]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], (Tag::Partial, vec![b'x'; MAX_LINE]));
        assert_eq!(out[1], (Tag::Partial, vec![b'x'; MAX_LINE]));
        assert_eq!(out[2], (Tag::Full, vec![b'x'; 5]));
    }

    #[test]
    fn record_format() {
        let ts = "2016-10-06T00:17:09.669794202Z";
        assert_eq!(
            format_record(ts, Stream::Stdout, Tag::Full, b"hello"),
            b"2016-10-06T00:17:09.669794202Z stdout F hello\n".to_vec()
        );
        assert_eq!(
            format_record(ts, Stream::Stderr, Tag::Partial, b""),
            b"2016-10-06T00:17:09.669794202Z stderr P \n".to_vec()
        );
    }

    #[test]
    fn timestamp_is_rfc3339_nanos_utc() {
        let ts = timestamp_now();
        // 2016-10-06T00:17:09.669794202Z
        assert_eq!(ts.len(), 30, "{ts}");
        assert!(ts.ends_with('Z'));
        assert_eq!(&ts[10..11], "T");
        assert_eq!(&ts[19..20], ".");
    }

    fn at(secs: i64, nanos: u32) -> SystemTime {
        let d = std::time::Duration::new(secs.unsigned_abs(), 0);
        let whole = if secs >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d };
        whole + std::time::Duration::from_nanos(u64::from(nanos))
    }

    #[test]
    fn timestamps_of_known_instants() {
        for (secs, nanos, want) in [
            (0, 0, "1970-01-01T00:00:00.000000000Z"),
            (1_475_713_029, 669_794_202, "2016-10-06T00:17:09.669794202Z"),
            (951_782_400, 1, "2000-02-29T00:00:00.000000001Z"),
            (951_868_799, 999_999_999, "2000-02-29T23:59:59.999999999Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000000Z"),
            (1_709_251_199, 0, "2024-02-29T23:59:59.000000000Z"),
            (1_735_689_599, 5, "2024-12-31T23:59:59.000000005Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59.000000000Z"),
            (-1, 999_999_999, "1969-12-31T23:59:59.999999999Z"),
            (-86_400, 0, "1969-12-31T00:00:00.000000000Z"),
            (-62_167_219_200, 0, "0000-01-01T00:00:00.000000000Z"),
        ] {
            assert_eq!(format_timestamp(at(secs, nanos)), want, "{secs}.{nanos}");
        }
        // Out of RFC 3339's range: clamped, still 30 bytes.
        assert_eq!(format_timestamp(at(253_402_300_800, 0)).len(), 30);
    }

    #[test]
    fn timestamps_match_chrono() {
        use chrono::{DateTime, SecondsFormat};
        // A deterministic walk over 1970..2400 with odd steps hits every month, leap days and
        // century years, and all digits of the fraction.
        let (mut secs, mut nanos) = (-100_000_i64, 1_u32);
        while secs < 13_569_465_600 {
            let want = DateTime::from_timestamp(secs, nanos)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Nanos, true);
            assert_eq!(format_timestamp(at(secs, nanos)), want);
            secs += 86_400 * 3 + 7_919;
            nanos = (nanos.wrapping_mul(7_919) + 104_729) % 1_000_000_000;
        }
    }

    #[test]
    fn writer_appends_and_reopens_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/0.log");
        let w = LogWriter::open(&path).unwrap();
        w.write_record(Stream::Stdout, Tag::Full, b"one");
        std::fs::rename(&path, dir.path().join("rotated.log")).unwrap();
        w.reopen().unwrap();
        w.write_record(Stream::Stderr, Tag::Full, b"two");
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(new.ends_with(" stderr F two\n"), "{new}");
        let old = std::fs::read_to_string(dir.path().join("rotated.log")).unwrap();
        assert!(old.ends_with(" stdout F one\n"), "{old}");
    }

    #[test]
    fn writer_refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let host_file = dir.path().join("host-file");
        std::fs::write(&host_file, "precious\n").unwrap();
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&host_file, &link).unwrap();
        let subdir = dir.path().join("dir.log");
        std::fs::create_dir(&subdir).unwrap();

        let kind = |path: &Path| match LogWriter::open(path) {
            Err(ShimError::LogNotRegular { kind, .. }) => kind,
            other => panic!("{}: {other:?}", path.display()),
        };
        // No reader: a blocking open would wait here forever.
        assert_eq!(kind(&fifo), "a FIFO");
        assert_eq!(kind(&link), "a symbolic link");
        assert_eq!(kind(&subdir), "a directory");
        // A FIFO with a reader opens, and is refused all the same.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        assert_eq!(kind(&fifo), "a FIFO");

        // Reopen after a hostile swap: refused, the old file stays in use.
        let path = dir.path().join("0.log");
        let w = LogWriter::open(&path).unwrap();
        std::fs::rename(&path, dir.path().join("rotated.log")).unwrap();
        std::os::unix::fs::symlink(&host_file, &path).unwrap();
        assert!(matches!(w.reopen(), Err(ShimError::LogNotRegular { .. })));
        w.write_record(Stream::Stdout, Tag::Full, b"still here");
        assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "precious\n");
        let old = std::fs::read_to_string(dir.path().join("rotated.log")).unwrap();
        assert!(old.ends_with(" stdout F still here\n"), "{old}");
        // The writer's file is blocking again: O_NONBLOCK was only for the open.
        let file = w.file.lock().unwrap();
        let flags = nix::fcntl::fcntl(&*file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }
}

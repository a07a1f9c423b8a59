//! The main process's output log, `<sandbox dir>/output.log`, bounded.
//!
//! A sequence of records `[stream: u8][len: u32 LE][bytes]`, stream 1 for
//! stdout and 2 for stderr, so `kiln logs` can give each back on its own
//! descriptor. Only the supervisor appends; it publishes the length of what
//! is completely written, so readers never see half a record.
//!
//! A guest decides how much it prints, so the log is a ring of two
//! segments that keeps the newest output: `output.log` (being written) and
//! `output.log.1` (the one before). When `output.log` would grow past half
//! the limit it is renamed to `output.log.1` (dropping the older one) and
//! a new `output.log` starts, so the log never holds more than the limit
//! (plus one record). Each segment starts with a meta record (stream 0:
//! `[start u64 LE][dropped u64 LE]`): the logical offset of its first
//! record and how many output bytes were written before it. Offsets given
//! to and published by this module are logical (bytes of data records ever
//! written), so readers follow across rotations; a reader that fell behind
//! skips what was dropped. A log without a meta record (written before the
//! limit existed) is one segment starting at 0.
//!
//! The limit: `KILN_LOG_LIMIT` in the supervisor's environment (bytes, or
//! with a `K`, `M` or `G` suffix; `kiln run --log-limit` sets it for the
//! sandbox it starts), default `DEFAULT_LIMIT`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Largest record body; larger writes are split.
pub const MAX_RECORD: usize = 1 << 20;
/// What a sandbox's output log may hold by default.
pub const DEFAULT_LIMIT: u64 = 64 << 20;
/// The smallest limit accepted (smaller values are raised to it).
pub const MIN_LIMIT: u64 = 64 << 10;
/// Environment variable that sets the limit (see the module docs).
pub const LIMIT_ENV: &str = "KILN_LOG_LIMIT";

const META: u8 = 0;
const META_LEN: u64 = 5 + 16;

/// Which descriptor a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout = 1,
    Stderr = 2,
}

/// A log limit that is not a size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid log limit {0:?}: expected a size in bytes, optionally with K, M or G (e.g. 64M)")]
pub struct ParseLimitError(pub String);

/// Parses `123`, `64K`, `64M`, `1G` (powers of 1024; `KiB`/`MiB`/`GiB` and
/// lower case accepted).
pub fn parse_limit(s: &str) -> Result<u64, ParseLimitError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, shift) = [
        ("gib", 30),
        ("mib", 20),
        ("kib", 10),
        ("g", 30),
        ("m", 20),
        ("k", 10),
    ]
    .iter()
    .find_map(|(suf, sh)| lower.strip_suffix(suf).map(|n| (n.to_string(), *sh)))
    .unwrap_or((lower.strip_suffix('b').unwrap_or(&lower).to_string(), 0));
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| ParseLimitError(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .filter(|v| *v > 0)
        .ok_or_else(|| ParseLimitError(s.to_string()))
}

/// The limit from `KILN_LOG_LIMIT`, or `DEFAULT_LIMIT` (with a warning if
/// the variable is set but not a size).
pub fn limit_from_env() -> u64 {
    match std::env::var(LIMIT_ENV) {
        Ok(v) => match parse_limit(&v) {
            Ok(n) => n.max(MIN_LIMIT),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring {LIMIT_ENV}");
                DEFAULT_LIMIT
            }
        },
        Err(_) => DEFAULT_LIMIT,
    }
}

/// The path of the older segment.
pub fn previous_segment(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(".1");
    PathBuf::from(p)
}

/// `(start, dropped, meta_len)` of a segment, from its first record.
fn read_meta(file: &mut File) -> std::io::Result<(u64, u64, u64)> {
    let mut m = [0u8; META_LEN as usize];
    file.seek(SeekFrom::Start(0))?;
    let mut got = 0;
    while got < m.len() {
        let n = file.read(&mut m[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got >= 1 && m[0] == META {
        if got < m.len() || m[1..5] != 16u32.to_le_bytes() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad segment header",
            ));
        }
        let start = u64::from_le_bytes(m[5..13].try_into().expect("8 bytes"));
        let dropped = u64::from_le_bytes(m[13..21].try_into().expect("8 bytes"));
        return Ok((start, dropped, META_LEN));
    }
    Ok((0, 0, 0)) // a log from before segments: one segment from 0
}

fn meta_record(start: u64, dropped: u64) -> [u8; META_LEN as usize] {
    let mut m = [0u8; META_LEN as usize];
    m[0] = META;
    m[1..5].copy_from_slice(&16u32.to_le_bytes());
    m[5..13].copy_from_slice(&start.to_le_bytes());
    m[13..21].copy_from_slice(&dropped.to_le_bytes());
    m
}

/// Appends records, rotating segments to stay within the limit.
pub struct LogWriter {
    path: PathBuf,
    file: File,
    /// Logical end: everything written so far.
    len: u64,
    /// Logical start of the current segment.
    start: u64,
    /// Output bytes written before the current segment.
    dropped_before: u64,
    /// Output bytes in the current segment.
    bodies: u64,
    /// Output bytes no reader can get any more.
    dropped: u64,
    segment_max: u64,
    chunk: usize,
}

impl LogWriter {
    /// Opens (creating) the log for appending, with the default limit.
    pub fn open(path: &Path) -> std::io::Result<LogWriter> {
        Self::open_with_limit(path, DEFAULT_LIMIT)
    }

    /// Opens (creating) the log for appending; it never holds much more
    /// than `limit` bytes (at least `MIN_LIMIT`).
    pub fn open_with_limit(path: &Path, limit: u64) -> std::io::Result<LogWriter> {
        let limit = limit.max(MIN_LIMIT);
        let segment_max = limit / 2;
        let chunk = MAX_RECORD.min((segment_max / 2) as usize);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        let (start, dropped_before, meta_len, bodies) = if size == 0 {
            file.write_all(&meta_record(0, 0))?;
            (0, 0, META_LEN, 0)
        } else {
            let (s, d, m) = read_meta(&mut file)?;
            let mut bodies = 0;
            let mut r = LogReader::open(path, s)?;
            r.read_to_end(|_, b| {
                bodies += b.len() as u64;
                Ok(())
            })
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            (s, d, m, bodies)
        };
        let size = file.metadata()?.len();
        let prev_dropped = match File::open(previous_segment(path)) {
            Ok(mut f) => read_meta(&mut f).map(|(_, d, _)| d).unwrap_or(0),
            Err(_) => dropped_before,
        };
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            len: start + (size - meta_len),
            start,
            dropped_before,
            bodies,
            dropped: prev_dropped,
            segment_max,
            chunk,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let prev = previous_segment(&self.path);
        std::fs::rename(&self.path, &prev)?;
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let dropped_before = self.dropped_before + self.bodies;
        file.write_all(&meta_record(self.len, dropped_before))?;
        // What the new `.1` holds stays readable; what the old `.1` held
        // (everything before the segment just renamed) is gone.
        self.dropped = self.dropped_before;
        self.file = file;
        self.start = self.len;
        self.dropped_before = dropped_before;
        self.bodies = 0;
        Ok(())
    }

    /// Appends `bytes` as one or more records; returns the new (logical)
    /// length.
    pub fn append(&mut self, stream: LogStream, bytes: &[u8]) -> std::io::Result<u64> {
        for chunk in bytes.chunks(self.chunk) {
            let rec_len = 5 + chunk.len() as u64;
            let in_segment = self.len - self.start;
            if in_segment > 0 && in_segment + rec_len > self.segment_max {
                self.rotate()?;
            }
            let mut rec = Vec::with_capacity(5 + chunk.len());
            rec.push(stream as u8);
            // A chunk is at most MAX_RECORD bytes, which fits a u32.
            rec.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            rec.extend_from_slice(chunk);
            self.file.write_all(&rec)?;
            self.len += rec_len;
            self.bodies += chunk.len() as u64;
        }
        Ok(self.len)
    }

    /// Logical length: bytes of records ever written.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Output bytes dropped so far to stay within the limit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Output bytes a log has dropped to stay within its limit (0 if it has
/// no log).
pub fn dropped(path: &Path) -> std::io::Result<u64> {
    let mut f = match File::open(previous_segment(path)).or_else(|_| File::open(path)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    Ok(read_meta(&mut f)?.1)
}

/// The log is not a sequence of records.
#[derive(Debug, thiserror::Error)]
pub enum ReadLogError {
    #[error("cannot read the output log")]
    Io(#[from] std::io::Error),
    #[error("the output log is corrupt at byte {0}")]
    Corrupt(u64),
}

/// An open segment.
struct Segment {
    file: File,
    start: u64,
    meta_len: u64,
}

/// Reads records from a logical offset, across rotations.
pub struct LogReader {
    path: PathBuf,
    seg: Option<Segment>,
    offset: u64,
    skipped: u64,
}

impl LogReader {
    pub fn open(path: &Path, offset: u64) -> std::io::Result<LogReader> {
        let mut r = LogReader {
            path: path.to_path_buf(),
            seg: None,
            offset,
            skipped: 0,
        };
        r.locate()?;
        if r.seg.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no output log at {}", path.display()),
            ));
        }
        Ok(r)
    }

    /// Logical offset of the next record to read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Logical bytes skipped because the writer had dropped them before
    /// this reader got there.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Opens the segment holding `self.offset` (or, if that was dropped,
    /// the oldest one, skipping ahead).
    fn locate(&mut self) -> std::io::Result<()> {
        // The current segment first: a rotation between the two opens then
        // gives us the same segment twice, never a gap.
        let mut found = vec![];
        for p in [self.path.clone(), previous_segment(&self.path)] {
            match File::open(&p) {
                Ok(mut file) => {
                    if let Ok((start, _, meta_len)) = read_meta(&mut file) {
                        found.push(Segment {
                            file,
                            start,
                            meta_len,
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let holding = found
            .iter()
            .enumerate()
            .filter(|(_, s)| s.start <= self.offset)
            .max_by_key(|(_, s)| s.start)
            .map(|(i, _)| i);
        let pick = match holding {
            Some(i) => Some(i),
            None => found
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.start)
                .map(|(i, _)| i),
        };
        if let Some(i) = pick {
            let seg = found.swap_remove(i);
            if seg.start > self.offset {
                self.skipped += seg.start - self.offset;
                self.offset = seg.start;
            }
            self.seg = Some(seg);
        }
        Ok(())
    }

    /// Calls `f` for every complete record between the current offset and
    /// `end` (a length published by the writer).
    pub fn read_until(
        &mut self,
        end: u64,
        mut f: impl FnMut(LogStream, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), ReadLogError> {
        let mut header = [0u8; 5];
        let mut body = Vec::new();
        let mut relocated = false;
        while end > self.offset && end - self.offset >= 5 {
            let Some(seg) = self.seg.as_mut() else {
                self.locate()?;
                if self.seg.is_none() {
                    return Ok(());
                }
                continue;
            };
            let pos = seg.meta_len + (self.offset - seg.start);
            let size = seg.file.metadata()?.len();
            if pos + 5 > size {
                // This segment ended (the writer rotated): go on in the next.
                if relocated {
                    return Ok(()); // nothing newer yet
                }
                relocated = true;
                let before = (seg.start, self.offset);
                self.seg = None;
                self.locate()?;
                if self.seg.as_ref().map(|s| (s.start, self.offset)) == Some(before) {
                    return Ok(());
                }
                continue;
            }
            relocated = false;
            seg.file.seek(SeekFrom::Start(pos))?;
            seg.file.read_exact(&mut header)?;
            let stream = match header[0] {
                1 => LogStream::Stdout,
                2 => LogStream::Stderr,
                _ => return Err(ReadLogError::Corrupt(self.offset)),
            };
            let len = u64::from(u32::from_le_bytes([
                header[1], header[2], header[3], header[4],
            ]));
            if len as usize > MAX_RECORD || 5 + len > end - self.offset || pos + 5 + len > size {
                return Err(ReadLogError::Corrupt(self.offset));
            }
            body.resize(len as usize, 0);
            seg.file.read_exact(&mut body)?;
            f(stream, &body)?;
            self.offset += 5 + len;
        }
        Ok(())
    }

    /// Reads to the end of the log as it is now.
    pub fn read_to_end(
        &mut self,
        f: impl FnMut(LogStream, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), ReadLogError> {
        let end = {
            let mut cur = File::open(&self.path)?;
            let (start, _, meta_len) = read_meta(&mut cur)?;
            start + cur.metadata()?.len().saturating_sub(meta_len)
        };
        self.read_until(end, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_reads() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("output.log");
        let mut w = LogWriter::open(&p).unwrap();
        w.append(LogStream::Stdout, b"out1").unwrap();
        let mid = w.append(LogStream::Stderr, b"err1").unwrap();
        w.append(LogStream::Stdout, &vec![7u8; MAX_RECORD + 10])
            .unwrap();
        let mut r = LogReader::open(&p, 0).unwrap();
        let mut got = vec![];
        r.read_until(mid, |s, b| {
            got.push((s, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                (LogStream::Stdout, b"out1".to_vec()),
                (LogStream::Stderr, b"err1".to_vec())
            ]
        );
        let mut n = 0;
        r.read_to_end(|s, b| {
            assert_eq!(s, LogStream::Stdout);
            n += b.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(n, MAX_RECORD + 10);
        assert_eq!(dropped(&p).unwrap(), 0);
    }

    #[test]
    fn corrupt_log_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("output.log");
        std::fs::write(&p, [9u8, 1, 0, 0, 0, 0]).unwrap();
        let mut r = LogReader::open(&p, 0).unwrap();
        assert!(matches!(
            r.read_to_end(|_, _| Ok(())),
            Err(ReadLogError::Corrupt(0))
        ));
    }

    #[test]
    fn ring_keeps_the_newest_output_within_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("output.log");
        let limit = 256 << 10;
        let mut w = LogWriter::open_with_limit(&p, limit).unwrap();
        // A reader following from the start, reading now and then.
        let mut follower = LogReader::open(&p, 0).unwrap();
        let mut followed = Vec::new();
        let mut total = 0u64;
        for i in 0..20000u32 {
            let line = format!("line {i:05}\n");
            total += line.len() as u64;
            let end = w.append(LogStream::Stdout, line.as_bytes()).unwrap();
            if i % 7 == 0 {
                follower
                    .read_until(end, |_, b| {
                        followed.extend_from_slice(b);
                        Ok(())
                    })
                    .unwrap();
            }
            let on_disk = std::fs::metadata(&p).unwrap().len()
                + std::fs::metadata(previous_segment(&p)).map_or(0, |m| m.len());
            assert!(on_disk <= limit + 64, "{on_disk} bytes on disk");
        }
        // The follower never lost anything: it kept up.
        follower
            .read_until(w.len(), |_, b| {
                followed.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        assert_eq!(follower.skipped(), 0);
        let expected: String = (0..20000).map(|i| format!("line {i:05}\n")).collect();
        assert_eq!(followed, expected.as_bytes());
        // A late reader gets the newest output, and learns what was dropped.
        let mut late = LogReader::open(&p, 0).unwrap();
        let mut tail = Vec::new();
        late.read_to_end(|_, b| {
            tail.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert!(late.skipped() > 0);
        assert!(expected.as_bytes().ends_with(&tail));
        let d = dropped(&p).unwrap();
        assert_eq!(d, w.dropped());
        assert_eq!(d + tail.len() as u64, total);
        // Reopening (a restarted writer) continues the same log.
        drop(w);
        let mut w = LogWriter::open_with_limit(&p, limit).unwrap();
        assert_eq!(w.dropped(), d);
        let end = w.append(LogStream::Stderr, b"more").unwrap();
        let mut got = vec![];
        late.read_until(end, |s, b| {
            got.push((s, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(LogStream::Stderr, b"more".to_vec())]);
    }

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("64M").unwrap(), 64 << 20);
        assert_eq!(parse_limit("1g").unwrap(), 1 << 30);
        assert_eq!(parse_limit("100KiB").unwrap(), 100 << 10);
        assert_eq!(parse_limit("4096").unwrap(), 4096);
        assert!(parse_limit("lots").is_err());
        assert!(parse_limit("0").is_err());
        assert!(parse_limit("99999999999G").is_err());
    }
}

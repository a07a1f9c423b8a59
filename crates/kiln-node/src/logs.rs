//! The main process's output log, `<sandbox dir>/output.log`.
//!
//! A sequence of records `[stream: u8][len: u32 LE][bytes]`, stream 1 for
//! stdout and 2 for stderr, so `kiln logs` can give each back on its own
//! descriptor. Only the supervisor appends; it publishes the length of what
//! is completely written, so readers never see half a record.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Largest record body; larger writes are split.
pub const MAX_RECORD: usize = 1 << 20;

/// Which descriptor a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout = 1,
    Stderr = 2,
}

/// Appends records.
pub struct LogWriter {
    file: File,
    len: u64,
}

impl LogWriter {
    /// Opens (creating) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<LogWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(LogWriter { file, len })
    }

    /// Appends `bytes` as one or more records; returns the new length.
    pub fn append(&mut self, stream: LogStream, bytes: &[u8]) -> std::io::Result<u64> {
        for chunk in bytes.chunks(MAX_RECORD) {
            let mut rec = Vec::with_capacity(5 + chunk.len());
            rec.push(stream as u8);
            // A chunk is at most MAX_RECORD bytes, which fits a u32.
            rec.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            rec.extend_from_slice(chunk);
            self.file.write_all(&rec)?;
            self.len += rec.len() as u64;
        }
        Ok(self.len)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The log is not a sequence of records.
#[derive(Debug, thiserror::Error)]
pub enum ReadLogError {
    #[error("cannot read the output log")]
    Io(#[from] std::io::Error),
    #[error("the output log is corrupt at byte {0}")]
    Corrupt(u64),
}

/// Reads records from an offset.
pub struct LogReader {
    file: File,
    offset: u64,
}

impl LogReader {
    pub fn open(path: &Path, offset: u64) -> std::io::Result<LogReader> {
        let file = File::open(path)?;
        Ok(LogReader { file, offset })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Calls `f` for every complete record between the current offset and
    /// `end` (a length published by the writer, or the file size).
    pub fn read_until(
        &mut self,
        end: u64,
        mut f: impl FnMut(LogStream, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), ReadLogError> {
        if end <= self.offset {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut remaining = end - self.offset;
        let mut header = [0u8; 5];
        let mut body = Vec::new();
        while remaining >= 5 {
            self.file.read_exact(&mut header)?;
            let stream = match header[0] {
                1 => LogStream::Stdout,
                2 => LogStream::Stderr,
                _ => return Err(ReadLogError::Corrupt(self.offset)),
            };
            let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as u64;
            if len as usize > MAX_RECORD || 5 + len > remaining {
                return Err(ReadLogError::Corrupt(self.offset));
            }
            body.resize(len as usize, 0);
            self.file.read_exact(&mut body)?;
            f(stream, &body)?;
            self.offset += 5 + len;
            remaining -= 5 + len;
        }
        Ok(())
    }

    /// Reads to the end of the file as it is now.
    pub fn read_to_end(
        &mut self,
        f: impl FnMut(LogStream, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), ReadLogError> {
        let end = self.file.metadata()?.len();
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
}

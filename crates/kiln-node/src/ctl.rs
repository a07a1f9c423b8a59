//! The control protocol between `kiln` commands and a sandbox's supervisor
//! (`kiln shim`), over the Unix socket `<sandbox dir>/ctl.sock`.
//!
//! A client connects, writes one JSON `CtlRequest` followed by a newline,
//! and from then on both sides exchange agent-protocol frames
//! (`kiln_api::proto`) on stream 1: the supervisor answers with a `Response`
//! frame, then `Data`/`Eof`/`Event` frames; the client sends `Data` (stdin or
//! a tar stream), `Eof`, and `Request` frames carrying `Signal`/`Resize`.
//! Flow control is the socket's own: each side reads only as fast as it can
//! pass data on, so back-pressure reaches the guest's credit window.

use std::path::Path;

use kiln_api::proto::{self, Decoded, Decoder, ExecRequest, Frame, Kind};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The stream id every control connection uses.
pub const STREAM: u32 = 1;
/// Longest request line accepted by the supervisor: an `Exec` carries a
/// command and environment up to what Linux accepts (`proto::MAX_REQUEST`).
pub const MAX_REQUEST_LINE: usize = proto::MAX_REQUEST + 64 * 1024;

/// What a client asks the supervisor for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CtlRequest {
    /// Follows the main process's output (from the start if `replay`),
    /// forwarding stdin if `stdin`. Ends with an `Exit` event.
    Attach { stdin: bool, replay: bool },
    /// Starts another process.
    Exec(ExecRequest),
    /// Re-attaches to a process started with `Exec`.
    AttachExec { pid: u32, stdin: bool },
    /// Unpacks the tar stream the client sends into `dest`.
    CopyIn { dest: String },
    /// Sends `path` as a tar stream.
    CopyOut { path: String },
    /// Describes a path in the guest.
    Stat { path: String },
    /// Signals the main process.
    Signal { signal: i32 },
    /// Stops the main process: SIGTERM, then SIGKILL after `grace_secs`.
    Stop { grace_secs: u64 },
    /// Kills the sandbox now.
    Kill,
    /// Answers once the main process has ended.
    Wait,
    /// Pauses the VM.
    Pause,
    /// Resumes the VM.
    Resume,
    /// Snapshots the sandbox into the staging directory `dest` (driver
    /// snapshot in `vm/`, the writable disk, `manifest.json` naming it
    /// `name`). The sandbox goes on running (or stays paused).
    Snapshot {
        dest: std::path::PathBuf,
        name: String,
        ephemeral: bool,
    },
    /// Hands a warm-pool member to a run: the supervisor resumes the VM,
    /// pushes the new identity and starts `spec`'s main process, then
    /// answers `Ready` and supervises it like any sandbox.
    Claim {
        spec: Box<crate::store::SandboxSpec>,
    },
}

/// The supervisor's first answer on a control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CtlResponse {
    Ok,
    Started {
        pid: u32,
    },
    Exited {
        exit_code: i32,
        signal: Option<i32>,
    },
    Error {
        message: String,
        exit_code: Option<i32>,
    },
    /// Answer to `Stat`: `None` when the path does not exist.
    Stat {
        stat: Option<kiln_api::proto::FileStat>,
    },
    /// First answer to `Claim`: the member took it (it is the run's now,
    /// and may start the command at any moment); `Ready` follows.
    Claimed,
    /// Answer to `Claim`: what a supervisor's ready line says.
    Ready {
        line: crate::shim::ReadyLine,
    },
}

/// A control connection failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the sandbox supervisor at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox's supervisor is gone (killed or crashed); `kiln ps` cleans up after it")]
    Gone(#[source] std::io::Error),
    #[error("control connection failed")]
    Io(#[from] std::io::Error),
    #[error("control connection protocol error: {0}")]
    Protocol(String),
}

/// Reads frames from one side of a control connection.
pub struct FrameReader<R> {
    inner: R,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            decoder: Decoder::new(),
            buf: vec![0u8; 64 * 1024],
        }
    }

    /// Like `new`, with bytes already read past the request line.
    pub fn with_buffered(inner: R, already: &[u8]) -> Self {
        let mut r = Self::new(inner);
        r.decoder.feed(already);
        r
    }

    /// The next frame, or `None` at end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, CtlError> {
        loop {
            match self.decoder.next_frame() {
                Some(Decoded::Frame(f)) => return Ok(Some(f)),
                Some(Decoded::Invalid(e)) => return Err(CtlError::Protocol(e.to_string())),
                None => {}
            }
            let n = self.inner.read(&mut self.buf).await?;
            if n == 0 {
                if self.decoder.buffered() > 0 {
                    return Err(CtlError::Protocol("connection closed mid-frame".into()));
                }
                return Ok(None);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }
}

/// Writes frames to one side of a control connection.
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    pub async fn raw(&mut self, bytes: &[u8]) -> Result<(), CtlError> {
        self.inner.write_all(bytes).await?;
        Ok(())
    }

    pub async fn json<T: Serialize>(&mut self, kind: Kind, msg: &T) -> Result<(), CtlError> {
        let f =
            proto::encode_json(kind, STREAM, msg).map_err(|e| CtlError::Protocol(e.to_string()))?;
        self.raw(&f).await
    }

    /// Sends bytes as as many `Data` frames as needed.
    pub async fn data(&mut self, ch: proto::Channel, bytes: &[u8]) -> Result<(), CtlError> {
        for chunk in bytes.chunks(proto::MAX_DATA_CHUNK) {
            let f = proto::encode_data(STREAM, ch, chunk)
                .map_err(|e| CtlError::Protocol(e.to_string()))?;
            self.raw(&f).await?;
        }
        Ok(())
    }

    pub async fn eof(&mut self, ch: proto::Channel) -> Result<(), CtlError> {
        self.raw(&proto::encode_eof(STREAM, ch)).await
    }

    pub async fn shutdown(&mut self) -> Result<(), CtlError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

/// A client's connection to a supervisor.
pub struct CtlConn {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: FrameWriter<OwnedWriteHalf>,
}

impl CtlConn {
    /// Connects and sends `req`; returns the supervisor's first answer.
    pub async fn open(sock: &Path, req: &CtlRequest) -> Result<(CtlConn, CtlResponse), CtlError> {
        let mut conn = Self::send(sock, req).await?;
        let resp = conn.response().await?;
        Ok((conn, resp))
    }

    /// Connects and sends `req` (its answers: `response`).
    pub async fn send(sock: &Path, req: &CtlRequest) -> Result<CtlConn, CtlError> {
        let s = UnixStream::connect(sock).await.map_err(|source| {
            if matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) {
                CtlError::Gone(source)
            } else {
                CtlError::Connect {
                    path: sock.display().to_string(),
                    source,
                }
            }
        })?;
        let (r, mut w) = s.into_split();
        let mut line = serde_json::to_vec(req).expect("requests always serialize");
        line.push(b'\n');
        w.write_all(&line).await.map_err(gone)?;
        Ok(CtlConn {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
        })
    }

    /// The supervisor's next answer (after `Claimed`, the `Ready`).
    pub async fn response(&mut self) -> Result<CtlResponse, CtlError> {
        let first = match self.reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(CtlError::Protocol(
                    "supervisor closed the connection without answering".into(),
                ));
            }
            Err(CtlError::Io(e)) => return Err(gone(e)),
            Err(e) => return Err(e),
        };
        if first.kind != Kind::Response {
            return Err(CtlError::Protocol(format!(
                "expected a response, got {:?}",
                first.kind
            )));
        }
        let resp: CtlResponse = first
            .json("control response")
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        Ok(resp)
    }
}

/// An I/O error on a fresh control connection: a peer that hung up is a
/// supervisor that died (its socket file outlives it).
fn gone(e: std::io::Error) -> CtlError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionRefused
        | std::io::ErrorKind::UnexpectedEof => CtlError::Gone(e),
        _ => CtlError::Io(e),
    }
}

/// Reads the request line of a new control connection. Returns the request
/// and any bytes read past the newline.
pub async fn read_request(r: &mut OwnedReadHalf) -> Result<(CtlRequest, Vec<u8>), CtlError> {
    let mut br = BufReader::new(r);
    let mut line = Vec::new();
    let n = (&mut br)
        .take(MAX_REQUEST_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(CtlError::Protocol("no complete request line".into()));
    }
    let req = serde_json::from_slice(&line[..line.len() - 1])
        .map_err(|e| CtlError::Protocol(format!("bad request: {e}")))?;
    let rest = br.buffer().to_vec();
    Ok((req, rest))
}

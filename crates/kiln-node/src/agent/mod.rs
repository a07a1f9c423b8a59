//! Host side of the guest agent protocol (`kiln_api::proto`, described in
//! `docs/guest-protocol.md`): a client for `kiln-init` over one byte stream
//! (a virtio-serial Unix socket on QEMU, a vsock connection on Firecracker).
//!
//! One reader task decodes and validates guest frames and hands them to the
//! stream they belong to; one writer task serialises outgoing frames. Every
//! receive channel is bounded by the credit the host granted, so a hostile or
//! runaway guest cannot make the host buffer more than that.

mod demux;

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use kiln_api::proto::{
    self, Channel, Configure, Decoded, ErrorKind, ExecRequest, ExitStatus, Hello, HelloAck, Kind,
    MAX_DATA_CHUNK, ProcessInfo, Request, Response,
};
use kiln_api::text::sanitize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use demux::{Demux, Inbound, Opened, SlotSpec};

/// Interval between repeated `Hello`s during the handshake.
const HELLO_INTERVAL: Duration = Duration::from_millis(30);

/// A transport the client can run over.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AgentStream for T {}

/// The transport or the protocol failed for one stream.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("agent connection closed")]
    Closed,
    #[error("guest broke the agent protocol on stream {stream}: {}", sanitize(.reason))]
    Protocol { stream: u32, reason: String },
    #[error("the guest detached stream {0} (another host attached to the process?)")]
    Detached(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectAgentError {
    #[error("no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("agent transport failed during the handshake")]
    Io(#[source] std::io::Error),
    #[error("agent connection closed during the handshake")]
    Closed,
    #[error("guest agent speaks protocol version {guest}, the host speaks {host}")]
    Version { guest: u32, host: u32 },
    #[error(
        "the guest sent {0} bytes on the agent channel without a valid handshake (not a Kiln agent, or a hostile guest)"
    )]
    Garbage(usize),
}

/// Bytes a guest may send before its handshake answer. A real agent sends
/// a few hundred (answers to earlier Hellos); anything near this is noise.
const HANDSHAKE_BYTE_LIMIT: usize = 4 << 20;

/// Failure of a simple request (configure, signal, resize, processes,
/// quiesce, shutdown, ping, attach).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("guest agent refused {request}: {} ({kind:?})", sanitize(.message))]
    Refused {
        request: &'static str,
        kind: ErrorKind,
        message: String,
    },
    #[error("guest agent answered {request} with an unexpected {}", sanitize(.response))]
    Unexpected {
        request: &'static str,
        response: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Shell convention: exit code 127.
    #[error("{}", sanitize(.0))]
    NotFound(String),
    /// Shell convention: exit code 126.
    #[error("{}", sanitize(.0))]
    NotExecutable(String),
    #[error("{}", sanitize(.0))]
    NoSuchUser(String),
    #[error("guest agent refused to start the process: {} ({kind:?})", sanitize(.message))]
    Refused { kind: ErrorKind, message: String },
    /// The command or environment is more than Linux can pass to a
    /// process; refused before anything is sent.
    #[error("cannot run the command: {0}")]
    Limits(#[from] proto::ExecLimitError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("guest agent answered exec with an unexpected {}", sanitize(.0))]
    Unexpected(String),
}

impl ExecError {
    /// The exit code a shell would report for this failure, if any.
    pub fn shell_code(&self) -> Option<i32> {
        match self {
            ExecError::NotFound(_) => Some(127),
            ExecError::NotExecutable(_) => Some(126),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyInError {
    #[error("reading the tar stream to copy into {dest}")]
    Read {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest refused to unpack into {}: {} ({kind:?})", sanitize(.dest), sanitize(.message))]
    Refused {
        dest: String,
        kind: ErrorKind,
        message: String,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("guest agent answered copy-in with an unexpected {}", sanitize(.0))]
    Unexpected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CopyOutError {
    #[error("guest cannot send {}: {} ({kind:?})", sanitize(.path), sanitize(.message))]
    Refused {
        path: String,
        kind: ErrorKind,
        message: String,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("guest agent answered copy-out with an unexpected {}", sanitize(.0))]
    Unexpected(String),
}

/// One item of a process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last item.
    Exit(ExitStatus),
}

struct Inner {
    demux: Mutex<Demux>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// This connection's session (sent in every `Hello`).
    session: u64,
    /// Counts the guest's `HelloAck`s for `session` after the handshake.
    acks: tokio::sync::watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Demux> {
        // A panic while holding the lock cannot leave the map inconsistent
        // in a way that matters more than losing the connection.
        self.demux.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what the demux queued (credit, close frames).
    fn flush(&self, d: &mut Demux) {
        for f in d.out.drain(..) {
            let _ = self.tx.send(f);
        }
    }

    fn send(&self, frame: Vec<u8>) -> Result<(), StreamError> {
        if self.lock().closed().is_some() {
            return Err(StreamError::Closed);
        }
        self.tx.send(frame).map_err(|_| StreamError::Closed)
    }

    fn close_stream(&self, id: u32) {
        let mut d = self.lock();
        d.close(id);
        self.flush(&mut d);
    }

    fn consumed(&self, id: u32, ch: Channel, n: usize) {
        let mut d = self.lock();
        d.consumed(id, ch, n);
        self.flush(&mut d);
    }

    fn fail_all(&self, reason: &str) {
        self.lock().fail_all(reason);
    }

    /// Opens a stream and sends `req` on it.
    fn request(&self, req: &Request, spec: SlotSpec) -> Result<Opened, StreamError> {
        let opened = self.lock().open(spec)?;
        let id = opened.id;
        let frame =
            proto::encode_json(Kind::Request, id, req).map_err(|e| StreamError::Protocol {
                stream: id,
                reason: format!("cannot encode the request: {e}"),
            })?;
        self.send(frame)?;
        Ok(opened)
    }
}

async fn response(
    rx: oneshot::Receiver<Result<Response, StreamError>>,
) -> Result<Response, StreamError> {
    rx.await.unwrap_or(Err(StreamError::Closed))
}

/// A connected guest agent. Dropping it (the last clone) closes the
/// transport; processes keep running in the guest.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
}

struct Tasks {
    inner: Arc<Inner>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.inner.fail_all("agent client dropped");
    }
}

impl AgentClient {
    /// Runs the Hello/HelloAck handshake (repeating Hello until the guest
    /// answers for this session) and starts the reader and writer tasks.
    pub async fn connect<S: AgentStream>(
        stream: S,
        timeout: Duration,
    ) -> Result<(AgentClient, HelloAck), ConnectAgentError> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let session: u64 = rand::random();
        let hello = proto::encode_json(
            Kind::Hello,
            0,
            &Hello {
                version: proto::VERSION,
                session,
            },
        )
        .map_err(|e| ConnectAgentError::Io(std::io::Error::other(e)))?;
        let mut dec = proto::Decoder::new();
        let mut buf = vec![0u8; 64 << 10];
        let deadline = tokio::time::Instant::now() + timeout;
        let mut received = 0usize;
        let ack = 'outer: loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ConnectAgentError::Timeout(timeout));
            }
            wr.write_all(&hello).await.map_err(ConnectAgentError::Io)?;
            let tick = (tokio::time::Instant::now() + HELLO_INTERVAL).min(deadline);
            loop {
                match tokio::time::timeout_at(tick, rd.read(&mut buf)).await {
                    Err(_) => break,
                    Ok(Ok(0)) => return Err(ConnectAgentError::Closed),
                    Ok(Ok(n)) => {
                        received += n;
                        if received > HANDSHAKE_BYTE_LIMIT {
                            return Err(ConnectAgentError::Garbage(received));
                        }
                        dec.feed(&buf[..n]);
                    }
                    Ok(Err(e)) => return Err(ConnectAgentError::Io(e)),
                }
                while let Some(d) = dec.next_frame() {
                    if let Decoded::Frame(f) = d
                        && f.kind == Kind::HelloAck
                        && let Ok(ack) = f.json::<HelloAck>("hello ack")
                        && ack.session == session
                    {
                        break 'outer ack;
                    }
                    // Anything else predates our session.
                }
            }
        };
        if ack.version != proto::VERSION {
            return Err(ConnectAgentError::Version {
                guest: ack.version,
                host: proto::VERSION,
            });
        }
        let (tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let inner = Arc::new(Inner {
            demux: Mutex::new(Demux::new()),
            tx,
            session,
            acks: tokio::sync::watch::Sender::new(0),
        });
        let rinner = Arc::clone(&inner);
        let reader = tokio::spawn(async move {
            let reason = loop {
                while let Some(d) = dec.next_frame() {
                    match d {
                        Decoded::Frame(f) => {
                            if f.kind == Kind::HelloAck
                                && f.json::<HelloAck>("hello ack")
                                    .is_ok_and(|a| a.session == rinner.session)
                            {
                                rinner.acks.send_modify(|n| *n += 1);
                            }
                            let mut dm = rinner.lock();
                            dm.on_frame(f);
                            rinner.flush(&mut dm);
                        }
                        Decoded::Invalid(e) => {
                            tracing::debug!(error = %e, "skipped an invalid guest frame")
                        }
                    }
                }
                match rd.read(&mut buf).await {
                    Ok(0) => break "guest closed the agent connection".to_string(),
                    Ok(n) => dec.feed(&buf[..n]),
                    Err(e) => break format!("reading from the guest agent: {e}"),
                }
            };
            tracing::debug!(%reason, "agent connection closed");
            rinner.fail_all(&reason);
        });
        let winner = Arc::clone(&inner);
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(512 << 10);
            while let Some(f) = out_rx.recv().await {
                batch.clear();
                batch.extend_from_slice(&f);
                while batch.len() < (256 << 10) {
                    match out_rx.try_recv() {
                        Ok(f) => batch.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                if let Err(e) = wr.write_all(&batch).await {
                    winner.fail_all(&format!("writing to the guest agent: {e}"));
                    return;
                }
                if out_rx.is_empty() {
                    let _ = wr.flush().await;
                }
            }
        });
        let tasks = Arc::new(Tasks {
            inner: Arc::clone(&inner),
            reader,
            writer,
        });
        Ok((
            AgentClient {
                inner,
                _tasks: tasks,
            },
            ack,
        ))
    }

    /// Whether the transport is still up.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().closed().is_none()
    }

    async fn simple(&self, name: &'static str, req: Request) -> Result<Response, RequestError> {
        let o = self.inner.request(
            &req,
            SlotSpec {
                recv: &[],
                send: None,
            },
        )?;
        let id = o.id;
        let r = response(o.response).await;
        // The guest does not keep one-shot streams; no Close is needed.
        self.inner.lock().close_quietly(id);
        match r? {
            Response::Error { kind, message } => Err(RequestError::Refused {
                request: name,
                kind,
                message,
            }),
            other => Ok(other),
        }
    }

    async fn expect_ok(&self, name: &'static str, req: Request) -> Result<(), RequestError> {
        match self.simple(name, req).await? {
            Response::Ok => Ok(()),
            other => Err(RequestError::Unexpected {
                request: name,
                response: format!("{other:?}"),
            }),
        }
    }

    /// Gives the guest its identity (hostname, entropy, clock).
    pub async fn configure(&self, c: Configure) -> Result<(), RequestError> {
        self.expect_ok("configure", Request::Configure(c)).await
    }

    pub async fn ping(&self) -> Result<(), RequestError> {
        match self.simple("ping", Request::Ping).await? {
            Response::Pong => Ok(()),
            other => Err(RequestError::Unexpected {
                request: "ping",
                response: format!("{other:?}"),
            }),
        }
    }

    /// Sends `signal` to a process (its process group for a tty).
    pub async fn signal(&self, pid: u32, signal: i32) -> Result<(), RequestError> {
        self.expect_ok("signal", Request::Signal { pid, signal })
            .await
    }

    pub async fn resize(&self, pid: u32, rows: u16, cols: u16) -> Result<(), RequestError> {
        self.expect_ok("resize", Request::Resize { pid, rows, cols })
            .await
    }

    /// Describes a path in the guest; `None` when it does not exist.
    pub async fn stat(&self, path: &str) -> Result<Option<proto::FileStat>, RequestError> {
        match self
            .simple(
                "stat",
                Request::Stat {
                    path: path.to_string(),
                },
            )
            .await
        {
            Ok(Response::Stat { stat }) => Ok(Some(stat)),
            Ok(other) => Err(RequestError::Unexpected {
                request: "stat",
                response: format!("{other:?}"),
            }),
            Err(RequestError::Refused {
                kind: ErrorKind::Path,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, RequestError> {
        match self.simple("processes", Request::Processes).await? {
            Response::Processes { processes } => Ok(processes),
            other => Err(RequestError::Unexpected {
                request: "processes",
                response: format!("{other:?}"),
            }),
        }
    }

    /// Syncs the guest's disks and stops all guest sending until the next
    /// `Hello` (before a snapshot; see [`AgentClient::resume_session`]).
    pub async fn quiesce(&self) -> Result<(), RequestError> {
        self.expect_ok("quiesce", Request::Quiesce).await
    }

    /// Ends a `quiesce` without starting a new session: repeats `Hello` with
    /// this connection's session (every 30 ms) until the guest acknowledges
    /// it. Streams stay attached; output held back meanwhile follows.
    pub async fn resume_session(&self, timeout: Duration) -> Result<(), RequestError> {
        let hello = proto::encode_json(
            Kind::Hello,
            0,
            &Hello {
                version: proto::VERSION,
                session: self.inner.session,
            },
        )
        .map_err(|e| StreamError::Protocol {
            stream: 0,
            reason: format!("cannot encode hello: {e}"),
        })?;
        let mut rx = self.inner.acks.subscribe();
        rx.borrow_and_update();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.inner.send(hello.clone())?;
            let tick = (tokio::time::Instant::now() + HELLO_INTERVAL).min(deadline);
            match tokio::time::timeout_at(tick, rx.changed()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(_)) => return Err(StreamError::Closed.into()),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(RequestError::Unexpected {
                        request: "hello",
                        response: format!("no acknowledgement within {timeout:?}"),
                    });
                }
                Err(_) => {}
            }
        }
    }

    /// Syncs and powers the guest off; the VMM process exits afterwards.
    pub async fn shutdown(&self) -> Result<(), RequestError> {
        self.expect_ok("shutdown", Request::Shutdown).await
    }

    /// Starts a process.
    pub async fn exec(&self, req: ExecRequest) -> Result<Process, ExecError> {
        req.check_limits()?;
        let stdin = req.stdin;
        let recv: &'static [Channel] = if req.tty {
            &[Channel::Stdout]
        } else {
            &[Channel::Stdout, Channel::Stderr]
        };
        let spec = SlotSpec {
            recv,
            send: stdin.then_some(Channel::Stdin),
        };
        let o = self.inner.request(&Request::Exec(req), spec)?;
        let id = o.id;
        match response(o.response).await? {
            Response::Started { pid } => Ok(self.process(o.id, pid, o.inbound, o.send_credit)),
            Response::Error { kind, message } => {
                self.inner.lock().close_quietly(id);
                Err(match kind {
                    ErrorKind::NotFound => ExecError::NotFound(message),
                    ErrorKind::NotExecutable => ExecError::NotExecutable(message),
                    ErrorKind::NoSuchUser => ExecError::NoSuchUser(message),
                    kind => ExecError::Refused { kind, message },
                })
            }
            other => {
                self.inner.close_stream(id);
                Err(ExecError::Unexpected(format!("{other:?}")))
            }
        }
    }

    /// Starts a process without attaching to it (`req.detached` is set):
    /// its output waits in the guest until [`AgentClient::attach`].
    pub async fn exec_detached(&self, mut req: ExecRequest) -> Result<u32, ExecError> {
        req.check_limits()?;
        req.detached = true;
        let spec = SlotSpec {
            recv: &[],
            send: None,
        };
        let o = self.inner.request(&Request::Exec(req), spec)?;
        let id = o.id;
        let result = match response(o.response).await? {
            Response::Started { pid } => Ok(pid),
            Response::Error { kind, message } => Err(match kind {
                ErrorKind::NotFound => ExecError::NotFound(message),
                ErrorKind::NotExecutable => ExecError::NotExecutable(message),
                ErrorKind::NoSuchUser => ExecError::NoSuchUser(message),
                kind => ExecError::Refused { kind, message },
            }),
            other => Err(ExecError::Unexpected(format!("{other:?}"))),
        };
        self.inner.lock().close_quietly(id);
        result
    }

    /// Re-attaches to a process started earlier (by this or an earlier
    /// connection): output produced meanwhile comes first, then live output,
    /// then its exit. Both stdout and stderr channels are accepted (a tty
    /// process uses stdout only).
    pub async fn attach(&self, pid: u32, stdin: bool) -> Result<Process, RequestError> {
        let spec = SlotSpec {
            recv: &[Channel::Stdout, Channel::Stderr],
            send: stdin.then_some(Channel::Stdin),
        };
        let o = self.inner.request(&Request::Attach { pid, stdin }, spec)?;
        let id = o.id;
        match response(o.response).await? {
            Response::Started { pid: p } if p == pid => {
                Ok(self.process(o.id, pid, o.inbound, o.send_credit))
            }
            Response::Error { kind, message } => {
                self.inner.lock().close_quietly(id);
                Err(RequestError::Refused {
                    request: "attach",
                    kind,
                    message,
                })
            }
            other => {
                self.inner.close_stream(id);
                Err(RequestError::Unexpected {
                    request: "attach",
                    response: format!("{other:?}"),
                })
            }
        }
    }

    fn process(
        &self,
        id: u32,
        pid: u32,
        rx: mpsc::UnboundedReceiver<Inbound>,
        credit: Option<Arc<Semaphore>>,
    ) -> Process {
        self.inner.lock().set_pid(id, pid);
        let stdin = credit.map(|c| Stdin::new(Arc::clone(&self.inner), id, Channel::Stdin, c));
        Process {
            pid,
            stdin,
            output: OutputStream {
                inner: Arc::clone(&self.inner),
                id,
                rx,
                done: false,
            },
        }
    }

    /// Unpacks the tar stream read from `tar` into the guest directory `dest`.
    pub async fn copy_in<R: AsyncRead + Unpin>(
        &self,
        dest: &str,
        mut tar: R,
    ) -> Result<(), CopyInError> {
        let spec = SlotSpec {
            recv: &[],
            send: Some(Channel::Tar),
        };
        let o = self.inner.request(
            &Request::CopyIn {
                dest: dest.to_string(),
            },
            spec,
        )?;
        let (id, mut rx) = (o.id, o.response);
        // Dropped before the end (the caller cancelled): close the stream
        // without an end of archive, so the guest drops the copy.
        let mut guard = CloseOnDrop {
            inner: Arc::clone(&self.inner),
            id,
            armed: true,
        };
        let Some(credit) = o.send_credit else {
            return Err(StreamError::Closed.into());
        };
        let mut w = Stdin::new(Arc::clone(&self.inner), id, Channel::Tar, credit);
        let mut buf = vec![0u8; MAX_DATA_CHUNK.min(128 << 10)];
        let mut early: Option<Result<Response, StreamError>> = None;
        loop {
            let n = tokio::select! {
                r = &mut rx, if early.is_none() => { early = Some(r.unwrap_or(Err(StreamError::Closed))); break; }
                n = tar.read(&mut buf) => n.map_err(|source| CopyInError::Read { dest: dest.to_string(), source })?,
            };
            if n == 0 {
                w.close_channel()?;
                break;
            }
            tokio::select! {
                r = &mut rx, if early.is_none() => { early = Some(r.unwrap_or(Err(StreamError::Closed))); break; }
                res = w.write(&buf[..n]) => res?,
            }
        }
        let r = match early {
            Some(r) => r,
            None => response(rx).await,
        };
        guard.armed = false;
        self.inner.lock().close_quietly(id);
        match r? {
            Response::Ok => Ok(()),
            Response::Error { kind, message } => Err(CopyInError::Refused {
                dest: dest.to_string(),
                kind,
                message,
            }),
            other => Err(CopyInError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Streams `path` (file or directory) out of the guest as a tar stream.
    /// The reader fails with `UnexpectedEof` if the guest ends the stream
    /// without finishing the archive.
    pub async fn copy_out(&self, path: &str) -> Result<CopyOutReader, CopyOutError> {
        let spec = SlotSpec {
            recv: &[Channel::Tar],
            send: None,
        };
        let o = self.inner.request(
            &Request::CopyOut {
                path: path.to_string(),
            },
            spec,
        )?;
        let id = o.id;
        match response(o.response).await? {
            Response::Ok => Ok(CopyOutReader {
                inner: Arc::clone(&self.inner),
                id,
                rx: o.inbound,
                pending: Bytes::new(),
                state: 0,
            }),
            Response::Error { kind, message } => {
                self.inner.lock().close_quietly(id);
                Err(CopyOutError::Refused {
                    path: path.to_string(),
                    kind,
                    message,
                })
            }
            other => {
                self.inner.close_stream(id);
                Err(CopyOutError::Unexpected(format!("{other:?}")))
            }
        }
    }
}

/// Closes a stream when dropped while armed.
struct CloseOnDrop {
    inner: Arc<Inner>,
    id: u32,
    armed: bool,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.inner.close_stream(self.id);
        }
    }
}

/// A process in the guest.
pub struct Process {
    pid: u32,
    stdin: Option<Stdin>,
    output: OutputStream,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's stdin, if the request asked for it.
    pub fn stdin(&mut self) -> Option<&mut Stdin> {
        self.stdin.as_mut()
    }

    pub fn take_stdin(&mut self) -> Option<Stdin> {
        self.stdin.take()
    }

    /// The next output item; `None` after `Output::Exit` (or an error).
    pub async fn recv(&mut self) -> Option<Result<Output, StreamError>> {
        self.output.recv().await
    }

    /// Splits the process into its stdin and output halves.
    pub fn into_parts(self) -> (Option<Stdin>, OutputStream) {
        (self.stdin, self.output)
    }

    /// Collects all output and the exit status.
    pub async fn wait_with_output(mut self) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), StreamError> {
        drop(self.stdin.take());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(item) = self.recv().await {
            match item? {
                Output::Stdout(b) => out.extend_from_slice(&b),
                Output::Stderr(b) => err.extend_from_slice(&b),
                Output::Exit(s) => return Ok((out, err, s)),
            }
        }
        Err(StreamError::Closed)
    }
}

/// A process's output. Credit is returned to the guest as items are taken,
/// so a slow consumer slows the process down. Dropping it detaches.
pub struct OutputStream {
    inner: Arc<Inner>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Inbound>,
    done: bool,
}

impl OutputStream {
    pub async fn recv(&mut self) -> Option<Result<Output, StreamError>> {
        if self.done {
            return None;
        }
        loop {
            let item = self.rx.recv().await;
            match item {
                Some(Inbound::Data(ch, b)) => {
                    self.inner.consumed(self.id, ch, b.len());
                    return Some(Ok(match ch {
                        Channel::Stderr => Output::Stderr(b),
                        _ => Output::Stdout(b),
                    }));
                }
                Some(Inbound::Eof) => {}
                Some(Inbound::Exit(s)) => {
                    self.done = true;
                    return Some(Ok(Output::Exit(s)));
                }
                Some(Inbound::Closed) => {
                    self.done = true;
                    return Some(Err(StreamError::Detached(self.id)));
                }
                Some(Inbound::Failed(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    return Some(Err(StreamError::Closed));
                }
            }
        }
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        if !self.done {
            self.inner.close_stream(self.id);
        } else {
            self.inner.lock().close_quietly(self.id);
        }
    }
}

/// The host→guest half of a stream (a process's stdin, a copy-in).
/// Writes wait for the guest's credit.
pub struct Stdin {
    inner: Arc<Inner>,
    id: u32,
    ch: Channel,
    credit: Arc<Semaphore>,
    closed: bool,
}

impl Stdin {
    fn new(inner: Arc<Inner>, id: u32, ch: Channel, credit: Arc<Semaphore>) -> Self {
        Stdin {
            inner,
            id,
            ch,
            credit,
            closed: false,
        }
    }

    /// Sends `data`, waiting for credit as needed.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), StreamError> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        while !data.is_empty() {
            let want = data
                .len()
                .min(MAX_DATA_CHUNK)
                .min(proto::INITIAL_WINDOW as usize);
            // Wait for one byte of credit, then take whatever else is
            // available: never wait for a chunk's worth that may not come.
            self.credit
                .acquire()
                .await
                .map_err(|_| StreamError::Closed)?
                .forget();
            let mut n = 1;
            let extra = (want - 1).min(self.credit.available_permits());
            if extra > 0
                && let Ok(p) = self.credit.try_acquire_many(extra as u32)
            {
                p.forget();
                n += extra;
            }
            let frame = proto::encode_data(self.id, self.ch, &data[..n]).map_err(|e| {
                StreamError::Protocol {
                    stream: self.id,
                    reason: e.to_string(),
                }
            })?;
            self.inner.send(frame)?;
            data = &data[n..];
        }
        Ok(())
    }

    fn close_channel(&mut self) -> Result<(), StreamError> {
        if !self.closed {
            self.closed = true;
            self.inner.send(proto::encode_eof(self.id, self.ch))?;
        }
        Ok(())
    }

    /// Ends the input (the process reads EOF).
    pub async fn close(mut self) -> Result<(), StreamError> {
        self.close_channel()
    }
}

/// A tar stream coming out of the guest.
pub struct CopyOutReader {
    inner: Arc<Inner>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Inbound>,
    pending: Bytes,
    /// 0 streaming, 1 finished, 2 failed
    state: u8,
}

impl AsyncRead for CopyOutReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.state == 1 {
                return Poll::Ready(Ok(()));
            }
            if self.state == 2 {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "copy-out stream failed",
                )));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Inbound::Data(ch, b))) => {
                    self.inner.consumed(self.id, ch, b.len());
                    self.pending = b;
                }
                Poll::Ready(Some(Inbound::Eof)) => self.state = 1,
                Poll::Ready(Some(Inbound::Exit(_))) => {}
                Poll::Ready(Some(Inbound::Failed(e))) => {
                    self.state = 2;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        e,
                    )));
                }
                Poll::Ready(Some(Inbound::Closed)) | Poll::Ready(None) => {
                    self.state = 2;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "guest ended the copy-out stream before the end of the archive",
                    )));
                }
            }
        }
    }
}

impl Drop for CopyOutReader {
    fn drop(&mut self) {
        self.inner.close_stream(self.id);
    }
}

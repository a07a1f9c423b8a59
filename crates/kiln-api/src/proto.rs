//! The host/guest agent protocol, version 1. The normative description is
//! `docs/guest-protocol.md`; this module is its only implementation of the
//! wire format, shared by `kiln-init` (guest) and Kiln (host).
//!
//! One byte stream (a virtio-serial port on QEMU, a vsock connection on
//! Firecracker) carries many logical streams. Every frame starts with a
//! 20-byte header:
//!
//! ```text
//! 0..4   magic  "KLN\x01"
//! 4..8   payload length, u32 little endian, at most MAX_PAYLOAD
//! 8..12  stream id, u32 little endian (0 = the session itself)
//! 12     kind
//! 13..16 reserved, zero
//! 16..20 CRC-32 of bytes 0..16, little endian
//! ```
//!
//! The magic and header checksum let a reader find the next frame boundary
//! after the transport was cut mid-frame (a host process that died, a
//! restored snapshot): `Decoder` skips bytes until a valid header appears.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"KLN\x01";
/// Size of a frame header.
pub const HEADER_LEN: usize = 20;
/// Largest payload of any frame.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Largest JSON control message (Hello, Response, Event).
pub const MAX_CONTROL: usize = 64 * 1024;
/// Largest `Request` (host → guest only): an `exec` carries the command and
/// environment, which Linux allows up to `ARG_MAX` (2 MiB) together, and
/// JSON escaping can grow them. Only the guest's decoder accepts frames
/// this large (`Decoder::accepting_requests`); the host's stays at
/// `MAX_PAYLOAD`, so a guest cannot make the host buffer more.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Linux's limit on the arguments and environment of one `execve` together
/// (`ARG_MAX` with the default 8 MiB stack): strings with their NUL bytes
/// plus one pointer each.
pub const ARG_MAX: usize = 2 * 1024 * 1024;
/// Linux's limit on one argument or environment string, NUL included
/// (`MAX_ARG_STRLEN`).
pub const MAX_ARG_STRLEN: usize = 128 * 1024;
/// Largest data chunk carried by one `Data` frame (payload minus channel byte).
pub const MAX_DATA_CHUNK: usize = MAX_PAYLOAD - 1;
/// Bytes a sender may send on a channel before the receiver grants more
/// credit. Both sides start every channel of every stream with this window.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;
/// Serial-port/vsock name of the agent channel in the guest.
pub const PORT_NAME: &str = "kiln.agent";
/// Vsock port the guest agent listens on (Firecracker).
pub const VSOCK_PORT: u32 = 1024;
/// `kiln-init WARM_UP_ARG` (not as PID 1) exits at once. The host runs it
/// as `/proc/self/exe` in a freshly restored warm-pool member, so that the
/// guest's process start path (fork, exec, exit, reaping, the agent's exec
/// handling) has run once in that VMM before a user's command does.
pub const WARM_UP_ARG: &str = "--kiln-warm-up";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// host → guest, stream 0: `Hello` (JSON). Starts (or restarts) a session.
    Hello = 1,
    /// guest → host, stream 0: `HelloAck` (JSON).
    HelloAck = 2,
    /// host → guest: `Request` (JSON) opening a new stream.
    Request = 3,
    /// guest → host: `Response` (JSON), the answer to the stream's request.
    Response = 4,
    /// either way: `[channel][bytes]`.
    Data = 5,
    /// either way: `[channel]`, no more data on that channel.
    Eof = 6,
    /// either way: `[channel][u32 LE]`, the receiver consumed that many
    /// bytes; the sender may send that many more.
    Credit = 7,
    /// guest → host: `Event` (JSON) on a stream, e.g. the process exited.
    Event = 8,
    /// either way, empty: the stream is finished (host: detach from it).
    Close = 9,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::Data,
            6 => Kind::Eof,
            7 => Kind::Credit,
            8 => Kind::Event,
            9 => Kind::Close,
            _ => return None,
        })
    }
}

/// A data channel within a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Channel {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    /// A tar stream (file copy in either direction).
    Tar = 3,
}

impl Channel {
    pub fn from_u8(v: u8) -> Option<Channel> {
        Some(match v {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::Tar,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A frame or message that does not follow the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    #[error("{kind:?} frame has a malformed payload of {len} bytes")]
    Malformed { kind: Kind, len: usize },
    #[error("invalid {what} message: {reason}")]
    Json { what: &'static str, reason: String },
}

fn header_crc(h: &[u8]) -> u32 {
    crc32fast::hash(&h[..16])
}

/// Largest payload a frame of `kind` may carry on the wire.
pub fn max_payload(kind: Kind) -> usize {
    match kind {
        Kind::Request => MAX_REQUEST,
        _ => MAX_PAYLOAD,
    }
}

/// Encodes a frame header. Fails if `len` exceeds `max_payload(kind)`.
pub fn encode_header(kind: Kind, stream: u32, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let max = max_payload(kind);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    // len <= MAX_REQUEST, which fits a u32.
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..12].copy_from_slice(&stream.to_le_bytes());
    h[12] = kind as u8;
    let crc = header_crc(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// Encodes a whole frame (header + payload) into one buffer.
pub fn encode(kind: Kind, stream: u32, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let h = encode_header(kind, stream, payload.len())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Encodes a JSON control message as a frame.
pub fn encode_json<T: Serialize>(kind: Kind, stream: u32, msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Json {
        what: "outgoing",
        reason: e.to_string(),
    })?;
    let max = max_control(kind);
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    encode(kind, stream, &body)
}

/// Largest JSON message a frame of `kind` may carry.
pub fn max_control(kind: Kind) -> usize {
    match kind {
        Kind::Request => MAX_REQUEST,
        _ => MAX_CONTROL,
    }
}

/// Encodes a `Data` frame: `[channel][bytes]`. `bytes` must be at most
/// `MAX_DATA_CHUNK` long.
pub fn encode_data(stream: u32, channel: Channel, bytes: &[u8]) -> Result<Vec<u8>, FrameError> {
    let h = encode_header(Kind::Data, stream, bytes.len() + 1)?;
    let mut out = Vec::with_capacity(HEADER_LEN + 1 + bytes.len());
    out.extend_from_slice(&h);
    out.push(channel as u8);
    out.extend_from_slice(bytes);
    Ok(out)
}

/// Encodes an `Eof` frame.
pub fn encode_eof(stream: u32, channel: Channel) -> Vec<u8> {
    encode(Kind::Eof, stream, &[channel as u8]).expect("one byte fits any frame")
}

/// Encodes a `Credit` frame.
pub fn encode_credit(stream: u32, channel: Channel, bytes: u32) -> Vec<u8> {
    let mut p = [0u8; 5];
    p[0] = channel as u8;
    p[1..5].copy_from_slice(&bytes.to_le_bytes());
    encode(Kind::Credit, stream, &p).expect("five bytes fit any frame")
}

/// Encodes a `Close` frame.
pub fn encode_close(stream: u32) -> Vec<u8> {
    encode(Kind::Close, stream, &[]).expect("empty payload fits any frame")
}

impl Frame {
    /// Parses a JSON control payload, bounded by `max_control(kind)`.
    pub fn json<'a, T: Deserialize<'a>>(&'a self, what: &'static str) -> Result<T, FrameError> {
        let max = max_control(self.kind);
        if self.payload.len() > max {
            return Err(FrameError::TooLarge {
                len: self.payload.len(),
                max,
            });
        }
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::Json {
            what,
            reason: e.to_string(),
        })
    }

    /// Splits a `Data` payload into its channel and bytes.
    pub fn data(&self) -> Result<(Channel, &[u8]), FrameError> {
        let (&c, rest) = self.payload.split_first().ok_or(FrameError::Malformed {
            kind: self.kind,
            len: 0,
        })?;
        let ch = Channel::from_u8(c).ok_or(FrameError::UnknownChannel(c))?;
        Ok((ch, rest))
    }

    /// The channel of an `Eof` frame.
    pub fn eof(&self) -> Result<Channel, FrameError> {
        match self.payload.as_slice() {
            [c] => Channel::from_u8(*c).ok_or(FrameError::UnknownChannel(*c)),
            p => Err(FrameError::Malformed {
                kind: self.kind,
                len: p.len(),
            }),
        }
    }

    /// The channel and byte count of a `Credit` frame.
    pub fn credit(&self) -> Result<(Channel, u32), FrameError> {
        match self.payload.as_slice() {
            [c, a, b, d, e] => {
                let ch = Channel::from_u8(*c).ok_or(FrameError::UnknownChannel(*c))?;
                Ok((ch, u32::from_le_bytes([*a, *b, *d, *e])))
            }
            p => Err(FrameError::Malformed {
                kind: self.kind,
                len: p.len(),
            }),
        }
    }
}

/// Incremental, resynchronising frame decoder. Feed it bytes as they arrive;
/// take frames out. Bytes that cannot start a valid header are skipped and
/// counted in `discarded` (a reader should log that, rate-limited).
#[derive(Debug)]
pub struct Decoder {
    buf: VecDeque<u8>,
    discarded: u64,
    /// Largest `Request` payload accepted (`MAX_PAYLOAD` unless this is
    /// the guest's decoder).
    max_request: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: VecDeque::new(),
            discarded: 0,
            max_request: MAX_PAYLOAD,
        }
    }
}

/// What `Decoder::next_frame` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// A header with a valid checksum but an unknown kind or an oversized
    /// length: the frame is skipped (the stream resynchronises).
    Invalid(FrameError),
}

impl Decoder {
    /// A decoder that accepts payloads up to `MAX_PAYLOAD` of any kind.
    pub fn new() -> Self {
        Self::default()
    }

    /// The guest's decoder: also accepts `Request` frames up to
    /// `MAX_REQUEST` (large commands and environments).
    pub fn accepting_requests() -> Self {
        Decoder {
            max_request: MAX_REQUEST,
            ..Self::default()
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
    }

    /// Bytes skipped so far while looking for a frame boundary.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything buffered (after the transport was reset).
    pub fn reset(&mut self) {
        self.discarded += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Returns the next complete frame, or `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Decoded> {
        loop {
            // Find the magic.
            let pos = self.find_magic();
            if pos > 0 {
                self.buf.drain(..pos);
                self.discarded += pos as u64;
            }
            if self.buf.len() < HEADER_LEN {
                return None;
            }
            let mut h = [0u8; HEADER_LEN];
            for (i, b) in self.buf.iter().take(HEADER_LEN).enumerate() {
                h[i] = *b;
            }
            let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
            if crc != header_crc(&h) || h[13..16] != [0, 0, 0] {
                // Not a header: skip the magic's first byte and search on.
                self.buf.pop_front();
                self.discarded += 1;
                continue;
            }
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let stream = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
            let max = if h[12] == Kind::Request as u8 {
                self.max_request
            } else {
                MAX_PAYLOAD
            };
            if len > max {
                self.buf.drain(..HEADER_LEN);
                self.discarded += HEADER_LEN as u64;
                return Some(Decoded::Invalid(FrameError::TooLarge { len, max }));
            }
            if self.buf.len() < HEADER_LEN + len {
                return None;
            }
            self.buf.drain(..HEADER_LEN);
            // Copy slice-wise: byte-wise iteration is slow under TCG.
            let mut payload = Vec::with_capacity(len);
            let (a, b) = self.buf.as_slices();
            let na = a.len().min(len);
            payload.extend_from_slice(&a[..na]);
            payload.extend_from_slice(&b[..len - na]);
            self.buf.drain(..len);
            return Some(match Kind::from_u8(h[12]) {
                Some(kind) => Decoded::Frame(Frame {
                    kind,
                    stream,
                    payload,
                }),
                None => {
                    self.discarded += (HEADER_LEN + len) as u64;
                    Decoded::Invalid(FrameError::UnknownKind(h[12]))
                }
            });
        }
    }

    /// Index of the first possible magic start; keeps a partial magic at the
    /// end of the buffer.
    fn find_magic(&self) -> usize {
        let n = self.buf.len();
        let mut i = 0;
        while i < n {
            if self.buf[i] == MAGIC[0] {
                let avail = (n - i).min(4);
                if (0..avail).all(|k| self.buf[i + k] == MAGIC[k]) {
                    return i;
                }
            }
            i += 1;
        }
        n
    }
}

/// host → guest, stream 0: opens a session. A new `session` value resets the
/// guest's view of the transport: streams of older sessions are detached
/// (their processes keep running; their output stays buffered for `Attach`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
    pub session: u64,
}

/// guest → host, stream 0: the answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u32,
    pub session: u64,
    /// `kiln-init` version string.
    pub agent: String,
    /// Random per guest boot; unchanged across snapshot/restore.
    pub boot_id: String,
    /// Main process, if one was started and its exit not yet collected.
    #[serde(default)]
    pub main: Option<ProcessInfo>,
}

/// What `Request::Stat` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// The type of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Other,
}

/// A process the agent knows about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    /// `None` while running.
    pub exit: Option<ExitStatus>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// host → guest: the first frame of a new stream. The host picks stream ids
/// (non-zero, never reused within a session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Gives the guest its identity; sent after every boot and restore.
    Configure(Configure),
    /// Starts a process. Response: `Started`; then `Data` on stdout/stderr,
    /// and `Event::Exit` when it ends.
    Exec(ExecRequest),
    /// Re-attaches to a process started earlier. Output buffered while no
    /// one was attached is sent first. Response: `Started`.
    Attach { pid: u32, stdin: bool },
    /// Sends a signal to a process (or its process group, for a tty).
    Signal { pid: u32, signal: i32 },
    /// Changes a tty process's window size.
    Resize { pid: u32, rows: u16, cols: u16 },
    /// Unpacks the tar stream that follows on `Channel::Tar` into the
    /// directory `dest`. Response `Ok` once it is written.
    CopyIn { dest: String },
    /// Sends `path` (file or directory) as a tar stream on `Channel::Tar`.
    /// Response `Ok` first, then the data, then `Eof`.
    CopyOut { path: String },
    /// Describes `path` (symlinks followed), e.g. so `cp` can tell a
    /// directory destination from a new name. Response: `Stat`, or `Error`
    /// with kind `Path` when it does not exist.
    Stat { path: String },
    /// Lists known processes. Response: `Processes`.
    Processes,
    /// Stops sending on every stream until the next `Hello` (used before a
    /// snapshot so no frame is cut in half). Response: `Ok`.
    Quiesce,
    /// Syncs file systems and powers the VM off. Response: `Ok` (sent first).
    Shutdown,
    /// Response: `Pong`.
    Ping,
}

/// The guest's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Configure {
    pub sandbox_id: String,
    pub hostname: String,
    /// Fresh random bytes, base64; credited to the guest's entropy pool.
    pub entropy: String,
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    /// The guest's network. Absent: leave the network as it is (a sandbox
    /// without a network device). Added after version 1 of this message;
    /// a host sends it only to sandboxes that have a network (an older
    /// `kiln-init` rejects the unknown field with an `invalid` error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// The guest's IPv4 configuration, applied by `kiln-init` to the interface
/// whose MAC it sets to `mac` (the first non-loopback one): address, default
/// route, and `/etc/resolv.conf`. Applied again on every `Configure`, so a
/// restored snapshot, fork or warm-pool member takes its new address and MAC
/// and forgets its neighbour cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestNetwork {
    /// `aa:bb:cc:dd:ee:ff`, a unicast address.
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    /// 1-30.
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    /// Resolvers for `/etc/resolv.conf` (at most 3); empty: file left alone.
    #[serde(default)]
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl GuestNetwork {
    /// The MAC as bytes; `None` unless it is six hex pairs of a unicast address.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        let mut out = [0u8; 6];
        let mut parts = self.mac.split(':');
        for b in &mut out {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        if parts.next().is_some() || out[0] & 1 == 1 {
            return None;
        }
        Some(out)
    }

    /// Checks what `kiln-init` relies on; the message of the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.mac_bytes().is_none() {
            return Err(format!("{:?} is not a unicast MAC address", self.mac));
        }
        if !(1..=30).contains(&self.prefix_len) {
            return Err(format!("prefix length {} is not 1-30", self.prefix_len));
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        if u32::from(self.address) & mask != u32::from(self.gateway) & mask {
            return Err(format!(
                "gateway {} is outside {}/{}",
                self.gateway, self.address, self.prefix_len
            ));
        }
        if self.address == self.gateway {
            return Err("the address is the gateway's".to_owned());
        }
        if self.dns.len() > 3 {
            return Err(format!("{} DNS servers, at most 3", self.dns.len()));
        }
        Ok(())
    }
}

/// A process to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv[0] is looked up in the process's `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries: the whole environment of the process.
    pub env: Vec<String>,
    /// Working directory; default `/`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group`, `uid:gid`; resolved in the guest's
    /// `/etc/passwd` and `/etc/group`. Default root.
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal (stdout only; stderr is merged).
    #[serde(default)]
    pub tty: bool,
    /// Initial window size for a tty.
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
    /// The host will send stdin; otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// The sandbox's main process: when it ends, the guest reports its
    /// status and waits for `Shutdown`.
    #[serde(default)]
    pub main: bool,
    /// Start without attaching: the guest answers `Started` and closes the
    /// stream; the process's output waits in the guest (its pipes fill and
    /// it blocks) until a host sends `Attach`, so nothing is lost.
    #[serde(default)]
    pub detached: bool,
}

/// A command or environment Linux would refuse to `execve`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecLimitError {
    #[error("the command is empty")]
    Empty,
    #[error(
        "{what} is {len} bytes long; Linux allows at most {max} bytes per argument or \
         environment variable"
    )]
    StringTooLong {
        what: String,
        len: usize,
        max: usize,
    },
    #[error(
        "the command and environment take {total} bytes together; Linux allows at most {max} \
         (ARG_MAX)"
    )]
    TooLarge { total: usize, max: usize },
    #[error("{what} contains a NUL byte, which Linux cannot pass to a process")]
    Nul { what: String },
    #[error(
        "the command and environment need {len} bytes once encoded (control characters are \
         escaped); at most {max} can be sent"
    )]
    Encoded { len: usize, max: usize },
}

impl ExecRequest {
    /// Checks the command and environment against what Linux's `execve`
    /// accepts (`MAX_ARG_STRLEN` per string, `ARG_MAX` together), so a
    /// request that cannot run is refused on the host with a message about
    /// the user's input, before anything is sent. Everything that passes
    /// fits one `Request` frame (`MAX_REQUEST`).
    pub fn check_limits(&self) -> Result<(), ExecLimitError> {
        if self.argv.is_empty() {
            return Err(ExecLimitError::Empty);
        }
        let mut total = 0usize;
        let named = self
            .argv
            .iter()
            .enumerate()
            .map(|(i, a)| (a, false, i))
            .chain(self.env.iter().enumerate().map(|(i, e)| (e, true, i)));
        for (s, is_env, i) in named {
            let what = || {
                if is_env {
                    let key = s.split('=').next().unwrap_or_default();
                    format!(
                        "environment variable {}",
                        crate::text::sanitize(&short(key))
                    )
                } else {
                    format!("argument {i}")
                }
            };
            if s.contains('\0') {
                return Err(ExecLimitError::Nul { what: what() });
            }
            if s.len() + 1 > MAX_ARG_STRLEN {
                return Err(ExecLimitError::StringTooLong {
                    what: what(),
                    len: s.len(),
                    max: MAX_ARG_STRLEN - 1,
                });
            }
            total += s.len() + 1 + std::mem::size_of::<u64>();
        }
        if total > ARG_MAX {
            return Err(ExecLimitError::TooLarge {
                total,
                max: ARG_MAX,
            });
        }
        // Escaping (control characters take six bytes in JSON) can make
        // a request that Linux would take too large for one frame.
        let encoded = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len()) + 64;
        if encoded > MAX_REQUEST {
            return Err(ExecLimitError::Encoded {
                len: encoded,
                max: MAX_REQUEST,
            });
        }
        Ok(())
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// guest → host: the answer to a `Request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Started { pid: u32 },
    Processes { processes: Vec<ProcessInfo> },
    Stat { stat: FileStat },
    Pong,
    Error { kind: ErrorKind, message: String },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The executable does not exist (shell convention: exit 127).
    NotFound,
    /// The executable exists but cannot be run (exit 126).
    NotExecutable,
    /// Unknown user or group.
    NoSuchUser,
    /// No such process.
    NoSuchProcess,
    /// A path does not exist or cannot be used.
    Path,
    /// The request is invalid.
    Invalid,
    /// Anything else.
    Internal,
}

/// guest → host: something happened on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Exit { pid: u32, status: ExitStatus },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder) -> Vec<Decoded> {
        let mut out = vec![];
        while let Some(f) = d.next_frame() {
            out.push(f);
        }
        out
    }

    #[test]
    fn configure_network_is_optional_and_checked() {
        // A message from a host that predates `network` still parses, and one
        // without a network serialises exactly as before.
        let old =
            r#"{"type":"configure","sandbox_id":"a","hostname":"a","entropy":"","time_unix_ns":0}"#;
        let r: Request = serde_json::from_str(old).unwrap();
        let Request::Configure(c) = &r else {
            panic!("configure")
        };
        assert_eq!(c.network, None);
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
        let n = GuestNetwork {
            mac: "02:4b:0a:58:00:02".into(),
            address: "10.88.0.2".parse().unwrap(),
            prefix_len: 16,
            gateway: "10.88.0.1".parse().unwrap(),
            dns: vec![],
        };
        assert_eq!(n.validate(), Ok(()));
        assert_eq!(n.mac_bytes(), Some([2, 0x4b, 10, 0x58, 0, 2]));
        let bad = |f: &dyn Fn(&mut GuestNetwork)| {
            let mut b = n.clone();
            f(&mut b);
            b.validate().unwrap_err()
        };
        assert!(bad(&|b| b.mac = "03:00:00:00:00:01".into()).contains("unicast"));
        assert!(bad(&|b| b.mac = "02:00:00:00:00".into()).contains("MAC"));
        assert!(bad(&|b| b.prefix_len = 31).contains("1-30"));
        assert!(bad(&|b| b.gateway = "10.89.0.1".parse().unwrap()).contains("outside"));
        assert!(bad(&|b| b.address = b.gateway).contains("gateway"));
    }

    #[test]
    fn round_trip() {
        let mut d = Decoder::new();
        let mut bytes = encode_data(7, Channel::Stdout, b"hello").unwrap();
        bytes.extend(encode_eof(7, Channel::Stdout));
        bytes.extend(encode_credit(7, Channel::Stdin, 4096));
        // Feed one byte at a time.
        let mut frames = vec![];
        for b in bytes {
            d.feed(&[b]);
            frames.extend(decode_all(&mut d));
        }
        assert_eq!(frames.len(), 3);
        let Decoded::Frame(f) = &frames[0] else {
            panic!()
        };
        assert_eq!(f.data().unwrap(), (Channel::Stdout, &b"hello"[..]));
        let Decoded::Frame(f) = &frames[1] else {
            panic!()
        };
        assert_eq!(f.eof().unwrap(), Channel::Stdout);
        let Decoded::Frame(f) = &frames[2] else {
            panic!()
        };
        assert_eq!(f.credit().unwrap(), (Channel::Stdin, 4096));
        assert_eq!(d.discarded(), 0);
    }

    #[test]
    fn resyncs_after_garbage_and_cut_frames() {
        let mut d = Decoder::new();
        let full = encode_data(1, Channel::Stdout, &[0xAB; 100]).unwrap();
        d.feed(b"garbage KLN\x01 more garbage");
        d.feed(&full[..50]); // a frame cut in half
        let hello = encode_json(
            Kind::Hello,
            0,
            &Hello {
                version: 1,
                session: 9,
            },
        )
        .unwrap();
        d.feed(&hello);
        // The cut frame's declared length swallows the first Hello (and part
        // of the next), which is why the host repeats Hello until it is
        // acknowledged. Some repetition must come out intact.
        for _ in 0..4 {
            d.feed(&hello);
        }
        let frames2 = decode_all(&mut d);
        let hellos: Vec<_> = frames2
            .iter()
            .filter_map(|f| match f {
                Decoded::Frame(f) if f.kind == Kind::Hello => {
                    Some(f.json::<Hello>("hello").unwrap())
                }
                _ => None,
            })
            .collect();
        assert!(!hellos.is_empty());
        assert_eq!(hellos[0].session, 9);
        assert!(d.discarded() > 0);
    }

    #[test]
    fn rejects_oversized_and_unknown() {
        let mut h = encode_header(Kind::Data, 1, 10).unwrap();
        h[12] = 200;
        let crc = header_crc(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&h);
        d.feed(&[0; 10]);
        assert_eq!(
            d.next_frame(),
            Some(Decoded::Invalid(FrameError::UnknownKind(200)))
        );
        assert!(encode_header(Kind::Data, 1, MAX_PAYLOAD + 1).is_err());
        let mut h = encode_header(Kind::Data, 1, 0).unwrap();
        h[4..8].copy_from_slice(&(u32::MAX).to_le_bytes());
        let crc = header_crc(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        d.feed(&h);
        assert!(matches!(
            d.next_frame(),
            Some(Decoded::Invalid(FrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let f = Frame {
            kind: Kind::Credit,
            stream: 1,
            payload: vec![1, 2],
        };
        assert!(f.credit().is_err());
        let f = Frame {
            kind: Kind::Data,
            stream: 1,
            payload: vec![],
        };
        assert!(f.data().is_err());
        let f = Frame {
            kind: Kind::Data,
            stream: 1,
            payload: vec![9, 1],
        };
        assert_eq!(f.data(), Err(FrameError::UnknownChannel(9)));
        let f = Frame {
            kind: Kind::Response,
            stream: 1,
            payload: b"{not json".to_vec(),
        };
        assert!(f.json::<Response>("response").is_err());
    }

    #[test]
    fn exit_status_shell_code() {
        assert_eq!(
            ExitStatus {
                code: Some(3),
                signal: None
            }
            .shell_code(),
            3
        );
        assert_eq!(
            ExitStatus {
                code: None,
                signal: Some(9)
            }
            .shell_code(),
            137
        );
    }

    #[test]
    fn request_json_shape() {
        let r = Request::Exec(ExecRequest {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: None,
            user: None,
            tty: false,
            rows: None,
            cols: None,
            stdin: true,
            main: true,
            detached: false,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"type":"exec""#), "{s}");
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }
}

//! The agent: one single-threaded poll(2) loop over the host channel, the
//! processes' pipes, a signalfd (SIGCHLD, SIGTERM, SIGINT) and a wake pipe
//! for the file-copy worker threads.
//!
//! Flow control: a process's output pipe is polled only while there is room
//! for what is read — the host's remaining credit when a host is attached,
//! `DETACHED_BOUND` bytes of buffer otherwise. When there is no room the
//! pipe is not read and the writer blocks; nothing is dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::proto::{
    self, Channel, Configure, Decoded, ErrorKind, Event, ExecRequest, ExitStatus, Frame, Hello,
    HelloAck, INITIAL_WINDOW, Kind, MAX_CONTROL, MAX_DATA_CHUNK, ProcessInfo, Request, Response,
};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use crate::log;
use crate::sys;

/// Output kept per pipe while no host is attached.
const DETACHED_BOUND: usize = 8 << 20;
/// Data frames are generated only while the outgoing queue is below this.
const OUTQ_HIGH: usize = 512 << 10;
/// Largest single read from a process pipe.
const READ_CHUNK: usize = 64 << 10;
/// Largest single read from the host channel.
const CHAN_READ: usize = 256 << 10;
/// How long the main process's pipes may outlive it.
const MAIN_LINGER: Duration = Duration::from_millis(250);
/// Retry interval while the serial port's host end is disconnected.
const HOST_DOWN_RETRY: Duration = Duration::from_millis(10);

/// Where the host channel comes from.
pub enum Transport {
    /// A virtio-serial port (QEMU); always "open", host presence unknown.
    Serial(PathBuf),
    /// A listening AF_VSOCK socket (Firecracker); each connection is a session.
    Vsock(OwnedFd),
}

mod configure;
mod pipes;
mod process;

use configure::configure;
use pipes::{InPipe, OutPipe, credit_in, drain_out};

struct Proc {
    argv: Vec<String>,
    main: bool,
    tty: bool,
    outs: Vec<OutPipe>,
    input: Option<InPipe>,
    pty: Option<OwnedFd>,
    exit: Option<ExitStatus>,
    stream: Option<u32>,
    /// Main process only: when it exited, how long its pipes may stay open
    /// (held by background children) before they are closed and the exit
    /// is reported. Other processes wait for their pipes, like `docker exec`.
    linger_until: Option<Instant>,
}

struct CopyJob {
    id: u64,
    input: Option<InPipe>,
    output: Option<OutPipe>,
    result: Option<Result<(), (ErrorKind, String)>>,
    /// Copy-in answers once the worker finished; copy-out answered at start.
    responded: bool,
    /// Set when the job goes away before the host ended its input: the
    /// worker then puts nothing more in place (see `copy::unpack`).
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for CopyJob {
    fn drop(&mut self) {
        // Runs before the input pipe closes, so the worker sees the flag
        // when it reads the end of its input.
        if self.input.as_ref().is_some_and(|i| !i.eof) {
            self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

type Results = Arc<Mutex<Vec<(u64, Result<(), (ErrorKind, String)>)>>>;

#[derive(Clone, Copy)]
enum Tag {
    Sig,
    Wake,
    Chan,
    Listen,
    Out(u32, usize),
    In(u32),
    CopyOut(u32),
    CopyIn(u32),
}

pub struct Agent {
    transport: Transport,
    conn: Option<OwnedFd>,
    host_down_until: Option<Instant>,
    /// Consecutive reads that found the serial host end disconnected.
    down_strikes: u8,
    out: Vec<u8>,
    out_pos: usize,
    /// While quiesced, bytes up to here may still be written.
    quiesce_mark: Option<usize>,
    dec: proto::Decoder,
    session: Option<u64>,
    boot_id: String,
    procs: BTreeMap<u32, Proc>,
    streams: HashMap<u32, u32>,
    copies: HashMap<u32, CopyJob>,
    next_job: u64,
    main_pid: Option<u32>,
    sigfd: SignalFd,
    wake_r: OwnedFd,
    wake_w: Arc<OwnedFd>,
    results: Results,
    scratch: Vec<u8>,
    bad_frames: RateLimit,
}

/// At most a few log lines per second on paths the host can trigger.
struct RateLimit {
    window: Instant,
    count: u32,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        if self.window.elapsed() > Duration::from_secs(1) {
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        self.count <= 5
    }
}

fn set_nonblock(fd: &OwnedFd) -> nix::Result<()> {
    let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)).map(drop)
}

fn set_cloexec(fd: &OwnedFd) -> nix::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).map(drop)
}

fn err(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

impl Agent {
    pub fn new(transport: Transport, sigfd: SignalFd) -> nix::Result<Agent> {
        let (wake_r, wake_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Agent {
            transport,
            conn: None,
            host_down_until: None,
            down_strikes: 0,
            out: Vec::new(),
            out_pos: 0,
            quiesce_mark: None,
            dec: proto::Decoder::accepting_requests(),
            session: None,
            boot_id,
            procs: BTreeMap::new(),
            streams: HashMap::new(),
            copies: HashMap::new(),
            next_job: 1,
            main_pid: None,
            sigfd,
            wake_r,
            wake_w: Arc::new(wake_w),
            results: Arc::new(Mutex::new(Vec::new())),
            scratch: vec![0; CHAN_READ],
            bad_frames: RateLimit {
                window: Instant::now(),
                count: 0,
            },
        })
    }

    /// Opens the serial port (vsock connections come through `accept`).
    pub fn open_channel(&mut self) -> std::io::Result<()> {
        if let Transport::Serial(path) = &self.transport {
            let fd = nix::fcntl::open(
                path.as_path(),
                OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                nix::sys::stat::Mode::empty(),
            )?;
            self.conn = Some(fd);
        }
        Ok(())
    }

    /// Runs forever.
    pub fn run(&mut self) -> ! {
        loop {
            self.step();
        }
    }

    fn queue(&mut self, frame: Vec<u8>) {
        self.out.extend_from_slice(&frame);
    }

    fn queue_json<T: serde::Serialize>(&mut self, kind: Kind, stream: u32, msg: &T) {
        match proto::encode_json(kind, stream, msg) {
            Ok(f) => self.queue(f),
            Err(e) => log!("cannot encode a {kind:?} frame: {e}"),
        }
    }

    fn respond(&mut self, stream: u32, r: &Response) {
        self.queue_json(Kind::Response, stream, r);
    }

    fn outq_len(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn sending(&self) -> bool {
        self.conn.is_some() && self.session.is_some() && self.quiesce_mark.is_none()
    }

    fn step(&mut self) {
        let now = Instant::now();
        if self.host_down_until.is_some_and(|t| now >= t) {
            self.host_down_until = None;
        }
        let mut expired = false;
        for p in self.procs.values_mut() {
            if p.linger_until.is_some_and(|t| now >= t) {
                p.linger_until = None;
                expired = true;
                // Take what is readable now, then stop waiting for writers
                // that outlived the main process.
                for o in &mut p.outs {
                    while o.fd.is_some() && o.buf.len() < DETACHED_BOUND {
                        let before = o.buf.len();
                        o.read_some(&mut self.scratch, DETACHED_BOUND - before);
                        if o.buf.len() == before {
                            break;
                        }
                    }
                    o.fd = None;
                }
            }
        }
        if expired {
            // Report what the expiry finished before blocking in poll.
            self.pump();
            return;
        }
        let mut tags: Vec<Tag> = Vec::new();
        let mut revents: Vec<PollFlags> = Vec::new();
        {
            let mut fds: Vec<PollFd> = Vec::new();
            fds.push(PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Sig);
            fds.push(PollFd::new(self.wake_r.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Wake);
            if let Transport::Vsock(l) = &self.transport {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                tags.push(Tag::Listen);
            }
            if let (Some(c), None) = (&self.conn, self.host_down_until) {
                let writable_until = self.quiesce_mark.unwrap_or(self.out.len());
                let mut ev = PollFlags::POLLIN;
                if writable_until > self.out_pos {
                    ev |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(c.as_fd(), ev));
                tags.push(Tag::Chan);
            }
            for (pid, p) in &self.procs {
                let attached = p.stream.is_some();
                for (i, o) in p.outs.iter().enumerate() {
                    if let Some(fd) = &o.fd
                        && o.room(attached) > 0
                    {
                        fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                        tags.push(Tag::Out(*pid, i));
                    }
                }
                if let Some(inp) = &p.input
                    && let Some(fd) = &inp.fd
                    && !inp.buf.is_empty()
                {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                    tags.push(Tag::In(*pid));
                }
            }
            for (s, j) in &self.copies {
                if let Some(o) = &j.output
                    && let Some(fd) = &o.fd
                    && o.room(true) > 0
                {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    tags.push(Tag::CopyOut(*s));
                }
                if let Some(i) = &j.input
                    && let Some(fd) = &i.fd
                    && !i.buf.is_empty()
                {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                    tags.push(Tag::CopyIn(*s));
                }
            }
            let wake_at = self
                .procs
                .values()
                .filter_map(|p| p.linger_until)
                .chain(self.host_down_until)
                .min();
            let timeout = match wake_at {
                Some(t) => {
                    let ms = t.saturating_duration_since(now).as_millis().clamp(1, 1000);
                    PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::NONE)
                }
                None => PollTimeout::NONE,
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => return,
                Err(e) => {
                    log!("poll: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
            for f in &fds {
                revents.push(f.revents().unwrap_or(PollFlags::empty()));
            }
        }
        let ready =
            PollFlags::POLLIN | PollFlags::POLLOUT | PollFlags::POLLHUP | PollFlags::POLLERR;
        for (tag, ev) in tags.into_iter().zip(revents) {
            if !ev.intersects(ready) {
                continue;
            }
            match tag {
                Tag::Sig => self.on_signals(),
                Tag::Wake => self.on_wake(),
                Tag::Listen => self.on_accept(),
                Tag::Chan => self.on_channel(ev),
                Tag::Out(pid, i) => {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        let attached = p.stream.is_some();
                        if let Some(o) = p.outs.get_mut(i) {
                            let room = o.room(attached);
                            o.read_some(&mut self.scratch, room);
                        }
                    }
                }
                Tag::In(pid) => {
                    if let Some(inp) = self.procs.get_mut(&pid).and_then(|p| p.input.as_mut()) {
                        inp.write_some();
                        inp.maybe_close();
                    }
                }
                Tag::CopyOut(s) => {
                    if let Some(o) = self.copies.get_mut(&s).and_then(|j| j.output.as_mut()) {
                        let room = o.room(true);
                        o.read_some(&mut self.scratch, room);
                    }
                }
                Tag::CopyIn(s) => {
                    if let Some(i) = self.copies.get_mut(&s).and_then(|j| j.input.as_mut()) {
                        i.write_some();
                        i.maybe_close();
                    }
                }
            }
        }
        self.pump();
    }

    fn on_accept(&mut self) {
        let Transport::Vsock(l) = &self.transport else {
            return;
        };
        match sys::accept(l) {
            Ok(fd) => {
                // A new connection replaces the old one; the session starts
                // with its Hello.
                self.conn = Some(fd);
                self.dec = proto::Decoder::accepting_requests();
                self.out.clear();
                self.out_pos = 0;
                self.quiesce_mark = None;
                self.detach_all();
                self.session = None;
            }
            Err(e) => log!("vsock accept: {e}"),
        }
    }

    fn conn_lost(&mut self) {
        match self.transport {
            // The port stays open; poll it again a little later. If the host
            // end is still gone at the next look, stop spending credit on it
            // (output stays buffered for the next host's Attach). One look
            // is not enough: the port-open notice of a new host can trail
            // the host's first bytes.
            Transport::Serial(_) => {
                self.host_down_until = Some(Instant::now() + HOST_DOWN_RETRY);
                self.down_strikes = self.down_strikes.saturating_add(1);
                if self.down_strikes >= 2 && self.session.is_some() {
                    self.detach_all();
                    self.session = None;
                }
            }
            Transport::Vsock(_) => {
                self.conn = None;
                self.detach_all();
                self.session = None;
            }
        }
    }

    fn on_channel(&mut self, ev: PollFlags) {
        if ev.contains(PollFlags::POLLOUT) {
            self.flush_some();
        }
        if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            let Some(c) = &self.conn else { return };
            match nix::unistd::read(c, &mut self.scratch) {
                Ok(0) => self.conn_lost(),
                Ok(n) => {
                    self.down_strikes = 0;
                    self.dec.feed(&self.scratch[..n]);
                    while let Some(d) = self.dec.next_frame() {
                        match d {
                            Decoded::Frame(f) => self.on_frame(f),
                            Decoded::Invalid(e) => {
                                if self.bad_frames.allow() {
                                    log!("skipped an invalid frame: {e}");
                                }
                            }
                        }
                    }
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(e) => {
                    if self.bad_frames.allow() {
                        log!("reading the host channel: {e}");
                    }
                    self.conn_lost();
                }
            }
        }
    }

    fn flush_some(&mut self) {
        let Some(c) = &self.conn else { return };
        let end = self.quiesce_mark.unwrap_or(self.out.len());
        if end <= self.out_pos {
            return;
        }
        match nix::unistd::write(c, &self.out[self.out_pos..end]) {
            Ok(n) => self.out_pos += n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(_) => self.conn_lost(),
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.quiesce_mark.is_some() {
                self.quiesce_mark = Some(0);
            }
        } else if self.out_pos > (1 << 20) {
            self.out.drain(..self.out_pos);
            if let Some(m) = self.quiesce_mark.as_mut() {
                *m = m.saturating_sub(self.out_pos);
            }
            self.out_pos = 0;
        }
    }

    fn on_signals(&mut self) {
        loop {
            match self.sigfd.read_signal() {
                Ok(Some(info)) => {
                    let sig = info.ssi_signo as i32;
                    if sig == Signal::SIGCHLD as i32 {
                        self.reap();
                    } else if let (Some(pid), Ok(s)) = (self.main_pid, Signal::try_from(sig)) {
                        // Forward SIGTERM/SIGINT sent to PID 1 to the main process.
                        if self.procs.get(&pid).is_some_and(|p| p.exit.is_none()) {
                            let _ = kill(Pid::from_raw(pid as i32), s);
                        }
                    }
                }
                Ok(None) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        // A SIGCHLD may coalesce; reaping is cheap and idempotent.
        self.reap();
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.record_exit(
                        pid,
                        ExitStatus {
                            code: Some(code),
                            signal: None,
                        },
                    );
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.record_exit(
                        pid,
                        ExitStatus {
                            code: None,
                            signal: Some(sig as i32),
                        },
                    );
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }

    fn record_exit(&mut self, pid: Pid, status: ExitStatus) {
        let pid = pid.as_raw() as u32;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.exit = Some(status);
            if p.main {
                p.linger_until = Some(Instant::now() + MAIN_LINGER);
            }
            // The process is gone: whatever host stdin is pending goes nowhere.
            if let Some(i) = p.input.as_mut() {
                i.fd = None;
            }
        }
    }

    fn on_wake(&mut self) {
        let mut b = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake_r, &mut b), Ok(n) if n > 0) {}
        let done: Vec<_> = match self.results.lock() {
            Ok(mut r) => r.drain(..).collect(),
            Err(_) => return,
        };
        for (id, res) in done {
            if let Some(j) = self.copies.values_mut().find(|j| j.id == id) {
                j.result = Some(res);
            }
        }
    }

    fn detach_all(&mut self) {
        for p in self.procs.values_mut() {
            p.stream = None;
        }
        self.streams.clear();
        // Dropping a copy's pipes makes its worker thread fail and end.
        self.copies.clear();
    }

    fn on_frame(&mut self, f: Frame) {
        match f.kind {
            Kind::Hello => match f.json::<Hello>("hello") {
                Ok(h) => self.on_hello(h),
                Err(e) => {
                    if self.bad_frames.allow() {
                        log!("bad hello: {e}");
                    }
                }
            },
            Kind::Request if self.session.is_some() => self.on_request(f),
            Kind::Data => self.on_data(&f),
            Kind::Eof => {
                if let Ok(ch) = f.eof()
                    && let Some(i) = self.input_of(f.stream, ch)
                {
                    i.eof = true;
                    i.maybe_close();
                }
            }
            Kind::Credit => {
                if let Ok((ch, n)) = f.credit()
                    && let Some(o) = self.output_of(f.stream, ch)
                {
                    o.credit = o
                        .credit
                        .saturating_add(n.into())
                        .min(u64::from(u32::MAX) * 4);
                }
            }
            Kind::Close => {
                if let Some(pid) = self.streams.remove(&f.stream) {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.stream = None;
                    }
                } else {
                    self.copies.remove(&f.stream);
                }
            }
            _ => {
                if self.bad_frames.allow() {
                    log!("ignored a {:?} frame on stream {}", f.kind, f.stream);
                }
            }
        }
    }

    fn input_of(&mut self, stream: u32, ch: Channel) -> Option<&mut InPipe> {
        let inp = if let Some(pid) = self.streams.get(&stream) {
            self.procs.get_mut(pid)?.input.as_mut()?
        } else {
            self.copies.get_mut(&stream)?.input.as_mut()?
        };
        (inp.ch == ch).then_some(inp)
    }

    fn output_of(&mut self, stream: u32, ch: Channel) -> Option<&mut OutPipe> {
        if let Some(pid) = self.streams.get(&stream) {
            self.procs
                .get_mut(pid)?
                .outs
                .iter_mut()
                .find(|o| o.ch == ch)
        } else {
            self.copies
                .get_mut(&stream)?
                .output
                .as_mut()
                .filter(|o| o.ch == ch)
        }
    }

    fn on_data(&mut self, f: &Frame) {
        let Ok((ch, bytes)) = f.data() else { return };
        let stream = f.stream;
        let res = match self.input_of(stream, ch) {
            Some(i) => {
                let r = i.data(bytes);
                if r.is_ok() {
                    i.write_some();
                    i.maybe_close();
                }
                r
            }
            None => Ok(()),
        };
        if let Err(e) = res
            && self.bad_frames.allow()
        {
            log!("stream {stream}: host sent {e}; data dropped");
        }
    }

    fn on_hello(&mut self, h: Hello) {
        if self.session != Some(h.session) {
            // A new host: everything of the previous session is detached.
            // Queued bytes stay queued: a host ignores frames that precede
            // its HelloAck.
            self.detach_all();
            self.session = Some(h.session);
        }
        self.quiesce_mark = None;
        let main = self
            .main_pid
            .and_then(|pid| self.procs.get(&pid))
            .map(|p| ProcessInfo {
                pid: self.main_pid.unwrap_or_default(),
                argv: p.argv.clone(),
                exit: p.exit,
            });
        let ack = HelloAck {
            version: proto::VERSION,
            session: h.session,
            agent: format!("kiln-init {}", env!("CARGO_PKG_VERSION")),
            boot_id: self.boot_id.clone(),
            main,
        };
        self.queue_json(Kind::HelloAck, 0, &ack);
    }

    fn on_request(&mut self, f: Frame) {
        let s = f.stream;
        if s == 0 || self.streams.contains_key(&s) || self.copies.contains_key(&s) {
            self.respond(s, &err(ErrorKind::Invalid, format!("stream {s} is in use")));
            return;
        }
        let req = match f.json::<Request>("request") {
            Ok(r) => r,
            Err(e) => {
                self.respond(s, &err(ErrorKind::Invalid, e.to_string()));
                self.queue(proto::encode_close(s));
                return;
            }
        };
        match req {
            Request::Ping => self.respond(s, &Response::Pong),
            Request::Configure(c) => {
                // A malformed network is the host's mistake (invalid), a
                // failing ioctl the guest's (internal).
                let r = match c.network.as_ref().map(|n| n.validate()) {
                    Some(Err(e)) => err(ErrorKind::Invalid, e),
                    _ => match configure(&c) {
                        Ok(()) => Response::Ok,
                        Err(e) => err(ErrorKind::Internal, e),
                    },
                };
                self.respond(s, &r);
            }
            Request::Exec(e) => match self.exec(&e) {
                Ok(pid) if e.detached => {
                    self.respond(s, &Response::Started { pid });
                    self.queue(proto::encode_close(s));
                }
                Ok(pid) => {
                    self.respond(s, &Response::Started { pid });
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.stream = Some(s);
                    }
                    self.streams.insert(s, pid);
                }
                Err((kind, message)) => {
                    self.respond(s, &Response::Error { kind, message });
                    self.queue(proto::encode_close(s));
                }
            },
            Request::Attach { pid, stdin } => self.attach(s, pid, stdin),
            Request::Signal { pid, signal } => {
                let r = self.signal(pid, signal);
                self.respond(s, &r);
            }
            Request::Resize { pid, rows, cols } => {
                let r = match self.procs.get(&pid).and_then(|p| p.pty.as_ref()) {
                    Some(fd) => {
                        match sys::set_winsize(std::os::fd::AsRawFd::as_raw_fd(fd), rows, cols) {
                            Ok(()) => Response::Ok,
                            Err(e) => err(ErrorKind::Internal, format!("resize: {e}")),
                        }
                    }
                    None => err(
                        ErrorKind::NoSuchProcess,
                        format!("no tty process with pid {pid}"),
                    ),
                };
                self.respond(s, &r);
            }
            Request::CopyIn { dest } => self.copy_in(s, dest),
            Request::CopyOut { path } => self.copy_out(s, path),
            Request::Stat { path } => {
                let r = match std::fs::metadata(&path) {
                    Ok(m) => {
                        use std::os::unix::fs::PermissionsExt;
                        let kind = if m.is_dir() {
                            proto::FileKind::Dir
                        } else if m.is_file() {
                            proto::FileKind::File
                        } else {
                            proto::FileKind::Other
                        };
                        Response::Stat {
                            stat: proto::FileStat {
                                kind,
                                size: m.len(),
                                mode: m.permissions().mode() & 0o7777,
                            },
                        }
                    }
                    Err(e) => err(ErrorKind::Path, format!("{path}: {e}")),
                };
                self.respond(s, &r);
            }
            Request::Processes => {
                let mut processes: Vec<ProcessInfo> = self
                    .procs
                    .iter()
                    .map(|(pid, p)| ProcessInfo {
                        pid: *pid,
                        argv: p.argv.clone(),
                        exit: p.exit,
                    })
                    .collect();
                // Keep the answer within the control message limit.
                while serde_json::to_vec(&processes).map_or(0, |v| v.len()) > MAX_CONTROL - 256 {
                    processes.pop();
                }
                self.respond(s, &Response::Processes { processes });
            }
            Request::Quiesce => {
                // A snapshot follows: put dirty file data on the disks first,
                // so the writable disk is consistent on its own too.
                nix::unistd::sync();
                self.respond(s, &Response::Ok);
                self.quiesce_mark = Some(self.out.len());
            }
            Request::Shutdown => {
                self.respond(s, &Response::Ok);
                self.shutdown();
            }
        }
        // Requests that are answered at once end their stream.
    }

    fn shutdown(&mut self) -> ! {
        // Give the Ok a chance to reach the host.
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.outq_len() > 0 && Instant::now() < deadline && self.conn.is_some() {
            self.flush_some();
            std::thread::sleep(Duration::from_millis(1));
        }
        crate::power_off()
    }
}

/// Finds the `/dev/vportNpM` whose name is `kiln.agent`.
pub fn find_serial_port() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == proto::PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

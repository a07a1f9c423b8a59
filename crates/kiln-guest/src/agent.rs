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

/// Output of a process (or a copy-out) towards the host.
struct OutPipe {
    ch: Channel,
    fd: Option<OwnedFd>,
    buf: VecDeque<u8>,
    /// Bytes the host still accepts on this channel.
    credit: u64,
    eof_sent: bool,
}

impl OutPipe {
    fn new(ch: Channel, fd: OwnedFd) -> Self {
        OutPipe {
            ch,
            fd: Some(fd),
            buf: VecDeque::new(),
            credit: INITIAL_WINDOW.into(),
            eof_sent: false,
        }
    }
    fn room(&self, attached: bool) -> usize {
        let cap = if attached {
            usize::try_from(self.credit)
                .unwrap_or(usize::MAX)
                .min(DETACHED_BOUND)
        } else {
            DETACHED_BOUND
        };
        cap.saturating_sub(self.buf.len())
    }
    fn done(&self) -> bool {
        self.fd.is_none() && self.buf.is_empty()
    }
    fn reset_for_attach(&mut self) {
        self.credit = INITIAL_WINDOW.into();
        self.eof_sent = false;
    }
    /// One read into the buffer, at most `room` bytes.
    fn read_some(&mut self, scratch: &mut [u8], room: usize) {
        let Some(fd) = &self.fd else { return };
        let n = room.min(READ_CHUNK).min(scratch.len());
        if n == 0 {
            return;
        }
        match nix::unistd::read(fd, &mut scratch[..n]) {
            Ok(0) => self.fd = None,
            Ok(k) => self.buf.extend(&scratch[..k]),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            // EIO: the pty's last slave closed.
            Err(_) => self.fd = None,
        }
    }
}

/// Input from the host into a pipe (stdin, copy-in).
struct InPipe {
    ch: Channel,
    fd: Option<OwnedFd>,
    buf: VecDeque<u8>,
    /// Bytes the host may still send before it needs more credit.
    window: u64,
    /// Bytes consumed that were not yet credited back.
    owed: u64,
    eof: bool,
}

impl InPipe {
    fn new(ch: Channel, fd: OwnedFd) -> Self {
        InPipe {
            ch,
            fd: Some(fd),
            buf: VecDeque::new(),
            window: INITIAL_WINDOW.into(),
            owed: 0,
            eof: false,
        }
    }
    fn data(&mut self, bytes: &[u8]) -> Result<(), String> {
        let n = bytes.len() as u64;
        if n > self.window {
            return Err(format!(
                "{} bytes beyond the {} of credit left",
                n, self.window
            ));
        }
        self.window -= n;
        if self.fd.is_some() {
            self.buf.extend(bytes);
        } else {
            // The reader is gone: discard, but keep the host moving.
            self.owed += n;
        }
        Ok(())
    }
    fn write_some(&mut self) {
        let Some(fd) = &self.fd else {
            self.owed += self.buf.len() as u64;
            self.buf.clear();
            return;
        };
        let (a, _) = self.buf.as_slices();
        if a.is_empty() {
            return;
        }
        match nix::unistd::write(fd, a) {
            Ok(k) => {
                self.buf.drain(..k);
                self.owed += k as u64;
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(_) => {
                self.fd = None;
                self.owed += self.buf.len() as u64;
                self.buf.clear();
            }
        }
    }
    /// Closes the pipe once the host's EOF and all data went through.
    fn maybe_close(&mut self) {
        if self.eof && self.buf.is_empty() {
            self.fd = None;
        }
    }
    fn reset_for_attach(&mut self) {
        self.window = INITIAL_WINDOW.into();
        self.owed = 0;
    }
}

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

    fn signal(&mut self, pid: u32, signal: i32) -> Response {
        let Ok(sig) = Signal::try_from(signal) else {
            return err(ErrorKind::Invalid, format!("invalid signal {signal}"));
        };
        let Some(p) = self.procs.get(&pid).filter(|p| p.exit.is_none()) else {
            return err(
                ErrorKind::NoSuchProcess,
                format!("no running process with pid {pid}"),
            );
        };
        let target = if p.tty { -(pid as i32) } else { pid as i32 };
        match kill(Pid::from_raw(target), sig) {
            Ok(()) => Response::Ok,
            Err(e) => err(ErrorKind::NoSuchProcess, format!("kill {pid}: {e}")),
        }
    }

    fn attach(&mut self, s: u32, pid: u32, stdin: bool) {
        let Some(p) = self.procs.get_mut(&pid) else {
            self.respond(
                s,
                &err(
                    ErrorKind::NoSuchProcess,
                    format!("no process with pid {pid}"),
                ),
            );
            self.queue(proto::encode_close(s));
            return;
        };
        if stdin && p.input.as_ref().is_none_or(|i| i.fd.is_none()) {
            let r = err(
                ErrorKind::Invalid,
                format!("process {pid} has no open stdin"),
            );
            self.respond(s, &r);
            self.queue(proto::encode_close(s));
            return;
        }
        let old = p.stream.replace(s);
        for o in &mut p.outs {
            o.reset_for_attach();
        }
        if let Some(i) = p.input.as_mut() {
            i.reset_for_attach();
            if !stdin {
                // The new host will not write: nothing more arrives.
                i.eof = true;
                i.maybe_close();
            }
        }
        if let Some(old) = old {
            self.streams.remove(&old);
            self.queue(proto::encode_close(old));
        }
        self.streams.insert(s, pid);
        self.respond(s, &Response::Started { pid });
    }

    fn exec(&mut self, e: &ExecRequest) -> Result<u32, (ErrorKind, String)> {
        let Some(argv0) = e.argv.first() else {
            return Err((ErrorKind::Invalid, "exec: empty argv".into()));
        };
        let id = crate::users::resolve_in_root(e.user.as_deref().unwrap_or(""))
            .map_err(|x| (ErrorKind::NoSuchUser, x.to_string()))?;
        let cwd = PathBuf::from(e.cwd.as_deref().filter(|c| !c.is_empty()).unwrap_or("/"));
        if !cwd.is_absolute() {
            return Err((
                ErrorKind::Path,
                format!("working directory {} is not absolute", cwd.display()),
            ));
        }
        if !cwd.exists() {
            std::fs::create_dir_all(&cwd).map_err(|x| {
                (
                    ErrorKind::Path,
                    format!("creating working directory {}: {x}", cwd.display()),
                )
            })?;
            let _ = chown(&cwd, Some(id.uid), Some(id.gid));
        } else if !cwd.is_dir() {
            return Err((
                ErrorKind::Path,
                format!("working directory {} is not a directory", cwd.display()),
            ));
        }
        let prog = crate::lookup::find_program(argv0, &e.env, &cwd)?;
        let mut cmd = Command::new(&prog);
        cmd.arg0(argv0)
            .args(&e.argv[1..])
            .env_clear()
            .current_dir(&cwd);
        for kv in &e.env {
            if let Some((k, v)) = kv.split_once('=')
                && !k.is_empty()
            {
                cmd.env(k, v);
            }
        }
        // Like Docker: HOME comes from the user's passwd entry unless set.
        if !e.env.iter().any(|kv| kv.starts_with("HOME=")) {
            cmd.env("HOME", id.home.as_deref().unwrap_or("/"));
        }
        let ioerr = |what: &str, x: nix::Error| (ErrorKind::Internal, format!("{what}: {x}"));
        let mut outs = Vec::new();
        let mut input = None;
        let mut pty = None;
        if e.tty {
            let ws = nix::pty::Winsize {
                ws_row: e.rows.unwrap_or(24),
                ws_col: e.cols.unwrap_or(80),
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let p = nix::pty::openpty(&ws, None).map_err(|x| ioerr("openpty", x))?;
            set_cloexec(&p.master).map_err(|x| ioerr("fcntl", x))?;
            set_cloexec(&p.slave).map_err(|x| ioerr("fcntl", x))?;
            set_nonblock(&p.master).map_err(|x| ioerr("fcntl", x))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|x| (ErrorKind::Internal, format!("dup: {x}")))
            };
            cmd.stdin(Stdio::from(dup(&p.slave)?))
                .stdout(Stdio::from(dup(&p.slave)?))
                .stderr(Stdio::from(p.slave));
            outs.push(OutPipe::new(Channel::Stdout, dup(&p.master)?));
            if e.stdin {
                input = Some(InPipe::new(Channel::Stdin, dup(&p.master)?));
            }
            pty = Some(p.master);
        } else {
            let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|x| ioerr("pipe", x));
            let (or, ow) = pipe()?;
            let (er, ew) = pipe()?;
            set_nonblock(&or).map_err(|x| ioerr("fcntl", x))?;
            set_nonblock(&er).map_err(|x| ioerr("fcntl", x))?;
            cmd.stdout(Stdio::from(ow)).stderr(Stdio::from(ew));
            outs.push(OutPipe::new(Channel::Stdout, or));
            outs.push(OutPipe::new(Channel::Stderr, er));
            if e.stdin {
                let (ir, iw) = pipe()?;
                set_nonblock(&iw).map_err(|x| ioerr("fcntl", x))?;
                cmd.stdin(Stdio::from(ir));
                input = Some(InPipe::new(Channel::Stdin, iw));
            } else {
                cmd.stdin(Stdio::null());
            }
            cmd.process_group(0);
        }
        sys::prepare(
            &mut cmd,
            sys::ChildSetup {
                uid: Uid::from_raw(id.uid),
                gid: Gid::from_raw(id.gid),
                groups: id.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
                tty: e.tty,
            },
        );
        let child = cmd.spawn().map_err(|x| {
            let kind = match x.raw_os_error() {
                Some(libc::ENOENT) => ErrorKind::NotFound,
                Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => {
                    ErrorKind::NotExecutable
                }
                _ => ErrorKind::Internal,
            };
            (kind, format!("exec: \"{argv0}\": {x}"))
        })?;
        let pid = child.id();
        // The child is reaped by the SIGCHLD loop, not through `child`.
        drop(child);
        drop(cmd);
        if e.main {
            self.main_pid = Some(pid);
        }
        self.procs.insert(
            pid,
            Proc {
                argv: e.argv.clone(),
                main: e.main,
                tty: e.tty,
                outs,
                input,
                pty,
                exit: None,
                stream: None,
                linger_until: None,
            },
        );
        Ok(pid)
    }

    fn spawn_worker(
        &mut self,
        f: impl FnOnce() -> Result<(), (ErrorKind, String)> + Send + 'static,
    ) -> u64 {
        let id = self.next_job;
        self.next_job += 1;
        let results = Arc::clone(&self.results);
        let wake = Arc::clone(&self.wake_w);
        let spawned = std::thread::Builder::new()
            .name("kiln-copy".into())
            .spawn(move || {
                let r = f();
                if let Ok(mut v) = results.lock() {
                    v.push((id, r));
                }
                let _ = nix::unistd::write(wake.as_fd(), &[1]);
            });
        if let Err(e) = spawned
            && let Ok(mut v) = self.results.lock()
        {
            v.push((
                id,
                Err((ErrorKind::Internal, format!("spawning a worker: {e}"))),
            ));
        }
        id
    }

    fn copy_in(&mut self, s: u32, dest: String) {
        let pipe = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                self.respond(s, &err(ErrorKind::Internal, format!("pipe: {e}")));
                return;
            }
        };
        let (r, w) = pipe;
        if let Err(e) = set_nonblock(&w) {
            self.respond(s, &err(ErrorKind::Internal, format!("fcntl: {e}")));
            return;
        }
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker_cancel = Arc::clone(&cancel);
        let id = self.spawn_worker(move || {
            let mut reader = File::from(r);
            let res = crate::copy::unpack(&mut reader, Path::new(&dest), &worker_cancel);
            // Drain the rest (tar padding) so the host's EOF goes through.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            match res {
                Ok(_) => Ok(()),
                Err(crate::copy::CopyError::NotADirectory(d)) => Err((
                    ErrorKind::Path,
                    format!("destination {d} is not a directory"),
                )),
                Err(e) => Err((ErrorKind::Invalid, e.to_string())),
            }
        });
        self.copies.insert(
            s,
            CopyJob {
                id,
                input: Some(InPipe::new(Channel::Tar, w)),
                output: None,
                result: None,
                responded: false,
                cancel,
            },
        );
    }

    fn copy_out(&mut self, s: u32, path: String) {
        let p = PathBuf::from(&path);
        if !p.is_absolute() || std::fs::symlink_metadata(&p).is_err() {
            self.respond(
                s,
                &err(
                    ErrorKind::Path,
                    format!("{path}: no such file or directory"),
                ),
            );
            self.queue(proto::encode_close(s));
            return;
        }
        let (r, w) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                self.respond(s, &err(ErrorKind::Internal, format!("pipe: {e}")));
                return;
            }
        };
        if let Err(e) = set_nonblock(&r) {
            self.respond(s, &err(ErrorKind::Internal, format!("fcntl: {e}")));
            return;
        }
        let id = self.spawn_worker(move || {
            let writer = std::io::BufWriter::with_capacity(64 << 10, File::from(w));
            crate::copy::pack(&p, writer).map_err(|e| (ErrorKind::Path, e.to_string()))
        });
        self.respond(s, &Response::Ok);
        self.copies.insert(
            s,
            CopyJob {
                id,
                input: None,
                output: Some(OutPipe::new(Channel::Tar, r)),
                result: None,
                responded: true,
                cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            },
        );
    }

    /// Moves buffered output into the outgoing queue as credit allows, and
    /// reports finished processes and copies.
    fn pump(&mut self) {
        if !self.sending() {
            return;
        }
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut budget = OUTQ_HIGH.saturating_sub(self.outq_len());
        let mut finished: Vec<u32> = Vec::new();
        for (pid, p) in self.procs.iter_mut() {
            let Some(s) = p.stream else { continue };
            for o in p.outs.iter_mut() {
                drain_out(s, o, &mut budget, &mut frames);
            }
            if let Some(i) = p.input.as_mut() {
                credit_in(s, i, &mut frames);
            }
            if let Some(status) = p.exit
                && p.outs.iter().all(|o| o.done() && o.eof_sent)
            {
                let ev = Event::Exit { pid: *pid, status };
                match proto::encode_json(Kind::Event, s, &ev) {
                    Ok(f) => frames.push(f),
                    Err(e) => log!("encoding an exit event: {e}"),
                }
                frames.push(proto::encode_close(s));
                finished.push(*pid);
            }
        }
        for pid in finished {
            if let Some(p) = self.procs.get_mut(&pid) {
                if let Some(s) = p.stream.take() {
                    self.streams.remove(&s);
                }
                // The status was collected; the main process's stays for
                // HelloAck until shutdown.
                if !p.main {
                    self.procs.remove(&pid);
                }
            }
        }
        let mut done_copies = Vec::new();
        for (s, j) in self.copies.iter_mut() {
            if let Some(o) = j.output.as_mut() {
                if !o.eof_sent && o.fd.is_none() && o.buf.is_empty() {
                    // Tell the end of the archive only if it was complete.
                    match &j.result {
                        Some(Ok(())) => drain_out(*s, o, &mut budget, &mut frames),
                        Some(Err(_)) => o.eof_sent = true,
                        None => {}
                    }
                } else {
                    drain_out(*s, o, &mut budget, &mut frames);
                }
            }
            if let Some(i) = j.input.as_mut() {
                credit_in(*s, i, &mut frames);
            }
            let out_done = j.output.as_ref().is_none_or(|o| o.done() && o.eof_sent);
            if let Some(res) = &j.result
                && out_done
            {
                if !j.responded {
                    let r = match res {
                        Ok(()) => Response::Ok,
                        Err((k, m)) => Response::Error {
                            kind: *k,
                            message: m.clone(),
                        },
                    };
                    if let Ok(f) = proto::encode_json(Kind::Response, *s, &r) {
                        frames.push(f);
                    }
                }
                frames.push(proto::encode_close(*s));
                done_copies.push(*s);
            }
        }
        for s in done_copies {
            self.copies.remove(&s);
        }
        for f in frames {
            self.queue(f);
        }
        if self.outq_len() > 0 {
            // Try to write right away; poll will take over on EAGAIN.
            self.flush_some();
        }
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

fn drain_out(s: u32, o: &mut OutPipe, budget: &mut usize, frames: &mut Vec<Vec<u8>>) {
    while !o.buf.is_empty() && o.credit > 0 && *budget > 0 {
        let n = o
            .buf
            .len()
            .min(MAX_DATA_CHUNK)
            .min(usize::try_from(o.credit).unwrap_or(usize::MAX))
            .min(*budget);
        let (a, b) = o.buf.as_slices();
        let mut chunk = Vec::with_capacity(n);
        let na = a.len().min(n);
        chunk.extend_from_slice(&a[..na]);
        chunk.extend_from_slice(&b[..n - na]);
        o.buf.drain(..n);
        match proto::encode_data(s, o.ch, &chunk) {
            Ok(f) => frames.push(f),
            Err(e) => log!("encoding data: {e}"),
        }
        o.credit -= n as u64;
        *budget -= n;
    }
    if o.fd.is_none() && o.buf.is_empty() && !o.eof_sent {
        frames.push(proto::encode_eof(s, o.ch));
        o.eof_sent = true;
    }
}

fn credit_in(s: u32, i: &mut InPipe, frames: &mut Vec<Vec<u8>>) {
    // Grant in batches, or everything once the buffer is empty.
    if i.owed > 0 && (i.owed >= 64 << 10 || i.buf.is_empty()) {
        let n = u32::try_from(i.owed).unwrap_or(u32::MAX);
        frames.push(proto::encode_credit(s, i.ch, n));
        i.window += u64::from(n);
        i.owed -= u64::from(n);
    }
}

fn configure(c: &Configure) -> Result<(), String> {
    use base64::Engine as _;
    if let Some(n) = &c.network {
        crate::net::configure(n)?;
    }
    if !c.hostname.is_empty() {
        nix::unistd::sethostname(&c.hostname).map_err(|e| format!("sethostname: {e}"))?;
        let _ = std::fs::write("/etc/hostname", format!("{}\n", c.hostname));
        if let Ok(hosts) = std::fs::read_to_string("/etc/hosts")
            && !hosts
                .lines()
                .any(|l| l.split_whitespace().skip(1).any(|n| n == c.hostname))
        {
            let line = format!("127.0.1.1\t{}\n", c.hostname);
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open("/etc/hosts")
                .and_then(|mut f| f.write_all(line.as_bytes()));
        } else if std::fs::metadata("/etc/hosts").is_err() {
            let _ = std::fs::write(
                "/etc/hosts",
                format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n", c.hostname),
            );
        }
    }
    if !c.entropy.is_empty() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&c.entropy)
            .map_err(|e| format!("entropy is not base64: {e}"))?;
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/random")
            .map_err(|e| format!("opening /dev/random: {e}"))?;
        let random = OwnedFd::from(random);
        sys::add_entropy(&random, &bytes).map_err(|e| format!("RNDADDENTROPY: {e}"))?;
        // After a restore every fork holds the same CRNG state: re-key it
        // from the pool that now holds this fork's own entropy.
        // ENODATA: the CRNG is not ready yet, so it will seed from the pool
        // when it becomes ready; nothing to do.
        match sys::reseed_crng(&random) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(format!("RNDRESEEDCRNG: {e}")),
        }
    }
    if c.time_unix_ns > 0 {
        let ts = nix::sys::time::TimeSpec::new(
            (c.time_unix_ns / 1_000_000_000) as libc::time_t,
            (c.time_unix_ns % 1_000_000_000) as libc::c_long,
        );
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| format!("clock_settime: {e}"))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(frames: &[Vec<u8>]) -> Vec<Frame> {
        let mut d = proto::Decoder::new();
        for f in frames {
            d.feed(f);
        }
        let mut out = vec![];
        while let Some(Decoded::Frame(f)) = d.next_frame() {
            out.push(f);
        }
        out
    }

    #[test]
    fn output_is_read_only_within_credit_or_bound() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        set_nonblock(&r).unwrap();
        nix::unistd::write(&w, &[7u8; 1000]).unwrap();
        let mut o = OutPipe::new(Channel::Stdout, r);
        o.credit = 100;
        assert_eq!(o.room(true), 100);
        let mut scratch = vec![0u8; 4096];
        let room = o.room(true);
        o.read_some(&mut scratch, room);
        assert_eq!(o.buf.len(), 100);
        assert_eq!(o.room(true), 0);
        // Detached, the bound applies instead of the credit.
        assert_eq!(o.room(false), DETACHED_BOUND - 100);
        // Sending is limited by the credit too.
        o.credit = 40;
        let (mut budget, mut frames) = (usize::MAX, vec![]);
        drain_out(5, &mut o, &mut budget, &mut frames);
        let f = decode(&frames);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].data().unwrap().1.len(), 40);
        assert_eq!((o.credit, o.buf.len()), (0, 60));
        // EOF is reported only once everything was sent.
        drop(w);
        o.credit = 1000;
        let room = o.room(true);
        o.read_some(&mut scratch, room);
        o.read_some(&mut scratch, room);
        assert!(o.fd.is_none());
        let mut frames = vec![];
        drain_out(5, &mut o, &mut budget, &mut frames);
        let f = decode(&frames);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].eof().unwrap(), Channel::Stdout);
        assert!(o.done() && o.eof_sent);
    }

    #[test]
    fn input_honours_the_window_and_grants_credit() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        set_nonblock(&w).unwrap();
        let mut i = InPipe::new(Channel::Stdin, w);
        i.window = 10;
        assert!(i.data(&[1; 11]).is_err());
        i.data(&[1; 10]).unwrap();
        assert_eq!(i.window, 0);
        i.write_some();
        assert!(i.buf.is_empty());
        let mut frames = vec![];
        credit_in(3, &mut i, &mut frames);
        let f = decode(&frames);
        assert_eq!(f[0].credit().unwrap(), (Channel::Stdin, 10));
        assert_eq!(i.window, 10);
        i.eof = true;
        i.maybe_close();
        assert!(i.fd.is_none());
        let mut got = vec![0u8; 64];
        assert_eq!(nix::unistd::read(&r, &mut got).unwrap(), 10);
        assert_eq!(nix::unistd::read(&r, &mut got).unwrap(), 0);
    }
}

//! A process's pipes: output read within credit (or a bound while no host
//! is attached), input written within the window it granted.

use super::*;

/// Output of a process (or a copy-out) towards the host.
pub(super) struct OutPipe {
    pub(super) ch: Channel,
    pub(super) fd: Option<OwnedFd>,
    pub(super) buf: VecDeque<u8>,
    /// Bytes the host still accepts on this channel.
    pub(super) credit: u64,
    pub(super) eof_sent: bool,
}

impl OutPipe {
    pub(super) fn new(ch: Channel, fd: OwnedFd) -> Self {
        OutPipe {
            ch,
            fd: Some(fd),
            buf: VecDeque::new(),
            credit: INITIAL_WINDOW.into(),
            eof_sent: false,
        }
    }
    pub(super) fn room(&self, attached: bool) -> usize {
        let cap = if attached {
            usize::try_from(self.credit)
                .unwrap_or(usize::MAX)
                .min(DETACHED_BOUND)
        } else {
            DETACHED_BOUND
        };
        cap.saturating_sub(self.buf.len())
    }
    pub(super) fn done(&self) -> bool {
        self.fd.is_none() && self.buf.is_empty()
    }
    pub(super) fn reset_for_attach(&mut self) {
        self.credit = INITIAL_WINDOW.into();
        self.eof_sent = false;
    }
    /// One read into the buffer, at most `room` bytes.
    pub(super) fn read_some(&mut self, scratch: &mut [u8], room: usize) {
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
pub(super) struct InPipe {
    pub(super) ch: Channel,
    pub(super) fd: Option<OwnedFd>,
    pub(super) buf: VecDeque<u8>,
    /// Bytes the host may still send before it needs more credit.
    pub(super) window: u64,
    /// Bytes consumed that were not yet credited back.
    pub(super) owed: u64,
    pub(super) eof: bool,
}

impl InPipe {
    pub(super) fn new(ch: Channel, fd: OwnedFd) -> Self {
        InPipe {
            ch,
            fd: Some(fd),
            buf: VecDeque::new(),
            window: INITIAL_WINDOW.into(),
            owed: 0,
            eof: false,
        }
    }
    pub(super) fn data(&mut self, bytes: &[u8]) -> Result<(), String> {
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
    pub(super) fn write_some(&mut self) {
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
    pub(super) fn maybe_close(&mut self) {
        if self.eof && self.buf.is_empty() {
            self.fd = None;
        }
    }
    pub(super) fn reset_for_attach(&mut self) {
        self.window = INITIAL_WINDOW.into();
        self.owed = 0;
    }
}
pub(super) fn drain_out(s: u32, o: &mut OutPipe, budget: &mut usize, frames: &mut Vec<Vec<u8>>) {
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

pub(super) fn credit_in(s: u32, i: &mut InPipe, frames: &mut Vec<Vec<u8>>) {
    // Grant in batches, or everything once the buffer is empty.
    if i.owed > 0 && (i.owed >= 64 << 10 || i.buf.is_empty()) {
        let n = u32::try_from(i.owed).unwrap_or(u32::MAX);
        frames.push(proto::encode_credit(s, i.ch, n));
        i.window += u64::from(n);
        i.owed -= u64::from(n);
    }
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

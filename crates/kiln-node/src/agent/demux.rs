//! The connection's shared state: open streams, credit accounting, and the
//! validation of every frame the guest sends. The guest is hostile: a frame
//! that breaks the protocol fails its stream (never the host), and what a
//! stream buffers is bounded by the credit the host granted.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use kiln_api::proto::{self, Channel, Event, ExitStatus, Frame, INITIAL_WINDOW, Kind, Response};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::StreamError;

/// Most credit the guest may hand us for one outbound channel; more is a
/// protocol violation (and would overflow the semaphore).
pub(crate) const MAX_SEND_CREDIT: usize = 64 << 20;

/// What a stream's consumer receives.
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Channel, Bytes),
    Eof,
    Exit(ExitStatus),
    /// The guest closed the stream.
    Closed,
    Failed(StreamError),
}

pub(crate) struct Slot {
    response: Option<oneshot::Sender<Result<Response, StreamError>>>,
    /// Set once the response arrived and the stream carries data.
    inbound: Option<mpsc::UnboundedSender<Inbound>>,
    /// Channels the guest may send `Data` on, with the bytes it may still send.
    recv_window: Vec<(Channel, u64)>,
    /// Credit for what the host sends (stdin, tar), if any.
    send_credit: Option<(Channel, Arc<Semaphore>)>,
    /// The process this stream belongs to (exec/attach), checked on Exit.
    pid: Option<u32>,
    exited: bool,
    /// Channels the guest already ended.
    eof: Vec<Channel>,
}

/// The host's handles on a newly opened stream.
pub(crate) struct Opened {
    pub id: u32,
    pub response: oneshot::Receiver<Result<Response, StreamError>>,
    pub inbound: mpsc::UnboundedReceiver<Inbound>,
    pub send_credit: Option<Arc<Semaphore>>,
}

/// What kind of stream to open.
pub(crate) struct SlotSpec {
    pub recv: &'static [Channel],
    pub send: Option<Channel>,
}

pub(crate) struct Demux {
    slots: HashMap<u32, Slot>,
    next_stream: u32,
    closed: Option<String>,
    /// Frames to the guest (credit, close) produced while handling frames.
    pub(crate) out: Vec<Vec<u8>>,
    warned: u32,
}

impl Demux {
    pub(crate) fn new() -> Self {
        Demux {
            slots: HashMap::new(),
            next_stream: 1,
            closed: None,
            out: Vec::new(),
            warned: 0,
        }
    }

    pub(crate) fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Registers a new stream.
    pub(crate) fn open(&mut self, spec: SlotSpec) -> Result<Opened, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::Closed);
        }
        let id = self.next_stream;
        self.next_stream = self.next_stream.checked_add(1).ok_or(StreamError::Closed)?;
        let (tx, rx) = oneshot::channel();
        let (itx, irx) = mpsc::unbounded_channel();
        let send_credit = spec
            .send
            .map(|c| (c, Arc::new(Semaphore::new(INITIAL_WINDOW as usize))));
        let opened = Opened {
            id,
            response: rx,
            inbound: irx,
            send_credit: send_credit.as_ref().map(|(_, s)| Arc::clone(s)),
        };
        self.slots.insert(
            id,
            Slot {
                response: Some(tx),
                inbound: Some(itx),
                recv_window: spec
                    .recv
                    .iter()
                    .map(|c| (*c, u64::from(INITIAL_WINDOW)))
                    .collect(),
                send_credit,
                pid: None,
                exited: false,
                eof: Vec::new(),
            },
        );
        Ok(opened)
    }

    /// Binds Exit events of stream `id` to process `pid`.
    pub(crate) fn set_pid(&mut self, id: u32, pid: u32) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.pid = Some(pid);
        }
    }

    /// Forgets a stream (the caller detached or finished); tells the guest.
    pub(crate) fn close(&mut self, id: u32) {
        if let Some(slot) = self.slots.remove(&id)
            && let Some((_, s)) = slot.send_credit
        {
            s.close();
        }
        if self.closed.is_none() {
            self.out.push(proto::encode_close(id));
        }
    }

    /// Forgets a stream without telling the guest (it already ended it).
    pub(crate) fn close_quietly(&mut self, id: u32) {
        if let Some(slot) = self.slots.remove(&id)
            && let Some((_, s)) = slot.send_credit
        {
            s.close();
        }
    }

    /// The consumer took `n` bytes of `ch`: grant that much credit again.
    pub(crate) fn consumed(&mut self, id: u32, ch: Channel, n: usize) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let Some(w) = slot.recv_window.iter_mut().find(|(c, _)| *c == ch) else {
            return;
        };
        w.1 += n as u64;
        if self.closed.is_none() {
            self.out.push(proto::encode_credit(id, ch, n as u32));
        }
    }

    /// The transport is gone: every pending operation fails.
    pub(crate) fn fail_all(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.closed = Some(reason.to_string());
        }
        for (_, slot) in self.slots.drain() {
            if let Some(r) = slot.response {
                let _ = r.send(Err(StreamError::Closed));
            }
            if let Some(i) = slot.inbound {
                let _ = i.send(Inbound::Failed(StreamError::Closed));
            }
            if let Some((_, s)) = slot.send_credit {
                s.close();
            }
        }
        self.out.clear();
    }

    fn violation(&mut self, id: u32, reason: String) {
        if self.warned < 20 {
            self.warned += 1;
            tracing::warn!(stream = id, %reason, "guest agent protocol violation");
        }
        if let Some(slot) = self.slots.remove(&id) {
            let err = StreamError::Protocol { stream: id, reason };
            if let Some(r) = slot.response {
                let _ = r.send(Err(err));
            } else if let Some(i) = slot.inbound {
                let _ = i.send(Inbound::Failed(err));
            }
            if let Some((_, s)) = slot.send_credit {
                s.close();
            }
            self.out.push(proto::encode_close(id));
        }
    }

    fn ignore(&mut self, what: std::fmt::Arguments<'_>) {
        if self.warned < 20 {
            self.warned += 1;
            tracing::debug!("ignored guest frame: {what}");
        }
    }

    /// Handles one frame from the guest.
    pub(crate) fn on_frame(&mut self, f: Frame) {
        let id = f.stream;
        if f.kind == Kind::HelloAck {
            return; // repeated acknowledgements of our handshake
        }
        if matches!(f.kind, Kind::Hello | Kind::Request) {
            return self.ignore(format_args!("{:?} is host-only", f.kind));
        }
        let Some(slot) = self.slots.get_mut(&id) else {
            // Late frames of a stream we closed are normal; nothing is kept.
            return self.ignore(format_args!("{:?} on unknown stream {id}", f.kind));
        };
        match f.kind {
            Kind::Response => {
                let Some(tx) = slot.response.take() else {
                    return self.violation(id, "a second response".into());
                };
                match f.json::<Response>("response") {
                    Ok(r) => {
                        if let Response::Started { pid } = r {
                            slot.pid = Some(pid);
                        }
                        let _ = tx.send(Ok(r));
                    }
                    Err(e) => {
                        slot.response = Some(tx);
                        self.violation(id, e.to_string());
                    }
                }
            }
            // Credit may precede the response (copy-in answers at the end).
            Kind::Credit => {
                let (ch, n) = match f.credit() {
                    Ok(c) => c,
                    Err(e) => return self.violation(id, e.to_string()),
                };
                match &slot.send_credit {
                    Some((c, sem)) if *c == ch => {
                        if sem.available_permits().saturating_add(n as usize) > MAX_SEND_CREDIT {
                            return self
                                .violation(id, format!("credit beyond {MAX_SEND_CREDIT} bytes"));
                        }
                        sem.add_permits(n as usize);
                    }
                    _ => self.violation(
                        id,
                        format!("credit for channel {ch:?}, which the host does not send"),
                    ),
                }
            }
            _ if slot.response.is_some() => {
                self.violation(id, format!("{:?} before the response", f.kind));
            }
            Kind::Data => {
                let (ch, bytes) = match f.data() {
                    Ok(d) => d,
                    Err(e) => return self.violation(id, e.to_string()),
                };
                let Some(w) = slot.recv_window.iter_mut().find(|(c, _)| *c == ch) else {
                    return self.violation(
                        id,
                        format!("data on channel {ch:?}, which this stream does not carry"),
                    );
                };
                let n = bytes.len() as u64;
                if n > w.1 {
                    let left = w.1;
                    return self.violation(
                        id,
                        format!("{n} bytes of {ch:?} with only {left} bytes of credit"),
                    );
                }
                w.1 -= n;
                if n > 0
                    && let Some(i) = &slot.inbound
                {
                    let _ = i.send(Inbound::Data(ch, Bytes::copy_from_slice(bytes)));
                }
            }
            Kind::Eof => match f.eof() {
                Ok(ch) if slot.recv_window.iter().any(|(c, _)| *c == ch) => {
                    // One Eof per channel: a flood of them must not grow
                    // the (unbounded, credit-bounded) inbound queue.
                    if slot.eof.contains(&ch) {
                        return self.violation(id, format!("a second EOF on channel {ch:?}"));
                    }
                    slot.eof.push(ch);
                    if let Some(i) = &slot.inbound {
                        let _ = i.send(Inbound::Eof);
                    }
                }
                Ok(ch) => self.violation(
                    id,
                    format!("EOF on channel {ch:?}, which this stream does not carry"),
                ),
                Err(e) => self.violation(id, e.to_string()),
            },
            Kind::Event => match f.json::<Event>("event") {
                Ok(Event::Exit { pid, status }) => {
                    if slot.pid != Some(pid) || slot.exited {
                        return self.violation(id, format!("unexpected exit event for pid {pid}"));
                    }
                    slot.exited = true;
                    if let Some(i) = &slot.inbound {
                        let _ = i.send(Inbound::Exit(status));
                    }
                }
                Err(e) => self.violation(id, e.to_string()),
            },
            Kind::Close => {
                if let Some(slot) = self.slots.remove(&id) {
                    if let Some(i) = slot.inbound {
                        let _ = i.send(Inbound::Closed);
                    }
                    if let Some((_, s)) = slot.send_credit {
                        s.close();
                    }
                }
            }
            Kind::Hello | Kind::HelloAck | Kind::Request => {}
        }
    }
}

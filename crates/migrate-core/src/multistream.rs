//! Several connections as one transport: page batches spread over the
//! data connections, every other record on a control connection of its
//! own, and frames handed over in the order they were numbered.
//!
//! # The ordering rule
//!
//! Every frame of a direction carries its sequence number (the engines'
//! [`Sequencer`](crate::protocol::Sequencer) stamps them as they leave).
//! [`MultiTransport::recv`] hands frames over strictly in that order,
//! whichever connection carried them: a frame that arrives early waits
//! until every frame numbered before it has been handed over. So a page
//! sent again in a later round (a higher number) is never overtaken by its
//! older copy on another connection, and a round marker, the switch-over
//! or the completion record is never handed over before a batch sent
//! before it. Aborts, which may come with any number, are handed over at
//! once. Without the rule, an older copy of a page that travels on a
//! slower connection would land after the newer one and the destination
//! would end with stale memory
//! (`tests::without_the_rule_an_older_copy_overtakes`). A frame that
//! arrives early costs memory until the frames before it arrive: at most
//! [`MAX_REORDER_BYTES`], beyond which the stream is refused.
//!
//! # Setting up
//!
//! [`MultiTransport::connect`] opens `1 + data` connections, each
//! beginning with a 16-byte hello: magic `LVMIGCON`, hello version,
//! capability bits (bit 0: frames spread over several connections), the
//! connection's index (0 is control) and the connections in all. The
//! accepting side ([`MultiTransport::accept`]) reads each hello, answers on
//! the control connection with its own capability bits, and refuses
//! a connection without a hello or a set it does not take
//! ([`TransportError::Handshake`]). A peer that expects a single stream
//! reads the hello's magic as a frame length above the limit and refuses
//! it as such, so neither side misreads the other.
//!
//! # The preempt connection
//!
//! [`MultiTransport::connect_preempt`] adds one more connection, the
//! last, for post-copy's requested pages ([`RecordType::RequestedPages`],
//! which the source engine sends with
//! [`EngineConfig::postcopy_preempt`](crate::EngineConfig::postcopy_preempt)).
//! Its hellos carry capability bit 1; an acceptor that takes it answers
//! with the bit, and one that does not (or an older one, which would take
//! the connection for a data connection) answers without it and the
//! connecting side refuses the set ([`TransportError::Handshake`]).
//!
//! With it, frames of requested pages are handed over as soon as they
//! arrive, before any frame waiting for its turn: they are numbered apart
//! from the stream (the engines check that numbering on its own), so the
//! ordering rule above does not hold them. Page batches are written by a
//! thread of their own from a short queue, so that
//! [`Transport::try_send`] can tell the source that the push is held up
//! and the source can serve requests meanwhile; every other frame is
//! written by the caller. Why an older copy of a page can never overwrite
//! a newer one under this rule is in `docs/protocol.md` (*The preempt
//! connection*).
//!
//! Each side may also use the preempt connection from threads of its own
//! ([`Transport::preempt_link`]: every write, the caller's included, is
//! one whole frame at a time), and may have the frames that arrive on it
//! served on its reader thread instead of handed to `recv`
//! ([`Transport::serve_preempt`]): the destination's page requests leave
//! from its requester thread, and the source answers them on that
//! reader thread (`docs/protocol.md`, *The preempt connection*).
//!
//! The preempt connection ending while the control connection stays open
//! for [`PREEMPT_END_GRACE`] is a cut: `recv` fails with
//! [`TransportError::Closed`], as it does when every connection ended.

use crate::protocol::{frame_sequence, RecordType};
use crate::transport::{
    may_send, send_error, spawn_reader, write_frame, PreemptLink, PreemptServe, SplitStream,
    Transport, TransportError,
};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most bytes of early frames a receiver holds while it waits for a
/// frame numbered before them.
pub const MAX_REORDER_BYTES: usize = 256 << 20;
/// The most data connections.
pub const MAX_DATA_CONNECTIONS: usize = 64;
/// Capability bit: frames spread over several connections.
const CAP_SPREAD: u32 = 1;
/// Capability bit: the last connection is a post-copy preempt connection.
const CAP_PREEMPT: u32 = 2;
/// How long the control connection may stay open after the preempt
/// connection ended before that counts as a cut (a peer that is done
/// closes every connection at once).
pub const PREEMPT_END_GRACE: Duration = Duration::from_millis(100);
/// Page batches queued for the writer thread (preempt connection only).
const PUSH_QUEUE: usize = 4;
const HELLO_MAGIC: [u8; 8] = *b"LVMIGCON";
const HELLO_VERSION: u8 = 1;
/// Frames each connection's reader may hold before it stops reading.
const READ_AHEAD: usize = 4;

/// How long a preempt reader whose queue for `recv` is full waits before
/// it tries again.
const FULL_QUEUE_RETRY: Duration = Duration::from_micros(200);

/// One control and several data connections as one [`Transport`].
///
/// `send` puts page batches (plain or compressed) on the data connections
/// in turn and every other record on the control connection; `recv`
/// hands frames over in the order of their sequence numbers (see the
/// module's ordering rule). Failures behave as on a [`StreamTransport`]:
/// a send that fails part-way shuts every connection down, and dropping
/// the transport returns promptly.
///
/// [`StreamTransport`]: crate::transport::StreamTransport
pub struct MultiTransport<S: SplitStream> {
    /// Control first, then the data connections, then the preempt one.
    writers: Vec<S>,
    rx: Receiver<Inbound>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The preempt connection's frames, handed over first.
    preempt_rx: Option<Receiver<Result<Bytes, TransportError>>>,
    /// With a preempt connection: the thread that writes page batches.
    pusher: Option<Pusher>,
    /// With a preempt connection: its sending side, shared by `send` and
    /// the threads that hold a [`PreemptLink`].
    preempt_link: Option<PreemptLink>,
    /// What serves the preempt connection's frames on its reader thread,
    /// once installed ([`Transport::serve_preempt`]).
    server: Arc<Mutex<Option<PreemptServe>>>,
    /// When the preempt connection ended, if it did.
    preempt_ended: Option<Instant>,
    /// Whether the control connection ended.
    control_ended: bool,
    /// A frame of the preempt connection taken off its queue early
    /// (tests), handed over first.
    #[cfg(test)]
    stash: Option<Bytes>,
    next_data: usize,
    send_timeout: Option<Duration>,
    broken: bool,
    /// Frames that came before their turn, by sequence number.
    early: BTreeMap<u32, Bytes>,
    early_bytes: usize,
    /// The number of the next frame to hand over.
    next_seq: u32,
    /// Connections whose peer has closed them.
    closed: usize,
}

/// What the readers hand to `recv`: a frame (or the end) of a
/// connection, by index, or a nudge that the preempt connection has one.
enum Inbound {
    Frame(usize, Result<Bytes, TransportError>),
    Preempt,
}

/// The writer thread of the data connections, and how it failed.
struct Pusher {
    tx: Option<SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<io::Error>>>,
}

impl Pusher {
    /// Writes the queued batches on `data` in turn; on a failure it keeps
    /// the error, shuts every connection of `all` (the peer sees a cut)
    /// and stops.
    fn start<S: SplitStream>(mut data: Vec<S>, all: Vec<S>) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(PUSH_QUEUE);
        let failed = Arc::new(Mutex::new(None));
        let failure = failed.clone();
        let thread = std::thread::Builder::new()
            .name("livemig-push".into())
            .spawn(move || {
                let mut next = 0;
                while let Ok(frame) = rx.recv() {
                    let i = next;
                    next = (next + 1) % data.len();
                    if let Err(e) = write_frame(&mut data[i], &frame) {
                        if let Ok(mut f) = failure.lock() {
                            *f = Some(e);
                        }
                        for s in &all {
                            s.shutdown_both();
                        }
                        break;
                    }
                }
            })?;
        Ok(Pusher {
            tx: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    /// The writer's failure, once it failed.
    fn error(&self, timeout: Option<Duration>) -> TransportError {
        match self.failed.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => send_error(e, timeout),
            None => TransportError::Closed,
        }
    }

    fn stop(&mut self) {
        self.tx = None;
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl<S: SplitStream> std::fmt::Debug for MultiTransport<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiTransport")
            .field("connections", &self.writers.len())
            .finish_non_exhaustive()
    }
}

fn hello(caps: u32, index: u8, count: u8) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&HELLO_MAGIC);
    h[8] = HELLO_VERSION;
    h[9..13].copy_from_slice(&caps.to_le_bytes());
    h[13] = index;
    h[14] = count;
    h
}

fn handshake_error(why: impl Into<String>) -> TransportError {
    TransportError::Handshake(why.into())
}

/// Reads a hello (or the answer, which has the same shape): its
/// capability bits, index and count.
fn read_hello<S: Read>(s: &mut S) -> Result<(u32, u8, u8), TransportError> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TransportError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            handshake_error("no hello from the peer in time")
        }
        _ => TransportError::Io(e),
    })?;
    if h[..8] != HELLO_MAGIC {
        return Err(handshake_error(
            "the peer did not open with a multi-connection hello (it may expect a single stream)",
        ));
    }
    if h[8] != HELLO_VERSION {
        return Err(handshake_error(format!(
            "hello version {} (this side speaks {HELLO_VERSION})",
            h[8]
        )));
    }
    let caps = u32::from_le_bytes([h[9], h[10], h[11], h[12]]);
    Ok((caps, h[13], h[14]))
}

impl<S: SplitStream> MultiTransport<S> {
    /// Opens a control and `data` data connections with `connect` (called
    /// `1 + data` times, in order), says hello on each and waits for the
    /// peer's answer on the control connection.
    pub fn connect(
        data: usize,
        connect: impl FnMut() -> io::Result<S>,
    ) -> Result<Self, TransportError> {
        Self::open(data, false, connect)
    }

    /// [`MultiTransport::connect`] with a post-copy preempt connection
    /// besides (called `2 + data` times): refused unless the peer takes it.
    pub fn connect_preempt(
        data: usize,
        connect: impl FnMut() -> io::Result<S>,
    ) -> Result<Self, TransportError> {
        Self::open(data, true, connect)
    }

    fn open(
        data: usize,
        preempt: bool,
        mut connect: impl FnMut() -> io::Result<S>,
    ) -> Result<Self, TransportError> {
        if data == 0 || data > MAX_DATA_CONNECTIONS {
            return Err(handshake_error(format!(
                "{data} data connections (1 to {MAX_DATA_CONNECTIONS})"
            )));
        }
        let offered = CAP_SPREAD | if preempt { CAP_PREEMPT } else { 0 };
        let count = (data + 1 + usize::from(preempt)) as u8;
        let mut streams = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            let mut s = connect()?;
            s.write_all(&hello(offered, i, count))?;
            streams.push(s);
        }
        let (caps, _, answered) = read_hello(&mut streams[0])?;
        if caps & offered != offered || answered != count {
            return Err(handshake_error(format!(
                "the peer took {answered} of {count} connections with capabilities {caps:#x} of {offered:#x}{}",
                if preempt && caps & CAP_PREEMPT == 0 {
                    " (it takes no preempt connection)"
                } else {
                    ""
                }
            )));
        }
        Self::from_streams(streams, preempt).map_err(TransportError::Io)
    }

    /// Accepts the connections of one [`MultiTransport::connect`] with
    /// `accept` (called until the hellos' count is reached), in any order,
    /// and answers on the control connection.
    ///
    /// A set with a preempt connection is taken (see
    /// [`MultiTransport::accept_with`]).
    pub fn accept(accept: impl FnMut() -> io::Result<S>) -> Result<Self, TransportError> {
        Self::accept_with(true, accept)
    }

    /// [`MultiTransport::accept`], taking a preempt connection only if
    /// `preempt`: a set that has one is otherwise answered without the
    /// capability (its connecting side refuses it) and refused here.
    pub fn accept_with(
        preempt: bool,
        mut accept: impl FnMut() -> io::Result<S>,
    ) -> Result<Self, TransportError> {
        let mut slots: Vec<Option<S>> = Vec::new();
        let mut count = None;
        let mut set_caps = None;
        let mut taken = 0;
        while count != Some(taken) {
            let mut s = accept()?;
            let (caps, index, n) = read_hello(&mut s)?;
            let n = usize::from(n);
            let least = 2 + usize::from(caps & CAP_PREEMPT != 0);
            if caps & CAP_SPREAD == 0 || !(least..=MAX_DATA_CONNECTIONS + least - 1).contains(&n) {
                return Err(handshake_error(format!(
                    "a hello for {n} connections with capabilities {caps:#x}"
                )));
            }
            if *count.get_or_insert(n) != n || *set_caps.get_or_insert(caps) != caps {
                return Err(handshake_error(
                    "hellos disagree on the connection count or capabilities",
                ));
            }
            slots.resize_with(n, || None);
            let slot = &mut slots[usize::from(index).min(n - 1)];
            if usize::from(index) >= n || slot.is_some() {
                return Err(handshake_error(format!(
                    "connection index {index} twice or out of range"
                )));
            }
            *slot = Some(s);
            taken += 1;
        }
        let mut streams: Vec<S> = slots.into_iter().flatten().collect();
        let count = streams.len() as u8;
        let offered = set_caps.unwrap_or(CAP_SPREAD) & CAP_PREEMPT != 0;
        let answer = CAP_SPREAD | if preempt { CAP_PREEMPT } else { 0 };
        streams[0].write_all(&hello(answer, 0, count))?;
        if offered && !preempt {
            return Err(handshake_error(
                "the peer offered a preempt connection this side does not take",
            ));
        }
        Self::from_streams(streams, offered).map_err(TransportError::Io)
    }

    /// Connections already set up: control first, then the data ones,
    /// then, with `preempt`, the preempt one.
    fn from_streams(streams: Vec<S>, preempt: bool) -> io::Result<Self> {
        // One queue for every reader: `recv` waits on all at once. The
        // preempt connection's reader has its own, and nudges `recv`
        // through the common one when it can.
        let (tx, rx) = mpsc::sync_channel(READ_AHEAD * streams.len());
        let last = streams.len() - 1;
        let mut readers = Vec::with_capacity(streams.len());
        let mut preempt_rx = None;
        let server: Arc<Mutex<Option<PreemptServe>>> = Arc::new(Mutex::new(None));
        let preempt_link = if preempt {
            let all = streams
                .iter()
                .map(|s| s.try_clone_stream())
                .collect::<io::Result<Vec<S>>>()?;
            let writer = Mutex::new((streams[last].try_clone_stream()?, all));
            Some(PreemptLink::new(move |frame: &[u8]| {
                let mut w = writer.lock().map_err(|_| TransportError::Closed)?;
                let (w, all) = &mut *w;
                write_frame(w, frame).map_err(|e| {
                    // Part of a frame may be on the connection: show the
                    // peer a cut on all.
                    for s in all.iter() {
                        s.shutdown_both();
                    }
                    send_error(e, None)
                })
            }))
        } else {
            None
        };
        for (i, s) in streams.iter().enumerate() {
            let tx = tx.clone();
            if preempt && i == last {
                let (ptx, prx) = mpsc::sync_channel(READ_AHEAD * 4);
                preempt_rx = Some(prx);
                let server = server.clone();
                let link = preempt_link.clone();
                readers.push(spawn_reader(s, move |r| {
                    let (mut frame, link) = match (r, link.as_ref()) {
                        (Ok(frame), Some(link)) => (frame, link),
                        (r, _) => {
                            let ok = ptx.send(r).is_ok();
                            let _ = tx.try_send(Inbound::Preempt);
                            return ok;
                        }
                    };
                    // A frame is served, or queued for `recv`, under the
                    // server's lock, so that `serve_preempt` (which drains
                    // the queue and installs the server under it) never
                    // sees a later frame served ahead of one still queued.
                    // A full queue is retried outside the lock, so that
                    // `recv` and `serve_preempt` can empty it meanwhile.
                    loop {
                        let Ok(mut slot) = server.lock() else {
                            return false;
                        };
                        if let Some(serve) = slot.as_mut() {
                            serve(frame, link);
                            return true;
                        }
                        match ptx.try_send(Ok(frame)) {
                            Ok(()) => {
                                drop(slot);
                                let _ = tx.try_send(Inbound::Preempt);
                                return true;
                            }
                            Err(TrySendError::Full(Ok(back))) => {
                                drop(slot);
                                frame = back;
                                let _ = tx.try_send(Inbound::Preempt);
                                std::thread::sleep(FULL_QUEUE_RETRY);
                            }
                            Err(_) => return false,
                        }
                    }
                })?);
            } else {
                readers.push(spawn_reader(s, move |r| {
                    tx.send(Inbound::Frame(i, r)).is_ok()
                })?);
            }
        }
        let pusher = if preempt {
            let data = streams[1..last]
                .iter()
                .map(|s| s.try_clone_stream())
                .collect::<io::Result<Vec<S>>>()?;
            let all = streams
                .iter()
                .map(|s| s.try_clone_stream())
                .collect::<io::Result<Vec<S>>>()?;
            Some(Pusher::start(data, all)?)
        } else {
            None
        };
        Ok(MultiTransport {
            writers: streams,
            rx,
            readers,
            preempt_rx,
            pusher,
            preempt_link,
            server,
            preempt_ended: None,
            control_ended: false,
            #[cfg(test)]
            stash: None,
            next_data: 0,
            send_timeout: None,
            broken: false,
            early: BTreeMap::new(),
            early_bytes: 0,
            next_seq: 0,
            closed: 0,
        })
    }

    /// Connections in all (control and preempt included).
    pub fn connections(&self) -> usize {
        self.writers.len()
    }

    /// Whether the last connection is a post-copy preempt connection.
    pub fn has_preempt(&self) -> bool {
        self.pusher.is_some()
    }

    /// Waits until a frame of the preempt connection has arrived (and
    /// keeps it for `recv`).
    #[cfg(test)]
    fn wait_for_preempt(&mut self) {
        if let Some(Ok(Ok(f))) = self.preempt_rx.as_ref().map(|p| p.recv()) {
            self.stash = Some(f);
        }
    }

    /// Where a frame goes: page batches on the data connections (`None`:
    /// through the writer thread), requested pages on the preempt
    /// connection, the rest on the control connection.
    fn route(&mut self, frame: &[u8]) -> Option<usize> {
        let ty = frame.first().copied();
        let batch = matches!(
            ty,
            Some(t) if t == RecordType::PageBatch as u8 || t == RecordType::CompressedBatch as u8
        );
        let data = self.writers.len() - 1 - usize::from(self.has_preempt());
        if batch && self.has_preempt() {
            None
        } else if batch && data > 0 {
            self.next_data = (self.next_data + 1) % data;
            Some(1 + self.next_data)
        } else if is_preempt_frame(ty) && self.has_preempt() {
            Some(self.writers.len() - 1)
        } else {
            Some(0)
        }
    }

    /// Writes `frame` on connection `i`.
    fn write_on(&mut self, i: usize, frame: &[u8]) -> Result<(), TransportError> {
        let timeout = self.send_timeout;
        if let Some(link) = self
            .preempt_link
            .as_ref()
            .filter(|_| i == self.writers.len() - 1)
        {
            // Shared with the threads that hold the link: one frame at a
            // time.
            return link.send(frame).map_err(|e| {
                self.shut();
                match e {
                    TransportError::Io(e) => send_error(e, timeout),
                    e => e,
                }
            });
        }
        write_frame(&mut self.writers[i], frame).map_err(|e| {
            // Part of a frame may be on one connection: none can carry
            // another, so the peer is shown a cut on all.
            self.shut();
            send_error(e, timeout)
        })
    }

    /// The writer thread's failure, the transport shut.
    fn push_failed(&mut self) -> TransportError {
        self.shut();
        let timeout = self.send_timeout;
        self.pusher
            .as_ref()
            .map_or(TransportError::Closed, |p| p.error(timeout))
    }

    /// What to do with a frame that came in: hand it over now, or keep it
    /// for its turn.
    fn take_in(&mut self, frame: Bytes) -> Result<Option<Bytes>, TransportError> {
        let is_abort = frame.first() == Some(&(RecordType::Abort as u8));
        let Some(seq) = frame_sequence(&frame).filter(|_| !is_abort) else {
            // Too short to have a number (the decoder will say so), or
            // an abort: at once.
            return Ok(Some(frame));
        };
        let ahead = seq.wrapping_sub(self.next_seq);
        if ahead == 0 {
            self.next_seq = self.next_seq.wrapping_add(1);
            return Ok(Some(frame));
        }
        if ahead > u32::MAX / 2 || self.early.contains_key(&seq) {
            // Behind, or twice: the decoder refuses it.
            return Ok(Some(frame));
        }
        self.early_bytes += frame.len();
        if self.early_bytes > MAX_REORDER_BYTES {
            return Err(TransportError::Handshake(format!(
                "more than {MAX_REORDER_BYTES} bytes arrived ahead of frame {}",
                self.next_seq
            )));
        }
        self.early.insert(seq, frame);
        Ok(None)
    }

    fn shut(&mut self) {
        self.broken = true;
        for w in &self.writers {
            w.shutdown_both();
        }
    }
}

/// Whether a frame of type `ty` travels on the preempt connection.
fn is_preempt_frame(ty: Option<u8>) -> bool {
    ty == Some(RecordType::RequestedPages as u8) || ty == Some(RecordType::PreemptRequest as u8)
}

impl<S: SplitStream> Transport for MultiTransport<S> {
    fn preempt_link(&self) -> Option<PreemptLink> {
        if self.broken {
            return None;
        }
        self.preempt_link.clone()
    }

    fn serve_preempt(&mut self, mut serve: PreemptServe) -> bool {
        let (Some(link), Some(prx)) = (self.preempt_link.as_ref(), self.preempt_rx.as_ref()) else {
            return false;
        };
        let Ok(mut slot) = self.server.lock() else {
            return false;
        };
        // What arrived before goes first, in its order; the reader waits
        // for the lock meanwhile.
        #[cfg(test)]
        if let Some(f) = self.stash.take() {
            serve(f, link);
        }
        loop {
            match prx.try_recv() {
                Ok(Ok(f)) => serve(f, link),
                Ok(Err(TransportError::Closed)) | Err(TryRecvError::Disconnected) => {
                    self.preempt_ended.get_or_insert_with(Instant::now);
                    break;
                }
                Ok(Err(_)) => {
                    self.preempt_ended.get_or_insert_with(Instant::now);
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        *slot = Some(serve);
        true
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        may_send(self.broken, frame)?;
        match self.route(frame) {
            Some(i) => self.write_on(i, frame),
            None => {
                let queued = self
                    .pusher
                    .as_ref()
                    .and_then(|p| p.tx.as_ref())
                    .is_some_and(|tx| tx.send(frame.to_vec()).is_ok());
                if queued {
                    Ok(())
                } else {
                    Err(self.push_failed())
                }
            }
        }
    }

    fn try_send(&mut self, frame: Vec<u8>) -> Result<Option<Vec<u8>>, TransportError> {
        may_send(self.broken, &frame)?;
        let Some(i) = self.route(&frame) else {
            let r = match self.pusher.as_ref().and_then(|p| p.tx.as_ref()) {
                Some(tx) => tx.try_send(frame),
                None => return Err(TransportError::Closed),
            };
            return match r {
                Ok(()) => Ok(None),
                Err(TrySendError::Full(back)) => Ok(Some(back)),
                Err(TrySendError::Disconnected(_)) => Err(self.push_failed()),
            };
        };
        self.write_on(i, &frame).map(|()| None)
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        #[cfg(test)]
        if let Some(f) = self.stash.take() {
            return Ok(Some(f));
        }
        loop {
            if let Some(prx) = &self.preempt_rx {
                match prx.try_recv() {
                    Ok(Ok(f)) => return Ok(Some(f)),
                    Ok(Err(TransportError::Closed)) | Err(TryRecvError::Disconnected) => {
                        self.preempt_ended.get_or_insert_with(Instant::now);
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(TryRecvError::Empty) => {}
                }
            }
            if let Some(at) = self.preempt_ended {
                if !self.control_ended && at.elapsed() >= PREEMPT_END_GRACE {
                    return Err(TransportError::Closed);
                }
            }
            if let Some(f) = self.early.remove(&self.next_seq) {
                self.early_bytes -= f.len();
                self.next_seq = self.next_seq.wrapping_add(1);
                return Ok(Some(f));
            }
            let mut left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Some(at) = self.preempt_ended.filter(|_| !self.control_ended) {
                // Wake when the grace is over.
                let grace = PREEMPT_END_GRACE.saturating_sub(at.elapsed());
                left = Some(left.map_or(grace, |l| l.min(grace)));
            }
            let item = match left {
                None => self.rx.recv().ok(),
                Some(t) if t.is_zero() => match self.rx.try_recv() {
                    Ok(x) => Some(x),
                    Err(TryRecvError::Empty) => return Ok(None),
                    Err(TryRecvError::Disconnected) => None,
                },
                Some(t) => match self.rx.recv_timeout(t) {
                    Ok(x) => Some(x),
                    Err(RecvTimeoutError::Timeout) => {
                        if deadline.is_none_or(|d| Instant::now() < d) {
                            // The preempt grace ran out first.
                            continue;
                        }
                        return Ok(None);
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            match item {
                // Every reader has stopped.
                None => return Err(TransportError::Closed),
                // Look at the preempt connection again.
                Some(Inbound::Preempt) => {}
                Some(Inbound::Frame(_, Ok(frame))) => {
                    if let Some(f) = self.take_in(frame)? {
                        return Ok(Some(f));
                    }
                }
                // One connection ended: the others may still carry
                // frames numbered before its end (the peer closes them
                // all when it is done). The stream has ended when all
                // have.
                Some(Inbound::Frame(i, Err(TransportError::Closed))) => {
                    self.control_ended |= i == 0;
                    self.closed += 1;
                    let preempt = usize::from(self.preempt_rx.is_some());
                    if self.closed + preempt == self.writers.len()
                        && (preempt == 0 || self.preempt_ended.is_some())
                    {
                        return Err(TransportError::Closed);
                    }
                }
                Some(Inbound::Frame(_, Err(e))) => return Err(e),
            }
        }
    }

    fn close(&mut self) {
        self.shut();
    }

    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        let timeout = timeout.filter(|t| !t.is_zero());
        if self
            .writers
            .iter()
            .all(|w| w.set_write_limit(timeout).is_ok())
        {
            self.send_timeout = timeout;
        }
    }
}

impl<S: SplitStream> Drop for MultiTransport<S> {
    fn drop(&mut self) {
        // As a stream transport: the queues first, so that a reader
        // blocked on one wakes, then the connections, then the readers.
        let (_, empty) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, empty));
        self.preempt_rx = None;
        for w in &self.writers {
            w.shutdown_both();
        }
        if let Some(p) = self.pusher.as_mut() {
            p.stop();
        }
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_page_batch, Record, Sequencer};
    use crate::transport::StreamTransport;
    use crate::PageSize;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Socket pairs for a transport of `data` data connections, the
    /// accepting ends handed out in `order`.
    fn pairs(data: usize) -> (Vec<UnixStream>, Vec<UnixStream>) {
        (0..=data).map(|_| UnixStream::pair().unwrap()).unzip()
    }

    /// A page-batch frame of one page of `page` holding `byte`, numbered
    /// by `seq`.
    fn page_frame(seq: &mut Sequencer, page: u64, byte: u8) -> Vec<u8> {
        let mut f = Vec::new();
        encode_page_batch(1, PageSize::DEFAULT, &[page], &[byte; 4096], &mut f);
        seq.seal(&mut f);
        f
    }

    /// The data of the one page of a frame made by `page_frame`: its
    /// last page's worth of bytes.
    fn page_data(frame: &[u8]) -> &[u8] {
        &frame[frame.len() - 4096..]
    }

    /// Frames spread over four data connections arrive in the order
    /// they were numbered, the connections are set up whatever the order
    /// they are accepted in, and the end of the stream comes after its
    /// last frame.
    #[test]
    fn frames_arrive_in_their_order_over_several_connections() {
        let (a, b) = pairs(4);
        let mut b = b.into_iter().rev();
        let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
        let mut a = a.into_iter();
        let mut tx = MultiTransport::connect(4, || Ok(a.next().unwrap())).unwrap();
        let mut rx = acceptor.join().unwrap().unwrap();
        assert_eq!(rx.connections(), 5);
        let mut seq = Sequencer::new();
        let frames: Vec<Vec<u8>> = (0..200)
            .map(|i| page_frame(&mut seq, i % 7, i as u8))
            .collect();
        // The sender closes every connection as soon as it has sent: the
        // frames still on their way arrive all the same, then the close.
        let sender = std::thread::spawn(move || {
            for f in &frames {
                tx.send(f).unwrap();
            }
            drop(tx);
            frames
        });
        let mut got = Vec::new();
        for _ in 0..200 {
            got.push(rx.recv(Some(Duration::from_secs(120))).unwrap().unwrap());
        }
        let frames = sender.join().unwrap();
        for (i, (g, f)) in got.iter().zip(&frames).enumerate() {
            assert!(g[..] == f[..], "frame {i} out of order");
        }
        assert!(matches!(
            rx.recv(Some(Duration::from_secs(120))),
            Err(TransportError::Closed)
        ));
    }

    /// A connection whose bytes arrive `delay` late: a socket pair whose
    /// far end is fed by a relay that waits before it forwards each read.
    fn slow_pair(delay: Duration) -> (UnixStream, UnixStream) {
        let (near, mut relay_in) = UnixStream::pair().unwrap();
        let (mut relay_out, far) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = relay_in.read(&mut buf) {
                if n == 0 {
                    break;
                }
                std::thread::sleep(delay);
                if relay_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        (near, far)
    }

    /// The rule is needed: the older copy of a page, sent first on a
    /// slow connection, arrives after its newer copy sent on a fast one,
    /// so a receiver that took frames as they came would end with the
    /// stale copy; the transport hands the copies over in the order they
    /// were sent.
    #[test]
    fn without_the_rule_an_older_copy_overtakes() {
        let mut seq = Sequencer::new();
        let old = page_frame(&mut seq, 9, 1);
        let new = page_frame(&mut seq, 9, 2);
        let delay = Duration::from_millis(300);

        // Taken as they come, from either connection.
        let (mut slow_a, slow_b) = slow_pair(delay);
        let (mut fast_a, fast_b) = UnixStream::pair().unwrap();
        write_frame(&mut slow_a, &old).unwrap();
        write_frame(&mut fast_a, &new).unwrap();
        let (tx, arrivals) = mpsc::channel();
        let mut readers = Vec::new();
        for s in [&slow_b, &fast_b] {
            let tx = tx.clone();
            readers.push(spawn_reader(s, move |r| tx.send(r).is_ok()).unwrap());
        }
        let first = arrivals.recv().unwrap().unwrap();
        let second = arrivals.recv().unwrap().unwrap();
        assert!(
            first[..] == new[..] && second[..] == old[..],
            "the older copy came second"
        );
        // Placed as they came: the last one placed stays.
        let mut place = [0u8; 4096];
        for f in [&first, &second] {
            place.copy_from_slice(page_data(f));
        }
        assert_eq!(
            place[0], 1,
            "taken as they came, the page ends with its old copy"
        );
        for s in [&slow_a, &fast_a, &slow_b, &fast_b] {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for h in readers {
            let _ = h.join();
        }

        // The same through the transport: the second data connection
        // (which carries the first batch) is the slow one.
        let (ctrl_a, ctrl_b) = UnixStream::pair().unwrap();
        let (d1_a, d1_b) = UnixStream::pair().unwrap();
        let (d2_a, d2_b) = slow_pair(delay);
        let mut b = vec![ctrl_b, d1_b, d2_b].into_iter();
        let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
        let mut a = vec![ctrl_a, d1_a, d2_a].into_iter();
        let mut tx = MultiTransport::connect(2, || Ok(a.next().unwrap())).unwrap();
        let mut rx = acceptor.join().unwrap().unwrap();
        tx.send(&old).unwrap();
        tx.send(&new).unwrap();
        for want in [1u8, 2] {
            let f = rx.recv(Some(Duration::from_secs(120))).unwrap().unwrap();
            place.copy_from_slice(page_data(&f));
            assert_eq!(place[0], want, "the copies in the order they were sent");
        }
        assert_eq!(rx.early_bytes, 0);
    }

    /// A single-stream peer is told, not misread: it reads the hello as a
    /// frame length above the limit; and an acceptor given a plain stream
    /// refuses it.
    #[test]
    fn a_single_stream_peer_and_a_multi_connection_peer_refuse_each_other() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut plain = StreamTransport::new(b).unwrap();
        a.write_all(&hello(CAP_SPREAD, 0, 3)).unwrap();
        assert!(matches!(
            plain.recv(Some(Duration::from_secs(120))),
            Err(TransportError::FrameTooLarge { .. })
        ));

        let (mut a, b) = UnixStream::pair().unwrap();
        write_frame(&mut a, &crate::protocol::encode_to_vec(&Record::Ready)).unwrap();
        let mut b = Some(b);
        let r = MultiTransport::accept(|| b.take().ok_or(io::ErrorKind::NotConnected.into()));
        assert!(matches!(r, Err(TransportError::Handshake(_))), "{r:?}");
    }

    /// A requested-pages frame of one page, numbered by `seq` (its own
    /// numbering).
    fn requested_frame(seq: &mut Sequencer, page: u64, byte: u8) -> Vec<u8> {
        let mut f = Vec::new();
        encode_page_batch(1, PageSize::DEFAULT, &[page], &[byte; 4096], &mut f);
        f[0] = RecordType::RequestedPages as u8;
        crate::protocol::reseal(&mut f);
        seq.seal(&mut f);
        f
    }

    /// A connected pair with `data` data connections and a preempt one,
    /// over socket pairs; also the raw far end of each connection of the
    /// accepting side, for a test that wants to read it itself.
    fn preempt_pair(data: usize) -> (MultiTransport<UnixStream>, MultiTransport<UnixStream>) {
        let (a, b) = (0..data + 2)
            .map(|_| UnixStream::pair().unwrap())
            .unzip::<_, _, Vec<_>, Vec<_>>();
        let mut b = b.into_iter();
        let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
        let mut a = a.into_iter();
        let tx = MultiTransport::connect_preempt(data, || Ok(a.next().unwrap())).unwrap();
        let rx = acceptor.join().unwrap().unwrap();
        (tx, rx)
    }

    /// Requested pages go on the last connection, and the receiver hands
    /// them over ahead of page batches sent before them and still
    /// waiting to be taken.
    #[test]
    fn requested_pages_go_on_their_own_connection_and_overtake_the_push() {
        // On the wire: read the accepting side's connections directly.
        let (a, b) = pairs(2);
        let mut b = b;
        let mut a = a.into_iter();
        let answer = {
            let mut ctrl = b[0].try_clone().unwrap();
            std::thread::spawn(move || {
                let (caps, _, n) = read_hello(&mut ctrl).unwrap();
                assert_eq!(caps, CAP_SPREAD | CAP_PREEMPT);
                ctrl.write_all(&hello(caps, 0, n)).unwrap();
            })
        };
        let mut tx = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap())).unwrap();
        answer.join().unwrap();
        for s in &mut b[1..] {
            let (caps, _, _) = read_hello(s).unwrap();
            assert_eq!(caps, CAP_SPREAD | CAP_PREEMPT);
        }
        assert!(tx.has_preempt());
        let mut own = Sequencer::new();
        let f = requested_frame(&mut own, 5, 7);
        tx.send(&f).unwrap();
        let mut len = [0u8; 4];
        b[2].read_exact(&mut len).unwrap();
        let mut got = vec![0u8; u32::from_le_bytes(len) as usize];
        b[2].read_exact(&mut got).unwrap();
        assert!(
            got == f,
            "the requested pages came on the preempt connection"
        );
        drop(tx);

        // Through the transport: the receiver has not taken the first
        // 16 batches (they wait in its queues and sockets); the requested
        // pages sent after them, once they are here, come first.
        let (mut tx, mut rx) = preempt_pair(1);
        assert!(rx.has_preempt() && rx.connections() == 3);
        let mut seq = Sequencer::new();
        for i in 0..16 {
            tx.send(&page_frame(&mut seq, i, 1)).unwrap();
        }
        let req = requested_frame(&mut own, 9, 2);
        tx.send(&req).unwrap();
        rx.wait_for_preempt();
        let got = rx.recv(Some(Duration::from_secs(120))).unwrap().unwrap();
        assert_eq!(
            got[0],
            RecordType::RequestedPages as u8,
            "ahead of the push"
        );
        assert!(got[..] == req[..]);
        for i in 0..16u8 {
            let f = rx.recv(Some(Duration::from_secs(120))).unwrap().unwrap();
            assert_eq!(f[0], RecordType::PageBatch as u8, "batch {i} in its order");
            assert_eq!(frame_sequence(&f), Some(u32::from(i)));
        }
    }

    /// With the push held up (the peer takes nothing from the data
    /// connection), `try_send` hands a batch back instead of waiting, and
    /// requested pages still reach the peer.
    #[test]
    fn a_held_up_push_is_handed_back_and_requested_pages_still_go() {
        let (mut tx, mut rx) = preempt_pair(1);
        let mut seq = Sequencer::new();
        let mut big = Vec::new();
        let pages: Vec<u64> = (0..256).collect();
        let data: Vec<u8> = (0..256 * 4096).map(|i| (i * 7 + i / 4096) as u8).collect();
        encode_page_batch(1, PageSize::DEFAULT, &pages, &data, &mut big);
        // The receiver reads nothing yet: its reader fills its queue, the
        // socket fills, the writer thread blocks and its queue fills.
        let mut handed_back = false;
        for _ in 0..10_000 {
            let mut f = big.clone();
            seq.seal(&mut f);
            if tx.try_send(f).unwrap().is_some() {
                handed_back = true;
                break;
            }
        }
        assert!(handed_back, "the push was never held up");
        let mut own = Sequencer::new();
        let req = requested_frame(&mut own, 3, 9);
        tx.send(&req).unwrap();
        rx.wait_for_preempt();
        let got = rx.recv(Some(Duration::from_secs(120))).unwrap().unwrap();
        assert!(got[..] == req[..], "the requested pages came first");
    }

    /// A peer that takes no preempt connection is told: the connecting
    /// side refuses the answer without the capability, and the accepting
    /// side refuses the set.
    #[test]
    fn a_preempt_connection_the_peer_does_not_take_is_refused_on_both_sides() {
        let (a, b) = pairs(2);
        let mut b = b.into_iter();
        let acceptor = std::thread::spawn(move || {
            MultiTransport::accept_with(false, || Ok(b.next().unwrap()))
        });
        let mut a = a.into_iter();
        let r = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap()));
        assert!(
            matches!(&r, Err(TransportError::Handshake(why)) if why.contains("preempt")),
            "{r:?}"
        );
        let r = acceptor.join().unwrap();
        assert!(matches!(r, Err(TransportError::Handshake(_))), "{r:?}");

        // An acceptor that knows nothing of the bit answers with its own
        // capabilities only.
        let (a, mut b) = pairs(2);
        let old = std::thread::spawn(move || {
            for s in &mut b {
                read_hello(s).unwrap();
            }
            b[0].write_all(&hello(CAP_SPREAD, 0, 3)).unwrap();
            b
        });
        let mut a = a.into_iter();
        let r = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap()));
        assert!(matches!(r, Err(TransportError::Handshake(_))), "{r:?}");
        drop(old.join().unwrap());
    }

    /// The preempt connection cut while the control connection stays
    /// open ends the stream for `recv`; a peer that closes everything
    /// ends it as before.
    #[test]
    fn a_cut_preempt_connection_ends_the_stream() {
        let (a, b) = pairs(2);
        let far_preempt = a[2].try_clone().unwrap();
        let mut b = b.into_iter();
        let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
        let mut a = a.into_iter();
        let tx = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap())).unwrap();
        let mut rx = acceptor.join().unwrap().unwrap();
        far_preempt.shutdown(std::net::Shutdown::Both).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let r = loop {
            match rx.recv(Some(Duration::from_millis(10))) {
                Ok(None) if Instant::now() < deadline => continue,
                r => break r,
            }
        };
        assert!(matches!(r, Err(TransportError::Closed)), "{r:?}");
        drop(tx);

        let (tx, mut rx) = preempt_pair(2);
        drop(tx);
        assert!(matches!(
            rx.recv(Some(Duration::from_secs(120))),
            Err(TransportError::Closed)
        ));
    }

    /// Frames on the preempt connection go to the server installed with
    /// `serve_preempt`, on the connection's reader thread, in their
    /// order (one that came before it was installed first), and its
    /// answers through the link reach the peer ahead of anything
    /// waiting; the peer's own link carries frames the other way. A
    /// transport without a preempt connection takes no server.
    #[test]
    fn frames_on_the_preempt_connection_are_served_on_its_thread() {
        let (mut near, mut far) = preempt_pair(1);
        let link = near.preempt_link().expect("a link");
        let mut own = Sequencer::new();
        let asks: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                let mut f = crate::protocol::encode_to_vec(&Record::PreemptRequest(vec![i]));
                own.seal(&mut f);
                f
            })
            .collect();
        link.send(&asks[0]).unwrap();
        far.wait_for_preempt();
        let (seen_tx, seen) = mpsc::channel();
        let mut answers = Sequencer::new();
        let mut decoder = crate::protocol::Decoder::preempt(PageSize::DEFAULT);
        assert!(
            far.serve_preempt(Box::new(move |f: Bytes, link: &PreemptLink| {
                let page = match decoder.decode(&f) {
                    Ok(Record::PreemptRequest(p)) => p[0],
                    _ => 100,
                };
                let _ = seen_tx.send(f);
                let _ = link.send(&requested_frame(&mut answers, page, page as u8 + 1));
            }))
        );
        for a in &asks[1..] {
            link.send(a).unwrap();
        }
        for (i, a) in asks.iter().enumerate() {
            let f = seen.recv_timeout(Duration::from_secs(120)).unwrap();
            assert!(f[..] == a[..], "request {i} served in its order");
            let back = near.recv(Some(Duration::from_secs(120))).unwrap().unwrap();
            assert_eq!(back[0], RecordType::RequestedPages as u8);
            assert_eq!(frame_sequence(&back), Some(i as u32));
            assert_eq!(page_data(&back)[0], i as u8 + 1);
        }
        assert!(
            matches!(far.recv(Some(Duration::ZERO)), Ok(None)),
            "nothing served reaches recv"
        );

        let (a, b) = pairs(1);
        let mut b = b.into_iter();
        let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
        let mut a = a.into_iter();
        let mut plain = MultiTransport::connect(1, || Ok(a.next().unwrap())).unwrap();
        assert!(plain.preempt_link().is_none());
        assert!(!plain.serve_preempt(Box::new(|_: Bytes, _: &PreemptLink| {})));
        drop(acceptor.join().unwrap());
    }
}

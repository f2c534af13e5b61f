//! Transports: ordered, reliable frames in both directions.
//!
//! A [`Transport`] moves whole frames (one protocol record each). The
//! library ships an in-process pair ([`channel_pair`]) and a stream
//! transport over TCP or a Unix socket ([`StreamTransport`]), which puts a
//! 4-byte little-endian length before each frame and refuses any length
//! above [`MAX_FRAME_LEN`] before allocating for it.

use crate::protocol::MAX_FRAME_LEN;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a transport could not move a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer closed the connection (or it was cut).
    #[error("connection closed by peer")]
    Closed,
    /// Nothing arrived within the timeout.
    #[error("timed out after {0:?} waiting for the peer")]
    Timeout(Duration),
    /// The peer announced a frame larger than any record may be.
    #[error("peer announced a {len}-byte frame; the limit is {max}")]
    FrameTooLarge {
        /// Length announced.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// Setting up several connections failed, or their frames could not
    /// be put back in order (see [`crate::multistream`]).
    #[error("multi-connection transport: {0}")]
    Handshake(String),
    /// An operating-system error.
    #[error("transport I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Ordered, reliable frames both ways.
///
/// The contract the engines rely on:
/// - `send` returns `Err` only if the frame did not, and will not, reach
///   the peer whole (a stream cut mid-frame is shut down, so the peer
///   sees a truncated frame and refuses it). A transport that cannot
///   tell must return `Ok`: the source then keeps its guest paused after
///   the point of no return rather than risk two running copies;
/// - `send` blocks at most the send timeout ([`Transport::set_send_timeout`])
///   while the peer takes nothing, then fails with
///   [`TransportError::Timeout`];
/// - dropping a transport returns promptly, whatever it holds.
pub trait Transport: Send {
    /// Sends one frame. Blocks while the link is busy, at most the send
    /// timeout without progress.
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError>;

    /// Receives the next frame, waiting at most `timeout` (forever if
    /// `None`). `Ok(None)` means nothing arrived in time.
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError>;

    /// Bounds how long `send` may wait while the peer takes nothing
    /// (`None`: no bound). The drivers set it to their peer timeout. The
    /// provided method does nothing, for transports whose sends never
    /// block.
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        let _ = timeout;
    }

    /// Closes the connection now, so the peer sees it end: every later
    /// `send` fails. A driver that gives up on a connection calls it
    /// before it waits for a new one. The provided method does nothing.
    fn close(&mut self) {}

    /// Sends a frame unless the link that would carry it is busy:
    /// `Ok(None)` when the frame was taken (sent, or queued to be sent:
    /// the contract of `send` holds), `Ok(Some(frame))` when taking it
    /// now would mean waiting. The caller keeps the frame, looks at what
    /// arrived meanwhile, and offers it again. A transport with a
    /// post-copy preempt connection ([`crate::multistream`]) uses it so
    /// that its source can serve page requests while the push waits; the
    /// provided method sends at once.
    fn try_send(&mut self, frame: Vec<u8>) -> Result<Option<Vec<u8>>, TransportError> {
        self.send(&frame)?;
        Ok(None)
    }

    /// The sending side of the post-copy preempt connection, for a thread
    /// of its own (the destination's page requests,
    /// [`crate::protocol::Record::PreemptRequest`]); `None` for a transport
    /// without one (the provided method). Frames sent through it bypass
    /// `send`; they are numbered apart from the stream, by their sender.
    fn preempt_link(&self) -> Option<PreemptLink> {
        None
    }

    /// From now on, hands every frame that arrives on the preempt
    /// connection to `serve` on that connection's own reader thread (frames
    /// that arrived before go first), with the link to answer on, instead
    /// of to `recv`; the connection's end still reaches `recv`. The
    /// source's driver serves the destination's page requests so, without
    /// waiting for its own loop. `false` (the provided method) when the
    /// transport has no preempt connection: the frames then come out of
    /// `recv` as any other.
    fn serve_preempt(&mut self, serve: PreemptServe) -> bool {
        let _ = serve;
        false
    }
}

/// What serves the frames of a preempt connection on its reader thread
/// ([`Transport::serve_preempt`]): each frame, and the link to answer on.
pub type PreemptServe = Box<dyn FnMut(Bytes, &PreemptLink) + Send>;

/// The sending side of a post-copy preempt connection that any thread may
/// use ([`Transport::preempt_link`]). Each frame is written whole, one at a
/// time; a write that fails shuts every connection of the transport down,
/// so that the peer sees a cut and the transport's `recv` its end.
#[derive(Clone)]
pub struct PreemptLink {
    write: Arc<WriteFrame>,
}

/// How a [`PreemptLink`] writes one frame.
type WriteFrame = dyn Fn(&[u8]) -> Result<(), TransportError> + Send + Sync;

impl PreemptLink {
    /// A link that writes each frame with `write`.
    pub fn new(
        write: impl Fn(&[u8]) -> Result<(), TransportError> + Send + Sync + 'static,
    ) -> Self {
        PreemptLink {
            write: Arc::new(write),
        }
    }

    /// Sends one frame on the preempt connection.
    pub fn send(&self, frame: &[u8]) -> Result<(), TransportError> {
        (self.write)(frame)
    }
}

impl std::fmt::Debug for PreemptLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreemptLink").finish_non_exhaustive()
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        (**self).send(frame)
    }
    fn preempt_link(&self) -> Option<PreemptLink> {
        (**self).preempt_link()
    }
    fn serve_preempt(&mut self, serve: PreemptServe) -> bool {
        (**self).serve_preempt(serve)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        (**self).recv(timeout)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        (**self).set_send_timeout(timeout)
    }
    fn close(&mut self) {
        (**self).close()
    }
    fn try_send(&mut self, frame: Vec<u8>) -> Result<Option<Vec<u8>>, TransportError> {
        (**self).try_send(frame)
    }
}

fn recv_from(
    rx: &Receiver<Result<Bytes, TransportError>>,
    timeout: Option<Duration>,
) -> Result<Option<Bytes>, TransportError> {
    let r = match timeout {
        None => rx.recv().map_err(|_| TransportError::Closed)?,
        Some(t) if t.is_zero() => match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return Ok(None),
            Err(TryRecvError::Disconnected) => return Err(TransportError::Closed),
        },
        Some(t) => match rx.recv_timeout(t) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Closed),
        },
    };
    r.map(Some)
}

/// One end of an in-process transport.
#[derive(Debug)]
pub struct ChannelTransport {
    tx: SyncSender<Result<Bytes, TransportError>>,
    rx: Receiver<Result<Bytes, TransportError>>,
    send_timeout: Option<Duration>,
}

/// Two connected in-process ends. Each direction buffers up to `depth`
/// frames before `send` blocks.
pub fn channel_pair(depth: usize) -> (ChannelTransport, ChannelTransport) {
    let (atx, brx) = mpsc::sync_channel(depth);
    let (btx, arx) = mpsc::sync_channel(depth);
    (
        ChannelTransport {
            tx: atx,
            rx: arx,
            send_timeout: None,
        },
        ChannelTransport {
            tx: btx,
            rx: brx,
            send_timeout: None,
        },
    )
}

impl Transport for ChannelTransport {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let msg = Ok(Bytes::copy_from_slice(frame));
        let Some(limit) = self.send_timeout else {
            return self.tx.send(msg).map_err(|_| TransportError::Closed);
        };
        // No timed send on a std channel: try, then back off briefly.
        let deadline = Instant::now() + limit;
        let mut msg = msg;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(TransportError::Closed),
                Err(TrySendError::Full(back)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(TransportError::Timeout(limit));
                    }
                    msg = back;
                    std::thread::sleep(pause.min(deadline - now));
                    // Short naps: a receiver that drains is noticed soon.
                    pause = (pause * 2).min(Duration::from_micros(200));
                }
            }
        }
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        recv_from(&self.rx, timeout)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.send_timeout = timeout.filter(|t| !t.is_zero());
    }
}

/// A byte stream that can be split into a reader and a writer half.
pub trait SplitStream: Read + Write + Send + 'static {
    /// A second handle on the same stream, for the reader thread.
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Shuts both directions down, waking a blocked reader.
    fn shutdown_both(&self);
    /// Bounds how long one write may block (`None`: no bound). The
    /// provided method does nothing.
    fn set_write_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }
}

/// `SplitStream` for the standard library's sockets, which share these
/// methods without a trait of their own.
macro_rules! split_socket {
    ($($t:ty),+) => {$(
        impl SplitStream for $t {
            fn try_clone_stream(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_both(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
            fn set_write_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.set_write_timeout(timeout)
            }
        }
    )+};
}

split_socket!(TcpStream, UnixStream);

/// Length-prefixed frames over a TCP or Unix stream. A reader thread
/// collects incoming frames, so `recv` can wait with a timeout without
/// losing a frame half-read.
///
/// A send that times out or fails part-way shuts the stream down (the
/// peer sees a cut, never a frame run into the next), and every later
/// send fails with [`TransportError::Closed`]. Dropping the transport
/// returns promptly in any state: it drops the read-ahead queue (waking a
/// reader blocked on it), shuts the stream down (waking a reader blocked
/// in `read`), and joins the reader.
pub struct StreamTransport<S: SplitStream> {
    writer: S,
    rx: Receiver<Result<Bytes, TransportError>>,
    reader: Option<std::thread::JoinHandle<()>>,
    send_timeout: Option<Duration>,
    broken: bool,
}

impl<S: SplitStream> std::fmt::Debug for StreamTransport<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTransport").finish_non_exhaustive()
    }
}

/// Frames the reader thread may hold before it stops reading (TCP then
/// pushes back on the sender).
const READ_AHEAD: usize = 4;

impl<S: SplitStream> StreamTransport<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(READ_AHEAD);
        let reader = spawn_reader(&stream, move |r| tx.send(r).is_ok())?;
        Ok(StreamTransport {
            writer: stream,
            rx,
            reader: Some(reader),
            send_timeout: None,
            broken: false,
        })
    }
}

/// Starts the reader thread of `stream`: each frame it reads (or the
/// error that ends it) goes to `deliver`, until that returns `false` or
/// the stream fails.
pub(crate) fn spawn_reader<S: SplitStream>(
    stream: &S,
    mut deliver: impl FnMut(Result<Bytes, TransportError>) -> bool + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    // Buffered, so that small frames cost one read call among many; a
    // read of a large frame's body bypasses the buffer (and a short
    // buffer leaves little of such a frame to be copied through it).
    let mut reader_half = io::BufReader::with_capacity(READ_BUFFER, stream.try_clone_stream()?);
    std::thread::Builder::new()
        .name("livemig-rx".into())
        .spawn(move || {
            let mut buffers = FrameBuffers::default();
            loop {
                let r = read_frame(&mut reader_half, &mut buffers);
                let stop = r.is_err();
                if !deliver(r) || stop {
                    break;
                }
            }
        })
}

/// Size of the reader's buffer.
const READ_BUFFER: usize = 32 << 10;

/// Receive buffers taken back once the frames cut from them are dropped.
///
/// The reader keeps a handle on each buffer it hands out; when every
/// frame cut from a buffer has been dropped, the handle is the only one
/// left and the buffer is reused as it is, its bytes already initialised.
/// A steady stream therefore neither allocates nor zero-fills after its
/// first few frames. A consumer that keeps frames only keeps their
/// buffers from being reused.
#[derive(Default)]
struct FrameBuffers {
    lent: VecDeque<Bytes>,
}

impl FrameBuffers {
    /// Buffers kept for reuse: the read-ahead queue's, the consumer's
    /// frame and the one being read.
    const KEPT: usize = READ_AHEAD + 2;

    /// A buffer of at least `len` initialised bytes.
    fn take(&mut self, len: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        // Oldest first: frames are mostly dropped in the order they came.
        for _ in 0..self.lent.len() {
            let Some(b) = self.lent.pop_front() else {
                break;
            };
            match b.try_into_mut() {
                Ok(m) => {
                    buf = m;
                    break;
                }
                Err(b) => self.lent.push_back(b),
            }
        }
        if buf.len() < len {
            // Zero-fills only the part never used before.
            buf.resize(len, 0);
        }
        buf
    }

    /// The first `len` bytes of `buf` as a frame, keeping a handle on
    /// the buffer.
    fn lend(&mut self, buf: BytesMut, len: usize) -> Bytes {
        let whole = buf.freeze();
        let frame = whole.slice(..len);
        self.lent.push_back(whole);
        if self.lent.len() > Self::KEPT {
            self.lent.pop_front();
        }
        frame
    }
}

impl StreamTransport<TcpStream> {
    /// Connects to a TCP listener.
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Self::new(s)
    }
}

impl StreamTransport<UnixStream> {
    /// Connects to a Unix socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::new(UnixStream::connect(path)?)
    }
}

/// Waits at most `timeout` for a connection on `listener` (a TCP
/// listener has no accept timeout of its own): a destination waiting for
/// its source to connect again uses it. The listener is left
/// non-blocking; the stream returned blocks.
pub fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> Result<TcpStream, TransportError> {
    listener.set_nonblocking(true)?;
    let end = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= end {
                    return Err(TransportError::Timeout(timeout));
                }
                std::thread::sleep((end - now).min(Duration::from_millis(5)));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_frame<R: Read>(r: &mut R, buffers: &mut FrameBuffers) -> Result<Bytes, TransportError> {
    let mut len = [0u8; 4];
    if let Err(e) = r.read_exact(&mut len) {
        return Err(match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => TransportError::Closed,
            _ => TransportError::Io(e),
        });
    }
    let len = u32::from_le_bytes(len) as u64;
    if len > MAX_FRAME_LEN as u64 {
        return Err(TransportError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let len = len as usize;
    let mut buf = buffers.take(len);
    r.read_exact(&mut buf[..len]).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TransportError::Closed,
        _ => TransportError::Io(e),
    })?;
    Ok(buffers.lend(buf, len))
}

/// Writes one frame (its length, then the frame) to `writer`.
pub(crate) fn write_frame<W: Write>(writer: &mut W, frame: &[u8]) -> io::Result<()> {
    let len = (frame.len() as u32).to_le_bytes();
    // Length and frame in one call where the stream takes both.
    let mut parts = [io::IoSlice::new(&len), io::IoSlice::new(frame)];
    let mut left = &mut parts[..];
    while !left.is_empty() {
        match writer.write_vectored(left) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => io::IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a frame may be sent: not on a broken stream, not above the
/// frame limit.
pub(crate) fn may_send(broken: bool, frame: &[u8]) -> Result<(), TransportError> {
    if broken {
        return Err(TransportError::Closed);
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(TransportError::FrameTooLarge {
            len: frame.len() as u64,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(())
}

/// The error of a send that failed with `e` under `timeout`.
pub(crate) fn send_error(e: io::Error, timeout: Option<Duration>) -> TransportError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => TransportError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            TransportError::Timeout(timeout.unwrap_or_default())
        }
        _ => TransportError::Io(e),
    }
}

impl<S: SplitStream> Transport for StreamTransport<S> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        may_send(self.broken, frame)?;
        write_frame(&mut self.writer, frame).map_err(|e| {
            // Part of the frame may be on the wire: the stream cannot
            // carry another frame, so the peer is shown a cut.
            self.broken = true;
            self.writer.shutdown_both();
            send_error(e, self.send_timeout)
        })
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        recv_from(&self.rx, timeout)
    }

    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        let timeout = timeout.filter(|t| !t.is_zero());
        if self.writer.set_write_limit(timeout).is_ok() {
            self.send_timeout = timeout;
        }
    }

    fn close(&mut self) {
        self.broken = true;
        self.writer.shutdown_both();
    }
}

impl<S: SplitStream> Drop for StreamTransport<S> {
    fn drop(&mut self) {
        // Drop the read-ahead queue first: a reader blocked on a full
        // queue then fails its send and stops.
        let (_, empty) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, empty));
        self.writer.shutdown_both();
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn channel_pair_moves_frames_both_ways() {
        let (mut a, mut b) = channel_pair(4);
        a.send(b"one").unwrap();
        b.send(b"two").unwrap();
        assert_eq!(&b.recv(None).unwrap().unwrap()[..], b"one");
        assert_eq!(&a.recv(None).unwrap().unwrap()[..], b"two");
        assert!(a.recv(Some(Duration::ZERO)).unwrap().is_none());
        drop(b);
        assert!(matches!(a.recv(None), Err(TransportError::Closed)));
    }

    #[test]
    fn tcp_moves_frames_and_reports_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut t = StreamTransport::new(s).unwrap();
            let f = t.recv(None).unwrap().unwrap();
            t.send(&f).unwrap();
        });
        let mut c = StreamTransport::connect_tcp(addr).unwrap();
        let big = vec![7u8; 1 << 20];
        c.send(&big).unwrap();
        assert_eq!(c.recv(None).unwrap().unwrap().len(), big.len());
        t.join().unwrap();
        assert!(matches!(c.recv(None), Err(TransportError::Closed)));
    }

    /// Receive buffers are reused: a frame still held keeps its bytes
    /// while later frames of other sizes arrive, and every frame arrives
    /// whole.
    #[test]
    fn reused_receive_buffers_never_touch_a_held_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = StreamTransport::new(a).unwrap();
        let mut rx = StreamTransport::new(b).unwrap();
        let frame = |i: usize| -> Vec<u8> {
            let len = [100_000, 16, 70_000, 1, 300_000][i % 5];
            (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
        };
        let sender = std::thread::spawn(move || {
            for i in 0..200 {
                tx.send(&frame(i)).unwrap();
            }
            tx
        });
        let held = rx.recv(None).unwrap().unwrap();
        for i in 1..200 {
            let f = rx.recv(Some(Duration::from_secs(120))).unwrap().unwrap();
            assert!(f[..] == frame(i)[..], "frame {i} differs");
        }
        assert!(held[..] == frame(0)[..], "the held frame was overwritten");
        drop(sender.join().unwrap());
    }

    #[test]
    fn oversized_length_prefix_is_refused_without_allocating() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut t = StreamTransport::new(b).unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        match t.recv(None) {
            Err(TransportError::FrameTooLarge { len, .. }) => assert_eq!(len, u32::MAX as u64),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    /// Finding 3: dropping a transport whose reader holds a full
    /// read-ahead queue (and is blocked on it) must return.
    #[test]
    fn dropping_a_stream_transport_with_unread_frames_returns() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut sender = StreamTransport::new(a).unwrap();
        let receiver = StreamTransport::new(b).unwrap();
        for _ in 0..(READ_AHEAD + 8) {
            sender.send(&[9u8; 4096]).unwrap();
        }
        // Let the reader fill its queue and block on it.
        std::thread::sleep(Duration::from_millis(100));
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            drop(receiver);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(1)).is_ok(),
            "dropping the transport did not return within a second"
        );
        drop(sender);
    }

    /// Finding 3: a send to a peer that stops reading without closing
    /// fails within the send timeout, and the stream is then shut.
    #[test]
    fn send_to_a_peer_that_never_reads_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut t = StreamTransport::new(a).unwrap();
        t.set_send_timeout(Some(Duration::from_millis(200)));
        let start = Instant::now();
        let frame = vec![1u8; 1 << 20];
        let err = loop {
            if let Err(e) = t.send(&frame) {
                break e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sends never failed"
            );
        };
        assert!(matches!(err, TransportError::Timeout(_)), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(t.send(b"x"), Err(TransportError::Closed)));
        drop(b);
    }

    #[test]
    fn channel_send_to_a_peer_that_never_reads_times_out() {
        let (mut a, b) = channel_pair(2);
        a.set_send_timeout(Some(Duration::from_millis(100)));
        a.send(b"1").unwrap();
        a.send(b"2").unwrap();
        let start = Instant::now();
        assert!(matches!(a.send(b"3"), Err(TransportError::Timeout(_))));
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(b);
        assert!(matches!(a.send(b"4"), Err(TransportError::Closed)));
    }

    #[test]
    fn truncated_frame_is_a_close() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut t = StreamTransport::new(b).unwrap();
        a.write_all(&100u32.to_le_bytes()).unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        assert!(matches!(t.recv(None), Err(TransportError::Closed)));
    }
}

//! Transports: ordered, reliable frames in both directions.
//!
//! A [`Transport`] moves whole frames (one protocol record each). The
//! library ships an in-process pair ([`channel_pair`]) and a stream
//! transport over TCP or a Unix socket ([`StreamTransport`]), which puts a
//! 4-byte little-endian length before each frame and refuses any length
//! above [`MAX_FRAME_LEN`] before allocating for it.

use crate::protocol::MAX_FRAME_LEN;
use bytes::Bytes;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::Duration;

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
    /// An operating-system error.
    #[error("transport I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Ordered, reliable frames both ways.
pub trait Transport: Send {
    /// Sends one frame. Blocks while the link is busy.
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError>;

    /// Receives the next frame, waiting at most `timeout` (forever if
    /// `None`). `Ok(None)` means nothing arrived in time.
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        (**self).send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        (**self).recv(timeout)
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
}

/// Two connected in-process ends. Each direction buffers up to `depth`
/// frames before `send` blocks.
pub fn channel_pair(depth: usize) -> (ChannelTransport, ChannelTransport) {
    let (atx, brx) = mpsc::sync_channel(depth);
    let (btx, arx) = mpsc::sync_channel(depth);
    (
        ChannelTransport { tx: atx, rx: arx },
        ChannelTransport { tx: btx, rx: brx },
    )
}

impl Transport for ChannelTransport {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.tx
            .send(Ok(Bytes::copy_from_slice(frame)))
            .map_err(|_| TransportError::Closed)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        recv_from(&self.rx, timeout)
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
}

impl SplitStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl SplitStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// Length-prefixed frames over a TCP or Unix stream. A reader thread
/// collects incoming frames, so `recv` can wait with a timeout without
/// losing a frame half-read.
pub struct StreamTransport<S: SplitStream> {
    writer: S,
    rx: Receiver<Result<Bytes, TransportError>>,
    reader: Option<std::thread::JoinHandle<()>>,
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
        // Buffered: small frames then cost one read call among many.
        let mut reader_half = io::BufReader::with_capacity(256 << 10, stream.try_clone_stream()?);
        let (tx, rx) = mpsc::sync_channel(READ_AHEAD);
        let reader = std::thread::Builder::new()
            .name("livemig-rx".into())
            .spawn(move || loop {
                let r = read_frame(&mut reader_half);
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    break;
                }
            })?;
        Ok(StreamTransport {
            writer: stream,
            rx,
            reader: Some(reader),
        })
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

fn read_frame<R: Read>(r: &mut R) -> Result<Bytes, TransportError> {
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
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TransportError::Closed,
        _ => TransportError::Io(e),
    })?;
    Ok(Bytes::from(buf))
}

impl<S: SplitStream> Transport for StreamTransport<S> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(TransportError::FrameTooLarge {
                len: frame.len() as u64,
                max: MAX_FRAME_LEN,
            });
        }
        let len = (frame.len() as u32).to_le_bytes();
        // Length and frame in one call where the stream takes both.
        let mut parts = [io::IoSlice::new(&len), io::IoSlice::new(frame)];
        let mut left = &mut parts[..];
        let mut r = Ok(());
        while !left.is_empty() {
            match self.writer.write_vectored(left) {
                Ok(0) => {
                    r = Err(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => io::IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        r.map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => TransportError::Closed,
            _ => TransportError::Io(e),
        })
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        recv_from(&self.rx, timeout)
    }
}

impl<S: SplitStream> Drop for StreamTransport<S> {
    fn drop(&mut self) {
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

//! Post-copy recovery: a post-copy (or hybrid) whose TCP connection is
//! cut after the switch-over goes on over a new connection. The cut is
//! tried at every frame after the switch-over, in either direction; each
//! run either recovers and completes with memory verified, or (a cut
//! before the device state left) fails with the source guest running.
//! Over mutual TLS too, and a connection that names another session is
//! refused while the real source recovers.

use backend_sim::SimGuest;
use bytes::Bytes;
use migrate_core::driver::{run_destination_recoverable, run_source_recoverable, Faults};
use migrate_core::protocol::{self, Record, RecordType, Sequencer};
use migrate_core::transport::{accept_within, StreamTransport, Transport, TransportError};
use migrate_core::{
    DestinationEngine, DestinationReport, EngineConfig, ErrorKind, Hybrid, HybridConfig,
    MigrationError, MigrationStats, Policy, PostCopy, PrecopyConfig, SourceEngine,
};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{guests, recovering_postcopy_source, TIMEOUT};

/// How long either side waits for a new connection.
const RECOVER: Duration = Duration::from_secs(5);

/// Records the type of every frame sent through it and, if told to,
/// cuts the connection instead of sending frame `cut_at` (that send and
/// every later one fail, and the peer sees the connection end). With
/// `swallow` the send of that frame succeeds: it was handed to the
/// connection and lost with it.
struct Tap<T> {
    inner: T,
    log: Arc<Mutex<Vec<u8>>>,
    cut_at: Option<usize>,
    swallow: bool,
    sent: usize,
    cut: Arc<AtomicBool>,
}

impl<T: Transport> Transport for Tap<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if self.cut_at == Some(self.sent) {
            self.cut.store(true, Ordering::Relaxed);
            self.inner.close();
            self.sent += 1;
            if self.swallow {
                self.log.lock().unwrap().push(frame[0]);
                return Ok(());
            }
            return Err(TransportError::Closed);
        }
        self.sent += 1;
        if self.cut_at.is_some_and(|c| self.sent > c) {
            return Err(TransportError::Closed);
        }
        self.log.lock().unwrap().push(frame[0]);
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        if self.cut_at.is_some_and(|c| self.sent > c) {
            return Err(TransportError::Closed);
        }
        self.inner.recv(timeout)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_send_timeout(timeout)
    }
    fn close(&mut self) {
        self.inner.close()
    }
}

type Link = Tap<StreamTransport<TcpStream>>;

/// What one side's links share: the log of frame types and whether the
/// cut happened.
#[derive(Clone, Default)]
struct Wire {
    log: Arc<Mutex<Vec<u8>>>,
    cut: Arc<AtomicBool>,
}

impl Wire {
    fn link(&self, s: TcpStream, cut_at: Option<usize>) -> Link {
        self.link_swallowing(s, cut_at, false)
    }
    fn link_swallowing(&self, s: TcpStream, cut_at: Option<usize>, swallow: bool) -> Link {
        Tap {
            inner: StreamTransport::new(s).unwrap(),
            log: self.log.clone(),
            cut_at,
            swallow,
            sent: 0,
            cut: self.cut.clone(),
        }
    }
    fn types(&self) -> Vec<u8> {
        self.log.lock().unwrap().clone()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Frames from the source are cut.
    Forward,
    /// Replies from the destination are cut.
    Reply,
}

struct Run {
    source: Result<MigrationStats, MigrationError>,
    dest: Result<DestinationReport, MigrationError>,
    src: SimGuest,
    dst: SimGuest,
    /// Frame types each side sent, new connections included.
    sent: Vec<u8>,
    replies: Vec<u8>,
    /// Whether the connection was cut (the run had that many frames).
    cut: bool,
}

/// Feeds the destination guest's faults (its vCPU stalls on a missing
/// page until it arrives) to the driver, as a backend's handler does.
fn fault_pump(dst: &SimGuest) -> (mpsc::Receiver<Faults>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let (d, s) = (dst.clone(), stop.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let f = d.take_faults();
            if let Some(&(_, at)) = f.first() {
                let pages = f.iter().map(|(p, _)| *p).collect();
                if tx.send(Faults { pages, at }).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    (rx, stop)
}

/// A migration of a 4 MiB guest writing `writes` pages a second (over
/// 256 pages) from one thread to another over loopback TCP, with
/// recovery on, cut as `cut` says.
fn migrate<P: Policy + Send + 'static>(policy: P, writes: f64, cut: Option<(Dir, usize)>) -> Run {
    migrate_swallowing(policy, writes, cut, false)
}

/// [`migrate`]; with `swallow` the frame cut in the forward direction is
/// lost with the connection after the source handed it out.
fn migrate_swallowing<P: Policy + Send + 'static>(
    policy: P,
    writes: f64,
    cut: Option<(Dir, usize)>,
    swallow: bool,
) -> Run {
    let (src, dst, clock) = guests(4 << 20, writes);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (fwd, back) = (Wire::default(), Wire::default());
    let at = |d: Dir| cut.filter(|(dir, _)| *dir == d).map(|(_, i)| i);
    let (d, c, w, dcut) = (dst.clone(), clock.clone(), back.clone(), at(Dir::Reply));
    let dest = std::thread::spawn(move || {
        let mut t = w.link(accept_within(&listener, TIMEOUT).unwrap(), dcut);
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        e.set_recover_timeout(Some(RECOVER));
        let (mut rx, stop) = fault_pump(&d);
        let mut again = |left: Duration| -> Result<Link, TransportError> {
            Ok(w.link(accept_within(&listener, left)?, None))
        };
        let out = run_destination_recoverable(&mut e, &mut t, Some(&mut rx), &mut again, TIMEOUT);
        stop.store(true, Ordering::Relaxed);
        out
    });
    let mut t = fwd.link_swallowing(TcpStream::connect(addr).unwrap(), at(Dir::Forward), swallow);
    let mut cfg = EngineConfig::default();
    cfg.postcopy_batch_pages = 16;
    cfg.recover_timeout = Some(RECOVER);
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        clock,
        cfg,
    );
    let mut again = |_left: Duration| -> Result<Link, TransportError> {
        Ok(fwd.link(TcpStream::connect(addr)?, None))
    };
    let source = run_source_recoverable(&mut e, &mut t, &mut again, TIMEOUT);
    drop(t);
    let dest = dest.join().unwrap();
    Run {
        source,
        dest,
        src,
        dst,
        sent: fwd.types(),
        replies: back.types(),
        cut: fwd.cut.load(Ordering::Relaxed) || back.cut.load(Ordering::Relaxed),
    }
}

fn index_of(types: &[u8], ty: RecordType) -> usize {
    types.iter().position(|t| *t == ty as u8).unwrap()
}

/// A completed migration: the destination's memory as it arrived is the
/// paused source's, every page is there, and the guest runs there alone.
fn assert_completed(r: &Run, what: &str) -> (MigrationStats, DestinationReport) {
    let stats = match &r.source {
        Ok(s) => s.clone(),
        Err(e) => panic!(
            "{what}: source failed: {e}; destination: {:?}; sent {:?}; replies {:?}",
            r.dest.as_ref().map(|_| ()),
            r.sent,
            r.replies
        ),
    };
    let report = match &r.dest {
        Ok(rep) => rep.clone(),
        Err(e) => panic!("{what}: destination failed: {e}"),
    };
    assert!(stats.memory_verified, "{what}");
    assert_eq!(report.digest.unwrap(), r.src.digest(), "{what}: digest");
    assert_eq!(r.dst.absent_pages(), 0, "{what}: every page arrived");
    assert!(
        r.src.is_paused() && !r.dst.is_paused(),
        "{what}: one copy runs"
    );
    (stats, report)
}

/// Cuts the connection at every frame from the switch-over on, in `dir`,
/// and checks each run. Returns how many runs recovered.
fn cut_everywhere<P: Policy + Send + 'static>(
    make: impl Fn() -> P,
    writes: f64,
    dir: Dir,
) -> usize {
    let clean = migrate(make(), writes, None);
    let (stats, report) = assert_completed(&clean, "clean run");
    assert!(stats.postcopy.is_some(), "post-copy ran");
    assert_eq!(report.recoveries, 0);
    let switch = index_of(&clean.sent, RecordType::SwitchOver);
    let (from, to) = match dir {
        Dir::Forward => (switch, clean.sent.len()),
        // The destination's frames after it resumed.
        Dir::Reply => (
            index_of(&clean.replies, RecordType::Resumed),
            clean.replies.len(),
        ),
    };
    let mut recovered = 0;
    for i in from..to {
        let what = format!("{dir:?} cut at frame {i}");
        let r = migrate(make(), writes, Some((dir, i)));
        if !r.cut {
            // This run had fewer frames (a hybrid's push varies with
            // what the guest dirtied).
            let (_, report) = assert_completed(&r, &what);
            assert_eq!(report.recoveries, 0, "{what}");
            continue;
        }
        if dir == Dir::Forward && !r.sent[..i].contains(&(RecordType::DeviceState as u8)) {
            // The device state never left: the source resumes its guest,
            // the destination never resumed.
            let e = r.source.as_ref().expect_err(&what);
            assert_ne!(e.kind(), ErrorKind::Settle, "{what}: {e}");
            assert!(!r.src.is_paused() && r.dst.is_paused(), "{what}");
            assert!(r.dest.is_err(), "{what}");
            continue;
        }
        if dir == Dir::Reply && !r.replies.contains(&(RecordType::Verified as u8)) {
            // The destination verified and completed, and its
            // confirmation was cut; it does not wait for the source
            // again. The source cannot know, and says so after its
            // recovery timeout.
            let rep = r.dest.as_ref().expect(&what);
            assert_eq!(rep.digest.unwrap(), r.src.digest(), "{what}");
            let e = r.source.as_ref().expect_err(&what);
            assert_eq!(e.kind(), ErrorKind::Settle, "{what}: {e}");
            assert!(r.src.is_paused() && !r.dst.is_paused(), "{what}");
            continue;
        }
        let (stats, report) = assert_completed(&r, &what);
        let pc = stats.postcopy.expect("post-copy");
        assert_eq!(pc.recoveries, 1, "{what}");
        assert_eq!(report.recoveries, 1, "{what}");
        // The new connection opened with a header and the resume request.
        let reopened = r
            .sent
            .windows(2)
            .skip(1)
            .any(|w| w == [RecordType::Header as u8, RecordType::Session as u8]);
        assert!(reopened, "{what}: {:?}", r.sent);
        assert!(r.replies.contains(&(RecordType::Recovered as u8)), "{what}");
        recovered += 1;
    }
    recovered
}

#[test]
fn postcopy_recovers_from_a_cut_at_every_frame_after_the_switch_over() {
    let n = cut_everywhere(PostCopy::default, 5_000.0, Dir::Forward);
    assert!(n > 30, "{n} recoveries");
}

#[test]
fn postcopy_recovers_from_a_cut_reply_at_every_frame_after_the_resume() {
    let n = cut_everywhere(PostCopy::default, 5_000.0, Dir::Reply);
    assert!(n > 0, "{n} recoveries");
}

fn hybrid() -> Hybrid {
    // One pre-copy round, then post-copy.
    let mut v = HybridConfig::default();
    v.precopy = {
        let mut p = PrecopyConfig::default();
        p.downtime_target = Duration::ZERO;
        p.max_rounds = 1;
        p
    };
    Hybrid::new(v)
}

#[test]
fn hybrid_recovers_from_a_cut_at_every_frame_after_the_switch_over() {
    // A busy guest, so that the pre-copy round leaves its whole working
    // set (256 pages) to post-copy.
    let n = cut_everywhere(hybrid, 200_000.0, Dir::Forward);
    assert!(n > 10, "{n} recoveries");
}

#[test]
fn without_a_new_connection_both_sides_give_up_after_the_recovery_timeout() {
    let (src, dst, clock) = guests(4 << 20, 5_000.0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Wire::default();
    let (d, c, w) = (dst.clone(), clock.clone(), wire.clone());
    let dest = std::thread::spawn(move || {
        let mut t = w.link(accept_within(&listener, TIMEOUT).unwrap(), None);
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        e.set_recover_timeout(Some(Duration::from_secs(1)));
        // The source never comes back: accept nothing.
        let mut never = |left: Duration| -> Result<Link, TransportError> {
            std::thread::sleep(left);
            Err(TransportError::Timeout(left))
        };
        let r = run_destination_recoverable(&mut e, &mut t, None, &mut never, TIMEOUT);
        (r, e.resumed())
    });
    // Header, session, layout, capabilities (asking for round
    // acknowledgements), switch-over, discard, device state, then the
    // first batch of the push: cut.
    let mut t = wire.link(TcpStream::connect(addr).unwrap(), Some(7));
    let mut e = recovering_postcopy_source(&src, clock, Duration::from_secs(1));
    let mut refused =
        |_left: Duration| -> Result<Link, TransportError> { Err(TransportError::Closed) };
    let err = run_source_recoverable(&mut e, &mut t, &mut refused, TIMEOUT).unwrap_err();
    assert!(matches!(err, MigrationError::OutcomeUnknown(_)), "{err}");
    assert!(
        src.is_paused(),
        "the source keeps the guest's memory, paused"
    );
    let (r, resumed) = dest.join().unwrap();
    let e = r.unwrap_err();
    assert!(matches!(e, MigrationError::SourceLost(_)), "{e}");
    assert!(resumed && dst.absent_pages() > 0);
}

#[test]
fn a_connection_naming_another_session_is_refused_and_the_source_recovers() {
    let (src, dst, clock) = guests(4 << 20, 5_000.0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Wire::default();
    let (d, c, w) = (dst.clone(), clock.clone(), wire.clone());
    let dest = std::thread::spawn(move || {
        let mut t = w.link(accept_within(&listener, TIMEOUT).unwrap(), None);
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        e.set_recover_timeout(Some(RECOVER));
        let mut again = |left: Duration| -> Result<Link, TransportError> {
            Ok(w.link(accept_within(&listener, left)?, None))
        };
        run_destination_recoverable(&mut e, &mut t, None, &mut again, TIMEOUT)
    });
    // Header, session, layout, capabilities (asking for round
    // acknowledgements), switch-over, discard, device state, then the
    // first batch of the push: cut.
    let mut t = wire.link(TcpStream::connect(addr).unwrap(), Some(7));
    let mut e = recovering_postcopy_source(&src, clock, RECOVER);
    let mut impostor_refused = false;
    let mut again = |_left: Duration| -> Result<Link, TransportError> {
        if !impostor_refused {
            impostor_refused = true;
            impostor(addr);
        }
        Ok(wire.link(TcpStream::connect(addr)?, None))
    };
    let stats = run_source_recoverable(&mut e, &mut t, &mut again, TIMEOUT).expect("source");
    let report = dest.join().unwrap().expect("destination");
    assert_eq!(report.recoveries, 1);
    assert_eq!(stats.postcopy.unwrap().recoveries, 1);
    assert_eq!(report.digest.unwrap(), src.digest());
    assert_eq!(dst.absent_pages(), 0);
}

/// Connects to the recovering destination and asks it to resume another
/// session: the destination must drop the connection (it never answers
/// with its pages).
fn impostor(addr: SocketAddr) {
    let mut t = StreamTransport::new(TcpStream::connect(addr).unwrap()).unwrap();
    let mut seq = Sequencer::new();
    for r in [
        Record::Header {
            version: protocol::VERSION,
        },
        Record::Session {
            id: 0x5eed,
            resume: true,
        },
    ] {
        let mut f = protocol::encode_to_vec(&r);
        seq.seal(&mut f);
        t.send(&f).unwrap();
    }
    let mut got = Vec::new();
    loop {
        match t.recv(Some(TIMEOUT)) {
            Ok(Some(f)) => got.push(f[0]),
            Ok(None) => panic!("the destination neither answered nor hung up"),
            Err(_) => break,
        }
    }
    assert!(
        !got.contains(&(RecordType::ReceivedBitmap as u8))
            && !got.contains(&(RecordType::Recovered as u8)),
        "another session was told the pages: {got:?}"
    );
}

#[test]
fn a_device_state_lost_with_the_link_resumes_the_source_guest() {
    let clean = migrate(PostCopy::default(), 5_000.0, None);
    assert_completed(&clean, "clean run");
    let commit = index_of(&clean.sent, RecordType::DeviceState);
    // The device state is handed to the connection, which then breaks:
    // the source passed its point of no return, the destination never
    // resumed. On the new connection the destination says so (an abort
    // in sequence, no resume confirmation), and the source resumes its
    // guest at once instead of waiting to settle the outcome.
    let r = migrate_swallowing(
        PostCopy::default(),
        5_000.0,
        Some((Dir::Forward, commit)),
        true,
    );
    assert!(r.cut);
    let e = r.source.as_ref().expect_err("the source cannot complete");
    assert_ne!(e.kind(), ErrorKind::Settle, "{e}");
    assert!(matches!(e, MigrationError::PeerAborted(_)), "{e}");
    assert!(!r.src.is_paused(), "the source guest runs again");
    assert!(r.dst.is_paused(), "the destination never resumed");
    assert!(r.dest.is_err());
    assert!(
        r.sent
            .windows(2)
            .any(|w| w == [RecordType::Header as u8, RecordType::Session as u8]),
        "the source came back: {:?}",
        r.sent
    );
}

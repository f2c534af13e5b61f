//! Migrations over real transports (TCP, Unix socket, in-process) with the
//! simulated guest on the host clock, and what happens when they fail.

use backend_sim::{
    Fault, FaultAt, FaultPlan, FaultyTransport, MemoryMode, SimGuest, SimTracker, WorkloadKind,
    WorkloadSpec,
};
use bytes::Bytes;
use migrate_core::driver::{run_destination, run_source};
use migrate_core::protocol::{Codec, ProtocolError, RecordType};
use migrate_core::transport::{channel_pair, StreamTransport, Transport, TransportError};
use migrate_core::MultiTransport;
use migrate_core::{
    Clock, GuestControl, MemoryLayout, MigrationError, PageSize, Policy, PostCopy, Precopy,
    StopAndCopy, SystemClock,
};
use migrate_core::{DestinationEngine, EngineConfig, SourceEngine, SourceVerify};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{guests, source_engine, spawn_destination, TIMEOUT};

fn migrate_over<A, B>(src_t: A, dst_t: B)
where
    A: Transport + 'static,
    B: Transport + 'static,
{
    let (src, dst, clock) = guests(64 << 20, 50_000.0);
    let d = dst.clone();
    let c = clock.clone();
    let dest = spawn_destination(&d, &c, dst_t);
    let mut t = src_t;
    let mut e = source_engine(&src, Precopy::default(), clock);
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("source");
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified);
    assert!(report.resume_confirmed);
    assert!(
        src.is_paused(),
        "the source stays paused after a completed migration"
    );
    assert!(!dst.is_paused(), "the destination runs");
    // Memory verified by digest at the switch; compare the digests the
    // sides computed, and the source's progress counter with the state
    // the destination restored.
    assert_eq!(report.digest.unwrap(), src.digest());
    assert!(stats.rounds[0].sent + stats.rounds[0].skipped == 16384);
    assert!(stats.downtime > Duration::ZERO);
}

#[test]
fn migrates_over_tcp() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || StreamTransport::new(l.accept().unwrap().0).unwrap());
    let client = StreamTransport::connect_tcp(addr).unwrap();
    let server = acceptor.join().unwrap();
    migrate_over(client, server);
}

#[test]
fn migrates_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("livemig-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("migrate.sock");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    let acceptor = std::thread::spawn(move || StreamTransport::new(l.accept().unwrap().0).unwrap());
    let client = StreamTransport::connect_unix(&path).unwrap();
    let server = acceptor.join().unwrap();
    migrate_over(client, server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migrates_in_process() {
    let (a, b) = channel_pair(8);
    migrate_over(a, b);
}

/// Passes frames through until `cut` says otherwise, then behaves as a
/// connection that was cut: the peer sees the close, we see `Closed`.
struct Cut<T: Transport> {
    inner: Option<T>,
    frames_left: usize,
    cut_after_type: Option<u8>,
    refuse_type: Option<u8>,
}

impl<T: Transport> Cut<T> {
    fn new(inner: T) -> Self {
        Cut {
            inner: Some(inner),
            frames_left: usize::MAX,
            cut_after_type: None,
            refuse_type: None,
        }
    }
}

impl<T: Transport> Transport for Cut<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let Some(inner) = self.inner.as_mut() else {
            return Err(TransportError::Closed);
        };
        if self.frames_left == 0 || self.refuse_type == Some(frame[0]) {
            self.inner = None;
            return Err(TransportError::Closed);
        }
        self.frames_left -= 1;
        inner.send(frame)?;
        if self.cut_after_type == Some(frame[0]) {
            self.inner = None;
        }
        Ok(())
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        match self.inner.as_mut() {
            Some(t) => t.recv(timeout),
            None => Err(TransportError::Closed),
        }
    }
}

#[test]
fn connection_cut_mid_precopy_leaves_the_source_running() {
    let (src, dst, clock) = guests(64 << 20, 50_000.0);
    let (a, b) = channel_pair(4);
    let d = dst.clone();
    let c = clock.clone();
    let dest = std::thread::spawn(move || {
        let mut t = b;
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        let r = run_destination(&mut e, &mut t, None, TIMEOUT);
        (r, e.resumed())
    });
    // Header, layout, then 20 page batches, then the cable is pulled.
    let mut t = Cut {
        frames_left: 22,
        ..Cut::new(a)
    };
    let mut e = source_engine(&src, Precopy::default(), clock);
    let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, MigrationError::Transport(TransportError::Closed)),
        "{err}"
    );
    assert_eq!(err.kind(), migrate_core::ErrorKind::Retry);
    assert!(!src.is_paused(), "source guest must keep running");
    let before = src.progress_counter();
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        src.progress_counter() > before,
        "source guest makes progress after the failure"
    );

    let (r, resumed) = dest.join().unwrap();
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert!(!resumed, "destination must not resume an incomplete guest");
    assert!(dst.is_paused());
}

#[test]
fn connection_cut_after_completion_leaves_the_outcome_to_the_operator() {
    let (src, dst, clock) = guests(16 << 20, 10_000.0);
    let (a, b) = channel_pair(64);
    let d = dst.clone();
    let c = clock.clone();
    // The destination's confirmation (type 11) cannot get out either.
    let dest = spawn_destination(
        &d,
        &c,
        Cut {
            refuse_type: Some(11),
            ..Cut::new(b)
        },
    );
    // Cut right after the completion record (type 8) went out.
    let mut t = Cut {
        cut_after_type: Some(8),
        ..Cut::new(a)
    };
    let mut e = source_engine(&src, StopAndCopy, clock);
    let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
    assert!(matches!(err, MigrationError::OutcomeUnknown(_)), "{err}");
    // Finding 4: an unknown outcome is not a reason to retry.
    assert_eq!(err.kind(), migrate_core::ErrorKind::Settle);
    assert!(
        src.is_paused(),
        "the destination may be running: the source must stay paused"
    );
    // The destination had everything, so it verified and resumed; its
    // confirmation could not be delivered, and it says so. Exactly one
    // copy of the guest runs.
    let r = dest.join().unwrap().expect("destination resumed");
    assert!(!r.resume_confirmed);
    assert!(!dst.is_paused());
    assert_eq!(r.digest.unwrap(), src.digest());
}

#[test]
fn destination_refusing_the_layout_aborts_and_the_source_keeps_running() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let w = WorkloadSpec::idle(1);
    let src = SimGuest::source(
        MemoryLayout::flat(PageSize::DEFAULT, 8 << 20).unwrap(),
        MemoryMode::Bytes,
        w.clone(),
        clock.clone(),
    )
    .unwrap();
    let dst = SimGuest::destination(
        MemoryLayout::flat(PageSize::DEFAULT, 4 << 20).unwrap(),
        MemoryMode::Bytes,
        w,
        clock.clone(),
    )
    .unwrap();
    let (a, b) = channel_pair(8);
    let d = dst.clone();
    let c = clock.clone();
    let dest = spawn_destination(&d, &c, b);
    let mut t = a;
    let mut e = source_engine(&src, Precopy::default(), clock);
    let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, MigrationError::PeerAborted(ref why) if why.contains("layout")),
        "{err}"
    );
    assert!(!src.is_paused());
    let r = dest.join().unwrap();
    assert!(
        matches!(r, Err(MigrationError::LayoutMismatch { .. })),
        "{r:?}"
    );
    assert!(dst.is_paused());
}

#[test]
fn postcopy_over_tcp_completes_and_verifies() {
    let (src, dst, clock) = guests(32 << 20, 20_000.0);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let d = dst.clone();
    let c = clock.clone();
    let dest = std::thread::spawn(move || {
        let mut t = StreamTransport::new(l.accept().unwrap().0).unwrap();
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        run_destination(&mut e, &mut t, None, TIMEOUT)
    });
    let mut t = StreamTransport::connect_tcp(addr).unwrap();
    let mut e = source_engine(&src, PostCopy::default(), clock);
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("source");
    let report = dest.join().unwrap().expect("destination");
    assert!(report.resume_confirmed);
    let pc = report.postcopy.expect("post-copy report");
    assert_eq!(pc.duplicates, 0);
    assert_eq!(stats.total_pages_sent, 8192, "each page once");
    assert!(stats.postcopy.is_some());
    // The digest of what arrived equals the source's memory at pause.
    assert_eq!(report.digest.unwrap(), src.digest());
    assert!(src.is_paused());
    assert_eq!(dst.absent_pages(), 0);
}

#[test]
fn postcopy_destination_that_loses_its_source_does_not_pretend_the_guest_is_whole() {
    let (src, dst, clock) = guests(32 << 20, 20_000.0);
    let (a, b) = channel_pair(4);
    let d = dst.clone();
    let c = clock.clone();
    let dest = std::thread::spawn(move || {
        let mut t = b;
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        let r = run_destination(&mut e, &mut t, None, TIMEOUT);
        (r, e.resumed(), e.completed())
    });
    // Header, layout, switch-over, discard, device state, then ten page
    // batches of the push, then the link is gone.
    let mut t = Cut {
        frames_left: 15,
        ..Cut::new(a)
    };
    let mut e = source_engine(&src, PostCopy::default(), clock);
    let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
    assert!(matches!(err, MigrationError::OutcomeUnknown(_)), "{err}");
    assert!(
        src.is_paused(),
        "the guest already runs on the destination: the source stays paused"
    );
    let (r, resumed, completed) = dest.join().unwrap();
    match &r {
        Err(e @ MigrationError::SourceLost(_)) => {
            assert_eq!(e.kind(), migrate_core::ErrorKind::Settle)
        }
        other => panic!("expected SourceLost, got {other:?}"),
    }
    assert!(
        resumed,
        "post-copy resumed the guest before its pages arrived"
    );
    assert!(!completed, "and the migration must not claim completion");
    assert!(dst.absent_pages() > 0);
}

/// A tracker that loses every write to pages that are multiples of 97,
/// as a buggy dirty log would. After each of its first two collections
/// it lets 20 ms of the guest's (real) time pass, so that the guest
/// certainly writes pages it will lose after they were sent: at 200,000
/// writes a second over 2,048 pages, some of the 21 lost pages are
/// written in that time but for a chance below 10^-15, whatever the
/// host's speed.
struct Lossy(SimTracker, u32);

impl migrate_core::DirtyTracker for Lossy {
    fn start(&mut self) -> Result<(), migrate_core::BackendError> {
        self.0.start()
    }
    fn collect_and_clear(
        &mut self,
        into: &mut migrate_core::DirtyBitmap,
    ) -> Result<(), migrate_core::BackendError> {
        self.0.collect_and_clear(into)?;
        let lost: Vec<u64> = into.iter_ones().filter(|p| p.is_multiple_of(97)).collect();
        lost.into_iter().for_each(|p| into.clear(p));
        if self.1 < 2 {
            self.1 += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
    fn peek(
        &mut self,
        into: &mut migrate_core::DirtyBitmap,
    ) -> Result<(), migrate_core::BackendError> {
        self.0.peek(into)
    }
    fn stop(&mut self) -> Result<(), migrate_core::BackendError> {
        self.0.stop()
    }
}

fn lossy_migration(
    verify: SourceVerify,
) -> (
    Result<migrate_core::MigrationStats, MigrationError>,
    Result<migrate_core::DestinationReport, MigrationError>,
    SimGuest,
    SimGuest,
) {
    // Uniform writes over all of a small memory, so lost pages are written.
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 8 << 20).unwrap();
    let w = WorkloadSpec::new(WorkloadKind::Uniform, 2048, 200_000.0, 3);
    let src =
        SimGuest::source(layout.clone(), MemoryMode::Bytes, w.clone(), clock.clone()).unwrap();
    let dst = SimGuest::destination(layout, MemoryMode::Bytes, w, clock.clone()).unwrap();
    let (a, b) = channel_pair(64);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = spawn_destination(&d, &c, b);
    let mut t = a;
    let config = {
        let mut v = EngineConfig::default();
        v.verify = verify;
        v
    };
    let mut e = SourceEngine::new(
        Lossy(src.tracker(), 0),
        src.pages(),
        src.control(),
        Precopy::default(),
        clock,
        config,
    );
    let s = run_source(&mut e, &mut t, TIMEOUT);
    (s, dest.join().unwrap(), src, dst)
}

#[test]
fn full_scan_verification_catches_a_tracker_that_loses_writes() {
    let (s, d, src, dst) = lossy_migration(SourceVerify::FullScan);
    assert!(
        matches!(d, Err(MigrationError::DigestMismatch { .. })),
        "{d:?}"
    );
    assert!(dst.is_paused(), "the destination refused to resume");
    assert!(matches!(s, Err(MigrationError::PeerAborted(_))), "{s:?}");
    assert!(!src.is_paused(), "and the source guest runs on");
}

#[test]
fn sent_content_verification_trusts_the_tracker() {
    // The cheap mode proves the transfer, not the tracker: with a tracker
    // that loses writes the migration completes, with stale pages. This is
    // why a full scan is the default.
    let (s, d, src, dst) = lossy_migration(SourceVerify::SentContent);
    assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
    dst.control().pause().unwrap();
    assert!(!src.same_memory(&dst), "stale pages went unnoticed");
}

/// How a run with a fault ended: both results, whether the destination
/// resumed, the two guests, and whether the source-side fault fired.
type FaultyRun = (
    Result<migrate_core::MigrationStats, MigrationError>,
    Result<migrate_core::DestinationReport, MigrationError>,
    bool,
    SimGuest,
    SimGuest,
    bool,
);

/// Runs `policy` from `src` to `dst` over an in-process pair whose source
/// end breaks a frame as `to_dest` says and whose destination end breaks
/// a reply as `to_source` says.
fn faulty_migration<P: Policy>(
    policy: P,
    to_dest: Option<FaultPlan>,
    to_source: Option<FaultPlan>,
) -> FaultyRun {
    let (src, dst, clock) = guests(8 << 20, 20_000.0);
    let (a, b) = channel_pair(16);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = FaultyTransport::new(b, to_source);
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        let r = run_destination(&mut e, &mut t, None, Duration::from_secs(5));
        (r, e.resumed())
    });
    let mut t = FaultyTransport::new(a, to_dest);
    let mut e = source_engine(&src, policy, clock);
    let s = run_source(&mut e, &mut t, Duration::from_secs(5));
    let (d, resumed) = dest.join().unwrap();
    (s, d, resumed, src, dst, t.fired())
}

/// The failure came before the point of no return: the source guest
/// runs (and makes progress), the destination's does not, and the
/// source's error is not an unknown outcome.
fn assert_source_kept_the_guest(
    s: &Result<migrate_core::MigrationStats, MigrationError>,
    resumed: bool,
    src: &SimGuest,
    dst: &SimGuest,
) {
    let err = s.as_ref().expect_err("the migration must fail");
    assert_ne!(err.kind(), migrate_core::ErrorKind::Settle, "{err}");
    assert!(!resumed, "the destination resumed: {err}");
    assert!(dst.is_paused());
    assert!(!src.is_paused(), "the source guest was left paused: {err}");
    let before = src.progress_counter();
    std::thread::sleep(Duration::from_millis(30));
    assert!(src.progress_counter() > before);
}

/// Finding 2: a cut before the point-of-no-return record went out (at
/// the final round marker, the switch-over, the device state, or the
/// completion itself) resumes the source guest with a plain error.
#[test]
fn cut_before_the_completion_is_sent_resumes_the_source() {
    for ty in [
        RecordType::SwitchOver,
        RecordType::RoundEnd,
        RecordType::DeviceState,
        RecordType::Complete,
    ] {
        let plan = FaultPlan::new(Fault::Cut, FaultAt::FirstOfType(ty as u8));
        let (s, d, resumed, src, dst, fired) = faulty_migration(StopAndCopy, Some(plan), None);
        assert!(fired);
        assert!(
            matches!(s, Err(MigrationError::Transport(TransportError::Closed))),
            "cut at {ty:?}: {s:?}"
        );
        assert_eq!(
            s.as_ref().unwrap_err().kind(),
            migrate_core::ErrorKind::Retry
        );
        assert!(d.is_err());
        assert_source_kept_the_guest(&s, resumed, &src, &dst);
    }
}

/// Finding 1: a post-copy `Discard` record lost on the way: the
/// destination must not resume (it would show the guest pages it does
/// not have), and the source, told so in sequence, runs its guest again.
#[test]
fn lost_discard_record_stops_the_postcopy_destination() {
    let policies: [fn() -> Box<dyn Policy>; 2] = [
        || Box::new(PostCopy::default()),
        || {
            Box::new(migrate_core::Hybrid::new({
                let mut v = migrate_core::HybridConfig::default();
                v.precopy = {
                    let mut v = migrate_core::PrecopyConfig::default();
                    v.downtime_target = Duration::ZERO;
                    // One round: a second, short one may find nothing
                    // dirtied on a busy host and converge instead.
                    v.max_rounds = 1;
                    v
                };
                v
            }))
        },
    ];
    let mut dropped = 0;
    for policy in policies {
        for ty in [RecordType::Discard, RecordType::DiscardBitmap] {
            let plan = FaultPlan::new(Fault::Drop, FaultAt::FirstOfType(ty as u8));
            let (s, d, resumed, src, dst, fired) = faulty_migration(policy(), Some(plan), None);
            if !fired {
                // This policy sent no record of that type.
                assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
                continue;
            }
            dropped += 1;
            assert!(
                matches!(
                    d,
                    Err(MigrationError::Protocol(
                        ProtocolError::OutOfSequence { .. }
                    ))
                ),
                "{d:?}"
            );
            assert_source_kept_the_guest(&s, resumed, &src, &dst);
        }
    }
    assert!(dropped >= 2, "each policy sent discards");
}

/// Finding 1: a hybrid run whose round-1 page batch is lost must not
/// resume the guest on pages that never came.
#[test]
fn lost_precopy_batch_stops_the_hybrid_destination() {
    let plan = FaultPlan::new(
        Fault::Drop,
        FaultAt::FirstOfType(RecordType::PageBatch as u8),
    );
    let (s, d, resumed, src, dst, fired) =
        faulty_migration(migrate_core::Hybrid::default(), Some(plan), None);
    assert!(fired);
    assert!(d.is_err(), "{d:?}");
    assert_source_kept_the_guest(&s, resumed, &src, &dst);
}

/// Finding 1: a flipped byte in the device state is refused before it
/// is restored, in pre-copy and in post-copy.
#[test]
fn altered_device_state_is_never_restored() {
    let policies: [fn() -> Box<dyn Policy>; 4] = [
        || Box::new(StopAndCopy),
        || Box::new(Precopy::default()),
        || Box::new(PostCopy::default()),
        || Box::new(migrate_core::Hybrid::default()),
    ];
    for policy in policies {
        let plan = FaultPlan::new(
            Fault::Flip,
            FaultAt::FirstOfType(RecordType::DeviceState as u8),
        );
        let (s, d, resumed, src, dst, fired) = faulty_migration(policy(), Some(plan), None);
        assert!(fired);
        assert!(
            matches!(
                d,
                Err(MigrationError::Protocol(
                    ProtocolError::FrameChecksum { .. }
                ))
            ),
            "{d:?}"
        );
        assert_source_kept_the_guest(&s, resumed, &src, &dst);
    }
}

/// The same lossy tracker on a guest in model memory (pages moved as
/// version tokens), on a virtual clock that advances as a 1 Gbit/s link
/// would carry each frame. Returns how it ended and, if the destination
/// resumed, whether its memory equalled the source's at that instant.
fn lossy_model_migration(verify: SourceVerify) -> (Result<(), MigrationError>, Option<bool>) {
    let clock = migrate_core::VirtualClock::new();
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 8 << 20).unwrap();
    let w = WorkloadSpec::new(WorkloadKind::Uniform, 2048, 200_000.0, 3);
    let src = SimGuest::source(layout.clone(), MemoryMode::Model, w.clone(), c.clone()).unwrap();
    let dst = SimGuest::destination(layout, MemoryMode::Model, w, c.clone()).unwrap();
    let mut source = SourceEngine::new(
        Lossy(src.tracker(), 0),
        src.pages(),
        src.control(),
        Precopy::default(),
        c.clone(),
        {
            let mut v = EngineConfig::default();
            v.verify = verify;
            v.payload = migrate_core::Payload::Model;
            v
        },
    );
    let mut dest = DestinationEngine::new(dst.pages(), dst.control(), c);
    let mut equal_at_resume = None;
    for _ in 0..100_000 {
        match source.poll() {
            Ok(migrate_core::SourceStep::Send(f)) => {
                let bytes = migrate_core::protocol::wire_len(&f) as f64;
                clock.set(clock.now() + Duration::from_secs_f64(bytes * 8.0 / 1e9));
                if let Err(e) = dest.handle_frame(&f) {
                    return (Err(e), equal_at_resume);
                }
                if equal_at_resume.is_none() && dst.resumed_at().is_some() {
                    equal_at_resume = Some(src.same_memory(&dst));
                }
                while let Some(r) = dest.poll_transmit() {
                    source.handle_frame(&r).unwrap();
                }
            }
            Ok(migrate_core::SourceStep::Wait) => {
                clock.set(clock.now() + Duration::from_micros(100));
            }
            Ok(migrate_core::SourceStep::Done) => return (Ok(()), equal_at_resume),
            Err(e) => return (Err(e), equal_at_resume),
        }
    }
    panic!("the migration did not finish")
}

#[test]
fn model_memory_full_scan_catches_a_tracker_that_loses_writes() {
    let (r, equal) = lossy_model_migration(SourceVerify::FullScan);
    assert!(
        matches!(r, Err(MigrationError::DigestMismatch { .. })),
        "{r:?}"
    );
    assert_eq!(equal, None, "the destination resumed");
}

#[test]
fn model_memory_sent_content_trusts_the_tracker_too() {
    let (r, equal) = lossy_model_migration(SourceVerify::SentContent);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(equal, Some(false), "stale pages went unnoticed");
}

/// Page batches compressed with each codec over TCP: the destination
/// announces the codecs, the source compresses the batches that pay,
/// both sides count the same batches, and memory verifies. The guest's
/// pages (a page number and a version, then zeros) compress well.
#[test]
fn compressed_batches_over_tcp_with_each_codec() {
    for codec in [Codec::Lz4, Codec::Zstd { level: 3 }] {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let layout = MemoryLayout::flat(PageSize::DEFAULT, 32 << 20).unwrap();
        let mut w = WorkloadSpec::new(WorkloadKind::Uniform, 2048, 20_000.0, 7);
        w.zero_fraction = 0.25;
        let src = SimGuest::source(
            layout.clone(),
            MemoryMode::Compact,
            w.clone(),
            clock.clone(),
        )
        .unwrap();
        let dst = SimGuest::destination(layout, MemoryMode::Compact, w, clock.clone()).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor =
            std::thread::spawn(move || StreamTransport::new(l.accept().unwrap().0).unwrap());
        let mut client = StreamTransport::connect_tcp(addr).unwrap();
        let server = acceptor.join().unwrap();
        let dest = spawn_destination(&dst, &clock, server);
        let mut config = EngineConfig::default();
        config.compression = Some(codec);
        let mut e = SourceEngine::new(
            src.tracker(),
            src.pages(),
            src.control(),
            Precopy::default(),
            clock,
            config,
        );
        let stats = run_source(&mut e, &mut client, TIMEOUT).expect("source");
        let report = dest.join().unwrap().expect("destination");
        assert!(stats.memory_verified && report.resume_confirmed);
        assert_eq!(report.digest.unwrap(), src.digest());
        let c = stats.compression.expect("compression figures");
        println!("{codec:?}: {c:?}");
        assert!(c.negotiated, "{codec:?}");
        assert!(c.compressed_batches > 0, "{codec:?}: {c:?}");
        assert_eq!(c.compressed_batches, report.compression.compressed_batches);
        assert!(
            c.bytes_after * 4 < c.bytes_before,
            "{codec:?} saved little: {c:?}"
        );
        assert!(stats.transferred < c.bytes_before, "{codec:?}");
    }
}

/// A migration over a control and four data connections, TCP and a Unix
/// socket: page batches spread over the data connections arrive in
/// their order and memory verifies.
#[test]
fn migrates_over_several_connections() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || {
        MultiTransport::accept(|| {
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .unwrap()
    });
    let client = MultiTransport::connect(4, || {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
    .unwrap();
    let server = acceptor.join().unwrap();
    assert_eq!((client.connections(), server.connections()), (5, 5));
    migrate_over(client, server);

    let dir = std::env::temp_dir().join(format!("livemig-multi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("migrate.sock");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    let acceptor =
        std::thread::spawn(move || MultiTransport::accept(|| Ok(l.accept()?.0)).unwrap());
    let client =
        MultiTransport::connect(4, || std::os::unix::net::UnixStream::connect(&path)).unwrap();
    let server = acceptor.join().unwrap();
    migrate_over(client, server);
    let _ = std::fs::remove_dir_all(&dir);
}

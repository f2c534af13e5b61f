//! Steering a KVM migration through its handle: cancel in every phase,
//! the bandwidth cap over loopback TCP, auto-converge by throttling the
//! vCPUs. Every completed migration checks the destination's memory.

mod common;
use common::{eventually, have_kvm, serial, MEM, PATIENCE, TIMEOUT};

use backend_kvm::{KvmFaults, Pacing, TestVm};
use bytes::Bytes;
use migrate_core::digest::digest_memory;
use migrate_core::driver::{run_destination, run_source};
use migrate_core::protocol::{wire_len, RecordType};
use migrate_core::transport::{channel_pair, StreamTransport, Transport, TransportError};
use migrate_core::{
    AutoConverge, Clock, ControlError, DestinationEngine, DestinationReport, EngineConfig,
    ErrorKind, Event, MigrationError, MigrationHandle, MigrationStats, PageSource, Phase, Policy,
    PostCopy, Precopy, PrecopyConfig, SourceEngine, StopAndCopy, SwitchReason, SystemClock,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records when each frame was handed to the transport, and may slow it.
struct Recorder<T: Transport> {
    inner: T,
    /// Each frame: when it was handed over, its length on the wire and
    /// its record type.
    sent: Arc<Mutex<Vec<(Instant, usize, u8)>>>,
    per_frame: Duration,
}

impl<T: Transport> Transport for Recorder<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        std::thread::sleep(self.per_frame);
        self.sent.lock().unwrap().push((
            Instant::now(),
            wire_len(frame),
            frame.first().copied().unwrap_or(0),
        ));
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        self.inner.recv(timeout)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_send_timeout(timeout)
    }
}

type DestResult = (Result<DestinationReport, MigrationError>, bool);

/// Starts a destination VM's engine on its own thread over `t`.
fn destination(
    dst: &TestVm,
    t: impl Transport + 'static,
) -> (MigrationHandle, std::thread::JoinHandle<DestResult>) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut e = DestinationEngine::new(dst.pages(), dst.control(), clock);
    let h = e.handle();
    let j = std::thread::spawn(move || {
        let mut t = t;
        let r = run_destination(&mut e, &mut t, None, TIMEOUT);
        (r, e.resumed())
    });
    (h, j)
}

fn source_engine<P: Policy>(
    src: &TestVm,
    policy: P,
    cfg: EngineConfig,
) -> SourceEngine<backend_kvm::KvmDirtyTracker, backend_kvm::KvmPages, backend_kvm::KvmControl, P> {
    SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        Arc::new(SystemClock::new()),
        cfg,
    )
}

fn assert_source_runs_on(src: &TestVm) {
    assert!(src.runners()[0].running(), "the source guest was resumed");
    assert_eq!(src.runners()[0].throttle(), 0, "the throttle was lifted");
    let before = src.reports().len();
    assert!(
        eventually(|| src.reports().len() > before + 2),
        "the source guest keeps running"
    );
    assert!(src.fault().is_none(), "{:?}", src.fault());
}

/// Cancels from another thread once `when` holds for the source's
/// progress; returns the phase it was cancelled in.
fn cancel_from_thread(
    h: MigrationHandle,
    when: impl Fn(&migrate_core::Progress) -> bool + Send + 'static,
) -> std::thread::JoinHandle<Option<Phase>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let p = h.progress();
            if matches!(p.phase, Phase::Completed | Phase::Failed | Phase::Cancelled) {
                return None;
            }
            if when(&p) {
                h.cancel().expect("cancel before the point of no return");
                return Some(p.phase);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    })
}

#[test]
fn kvm_cancel_in_every_phase_leaves_the_source_running() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 4096, 1 << 10, Some(20_000.0)).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 3), "{:?}", src.fault());

    // In setup: cancelled before the first frame.
    {
        let dst = TestVm::destination(MEM, 1 << 10, None).expect("destination VM");
        let (a, b) = channel_pair(8);
        let (_, dest) = destination(&dst, b);
        let mut e = source_engine(&src, Precopy::default(), EngineConfig::default());
        e.handle().cancel().unwrap();
        let mut t = a;
        let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
        assert!(matches!(err, MigrationError::Cancelled), "{err}");
        assert_eq!(e.handle().progress().phase, Phase::Cancelled);
        let (r, resumed) = dest.join().unwrap();
        assert!(r.is_err() && !resumed);
        assert!(dst.reports().is_empty());
        assert_source_runs_on(&src);
    }

    // In pre-copy (round 1 held to 8 MB/s by the cap), and in the final
    // copy of stop-and-copy (frames slowed to 20 ms each).
    type Case = (
        &'static str,
        Box<dyn Policy>,
        Option<u64>,
        Duration,
        Box<dyn Fn(&migrate_core::Progress) -> bool + Send>,
        Phase,
    );
    let cases: Vec<Case> = vec![
        (
            "pre-copy",
            Box::new(Precopy::default()),
            Some(8_000_000),
            Duration::ZERO,
            Box::new(|p| p.phase == Phase::Precopy && p.normal_pages > 2000),
            Phase::Precopy,
        ),
        (
            "stop-and-copy",
            Box::new(StopAndCopy),
            None,
            Duration::from_millis(20),
            Box::new(|p| p.phase == Phase::StopAndCopy && p.normal_pages > 100),
            Phase::StopAndCopy,
        ),
    ];
    for (name, policy, cap, per_frame, when, phase) in cases {
        let dst = TestVm::destination(MEM, 1 << 10, None).expect("destination VM");
        let (a, b) = channel_pair(8);
        let (_, dest) = destination(&dst, b);
        let mut cfg = EngineConfig::default();
        cfg.max_bandwidth = cap;
        let mut e = source_engine(&src, policy, cfg);
        let canceller = cancel_from_thread(e.handle(), when);
        let mut t = Recorder {
            inner: a,
            sent: Arc::default(),
            per_frame,
        };
        let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
        assert_eq!(canceller.join().unwrap(), Some(phase), "{name}");
        assert!(matches!(err, MigrationError::Cancelled), "{name}: {err}");
        assert_eq!(err.kind(), ErrorKind::Cancelled);
        let (r, resumed) = dest.join().unwrap();
        assert!(
            r.is_err() && !resumed,
            "{name}: the destination never resumes"
        );
        assert!(dst.reports().is_empty());
        assert_source_runs_on(&src);
    }

    // On the destination, during pre-copy.
    {
        let dst = TestVm::destination(MEM, 1 << 10, None).expect("destination VM");
        let (a, b) = channel_pair(8);
        let (dh, dest) = destination(&dst, b);
        let mut cfg = EngineConfig::default();
        cfg.max_bandwidth = Some(8_000_000);
        let mut e = source_engine(&src, Precopy::default(), cfg);
        let canceller = cancel_from_thread(dh, |p| p.normal_pages > 2000);
        let mut t = a;
        let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
        // The destination's abort says it was cancelled: the source's
        // outcome is the same typed one.
        assert!(matches!(err, MigrationError::Cancelled), "{err}");
        assert_eq!(canceller.join().unwrap(), Some(Phase::Precopy));
        let (r, resumed) = dest.join().unwrap();
        assert!(matches!(r, Err(MigrationError::Cancelled)) && !resumed);
        assert!(dst.reports().is_empty());
        assert_source_runs_on(&src);
    }
}

/// Migrates over loopback TCP; returns the statistics, the frames handed
/// to the transport and when the source paused the guest.
fn over_loopback(
    src: &TestVm,
    policy: impl Policy,
    cfg: EngineConfig,
) -> (MigrationStats, Vec<(Instant, usize, u8)>, Option<Instant>) {
    let dst = TestVm::destination(MEM, 1 << 10, None).expect("destination VM");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::net::TcpStream::connect(addr).unwrap();
    let (server, _) = listener.accept().unwrap();
    let (_, dest) = destination(&dst, StreamTransport::new(server).unwrap());
    let mut e = source_engine(src, policy, cfg);
    let paused = Arc::new(Mutex::new(None));
    let p2 = paused.clone();
    e.handle().on_event(move |ev| {
        if matches!(ev, Event::SwitchOver { .. }) {
            *p2.lock().unwrap() = Some(Instant::now());
        }
    });
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut t = Recorder {
        inner: StreamTransport::new(client).unwrap(),
        sent: sent.clone(),
        per_frame: Duration::ZERO,
    };
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("source");
    let (report, resumed) = dest.join().unwrap();
    let report = report.expect("destination");
    assert!(resumed && stats.memory_verified);
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap(),
        "destination memory equals the source's"
    );
    let sent = sent.lock().unwrap().clone();
    let paused = *paused.lock().unwrap();
    (stats, sent, paused)
}

#[test]
fn kvm_bandwidth_cap_holds_over_loopback() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 4096, 1 << 10, Some(5_000.0)).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 3), "{:?}", src.fault());
    let cap = 24_000_000u64;
    let mut cfg = EngineConfig::default();
    cfg.max_bandwidth = Some(cap);
    let (stats, sent, paused) = over_loopback(&src, Precopy::default(), cfg);
    let paused = paused.expect("a switch-over");
    let before: Vec<_> = sent.iter().filter(|(t, ..)| *t <= paused).collect();
    assert!(before.len() > 50);
    // The rate while the rounds send: between rounds the source waits
    // for the destination to say it received the round (a round trip
    // and the destination's scheduling, which the cap does not cover).
    let (mut bytes, mut secs) = (0usize, 0f64);
    let round_end = RecordType::RoundEnd as u8;
    for round in before.split_inclusive(|(_, _, ty)| *ty == round_end) {
        if let [first, .., last] = round {
            bytes += round[..round.len() - 1]
                .iter()
                .map(|(_, l, _)| l)
                .sum::<usize>();
            secs += (last.0 - first.0).as_secs_f64();
        }
    }
    let rate = bytes as f64 / secs;
    println!(
        "cap {cap} B/s: {bytes} bytes in {secs:.3} s of pre-copy = {rate:.0} B/s ({:+.2} %); {} rounds, downtime {:?}",
        (rate / cap as f64 - 1.0) * 100.0,
        stats.rounds.len(),
        stats.downtime
    );
    assert!(
        (rate / cap as f64 - 1.0).abs() < 0.05,
        "measured {rate:.0} B/s for a cap of {cap} B/s"
    );
}

#[test]
fn kvm_auto_converge_throttles_a_guest_that_outruns_the_link() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    // 80 MB/s of writes over 16 MiB against a 24 MB/s cap: pre-copy alone
    // does not get what is left under 100 ms.
    let policy = || {
        let mut c = PrecopyConfig::default();
        c.downtime_target = Duration::from_millis(100);
        c.max_rounds = 12;
        c.stall_rounds = 100;
        c.max_transfer_factor = 100.0;
        Precopy::new(c)
    };
    let mut cfg = EngineConfig::default();
    cfg.max_bandwidth = Some(24_000_000);
    let src = TestVm::source_paced(MEM, 1, 4096, 1 << 8, Pacing::Vmm(20_000.0)).expect("VM");
    assert!(eventually(|| src.reports().len() >= 3), "{:?}", src.fault());
    let (plain, _, _) = over_loopback(&src, policy(), cfg.clone());
    drop(src);

    let src = TestVm::source_paced(MEM, 1, 4096, 1 << 8, Pacing::Vmm(20_000.0)).expect("VM");
    assert!(eventually(|| src.reports().len() >= 3), "{:?}", src.fault());
    let mut ac = AutoConverge::default();
    ac.initial_pct = 50;
    ac.increment_pct = 20;
    cfg.auto_converge = Some(ac);
    let (conv, _, _) = over_loopback(&src, policy(), cfg);
    let throttles: Vec<u8> = conv.rounds.iter().map(|r| r.throttle_pct).collect();
    println!(
        "plain: {} rounds, {:?}, downtime {:?}; auto-converge: {} rounds, {:?}, downtime {:?}, throttle per round {throttles:?}",
        plain.rounds.len(),
        plain.switch_reason,
        plain.downtime,
        conv.rounds.len(),
        conv.switch_reason,
        conv.downtime,
    );
    for r in &conv.rounds {
        println!("{r}");
    }
    assert!(
        !plain.switch_reason.converged(),
        "{:?}",
        plain.switch_reason
    );
    assert_eq!(conv.switch_reason, SwitchReason::Converged);
    assert!(throttles.iter().any(|t| *t >= 50), "{throttles:?}");
}

#[test]
fn kvm_cancel_is_refused_once_post_copy_is_under_way() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 4096, 1 << 10, None).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 3), "{:?}", src.fault());
    let dst = TestVm::destination(MEM, 1 << 10, None).expect("destination VM");
    dst.memory().enable_postcopy().expect("userfaultfd");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (a, b) = channel_pair(8);
    let (dp, dc, mem, control, c2) = (
        dst.pages(),
        dst.control(),
        dst.memory(),
        dst.control(),
        clock.clone(),
    );
    let mut de = DestinationEngine::new(dp, dc, c2.clone());
    let dh = de.handle();
    let dest = std::thread::spawn(move || {
        let mut t = b;
        let mut faults = KvmFaults::start(&mem, &control, c2).expect("fault handler");
        let r = run_destination(&mut de, &mut t, Some(&mut faults), TIMEOUT);
        (r, de.completed())
    });
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        PostCopy::default(),
        clock,
        EngineConfig::default(),
    );
    let h = e.handle();
    // Try to cancel, on both sides, every moment of the post-copy.
    let watcher = std::thread::spawn(move || {
        let (mut src_refused, mut dst_refused) = (None, None);
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline && h.progress().phase != Phase::Completed {
            if src_refused.is_none() && h.progress().phase == Phase::Postcopy {
                src_refused = Some(h.cancel());
            }
            if dst_refused.is_none() && dh.progress().phase == Phase::Postcopy {
                dst_refused = Some(dh.cancel());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        (src_refused, dst_refused)
    });
    let mut t = Recorder {
        inner: a,
        sent: Arc::default(),
        per_frame: Duration::from_micros(300),
    };
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("post-copy completes");
    let (src_refused, dst_refused) = watcher.join().unwrap();
    let (r, completed) = dest.join().unwrap();
    let report = r.expect("destination");
    assert!(completed && stats.memory_verified);
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap()
    );
    assert!(
        matches!(src_refused, Some(Err(ControlError::PointOfNoReturn(_)))),
        "{src_refused:?}"
    );
    if let Some(d) = dst_refused {
        assert!(matches!(d, Err(ControlError::PointOfNoReturn(_))), "{d:?}");
    }
    assert!(
        eventually(|| !dst.reports().is_empty()),
        "the guest runs on the destination"
    );
}

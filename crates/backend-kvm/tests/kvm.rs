//! Real-KVM tests: a running guest migrated between two VMs.
//!
//! These need `/dev/kvm`. Without it they fail, unless the environment
//! sets `LIVEMIG_NO_KVM=1` to say, explicitly, that this machine has no
//! KVM (CI does not set it).

use backend_kvm::{run_kvm_destination, DirtyLog, Pacing, TestVm};
use bytes::Bytes;
use migrate_core::conformance::{check_dirty_tracker, check_page_roundtrip, Precision};
use migrate_core::digest::digest_memory;
use migrate_core::driver::{run_destination, run_source};
use migrate_core::engine::{DestinationEngine, DestinationReport, EngineConfig, SourceEngine};
use migrate_core::transport::{channel_pair, Transport, TransportError};
use migrate_core::MigrationStats;
use migrate_core::{
    Clock, GuestControl, MigrationError, PageSource, Policy, Precopy, StopAndCopy, SystemClock,
};
use migrate_core::{DirtyBitmap, DirtyTracker, Hybrid, HybridConfig, PostCopy, PrecopyConfig};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MEM: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// The tests' guests spin at full speed; on a two-core machine they take
/// turns rather than starve one another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a test waits for a guest to make progress. Generous: a host
/// with slow page faults and another process competing for the CPU may
/// take seconds where an idle one takes milliseconds. A test that waits
/// this long has failed; one that passes waits only as long as it must.
const PATIENCE: Duration = Duration::from_secs(120);

/// Waits until `cond` holds, at most [`PATIENCE`].
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

fn have_kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("LIVEMIG_NO_KVM").as_deref() == Ok("1") {
        eprintln!("LIVEMIG_NO_KVM=1: this machine declares it has no KVM; test not run");
        return false;
    }
    panic!("/dev/kvm not found (set LIVEMIG_NO_KVM=1 only on a machine known to have no KVM)");
}

fn rcx(vm: &TestVm) -> u64 {
    vm.runners()[0].with_vcpu(|fd| fd.get_regs().unwrap().rcx)
}

/// Runs the source side of a migration of `src` over `t`; it must succeed.
fn source_side<P: Policy>(
    src: &TestVm,
    policy: P,
    clock: Arc<dyn Clock>,
    mut t: impl Transport,
) -> MigrationStats {
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        clock,
        EngineConfig::default(),
    );
    run_source(&mut e, &mut t, TIMEOUT).expect("source")
}

/// Migrates `src` into `dst` over an in-process transport, the
/// destination on its own thread; both sides must succeed.
fn migrate_in_process<P: Policy>(
    src: &TestVm,
    dst: &TestVm,
    policy: P,
) -> (MigrationStats, DestinationReport) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (a, b) = channel_pair(8);
    let (dp, dc, c2) = (dst.pages(), dst.control(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = b;
        let mut e = DestinationEngine::new(dp, dc, c2);
        run_destination(&mut e, &mut t, TIMEOUT)
    });
    let stats = source_side(src, policy, clock, a);
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified && report.resume_confirmed);
    (stats, report)
}

fn migrate<P: Policy + 'static>(policy: P) {
    migrate_logged(policy, DirtyLog::Bitmap);
}

fn migrate_logged<P: Policy + 'static>(policy: P, log: DirtyLog) {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src =
        TestVm::source_logged(MEM, 1, 4096, 1 << 16, Pacing::Unlimited, log).expect("source VM");
    assert!(
        eventually(|| src.reports().len() >= 10),
        "the payload runs and reports"
    );
    assert!(src.fault().is_none(), "{:?}", src.fault());
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    let (stats, report) = migrate_in_process(&src, &dst, policy);

    // The source stays paused; its memory is what the destination got.
    let at_pause = rcx(&src);
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap()
    );

    // The destination's guest goes on from exactly where it stopped.
    assert!(
        eventually(|| !dst.reports().is_empty()),
        "the migrated guest runs and reports"
    );
    assert!(dst.fault().is_none(), "{:?}", dst.fault());
    let reports = dst.reports();
    let first = reports[0].value;
    assert!(
        first > at_pause & 0xffff_ffff,
        "counter {first} after resume, {at_pause} at pause"
    );
    assert!(
        first - (at_pause & 0xffff_ffff) <= 1 << 16,
        "the counter went on from where it was"
    );
    assert!(stats.downtime > Duration::ZERO && stats.downtime < PATIENCE);
    println!("{stats}");
}

#[test]
fn precopy_moves_a_running_guest() {
    migrate(Precopy::default());
}

#[test]
fn stop_and_copy_moves_a_running_guest() {
    migrate(StopAndCopy);
}

#[test]
fn precopy_on_the_dirty_ring_moves_a_running_guest() {
    migrate_logged(Precopy::default(), DirtyLog::Ring(4096));
}

#[test]
fn hca_on_the_dirty_ring_moves_a_running_guest() {
    // HCA samples the log every few milliseconds: many small collections.
    migrate_logged(
        migrate_core::Hca::new(migrate_core::HcaConfig::default()),
        DirtyLog::Ring(1024),
    );
}

#[test]
fn hca_moves_a_running_guest() {
    migrate(migrate_core::Hca::new(migrate_core::HcaConfig::default()));
}

/// Cuts the connection after `left` frames.
struct Cut<T: Transport> {
    inner: Option<T>,
    left: usize,
}

impl<T: Transport> Transport for Cut<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if self.left == 0 {
            self.inner = None;
        }
        let Some(t) = self.inner.as_mut() else {
            return Err(TransportError::Closed);
        };
        self.left -= 1;
        t.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        match self.inner.as_mut() {
            Some(t) => t.recv(timeout),
            None => Err(TransportError::Closed),
        }
    }
}

/// Paces the frames a source sends (a slow link): the push of a post-copy
/// then lasts long enough that the running guest surely faults on pages
/// it has not got.
struct Slow<T: Transport> {
    inner: T,
    per_frame: Duration,
}

impl<T: Transport> Transport for Slow<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        std::thread::sleep(self.per_frame);
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        self.inner.recv(timeout)
    }
}

/// 300 µs a frame: about 0.3 s for the 1,024 frames of 64 MiB, time
/// enough for the resumed guest to be scheduled and fault even on a
/// loaded host.
const SLOW: Duration = Duration::from_micros(300);

#[test]
fn connection_cut_mid_precopy_leaves_the_source_running() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 4096, 1 << 12, None).expect("source VM");
    // The guest has run (its first pass over its working set is done)
    // before the test relies on its running.
    assert!(eventually(|| src.reports().len() >= 3), "{:?}", src.fault());
    let dst = TestVm::destination(MEM, 1 << 12, None).expect("destination VM");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (a, b) = channel_pair(4);
    let (dp, dc, c2) = (dst.pages(), dst.control(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = b;
        let mut e = DestinationEngine::new(dp, dc, c2);
        (run_destination(&mut e, &mut t, TIMEOUT), e.resumed())
    });
    let mut t = Cut {
        inner: Some(a),
        left: 12,
    };
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        Precopy::default(),
        clock,
        EngineConfig::default(),
    );
    let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, MigrationError::Transport(TransportError::Closed)),
        "{err}"
    );
    assert!(src.runners()[0].running(), "the source guest was resumed");
    let before = src.reports().len();
    assert!(
        eventually(|| src.reports().len() > before + 2),
        "the source guest keeps running"
    );
    assert!(src.fault().is_none());
    let (r, resumed) = dest.join().unwrap();
    assert!(r.is_err());
    assert!(!resumed, "the destination never runs an incomplete guest");
    assert!(dst.reports().is_empty());
}

#[test]
fn kvm_pages_pass_the_page_roundtrip_conformance_check() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 1024, 1 << 16, None).expect("source VM");
    assert!(eventually(|| !src.reports().is_empty()));
    src.control().pause().unwrap();
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    check_page_roundtrip(&mut src.pages(), &mut dst.pages()).unwrap();
}

/// Set (to the source's address) in the destination process of the
/// two-process tests.
const DEST_ENV: &str = "LIVEMIG_KVM_DESTINATION";
/// Set (to the payload's report interval) with `DEST_ENV`.
const EVERY_ENV: &str = "LIVEMIG_KVM_REPORT_EVERY";
/// Set (to the payload's pages a second, 0 for no limit) with `DEST_ENV`.
const RATE_ENV: &str = "LIVEMIG_KVM_RATE";

/// The destination process of the two-process tests: the parent test
/// starts this test binary again running only this test, with `DEST_ENV`
/// set. Run on its own it has nothing to connect to.
#[test]
#[ignore = "the destination half of the two-process tests; they start it themselves"]
fn destination_process() {
    let addr = std::env::var(DEST_ENV).expect("started by a two-process test");
    let every: u64 = std::env::var(EVERY_ENV).unwrap().parse().unwrap();
    let rate: f64 = std::env::var(RATE_ENV).unwrap().parse().unwrap();
    let rate = (rate > 0.0).then_some(rate);
    let vm = TestVm::destination(MEM, every, rate).expect("destination VM");
    // One destination takes every policy's stream: post-copy is enabled
    // up front, and a pre-copy stream is placed through userfaultfd too.
    vm.memory().enable_postcopy().expect("userfaultfd");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut t = migrate_core::StreamTransport::connect_tcp(&addr).expect("connect");
    let mut e = DestinationEngine::new(vm.pages(), vm.control(), clock.clone());
    let report = run_kvm_destination(&mut e, &mut t, &vm.memory(), &vm.control(), clock, TIMEOUT)
        .expect("destination");
    assert_eq!(vm.memory().missing_pages(), 0);
    assert!(
        eventually(|| vm.reports().len() >= 3),
        "the migrated guest runs"
    );
    let r = vm.reports();
    let pc = report.postcopy.unwrap_or_default();
    println!(
        "DESTINATION {} {} {} {} {}",
        report.digest.unwrap(),
        r[0].value,
        vm.fault().is_none(),
        pc.faults,
        pc.duplicates
    );
}

/// Migrates the payload (dirtying a 16 MiB working set at `rate` pages a
/// second, or as fast as it can, and reporting every `every` pages) to a
/// destination process with `policy`.
fn between_processes<P: Policy + 'static>(
    policy: P,
    every: u64,
    rate: Option<f64>,
    slow: bool,
) -> MigrationStats {
    let _turn = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "destination_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(DEST_ENV, &addr)
        .env(EVERY_ENV, every.to_string())
        .env(RATE_ENV, rate.unwrap_or(0.0).to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the destination process");
    let src = TestVm::source(MEM, 4096, every, rate).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 5));
    let (stream, _) = listener.accept().unwrap();
    let t = Slow {
        inner: migrate_core::StreamTransport::new(stream).unwrap(),
        per_frame: if slow { SLOW } else { Duration::ZERO },
    };
    let stats = source_side(&src, policy, Arc::new(SystemClock::new()), t);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "destination process failed: {text}");
    let line = text
        .lines()
        .find_map(|l| l.find("DESTINATION ").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no destination report in: {text}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let layout = src.pages().layout().clone();
    let digest = digest_memory(&mut src.pages(), &layout)
        .unwrap()
        .to_string();
    assert_eq!(f[1], digest, "destination memory equals the source's");
    let first: u64 = f[2].parse().unwrap();
    let last_on_source = src.reports().last().unwrap().value;
    assert_eq!(
        first,
        last_on_source + every,
        "the counter goes on from where it stopped"
    );
    assert_eq!(f[3], "true", "no guest fault on the destination");
    assert!(stats.memory_verified && stats.downtime > Duration::ZERO);
    if let Some(pc) = &stats.postcopy {
        let faults: u64 = f[4].parse().unwrap();
        assert_eq!(pc.requests, faults, "each fault was one request");
        assert_eq!(f[5], "0", "no page placed twice");
    }
    stats
}

#[test]
fn precopy_between_two_processes() {
    if have_kvm() {
        let stats = between_processes(Precopy::default(), 1 << 10, Some(20_000.0), false);
        assert!(stats.postcopy.is_none());
    }
}

#[test]
fn stop_and_copy_between_two_processes() {
    if have_kvm() {
        between_processes(StopAndCopy, 1 << 10, Some(20_000.0), false);
    }
}

#[test]
fn hca_between_two_processes() {
    if have_kvm() {
        between_processes(
            migrate_core::Hca::new(migrate_core::HcaConfig::default()),
            1 << 10,
            Some(20_000.0),
            false,
        );
    }
}

#[test]
fn postcopy_between_two_processes_sends_each_page_once() {
    if have_kvm() {
        let stats = between_processes(PostCopy::default(), 1 << 10, Some(20_000.0), true);
        let pc = stats.postcopy.expect("a post-copy migration");
        assert_eq!(
            stats.total_pages_sent, stats.guest_pages,
            "every page crosses once"
        );
        assert_eq!(pc.pages, stats.guest_pages);
        assert!(pc.requests > 0, "the resumed guest faulted on absent pages");
        assert!(pc.fault_latency_p50 > Duration::ZERO);
    }
}

/// Hybrid with two pre-copy rounds and a 1 µs downtime target, which
/// then switches to post-copy. Its one change to [`Hybrid`]: where Hybrid
/// would stop and copy because nothing is left (a guest that got no CPU
/// during a round dirtied nothing, which a loaded host can cause), it
/// switches to post-copy all the same, so the test exercises the switch
/// on any host.
struct ForcedHybrid(Hybrid);

fn forced_hybrid() -> ForcedHybrid {
    ForcedHybrid(Hybrid::new(HybridConfig {
        precopy: PrecopyConfig {
            max_rounds: 2,
            downtime_target: Duration::from_micros(1),
            ..PrecopyConfig::default()
        },
        ..HybridConfig::default()
    }))
}

impl Policy for ForcedHybrid {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn decide(&mut self, input: &migrate_core::PolicyInput<'_>) -> migrate_core::Decision {
        match self.0.decide(input) {
            migrate_core::Decision::StopAndCopy(r) => migrate_core::Decision::PostCopy(r),
            other => other,
        }
    }
    fn on_fault(&mut self, page: u64, now: Duration) {
        self.0.on_fault(page, now)
    }
    fn next_push(&mut self, pending: &DirtyBitmap, max: usize, out: &mut Vec<u64>) {
        self.0.next_push(pending, max, out)
    }
}

#[test]
fn hybrid_between_two_processes() {
    if have_kvm() {
        // A guest that never stops writing, so that every pre-copy round
        // finds pages dirtied.
        let stats = between_processes(forced_hybrid(), 1 << 16, None, false);
        assert!(stats.postcopy.is_some(), "{:?}", stats.switch_reason);
        assert!(stats.rounds.len() >= 2, "pre-copy rounds came first");
    }
}

/// A running source (dirtying 16 MiB as fast as it can) and a post-copy
/// destination.
fn postcopy_pair() -> (TestVm, TestVm) {
    let src = TestVm::source(MEM, 4096, 1 << 16, None).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 10));
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    dst.memory().enable_postcopy().expect("userfaultfd");
    (src, dst)
}

/// The destination's result, whether it resumed, whether it completed.
type DestEnd = (Result<DestinationReport, MigrationError>, bool, bool);

/// Runs `dst` as a post-copy destination over `t` on its own thread.
fn postcopy_destination(
    dst: &TestVm,
    clock: Arc<dyn Clock>,
    t: impl Transport + 'static,
) -> std::thread::JoinHandle<DestEnd> {
    let (dp, dc, mem, control) = (dst.pages(), dst.control(), dst.memory(), dst.control());
    std::thread::spawn(move || {
        let mut t = t;
        let mut e = DestinationEngine::new(dp, dc, clock.clone());
        let r = run_kvm_destination(&mut e, &mut t, &mem, &control, clock, TIMEOUT);
        (r, e.resumed(), e.completed())
    })
}

#[test]
fn postcopy_moves_a_running_guest() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let (src, dst) = postcopy_pair();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (a, b) = channel_pair(8);
    let dest = postcopy_destination(&dst, clock.clone(), b);
    let t = Slow {
        inner: a,
        per_frame: SLOW,
    };
    let stats = source_side(&src, PostCopy::default(), clock, t);
    let report = dest.join().unwrap().0.expect("destination");
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap(),
        "what arrived is the source's memory at the pause"
    );
    let at_pause = rcx(&src) & 0xffff_ffff;
    assert!(eventually(|| !dst.reports().is_empty()));
    assert!(dst.fault().is_none(), "{:?}", dst.fault());
    let first = dst.reports()[0].value;
    assert!(first > at_pause && first - at_pause <= 1 << 16);
    let pc = stats.postcopy.clone().expect("post-copy figures");
    assert!(pc.requests > 0, "the guest faulted and asked for pages");
    assert_eq!(stats.total_pages_sent, stats.guest_pages);
    // Memory left userfaultfd: every page is readable.
    assert_eq!(dst.memory().missing_pages(), 0);
    let mut page = vec![0u8; 4096];
    dst.pages().read_pages(&[0], &mut page).unwrap();
    println!("{stats}");
}

#[test]
fn a_postcopy_destination_that_loses_its_source_says_the_guest_is_incomplete() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let (src, dst) = postcopy_pair();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (a, b) = channel_pair(8);
    let dest = postcopy_destination(&dst, clock.clone(), b);
    // Header, layout, switch-over and device state, then 60 batches of
    // pages out of about a thousand: the connection is cut mid-push.
    let mut t = Cut {
        inner: Some(a),
        left: 64,
    };
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        PostCopy::default(),
        clock,
        EngineConfig::default(),
    );
    let err = run_source(&mut e, &mut t, TIMEOUT).unwrap_err();
    println!("source: {err}");
    assert!(
        !src.runners()[0].running(),
        "the source stays paused: its guest ran on the destination"
    );
    let (r, resumed, completed) = dest.join().unwrap();
    let err = r.unwrap_err();
    assert!(matches!(err, MigrationError::SourceLost(_)), "{err}");
    assert!(resumed && !completed);
    let missing = dst.memory().missing_pages();
    assert!(missing > 0 && missing < src.pages().layout().total_pages());
    // It does not pretend: the memory stays under userfaultfd, and an
    // absent page is an error, not zeros.
    assert!(dst.memory().finish_postcopy().is_err());
    let last = src.pages().layout().page_end() - 1;
    let mut page = vec![0u8; 4096];
    assert!(dst.pages().read_pages(&[last], &mut page).is_err());
    println!("destination: {err}; {missing} pages missing");
}

#[test]
fn kvm_tracker_passes_the_tracker_conformance_check() {
    tracker_conformance(DirtyLog::Bitmap);
}

#[test]
fn dirty_ring_tracker_passes_the_tracker_conformance_check() {
    // 256 entries against a working set of 1,024 pages: the ring fills
    // while the guest runs, and the vCPU's exit has it collected.
    tracker_conformance(DirtyLog::Ring(256));
}

fn tracker_conformance(log: DirtyLog) {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    // A report every 4,096 writes: one report after tracking starts means
    // every page of the 1,024-page working set was written since.
    let vm =
        TestVm::source_logged(MEM, 1, 1024, 1 << 12, Pacing::Unlimited, log).expect("source VM");
    assert!(eventually(|| !vm.reports().is_empty()), "{:?}", vm.fault());
    vm.control().pause().unwrap();
    let pages = vm.pages();
    let layout = pages.layout().clone();
    // The VMM writes on the guest's behalf (device emulation would): KVM's
    // log does not see these, vm-memory's bitmap does, and the tracker
    // must report them. With the guest paused nothing else is written.
    // (The last 64 bytes of a page: the test guest's GDT, page tables and
    // code all sit at the start of theirs.)
    let mut write = |p: u64| {
        use vm_memory::Bytes;
        pages
            .0
            .guest_memory()
            .write_slice(&[0xa5; 64], vm_memory::GuestAddress((p << 12) + 4032))
            .unwrap();
    };
    check_dirty_tracker(&mut vm.tracker(), &layout, Precision::Exact, &mut write).unwrap();

    // And the guest's own writes, with the guest running: two reports
    // after the start, every page of its working set has been written.
    let mut t = vm.tracker();
    t.start().unwrap();
    let before = vm.reports().len();
    vm.control().resume().unwrap();
    assert!(
        eventually(|| vm.reports().len() >= before + 2),
        "{:?}",
        vm.fault()
    );
    vm.control().pause().unwrap();
    let mut dirty = DirtyBitmap::new(layout.page_end());
    t.peek(&mut dirty).unwrap();
    let wss: Vec<u64> = (0..1024)
        .map(|i| (backend_kvm::WSS_BASE >> 12) + i)
        .collect();
    assert!(
        wss.iter().all(|p| dirty.get(*p)),
        "every working-set page written by the guest is reported"
    );
    let mut again = DirtyBitmap::new(layout.page_end());
    t.collect_and_clear(&mut again).unwrap();
    assert!(wss.iter().all(|p| again.get(*p)), "a peek loses nothing");
    t.stop().unwrap();
    let full = vm.runners()[0].ring_full_exits();
    if let DirtyLog::Ring(entries) = log {
        assert!(
            (entries as u64) < 1024 && full > 0,
            "the ring filled and was collected"
        );
    } else {
        assert_eq!(full, 0);
    }
}

#[test]
fn saved_state_carries_every_part_and_restores_exactly() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 1024, 1 << 16, None).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 3));
    let mut sc = src.control();
    sc.pause().unwrap();
    let saved = sc.save_state().unwrap();
    assert_eq!(
        (saved.format.as_str(), saved.version),
        (backend_kvm::STATE_FORMAT, backend_kvm::STATE_VERSION)
    );
    let g: backend_kvm::GuestState = serde_json::from_slice(&saved.data).unwrap();
    assert_eq!(g.vm.irqchips.len(), 3, "PIC master, PIC slave, IOAPIC");
    assert!(g.vm.pit.is_some() && g.vm.clock.is_some());
    let v = &g.vcpus[0];
    assert!(v.msrs.len() > 10, "{} MSRs", v.msrs.len());
    assert!(
        v.lapic.is_some() && v.events.is_some() && v.debugregs.is_some() && v.mp_state.is_some()
    );
    assert!(v.xcrs.is_some());

    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    let mut dc = dst.control();
    dc.restore_state(&saved).unwrap();
    let again: backend_kvm::GuestState =
        serde_json::from_slice(&dc.save_state().unwrap().data).unwrap();
    let j = |x: &dyn erased::Ser| x.json();
    let (a, b) = (&g.vcpus[0], &again.vcpus[0]);
    assert_eq!(j(&a.regs), j(&b.regs));
    assert_eq!(j(&a.sregs), j(&b.sregs));
    assert_eq!(j(&a.lapic), j(&b.lapic));
    // Every MSR reads back as written, but the time-stamp counter (0x10),
    // which has kept counting from the value written.
    const TSC: u32 = 0x10;
    assert_eq!(a.msrs.len(), b.msrs.len());
    for (x, y) in a.msrs.iter().zip(&b.msrs) {
        assert_eq!(x.index, y.index);
        if x.index == TSC {
            assert!(y.data >= x.data, "the TSC went on from where it was");
        } else {
            assert_eq!(x.data, y.data, "MSR {:#x}", x.index);
        }
    }
    assert_eq!(j(&g.vm.irqchips), j(&again.vm.irqchips));
}

/// Compares kvm-bindings structs (which lack `PartialEq`) through JSON.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn a_guest_with_two_vcpus_moves_with_both_counters_continuing() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    const EVERY: u64 = 1 << 10;
    let src = TestVm::source_smp(MEM, 2, 4096, EVERY, Some(40_000.0)).expect("source VM");
    assert_eq!(src.vcpus(), 2);
    assert!(eventually(
        || src.reports_of(0).len() >= 3 && src.reports_of(1).len() >= 3
    ));
    let dst = TestVm::destination_smp(MEM, 2, EVERY, Some(40_000.0)).expect("destination VM");
    let (_, report) = migrate_in_process(&src, &dst, Precopy::default());
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap()
    );
    for i in 0..2 {
        assert!(
            eventually(|| !dst.reports_of(i).is_empty()),
            "vCPU {i} runs on the destination"
        );
        let last = src.reports_of(i).last().unwrap().value;
        let first = dst.reports_of(i)[0].value;
        assert_eq!(
            first,
            last + EVERY,
            "vCPU {i}'s counter goes on from where it stopped"
        );
    }
    assert!(dst.fault().is_none(), "{:?}", dst.fault());
}

/// Builds the multiboot image with `payload/build.sh` (binutils), once per
/// test process: the tests that use it run in parallel and would otherwise
/// overwrite each other's intermediate files.
fn build_image() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("payload");
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("payload/build.sh");
            let status = std::process::Command::new("sh")
                .arg(&script)
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("running payload/build.sh (needs binutils): {e}"))?;
            if status.success() {
                Ok(out)
            } else {
                Err(format!("payload/build.sh failed: {status}"))
            }
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn payload_source_assembles_to_the_payload_bytes() {
    let out = build_image();
    let bytes = std::fs::read(out.join("payload.bin")).unwrap();
    assert_eq!(bytes, backend_kvm::PAYLOAD);
}

#[test]
fn multiboot_image_boots_to_cpl3_and_migrates() {
    if !have_kvm() {
        return;
    }
    let image = std::fs::read(build_image().join("payload.elf")).unwrap();
    let _turn = serial();
    let src = TestVm::boot_multiboot(MEM, &image, "payload.elf wss=512 every=4096 ticks=0")
        .expect("booting the image");
    assert!(
        eventually(|| src.reports().len() >= 5),
        "the booted payload reports ({:?})",
        src.fault()
    );
    let values: Vec<u64> = src.reports().iter().map(|r| r.value).collect();
    assert!(values.iter().all(|v| v % 4096 == 0), "{values:?}");
    assert!(values.windows(2).all(|w| w[1] == w[0] + 4096), "{values:?}");

    // The stub handed over to the payload at CPL 3 with the parameters
    // from the command line (the reports show its port I/O works).
    src.control().pause().unwrap();
    let (regs, sregs) =
        src.runners()[0].with_vcpu(|fd| (fd.get_regs().unwrap(), fd.get_sregs().unwrap()));
    src.control().resume().unwrap();
    assert_eq!((sregs.cs.selector, sregs.cs.dpl, sregs.cs.l), (0x23, 3, 1));
    assert!(
        (0x10000..0x10000 + 75).contains(&regs.rip),
        "{:#x}",
        regs.rip
    );
    assert_eq!(
        (regs.rdi, regs.rsi, regs.r8, regs.r9),
        (1 << 20, 512, 4095, 0)
    );

    // It dirties exactly its working set: 512 pages from 1 MiB.
    let mut tracker = src.tracker();
    let layout = src.pages().layout().clone();
    tracker.start().unwrap();
    let first = src.reports().len();
    assert!(eventually(|| src.reports().len() >= first + 2));
    let mut dirty = DirtyBitmap::new(layout.page_end());
    tracker.collect_and_clear(&mut dirty).unwrap();
    tracker.stop().unwrap();
    let ws = (256..256 + 512).filter(|&p| dirty.get(p)).count();
    assert_eq!(ws, 512, "every working-set page dirtied");
    assert_eq!(dirty.count_ones(), 512, "and nothing else");
    assert_eq!(layout.total_pages(), MEM / 4096);

    let dst = TestVm::destination(MEM, 4096, None).expect("destination VM");
    let (_, report) = migrate_in_process(&src, &dst, Precopy::default());
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap()
    );
    let last = src.reports().last().unwrap().value;
    assert!(eventually(|| !dst.reports().is_empty()));
    assert_eq!(dst.reports()[0].value, last + 4096, "the counter continues");
}

#[test]
fn guest_tsc_pacing_holds_the_rate_before_and_after_migration() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let rate = 20_000.0; // pages a second
    let every = 1 << 10;
    let pacing = backend_kvm::Pacing::GuestTsc(rate);
    let src = TestVm::source_paced(MEM, 1, 4096, every, pacing).expect("source VM");
    // Measured over the reports of about one second, once the guest has
    // been over its working set (4 reports) and paid its first touches.
    let measured = |vm: &TestVm| {
        assert!(eventually(|| vm.reports().len() >= 5), "{:?}", vm.fault());
        let start = vm.reports().len();
        assert!(
            eventually(|| vm.reports().len() >= start + 20),
            "{:?}",
            vm.fault()
        );
        let r = vm.reports();
        let (a, b) = (&r[start], &r[start + 19]);
        (b.value - a.value) as f64 / (b.at - a.at).as_secs_f64()
    };
    let before = measured(&src);
    assert!(
        (0.7 * rate..1.3 * rate).contains(&before),
        "{before:.0} pages/s paced to {rate}"
    );
    let dst = TestVm::destination(MEM, every, None).expect("destination VM");
    migrate_in_process(&src, &dst, Precopy::default());
    let after = measured(&dst);
    assert!(
        (0.7 * rate..1.3 * rate).contains(&after),
        "{after:.0} pages/s after migration, paced to {rate}"
    );
}

/// Dropping a running VM ends and joins each vCPU thread before the
/// memory goes: afterwards no thread is left, no `KVM_RUN` is made, and no
/// vCPU met a shutdown (the triple fault a guest takes when its memory
/// vanishes under it).
fn drop_while_running(vm: TestVm) {
    let watch = vm.watch();
    assert!(
        watch.iter().all(|w| w.record().entries > 0),
        "the guest ran"
    );
    drop(vm);
    let after: Vec<_> = watch.iter().map(|w| w.record()).collect();
    for (w, r) in watch.iter().zip(&after) {
        assert!(r.ended, "the vCPU thread ended before drop returned");
        assert_eq!(r.shutdowns, 0, "no triple fault");
        assert_eq!(w.fault(), None);
    }
    // Nothing enters the guest later either.
    std::thread::sleep(Duration::from_millis(20));
    let later: Vec<_> = watch.iter().map(|w| w.record()).collect();
    assert_eq!(after, later);
}

#[test]
fn dropping_a_running_vm_stops_its_vcpus_before_its_memory_goes() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let vm = TestVm::source_smp(MEM, 2, 4096, 1 << 12, None).expect("source VM");
    assert!(eventually(
        || vm.reports_of(0).len() >= 2 && vm.reports_of(1).len() >= 2
    ));
    drop_while_running(vm);
}

#[test]
fn dropping_a_vm_whose_guest_never_exits_returns() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let vm = TestVm::compute(MEM).expect("compute VM");
    assert!(eventually(|| vm.watch()[0].record().entries > 0));
    drop_while_running(vm);
}

#[test]
fn pause_kicks_a_guest_that_never_exits() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let vm = TestVm::compute(MEM).expect("compute VM");
    let mut c = vm.control();
    let mut last = 0;
    for _ in 0..20 {
        // The guest makes progress between pauses: wait until it has.
        assert!(eventually(|| {
            c.pause().unwrap();
            let now = rcx(&vm);
            let moved = now > last;
            last = now;
            c.resume().unwrap();
            moved
        }));
    }
    c.pause().unwrap();
    assert!(vm.reports().is_empty(), "the guest never left on its own");
    assert!(vm.fault().is_none(), "{:?}", vm.fault());
}

/// Whether the host offers transparent huge pages to `madvise`.
fn host_has_thp() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| !s.contains("[never]"))
        .unwrap_or(false)
}

/// `AnonHugePages` of the mapping that holds `addr`, in KiB.
fn anon_huge_kib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    0
}

#[test]
fn huge_pages_back_guest_memory_and_the_dirty_log_stays_exact_per_page() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    // The guest writes 4,096 pages from 1 MiB: 16 MiB of first touches.
    let vm = TestVm::source(MEM, 4096, 1 << 12, None).expect("source VM");
    assert!(eventually(|| vm.reports().len() >= 3), "{:?}", vm.fault());
    let host = {
        use vm_memory::GuestMemoryBackend;
        let m = vm.memory();
        let r = m.guest_memory().iter().next().unwrap();
        r.as_ptr() as u64
    };
    let thp_kib = anon_huge_kib(host + (9 << 20));
    println!("guest memory at {host:#x}: AnonHugePages {thp_kib} kB");
    if host_has_thp() {
        assert!(
            thp_kib >= 2048,
            "the touched working set sits on transparent huge pages"
        );
    } else {
        println!("this host offers no transparent huge pages: the 4 KiB half of the test only");
    }
    // Now the guest writes three pages in the middle of that huge-page
    // backed range, with dirty logging on: exactly those three come back.
    let mut c = vm.control();
    c.pause().unwrap();
    vm.runners()[0].with_vcpu(|fd| {
        let mut r = fd.get_regs().unwrap();
        r.rdi = 9 << 20;
        r.rsi = 3;
        fd.set_regs(&r).unwrap();
    });
    let layout = vm.pages().layout().clone();
    let mut t = vm.tracker();
    t.start().unwrap();
    let before = vm.reports().len();
    c.resume().unwrap();
    assert!(eventually(|| vm.reports().len() >= before + 2));
    c.pause().unwrap();
    let mut dirty = DirtyBitmap::new(layout.page_end());
    t.collect_and_clear(&mut dirty).unwrap();
    t.stop().unwrap();
    let first = (9u64 << 20) >> 12;
    let got: Vec<u64> = (0..layout.page_end()).filter(|p| dirty.get(*p)).collect();
    assert_eq!(
        got,
        vec![first, first + 1, first + 2],
        "4 KiB pages, not 2 MiB ones"
    );
}

#[test]
fn a_paused_vcpu_has_completed_its_last_port_write() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    // A report on every iteration: nearly every pause lands right after
    // an `out` exit, which KVM completes only on the next entry.
    let vm = TestVm::source(MEM, 16, 1, None).expect("source VM");
    assert!(eventually(|| vm.reports().len() >= 100), "{:?}", vm.fault());
    let out_at = backend_kvm::PAYLOAD_ADDR + 0x1f;
    let mut c = vm.control();
    for _ in 0..50 {
        c.pause().unwrap();
        let (rip, rcx) = vm.runners()[0].with_vcpu(|fd| {
            let r = fd.get_regs().unwrap();
            (r.rip, r.rcx)
        });
        assert_ne!(rip, out_at, "the saved state would run the `out` again");
        // The last report is the counter as the guest stands: a
        // destination resumed from here does not report it twice.
        let last = vm.reports().last().unwrap().value;
        assert!(rcx >= last, "counter {rcx}, last report {last}");
        c.resume().unwrap();
    }
}

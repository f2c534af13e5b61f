//! Real-KVM migrations between two processes: the test binary runs
//! itself again as the destination.

mod common;

use backend_kvm::{KvmFaults, TestVm};
use backend_sim::{Fault, FaultAt, FaultPlan, FaultyTransport};
use common::*;
use migrate_core::digest::digest_memory;
use migrate_core::driver::{
    run_destination, run_destination_recoverable, run_source, run_source_recoverable,
};
use migrate_core::protocol::RecordType;
use migrate_core::transport::Transport;
use migrate_core::transport::{accept_within, StreamTransport, TransportError};
use migrate_core::{Clock, PageSource, Policy, Precopy, StopAndCopy, SystemClock};
use migrate_core::{DestinationEngine, EngineConfig, SourceEngine};
use migrate_core::{DirtyBitmap, Hybrid, HybridConfig, PostCopy, PrecopyConfig};
use migrate_core::{MigrationStats, MultiTransport};
use std::sync::Arc;
use std::time::Duration;

/// Set (to the source's address) in the destination process of the
/// two-process tests.
const DEST_ENV: &str = "LIVEMIG_KVM_DESTINATION";
/// Set (to the payload's report interval) with `DEST_ENV`.
const EVERY_ENV: &str = "LIVEMIG_KVM_REPORT_EVERY";
/// Set (to the payload's pages a second, 0 for no limit) with `DEST_ENV`.
const RATE_ENV: &str = "LIVEMIG_KVM_RATE";
/// Set with `DEST_ENV` when the destination is to recover a post-copy
/// whose connection breaks (it dials the source again).
const RECOVER_ENV: &str = "LIVEMIG_KVM_RECOVER";

/// Set with `DEST_ENV` when the destination dials a preempt connection
/// besides a control and a data connection.
const PREEMPT_ENV: &str = "LIVEMIG_KVM_PREEMPT";

/// Set with `DEST_ENV` when the destination's driver is to be held inside
/// the first push frame after the resume until a requested page is
/// placed without it (or two minutes pass).
const HOLD_ENV: &str = "LIVEMIG_KVM_HOLD";

/// Holds the destination's driver inside the first page batch it receives
/// after the post-copy device state, until the guest's memory has fewer
/// pages missing than when it was held: only the preempt connection's
/// thread places pages then. `placed` says whether that happened.
struct Held {
    inner: Box<dyn Transport>,
    memory: Arc<backend_kvm::KvmMemory>,
    resumed: bool,
    placed: Arc<std::sync::Mutex<Option<bool>>>,
}

impl Transport for Held {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<bytes::Bytes>, TransportError> {
        let f = self.inner.recv(timeout)?;
        match f.as_ref().and_then(|f| f.first().copied()) {
            Some(t) if t == RecordType::DeviceState as u8 => self.resumed = true,
            Some(t)
                if t == RecordType::PageBatch as u8
                    && self.resumed
                    && self.placed.lock().unwrap().is_none() =>
            {
                let before = self.memory.missing_pages();
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while self.memory.missing_pages() >= before && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                *self.placed.lock().unwrap() = Some(self.memory.missing_pages() < before);
            }
            _ => {}
        }
        Ok(f)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_send_timeout(timeout)
    }
    fn close(&mut self) {
        self.inner.close()
    }
    fn preempt_link(&self) -> Option<migrate_core::transport::PreemptLink> {
        self.inner.preempt_link()
    }
    fn serve_preempt(&mut self, serve: migrate_core::transport::PreemptServe) -> bool {
        self.inner.serve_preempt(serve)
    }
}

/// How long either side waits for a new connection.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

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
    let preempt = std::env::var_os(PREEMPT_ENV).is_some();
    let dial = |addr: &str| -> Result<Box<dyn Transport>, TransportError> {
        if preempt {
            let t = MultiTransport::connect_preempt(1, || std::net::TcpStream::connect(addr))?;
            Ok(Box::new(t))
        } else {
            Ok(Box::new(StreamTransport::connect_tcp(addr)?))
        }
    };
    let mut t = dial(&addr).expect("connect");
    let placed_held = Arc::new(std::sync::Mutex::new(None));
    if std::env::var_os(HOLD_ENV).is_some() {
        t = Box::new(Held {
            inner: t,
            memory: vm.memory(),
            resumed: false,
            placed: placed_held.clone(),
        });
    }
    let mut e = DestinationEngine::new(vm.pages(), vm.control(), clock.clone());
    let mut faults = KvmFaults::start(&vm.memory(), &vm.control(), clock).expect("fault handler");
    let report = if std::env::var_os(RECOVER_ENV).is_some() {
        // The guest runs on while the link is down; its vCPUs that touch
        // a missing page wait in userfaultfd until the page arrives.
        e.set_recover_timeout(Some(RECOVER_TIMEOUT));
        let mut again = |_left: Duration| dial(&addr);
        run_destination_recoverable(&mut e, &mut t, Some(&mut faults), &mut again, TIMEOUT)
    } else {
        run_destination(&mut e, &mut t, Some(&mut faults), TIMEOUT)
    }
    .expect("destination");
    assert_eq!(vm.memory().missing_pages(), 0);
    assert!(
        eventually(|| vm.reports().len() >= 3),
        "the migrated guest runs"
    );
    let r = vm.reports();
    let pc = report.postcopy.unwrap_or_default();
    let held = match *placed_held.lock().unwrap() {
        Some(true) => "placed-while-held",
        Some(false) => "not-placed-while-held",
        None => "not-held",
    };
    println!(
        "DESTINATION {} {} {} {} {} {} {} {held}",
        report.digest.unwrap(),
        r[0].value,
        vm.fault().is_none(),
        pc.faults,
        pc.duplicates,
        report.recoveries,
        report.preempt_pages
    );
}

/// Migrates the payload (dirtying a 16 MiB working set at `rate` pages a
/// second, or as fast as it can, and reporting every `every` pages) to a
/// destination process with `policy`. With `cut`, post-copy recovery is
/// on and the connection is cut instead of sending that page batch of
/// the push; the migration must go on over a new one.
fn between_processes<P: Policy + 'static>(
    policy: P,
    every: u64,
    rate: Option<f64>,
    slow: bool,
    cut: Option<usize>,
) -> MigrationStats {
    between_processes_with(policy, every, rate, slow, cut, false, false)
}

/// [`between_processes`], with `preempt`: over a control, a data and a
/// preempt connection, the source sending requested pages on the last.
fn between_processes_with<P: Policy + 'static>(
    policy: P,
    every: u64,
    rate: Option<f64>,
    slow: bool,
    cut: Option<usize>,
    preempt: bool,
    hold: bool,
) -> MigrationStats {
    let _turn = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    if cut.is_some() {
        child.env(RECOVER_ENV, "1");
    }
    if preempt {
        child.env(PREEMPT_ENV, "1");
    }
    if hold {
        child.env(HOLD_ENV, "1");
    }
    let child = child
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
    let per_frame = if slow { SLOW } else { Duration::ZERO };
    // The cut: the connection is dropped (both directions, as a failed
    // link or a killed proxy would) instead of sending that page batch
    // of the push, the n-th after the post-copy device state.
    let link = |s, cut: Option<usize>| {
        let plan = cut.map(|nth| {
            let at = FaultAt::NthOfTypeAfter {
                after: RecordType::DeviceState as u8,
                ty: RecordType::PageBatch as u8,
                nth,
            };
            FaultPlan::new(Fault::Cut, at)
        });
        let slow = Slow {
            inner: s,
            per_frame,
        };
        FaultyTransport::new(slow, plan)
    };
    // The destination dials: one connection, or a set with a preempt
    // connection.
    let take = |left: Duration| -> Result<Box<dyn Transport>, TransportError> {
        if preempt {
            let t = MultiTransport::accept(|| {
                accept_within(&listener, left).map_err(std::io::Error::other)
            })?;
            assert!(t.has_preempt());
            Ok(Box::new(t))
        } else {
            Ok(Box::new(StreamTransport::new(accept_within(
                &listener, left,
            )?)?))
        }
    };
    let mut t = link(take(TIMEOUT).unwrap(), cut);
    let mut config = EngineConfig::default();
    config.recover_timeout = cut.map(|_| RECOVER_TIMEOUT);
    config.postcopy_preempt = preempt;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        clock,
        config,
    );
    let stats = if cut.is_some() {
        let mut again =
            |left: Duration| -> Result<_, TransportError> { Ok(link(take(left)?, None)) };
        run_source_recoverable(&mut e, &mut t, &mut again, TIMEOUT)
    } else {
        run_source(&mut e, &mut t, TIMEOUT)
    }
    .expect("source");
    drop(t);
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
        if cut.is_some() {
            // Faults outstanding at the cut are asked for again.
            assert!(
                pc.requests >= faults,
                "{} requests, {faults} faults",
                pc.requests
            );
        } else {
            assert_eq!(pc.requests, faults, "each fault was one request");
        }
        let duplicates: u64 = f[5].parse().unwrap();
        let preempt_pages: u64 = f[7].parse().unwrap();
        if preempt {
            // Requested pages went on the preempt connection; those the
            // push had sent already arrived twice, the second not placed.
            assert!(pc.requests > 0, "the resumed guest faulted on absent pages");
            assert_eq!(
                pc.preempt_pages, pc.requests,
                "each request on the preempt connection"
            );
            assert_eq!(preempt_pages, pc.preempt_pages, "and each arrived");
            if cut.is_none() {
                assert_eq!(duplicates, pc.pages - stats.guest_pages);
            }
        } else {
            assert_eq!(duplicates, 0, "no page placed twice");
            assert_eq!((preempt_pages, pc.preempt_pages), (0, 0));
        }
        if hold {
            assert_eq!(
                f[8], "placed-while-held",
                "a requested page placed while the destination's driver was held"
            );
        }
        let recoveries: u32 = f[6].parse().unwrap();
        let expected = u32::from(cut.is_some());
        assert_eq!(pc.recoveries, expected, "recoveries on the source");
        assert_eq!(recoveries, expected, "recoveries on the destination");
    } else {
        assert!(cut.is_none(), "a cut test must switch to post-copy");
    }
    stats
}

#[test]
fn precopy_between_two_processes() {
    if have_kvm() {
        let stats = between_processes(Precopy::default(), 1 << 10, Some(20_000.0), false, None);
        assert!(stats.postcopy.is_none());
    }
}

#[test]
fn stop_and_copy_between_two_processes() {
    if have_kvm() {
        between_processes(StopAndCopy, 1 << 10, Some(20_000.0), false, None);
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
            None,
        );
    }
}

#[test]
fn postcopy_between_two_processes_sends_each_page_once() {
    if have_kvm() {
        let stats = between_processes(PostCopy::default(), 1 << 10, Some(20_000.0), true, None);
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

/// Post-copy over a control, a data and a preempt connection (the push
/// slowed), the destination's driver `held` inside the first push frame
/// after the resume or not: memory verifies, and every page a fault
/// asked for went on the preempt connection, was placed once, and its
/// fault latency measured.
fn postcopy_with_a_preempt_connection(held: bool) {
    if have_kvm() {
        let stats = between_processes_with(
            PostCopy::default(),
            1 << 10,
            Some(20_000.0),
            true,
            None,
            true,
            held,
        );
        let pc = stats.postcopy.expect("a post-copy migration");
        assert!(pc.preempt_pages > 0 && pc.preempt_bytes > 0);
        assert!(pc.fault_latency_p50 > Duration::ZERO);
    }
}

/// Post-copy with a preempt connection: requests and requested pages
/// ahead of the push.
#[test]
fn postcopy_between_two_processes_with_a_preempt_connection() {
    postcopy_with_a_preempt_connection(false);
}

/// Post-copy with a preempt connection, the destination's driver held
/// inside the first push frame after the resume: the guest's faults are
/// still answered, each requested page placed by the preempt
/// connection's thread (`UFFDIO_COPY`), which wakes the vCPU.
#[test]
fn postcopy_between_two_processes_places_requested_pages_while_the_destination_driver_is_held() {
    postcopy_with_a_preempt_connection(true);
}

/// Hybrid with two pre-copy rounds and a 1 µs downtime target, which
/// then switches to post-copy. Its changes to [`Hybrid`]: where Hybrid
/// would stop and copy because nothing is left, it switches to post-copy
/// all the same; and it switches only once at least [`MIN_PUSH`] pages
/// are pending, running more pre-copy rounds until the guest has written
/// that many. A guest that got little CPU during a round (a loaded host
/// can cause it) dirtied few pages; waiting for its writes, not for
/// time, gives the post-copy push enough batches for the cut tests on
/// any host.
struct ForcedHybrid(Hybrid);

/// Pages pending at the switch to post-copy: 16 batches of the push.
const MIN_PUSH: u64 = 256;

fn forced_hybrid() -> ForcedHybrid {
    ForcedHybrid(Hybrid::new({
        let mut v = HybridConfig::default();
        v.precopy = {
            let mut v = PrecopyConfig::default();
            v.max_rounds = 2;
            v.downtime_target = Duration::from_micros(1);
            v
        };
        v
    }))
}

impl Policy for ForcedHybrid {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn decide(&mut self, input: &migrate_core::PolicyInput<'_>) -> migrate_core::Decision {
        use migrate_core::{Decision, PageSelection};
        match self.0.decide(input) {
            Decision::StopAndCopy(_) | Decision::PostCopy(_) if input.pending_pages < MIN_PUSH => {
                Decision::Precopy(PageSelection::AllPending)
            }
            Decision::StopAndCopy(r) => Decision::PostCopy(r),
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
        let stats = between_processes(forced_hybrid(), 1 << 16, None, false, None);
        assert!(stats.postcopy.is_some(), "{:?}", stats.switch_reason);
        assert!(stats.rounds.len() >= 2, "pre-copy rounds came first");
    }
}

#[test]
fn postcopy_between_two_processes_recovers_from_a_cut_mid_push() {
    if have_kvm() {
        // 1,024 batches in all; the link goes after 300 of them.
        let stats = between_processes(
            PostCopy::default(),
            1 << 10,
            Some(20_000.0),
            true,
            Some(300),
        );
        let pc = stats.postcopy.expect("a post-copy migration");
        println!(
            "recovered: {} pages missing at the cut sent over the new connection, {:?} from the cut to the destination's answer, total {:?}",
            pc.recovered_pages, pc.recovery_time, stats.total_time
        );
        assert!(pc.recovered_pages > 0 && pc.recovered_pages < stats.guest_pages);
        assert!(pc.recovery_time > Duration::ZERO);
    }
}

#[test]
fn hybrid_between_two_processes_recovers_from_a_cut_mid_push() {
    if have_kvm() {
        // The guest dirties its 16 MiB as fast as it can: the push after
        // the switch has what it dirtied in the last round (thousands of
        // pages on an idle host, far fewer on a loaded one); the link goes
        // at the third batch (48 pages).
        let stats = between_processes(forced_hybrid(), 1 << 16, None, true, Some(3));
        assert!(stats.rounds.len() >= 2, "pre-copy rounds came first");
        assert_eq!(stats.postcopy.expect("post-copy").recoveries, 1);
    }
}

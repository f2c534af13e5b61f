//! What the real-KVM tests share: a lock so that guests spinning at full
//! speed take turns, waiting for a guest's progress, whether this host
//! has KVM, migrating between two test VMs, and transports that cut or
//! slow a connection.
//!
//! These tests need `/dev/kvm`. Without it they fail, unless the
//! environment sets `LIVEMIG_NO_KVM=1` to say, explicitly, that this
//! machine has no KVM (CI does not set it).

// Each test binary uses a part of what is here.
#![allow(dead_code, unused_imports)]

use backend_kvm::{DirtyLog, KvmFaults, Pacing, TestVm};
use bytes::Bytes;
use migrate_core::conformance::{check_dirty_tracker, check_page_roundtrip, Precision};
use migrate_core::digest::digest_memory;
use migrate_core::driver::{run_destination, run_source};
use migrate_core::transport::{channel_pair, Transport, TransportError};
use migrate_core::MigrationStats;
use migrate_core::{
    Clock, GuestControl, MigrationError, PageSource, Policy, Precopy, StopAndCopy, SystemClock,
};
use migrate_core::{DestinationEngine, DestinationReport, EngineConfig, SourceEngine};
use migrate_core::{DirtyBitmap, DirtyTracker, Hybrid, HybridConfig, PostCopy, PrecopyConfig};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const MEM: u64 = 64 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The tests' guests spin at full speed; on a two-core machine they take
/// turns rather than starve one another.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a test waits for a guest to make progress. Generous: a host
/// with slow page faults and another process competing for the CPU may
/// take seconds where an idle one takes milliseconds. A test that waits
/// this long has failed; one that passes waits only as long as it must.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Waits until `cond` holds, at most [`PATIENCE`].
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

pub fn have_kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("LIVEMIG_NO_KVM").as_deref() == Ok("1") {
        eprintln!("LIVEMIG_NO_KVM=1: this machine declares it has no KVM; test not run");
        return false;
    }
    panic!("/dev/kvm not found (set LIVEMIG_NO_KVM=1 only on a machine known to have no KVM)");
}

pub fn rcx(vm: &TestVm) -> u64 {
    vm.runners()[0].with_vcpu(|fd| fd.get_regs().unwrap().rcx)
}

/// Runs the source side of a migration of `src` over `t`; it must succeed.
pub fn source_side<P: Policy>(
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
pub fn migrate_in_process<P: Policy>(
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
        run_destination(&mut e, &mut t, None, TIMEOUT)
    });
    let stats = source_side(src, policy, clock, a);
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified && report.resume_confirmed);
    (stats, report)
}

pub fn migrate<P: Policy + 'static>(policy: P) {
    migrate_logged(policy, DirtyLog::Bitmap);
}

pub fn migrate_logged<P: Policy + 'static>(policy: P, log: DirtyLog) {
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

/// Cuts the connection after `left` frames.
pub struct Cut<T: Transport> {
    pub inner: Option<T>,
    pub left: usize,
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
pub struct Slow<T: Transport> {
    pub inner: T,
    pub per_frame: Duration,
}

impl<T: Transport> Transport for Slow<T> {
    /// Pages a fault asked for on a preempt connection are not held up.
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if frame.first() != Some(&(migrate_core::protocol::RecordType::RequestedPages as u8)) {
            std::thread::sleep(self.per_frame);
        }
        self.inner.send(frame)
    }
    /// The preempt connection's own frames are not held up either: they
    /// are served on its thread.
    fn preempt_link(&self) -> Option<migrate_core::transport::PreemptLink> {
        self.inner.preempt_link()
    }
    fn serve_preempt(&mut self, serve: migrate_core::transport::PreemptServe) -> bool {
        self.inner.serve_preempt(serve)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        self.inner.recv(timeout)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_send_timeout(timeout)
    }
    fn close(&mut self) {
        self.inner.close()
    }
}

/// 300 µs a frame: about 0.3 s for the 1,024 frames of 64 MiB, time
/// enough for the resumed guest to be scheduled and fault even on a
/// loaded host.
pub const SLOW: Duration = Duration::from_micros(300);

/// A running source (dirtying 16 MiB as fast as it can) and a post-copy
/// destination.
pub fn postcopy_pair() -> (TestVm, TestVm) {
    let src = TestVm::source(MEM, 4096, 1 << 16, None).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 10));
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    dst.memory().enable_postcopy().expect("userfaultfd");
    (src, dst)
}

/// The destination's result, whether it resumed, whether it completed.
pub type DestEnd = (Result<DestinationReport, MigrationError>, bool, bool);

/// Runs `dst` as a post-copy destination over `t` on its own thread.
pub fn postcopy_destination(
    dst: &TestVm,
    clock: Arc<dyn Clock>,
    t: impl Transport + 'static,
) -> std::thread::JoinHandle<DestEnd> {
    let (dp, dc, mem, control) = (dst.pages(), dst.control(), dst.memory(), dst.control());
    std::thread::spawn(move || {
        let mut t = t;
        let mut e = DestinationEngine::new(dp, dc, clock.clone());
        let mut faults = KvmFaults::start(&mem, &control, clock).expect("fault handler");
        let r = run_destination(&mut e, &mut t, Some(&mut faults), TIMEOUT);
        (r, e.resumed(), e.completed())
    })
}

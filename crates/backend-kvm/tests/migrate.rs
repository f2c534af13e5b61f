//! Real-KVM migrations in one process: each policy moving a running
//! guest, a cut connection, post-copy, and a guest with two vCPUs.

mod common;

use backend_kvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use backend_kvm::{DirtyLog, TestVm};
use common::*;
use migrate_core::conformance::check_page_roundtrip;
use migrate_core::digest::digest_memory;
use migrate_core::driver::{run_destination, run_source};
use migrate_core::transport::{channel_pair, TransportError};
use migrate_core::PostCopy;
use migrate_core::{
    Clock, GuestControl, MigrationError, PageSource, Precopy, StopAndCopy, SystemClock,
};
use migrate_core::{DestinationEngine, EngineConfig, SourceEngine};
use std::sync::Arc;

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
        (run_destination(&mut e, &mut t, None, TIMEOUT), e.resumed())
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

/// Notes the pages a migration reads from its source.
struct CountingReads {
    inner: backend_kvm::KvmPages,
    read: std::collections::BTreeSet<migrate_core::PageNum>,
}

impl PageSource for CountingReads {
    fn layout(&self) -> &migrate_core::MemoryLayout {
        self.inner.layout()
    }
    fn read_pages(
        &mut self,
        pages: &[migrate_core::PageNum],
        out: &mut [u8],
    ) -> Result<(), migrate_core::BackendError> {
        self.read.extend(pages);
        self.inner.read_pages(pages, out)
    }
    fn known_zero(
        &mut self,
        pages: &[migrate_core::PageNum],
        zero: &mut [bool],
    ) -> Result<(), migrate_core::BackendError> {
        self.inner.known_zero(pages, zero)
    }
}

/// Pages of this process populated in `len` bytes from host address
/// `addr` (present or swapped, from `/proc/self/pagemap`).
fn populated(addr: u64, len: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut raw = vec![0u8; (len / 4096 * 8) as usize];
    f.read_exact_at(&mut raw, addr / 4096 * 8).unwrap();
    raw.chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 62 != 0)
        .count() as u64
}

/// A guest that touched little of its memory: the pages the host never
/// populated are sent as zero pages without being read, the destination
/// leaves them unpopulated, and both memories digest alike.
#[test]
fn untouched_memory_is_neither_read_nor_populated() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let src = TestVm::source(MEM, 16, 1 << 16, None).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 10));
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (mut a, b) = channel_pair(8);
    let (dp, dc, c2) = (dst.pages(), dst.control(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = b;
        let mut e = DestinationEngine::new(dp, dc, c2);
        run_destination(&mut e, &mut t, None, TIMEOUT)
    });
    let mut counting = CountingReads {
        inner: src.pages(),
        read: Default::default(),
    };
    let stats = {
        let mut e = SourceEngine::new(
            src.tracker(),
            &mut counting,
            src.control(),
            StopAndCopy,
            clock,
            EngineConfig::default(),
        );
        run_source(&mut e, &mut a, TIMEOUT).expect("source")
    };
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified && report.resume_confirmed);
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap()
    );
    let total = layout.total_pages();
    let region = |vm: &TestVm| {
        let m = vm.memory();
        let r = m.guest_memory().iter().next().unwrap();
        (r.as_ptr() as u64, r.len())
    };
    let (src_at, src_len) = region(&src);
    let (dst_at, dst_len) = region(&dst);
    let on_source = populated(src_at, src_len);
    let on_dest = populated(dst_at, dst_len);
    let read = counting.read.len() as u64;
    println!(
        "{total} pages: {read} read, {on_source} populated on the source, {on_dest} on the destination"
    );
    // The guest's code, stack and 16-page working set (in huge pages
    // where the host backs memory with them) are a small part of it.
    assert!(read < total / 2, "{read} of {total} pages read");
    assert!(read <= on_source, "read pages the host never populated");
    assert!(
        on_dest < total / 2,
        "{on_dest} of {total} pages populated on the destination"
    );
}

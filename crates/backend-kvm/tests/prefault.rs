//! The destination populates, ahead of their data and off the thread that
//! places pages, exactly the pages the source says will arrive; without
//! the prefault (turned off, post-copy, an old kernel) pages are
//! populated where they are written, and migrations verify either way.

mod common;

use backend_kvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use backend_kvm::{PrefaultUnavailable, TestVm};
use common::*;
use migrate_core::digest::digest_memory;
use migrate_core::{MigrationStats, PageSource, StopAndCopy};
use std::collections::BTreeSet;

/// Test VMs without transparent huge pages while it lives (a huge page
/// populates 512 pages at once, and these tests count pages).
struct SmallPages;

impl SmallPages {
    fn new() -> Self {
        TestVm::use_huge_pages(false);
        SmallPages
    }
}

impl Drop for SmallPages {
    fn drop(&mut self) {
        TestVm::use_huge_pages(true);
    }
}

/// The guest pages (page numbers from guest address 0) of `vm`'s one
/// region that are populated (present or swapped) in this process.
fn populated(vm: &TestVm) -> BTreeSet<u64> {
    use std::os::unix::fs::FileExt;
    let m = vm.memory();
    let r = m.guest_memory().iter().next().unwrap();
    let (addr, len) = (r.as_ptr() as u64, r.len());
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut raw = vec![0u8; (len / 4096 * 8) as usize];
    f.read_exact_at(&mut raw, addr / 4096 * 8).unwrap();
    raw.chunks_exact(8)
        .enumerate()
        .filter(|(_, e)| u64::from_le_bytes((*e).try_into().unwrap()) >> 62 != 0)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Stop-and-copies a 64 MiB guest with a 4 MiB working set into a fresh
/// destination, prefaulting or not; checks that the memories digest
/// alike. Returns both VMs, the pages populated on the source before the
/// migration, and the statistics.
fn migrate_small_guest(prefault: bool) -> (TestVm, TestVm, BTreeSet<u64>, MigrationStats) {
    let src = TestVm::source(MEM, 1024, 1 << 16, None).expect("source VM");
    assert!(eventually(|| src.reports().len() >= 10));
    let on_source_before = populated(&src);
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    dst.memory().set_prefault(prefault);
    let (stats, report) = migrate_in_process(&src, &dst, StopAndCopy);
    let layout = src.pages().layout().clone();
    assert_eq!(
        digest_memory(&mut src.pages(), &layout).unwrap(),
        report.digest.unwrap()
    );
    (src, dst, on_source_before, stats)
}

/// Asks a fresh destination to prefault two ranges: exactly their pages
/// become populated, the rest of memory stays as it was, and a range
/// outside guest memory is refused.
#[test]
fn prefault_populates_exactly_the_ranges_asked_for() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let _small = SmallPages::new();
    let dst = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    let before = populated(&dst);
    let mem = dst.memory();
    mem.prefault(&[(100, 20), (4000, 1)]).expect("prefault");
    assert!(mem.wait_prefault(PATIENCE));
    let report = mem.prefault_report();
    println!("{report:?}");
    let asked: BTreeSet<u64> = (100..120).chain([4000]).collect();
    let after = populated(&dst);
    match &report.unavailable {
        None => {
            assert_eq!((report.requested_pages, report.populated_pages), (21, 21));
            let expect: BTreeSet<u64> = before.union(&asked).copied().collect();
            assert_eq!(after, expect);
        }
        // A kernel without MADV_POPULATE_WRITE: nothing populated.
        Some(PrefaultUnavailable::Kernel(e)) => {
            eprintln!("this kernel does not prefault: {e}");
            assert_eq!(report.populated_pages, 0);
            assert_eq!(after, before);
        }
        Some(other) => panic!("prefault unavailable: {other}"),
    }
    let pages = MEM / 4096;
    assert!(mem.prefault(&[(pages - 1, 2)]).is_err());
    assert!(mem.prefault(&[(pages, 1)]).is_err());
    assert!(mem.prefault(&[(5, 0)]).is_err());
}

/// A stop-and-copy migration: the source announces the pages it holds,
/// the destination populates exactly those (and no page the source never
/// populated), and memory verifies.
#[test]
fn the_destination_prefaults_exactly_the_pages_the_source_holds() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let _small = SmallPages::new();
    let (src, dst, on_source_before, stats) = migrate_small_guest(true);
    let layout = src.pages().layout().clone();
    let mem = dst.memory();
    assert!(mem.wait_prefault(PATIENCE));
    let prefault = mem.prefault_report();
    let on_source = populated(&src);
    let on_dest = populated(&dst);
    println!(
        "{} pages: {} populated on the source, {} on the destination; {prefault:?}; {} ms",
        layout.total_pages(),
        on_source.len(),
        on_dest.len(),
        stats.total_time.as_millis()
    );
    // The source announced what it held when the migration began.
    let held = (on_source_before.len() as u64)..=(on_source.len() as u64);
    assert!(held.contains(&prefault.requested_pages), "{prefault:?}");
    match &prefault.unavailable {
        None => assert_eq!(prefault.populated_pages, prefault.requested_pages),
        Some(PrefaultUnavailable::Kernel(e)) => {
            eprintln!("this kernel does not prefault: {e}");
            assert_eq!(prefault.populated_pages, 0);
        }
        Some(other) => panic!("prefault unavailable: {other}"),
    }
    // Every page the source held is there; none it never populated is.
    assert!(on_source_before.is_subset(&on_dest));
    let extra: Vec<_> = on_dest.difference(&on_source).collect();
    assert!(
        extra.is_empty(),
        "populated only on the destination: {extra:?}"
    );
    assert!((on_dest.len() as u64) < layout.total_pages() / 2);
}

/// Prefault turned off, and on a post-copy destination: the source still
/// announces its pages, nothing is populated ahead, the pages are placed
/// as they come, and memory verifies.
#[test]
fn without_the_prefault_pages_are_populated_as_they_arrive() {
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let _small = SmallPages::new();
    let (src, dst, _, _) = migrate_small_guest(false);
    let prefault = dst.memory().prefault_report();
    assert_eq!(prefault.unavailable, Some(PrefaultUnavailable::Off));
    assert!(prefault.requested_pages > 0, "{prefault:?}");
    assert_eq!(prefault.populated_pages, 0);
    assert!(populated(&dst).is_subset(&populated(&src)));

    // A post-copy destination: a missing page must fault there, so
    // nothing is populated ahead (and nothing waits on userfaultfd).
    let pc = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    let mem = pc.memory();
    mem.enable_postcopy().expect("post-copy");
    mem.prefault(&[(0, 64)]).expect("prefault");
    assert!(mem.wait_prefault(PATIENCE));
    let r = mem.prefault_report();
    assert_eq!(r.unavailable, Some(PrefaultUnavailable::Postcopy));
    assert_eq!((r.requested_pages, r.populated_pages), (64, 0));
    assert!(populated(&pc).is_empty());
}

/// A post-copy destination places zero pages in runs: every page of the
/// runs is there afterwards and reads as zeros, a page that was present
/// with data is made zero, and pages outside the runs stay absent.
#[test]
fn a_postcopy_destination_places_runs_of_zero_pages() {
    use migrate_core::PageSink;
    if !have_kvm() {
        return;
    }
    let _turn = serial();
    let vm = TestVm::destination(MEM, 1 << 16, None).expect("destination VM");
    let mem = vm.memory();
    mem.enable_postcopy().expect("post-copy");
    let total = mem.layout().total_pages();
    assert_eq!(mem.missing_pages(), total);
    let mut pages = vm.pages();
    pages
        .write_page(5, &[0xa5; 4096])
        .expect("a page with data");
    // Two runs split by the present page 5, a run of one, and a run that
    // crosses a 2 MiB boundary.
    let zeros: Vec<u64> = (0..12).chain([40]).chain(500..530).collect();
    pages.write_zero_pages(&zeros).expect("zero pages placed");
    assert_eq!(mem.missing_pages(), total - zeros.len() as u64);
    let mut buf = vec![0xffu8; zeros.len() * 4096];
    pages
        .read_pages(&zeros, &mut buf)
        .expect("placed pages read");
    assert!(
        buf.iter().all(|b| *b == 0),
        "a placed zero page is not zero"
    );
    let mut one = vec![0u8; 4096];
    assert!(
        pages.read_pages(&[12], &mut one).is_err(),
        "a page outside the runs was placed"
    );
}

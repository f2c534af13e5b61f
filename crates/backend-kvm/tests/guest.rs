//! The test VMM's guests: the multiboot image, TSC pacing, teardown of a
//! running VM, pausing a guest that never exits, and huge pages.

mod common;

use backend_kvm::TestVm;
use common::*;
use migrate_core::digest::digest_memory;
use migrate_core::{DirtyBitmap, DirtyTracker};
use migrate_core::{GuestControl, PageSource, Precopy};
use std::time::Duration;

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

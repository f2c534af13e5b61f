//! The KVM dirty trackers against the core's conformance checks, and the
//! saved guest state against a restore.

mod common;

use backend_kvm::{DirtyLog, Pacing, TestVm};
use common::*;
use migrate_core::conformance::{check_dirty_tracker, Precision};
use migrate_core::{DirtyBitmap, DirtyTracker};
use migrate_core::{GuestControl, PageSource};

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

//! The core's backend conformance suite, run on the simulator.

use backend_sim::{MemoryMode, SimGuest, WorkloadSpec};
use migrate_core::conformance::{check_dirty_tracker, check_page_roundtrip, Precision};
use migrate_core::{Clock, MemoryLayout, PageSink, PageSize, Region, VirtualClock};
use std::sync::Arc;

fn layouts() -> Vec<MemoryLayout> {
    vec![
        MemoryLayout::flat(PageSize::DEFAULT, 4 << 20).unwrap(),
        MemoryLayout::new(
            PageSize::new(512).unwrap(),
            vec![
                Region {
                    first_page: 3,
                    pages: 100,
                },
                Region {
                    first_page: 1000,
                    pages: 37,
                },
            ],
        )
        .unwrap(),
    ]
}

#[test]
fn simulated_tracker_meets_the_contract() {
    for layout in layouts() {
        for mode in [MemoryMode::Bytes, MemoryMode::Compact] {
            let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
            let guest =
                SimGuest::source(layout.clone(), mode, WorkloadSpec::idle(1), clock).unwrap();
            let mut writer = guest.pages();
            let mut tracker = guest.tracker();
            let ps = layout.page_size().get();
            // The VMM writes on the guest's behalf; the tracker must see it.
            let mut write = |p: u64| {
                let mut data = vec![0u8; ps];
                data[..8].copy_from_slice(&p.to_le_bytes());
                data[8..16].copy_from_slice(&1u64.to_le_bytes());
                writer.write_page(p, &data).unwrap();
            };
            check_dirty_tracker(&mut tracker, &layout, Precision::Exact, &mut write)
                .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        }
    }
}

#[test]
fn simulated_memory_moves_every_page_unchanged() {
    for layout in layouts() {
        for mode in [MemoryMode::Bytes, MemoryMode::Compact] {
            let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
            let mut w = WorkloadSpec::idle(5);
            w.zero_fraction = 0.3;
            let src = SimGuest::source(layout.clone(), mode, w.clone(), clock.clone()).unwrap();
            let dst = SimGuest::destination(layout.clone(), mode, w, clock).unwrap();
            check_page_roundtrip(&mut src.pages(), &mut dst.pages())
                .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            assert!(src.same_memory(&dst));
        }
    }
}

/// A device state the source cannot have saved (a write index near 2^55,
/// as a corrupted byte once made) is refused at once, not replayed.
#[test]
fn restoring_an_impossible_state_is_refused_promptly() {
    use migrate_core::{DeviceState, GuestControl};
    let clock: std::sync::Arc<dyn migrate_core::Clock> =
        std::sync::Arc::new(migrate_core::VirtualClock::new());
    let layout =
        migrate_core::MemoryLayout::flat(migrate_core::PageSize::DEFAULT, 1 << 20).unwrap();
    let w = backend_sim::WorkloadSpec::new(backend_sim::WorkloadKind::Uniform, 64, 1000.0, 1);
    let dst = backend_sim::SimGuest::destination(layout, backend_sim::MemoryMode::Bytes, w, clock)
        .unwrap();
    for (index, guest_ns) in [
        (1u64 << 55, 1_000_000_000u64),
        (1 << 55, u64::MAX),
        (5000, 1_000),
    ] {
        let mut data = index.to_le_bytes().to_vec();
        data.extend_from_slice(&guest_ns.to_le_bytes());
        let state = DeviceState {
            format: backend_sim::STATE_FORMAT.into(),
            version: backend_sim::STATE_VERSION,
            data,
        };
        let started = std::time::Instant::now();
        let r = dst.control().restore_state(&state);
        assert!(r.is_err(), "index {index} at {guest_ns} ns restored");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
    // A state the workload does reach is taken.
    let mut data = 10u64.to_le_bytes().to_vec();
    data.extend_from_slice(&1_000_000_000u64.to_le_bytes());
    let state = DeviceState {
        format: backend_sim::STATE_FORMAT.into(),
        version: backend_sim::STATE_VERSION,
        data,
    };
    dst.control().restore_state(&state).unwrap();
}

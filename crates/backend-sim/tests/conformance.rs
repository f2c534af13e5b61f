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

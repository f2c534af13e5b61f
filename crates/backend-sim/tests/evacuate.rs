//! Host evacuation: many migrations on one clock and one shared link.
//! Every migration verifies the destination's memory (checked through
//! `unverified`), the strategies keep their concurrency, the link's
//! bandwidth bounds the time to empty, and byte-accurate and model memory
//! give the same outcome guest by guest.

use backend_sim::{
    evacuate, EvacConfig, EvacGuest, EvacReport, Link, MemoryMode, PolicyFactory, Strategy,
    WorkloadKind, WorkloadSpec,
};
use migrate_core::{Hybrid, Policy, PostCopy, Precopy};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn guests() -> Vec<EvacGuest> {
    (0..6u64)
        .map(|i| {
            let memory = (8 + 8 * (i % 3)) * MIB;
            let kind = if i.is_multiple_of(2) {
                WorkloadKind::Zipf { exponent: 1.0 }
            } else {
                WorkloadKind::Uniform
            };
            let mut workload =
                WorkloadSpec::new(kind, memory / 4096 / 4, 2000.0 * (1 + i) as f64, 40 + i);
            workload.zero_fraction = 0.1;
            EvacGuest::new(memory, workload)
        })
        .collect()
}

fn run(
    strategy: Strategy,
    mode: MemoryMode,
    policy: PolicyFactory,
    downlinks: usize,
) -> EvacReport {
    let r = evacuate({
        let mut c = EvacConfig::new(
            guests(),
            Link::new(2e9, Duration::from_micros(200)),
            vec![1e9; downlinks],
            strategy,
            2,
            policy,
        );
        c.mode = mode;
        c
    })
    .expect("evacuation");
    assert_eq!(r.guests.len(), 6);
    assert_eq!(r.failed(), 0, "{strategy}: {:?}", r.guests);
    assert_eq!(
        r.unverified(),
        0,
        "{strategy}: a destination's memory differs"
    );
    r
}

fn precopy() -> PolicyFactory {
    Arc::new(|| -> Box<dyn Policy> { Box::new(Precopy::default()) })
}

/// Most migrations running at any instant.
fn most_at_once(r: &EvacReport) -> usize {
    let mut edges: Vec<(Duration, i32)> = r
        .guests
        .iter()
        .flat_map(|g| [(g.started, 1), (g.finished, -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn every_strategy_empties_the_host_within_what_the_link_allows() {
    for strategy in Strategy::all() {
        let r = run(strategy, MemoryMode::Model, precopy(), 2);
        let bound = Duration::from_secs_f64(r.bytes_sent() as f64 * 8.0 / 2e9);
        assert!(
            r.time_to_empty >= bound,
            "{strategy}: faster than the uplink"
        );
        let total: u64 = guests().iter().map(|g| g.memory).sum();
        assert!(r.bytes_sent() > total, "{strategy}: less sent than memory");
        let most = most_at_once(&r);
        match strategy {
            Strategy::OneAtATime => assert_eq!(most, 1),
            Strategy::AllAtOnce => assert!(most > 2, "{strategy}: {most} at once"),
            // fit: one per idle destination, two destinations.
            _ => assert!((1..=2).contains(&most), "{strategy}: {most} at once"),
        }
        assert!(r.downtime_quantile(0.5) <= r.downtime_quantile(0.99));
        assert!(r.downtime_quantile(0.99) <= r.downtime_quantile(1.0));
        assert!(r.downtime_quantile(1.0) > Duration::ZERO);
    }
}

#[test]
fn byte_and_model_memory_give_the_same_evacuation() {
    for strategy in [Strategy::SmallestFirst, Strategy::Fit { margin: 2.0 }] {
        let b = run(strategy, MemoryMode::Bytes, precopy(), 1);
        let m = run(strategy, MemoryMode::Model, precopy(), 1);
        assert_eq!(b.time_to_empty, m.time_to_empty, "{strategy}");
        for (x, y) in b.guests.iter().zip(&m.guests) {
            assert_eq!(x.started, y.started, "{strategy} guest {}", x.guest);
            assert_eq!(x.finished, y.finished, "{strategy} guest {}", x.guest);
            assert_eq!(x.destination, y.destination);
            assert_eq!(x.result.as_ref().ok(), y.result.as_ref().ok());
        }
    }
}

#[test]
fn post_copy_and_hybrid_evacuate_too() {
    let postcopy: PolicyFactory = Arc::new(|| -> Box<dyn Policy> { Box::new(PostCopy::default()) });
    let r = run(Strategy::SmallestFirst, MemoryMode::Bytes, postcopy, 2);
    assert!(r
        .guests
        .iter()
        .all(|g| g.result.as_ref().is_ok_and(|s| s.postcopy.is_some())));
    let hybrid: PolicyFactory = Arc::new(|| -> Box<dyn Policy> { Box::new(Hybrid::default()) });
    run(Strategy::Fit { margin: 2.0 }, MemoryMode::Model, hybrid, 2);
}

#[test]
fn smallest_first_starts_the_smallest_guest_first() {
    let r = run(Strategy::SmallestFirst, MemoryMode::Model, precopy(), 2);
    let mut by_start: Vec<_> = r.guests.iter().collect();
    by_start.sort_by_key(|g| (g.started, g.guest));
    let sizes: Vec<u64> = by_start.iter().map(|g| g.memory).collect();
    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    assert_eq!(sizes, sorted);
}

//! The fast path against the byte path: a guest in model memory moves
//! page models (a version token per page) instead of bytes, and must
//! give the same statistics, bit for bit, as the same guest in
//! byte-accurate memory on the same seed, for every policy.

use backend_sim::{
    simulate, Link, MemoryMode, SimConfig, SimGuest, SimReport, WorkloadKind, WorkloadSpec,
};
use migrate_core::{
    BackendErrorKind, Clock, DestinationEngine, EngineConfig, Hca, Hybrid, MemoryLayout,
    MigrationError, Payload, Policy, PostCopy, Precopy, Prepaging, SourceEngine, SourceStep,
    SourceVerify, StopAndCopy, VirtualClock,
};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn run(
    layout: &MemoryLayout,
    mode: MemoryMode,
    w: &WorkloadSpec,
    policy: Box<dyn Policy>,
    verify: SourceVerify,
) -> SimReport {
    let r = simulate({
        let mut c = SimConfig::new(
            layout.clone(),
            w.clone(),
            Link::new(1e9, Duration::from_micros(500)),
            policy,
        );
        c.mode = mode;
        c.engine = {
            let mut v = EngineConfig::default();
            v.verify = verify;
            v
        };
        c
    })
    .expect("simulated migration");
    assert!(r.stats.memory_verified, "{mode:?}: digest not verified");
    assert!(r.memory_equal, "{mode:?}: memories differ");
    assert_eq!(r.counter_at_pause, r.counter_at_resume, "{mode:?}");
    r
}

type MakePolicy = fn() -> Box<dyn Policy>;

fn policies() -> Vec<(&'static str, MakePolicy)> {
    vec![
        ("precopy", || Box::new(Precopy::default())),
        ("stop-and-copy", || Box::new(StopAndCopy)),
        ("postcopy", || {
            Box::new(PostCopy::new(Prepaging::MultiPivot { k: 7 }))
        }),
        ("postcopy-bubble", || {
            Box::new(PostCopy::new(Prepaging::Bubble { both_ways: true }))
        }),
        ("hybrid", || Box::new(Hybrid::default())),
        ("hca", || Box::new(Hca::default())),
    ]
}

fn assert_same(name: &str, bytes: &SimReport, model: &SimReport) {
    assert_eq!(bytes.stats, model.stats, "{name}: statistics differ");
    assert_eq!(bytes.true_downtime, model.true_downtime, "{name}");
    assert_eq!(bytes.counter_at_pause, model.counter_at_pause, "{name}");
    assert_eq!(bytes.true_faults, model.true_faults, "{name}");
    assert_eq!(bytes.true_stall, model.true_stall, "{name}");
    assert_eq!(bytes.source.fault_log(), model.source.fault_log(), "{name}");
    assert_eq!(
        bytes.destination.fault_log(),
        model.destination.fault_log(),
        "{name}"
    );
    let (b, m) = (&bytes.dest, &model.dest);
    assert_eq!(b.bytes_received, m.bytes_received, "{name}");
    assert_eq!(b.pages_received, m.pages_received, "{name}");
    assert_eq!(b.zero_pages, m.zero_pages, "{name}");
    assert_eq!(b.rounds, m.rounds, "{name}");
    assert_eq!(b.postcopy, m.postcopy, "{name}");
    // The two modes digest different things (bytes, tokens): both matched
    // their source's, which `run` checked.
    assert!(b.digest.is_some() && m.digest.is_some(), "{name}");
}

#[test]
fn model_and_bytes_give_the_same_statistics_for_every_policy() {
    let layout = MemoryLayout::flat(migrate_core::PageSize::DEFAULT, 32 * MIB).unwrap();
    for kind in ["zipf", "hotcold", "uniform", "phased"] {
        for seed in [1, 5] {
            let mut k: WorkloadKind = kind.parse().unwrap();
            if let WorkloadKind::Phased { phase } = &mut k {
                *phase = Duration::from_millis(40);
            }
            let mut w = WorkloadSpec::new(k, 4096, 60_000.0, seed);
            w.zero_fraction = 0.15;
            w.reads_per_write = 1.0;
            w.wss_offset = 700;
            for (name, make) in policies() {
                let name = format!("{kind} seed {seed} {name}");
                let b = run(
                    &layout,
                    MemoryMode::Bytes,
                    &w,
                    make(),
                    SourceVerify::FullScan,
                );
                let m = run(
                    &layout,
                    MemoryMode::Model,
                    &w,
                    make(),
                    SourceVerify::FullScan,
                );
                assert!(b.stats.total_pages_sent >= 8192, "{name}");
                assert_same(&name, &b, &m);
            }
        }
    }
}

#[test]
fn model_and_bytes_agree_on_a_layout_with_a_hole_and_with_sent_content_digests() {
    // 3 GiB below 4 GiB and the rest above: a hole in the GFN space.
    let layout =
        MemoryLayout::pc(migrate_core::PageSize::DEFAULT, 3 * 1024 * MIB + 16 * MIB).unwrap();
    let mut w = WorkloadSpec::new(WorkloadKind::Zipf { exponent: 1.0 }, 2048, 30_000.0, 9);
    w.wss_offset = 3 * 1024 * MIB / 4096 - 1024;
    for (name, make) in policies() {
        let b = run(
            &layout,
            MemoryMode::Compact,
            &w,
            make(),
            SourceVerify::SentContent,
        );
        let m = run(
            &layout,
            MemoryMode::Model,
            &w,
            make(),
            SourceVerify::SentContent,
        );
        assert_same(name, &b, &m);
    }
}

/// Runs a model-payload migration from a source in `src_mode` memory to
/// a destination in `dst_mode` memory, frames handed straight across;
/// returns the first error and both guests.
fn drive(src_mode: MemoryMode, dst_mode: MemoryMode) -> (MigrationError, SimGuest, SimGuest) {
    let layout = MemoryLayout::flat(migrate_core::PageSize::DEFAULT, 4 * MIB).unwrap();
    let c: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    let w = WorkloadSpec::new(WorkloadKind::Uniform, 256, 1000.0, 3);
    let src = SimGuest::source(layout.clone(), src_mode, w.clone(), c.clone()).unwrap();
    let dst = SimGuest::destination(layout, dst_mode, w, c.clone()).unwrap();
    let mut source = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        Precopy::default(),
        c.clone(),
        {
            let mut v = EngineConfig::default();
            v.payload = Payload::Model;
            v
        },
    );
    let mut dest = DestinationEngine::new(dst.pages(), dst.control(), c);
    for _ in 0..10_000 {
        let step = match source.poll() {
            Ok(s) => s,
            Err(e) => return (e, src, dst),
        };
        match step {
            SourceStep::Send(f) => {
                if let Err(e) = dest.handle_frame(&f) {
                    return (e, src, dst);
                }
                while let Some(r) = dest.poll_transmit() {
                    if let Err(e) = source.handle_frame(&r) {
                        return (e, src, dst);
                    }
                }
            }
            SourceStep::Wait | SourceStep::Done => break,
        }
    }
    panic!("the migration did not fail");
}

fn unsupported(e: &MigrationError) -> bool {
    matches!(e, MigrationError::Backend { source, .. } if source.kind == BackendErrorKind::Unsupported)
}

#[test]
fn a_destination_that_holds_bytes_refuses_page_models() {
    let (e, src, dst) = drive(MemoryMode::Model, MemoryMode::Bytes);
    assert!(unsupported(&e), "{e}");
    assert!(dst.resumed_at().is_none(), "the destination resumed");
    assert!(!src.is_paused());
}

#[test]
fn a_source_that_holds_bytes_cannot_send_page_models() {
    let (e, src, dst) = drive(MemoryMode::Bytes, MemoryMode::Model);
    assert!(unsupported(&e), "{e}");
    assert!(!src.is_paused(), "the source guest was left paused");
    assert!(dst.resumed_at().is_none());
}

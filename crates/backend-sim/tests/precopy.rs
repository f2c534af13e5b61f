//! The behaviour of pre-copy and stop-and-copy on the simulated guest.
//! Every migration here checks the destination's memory against the
//! source's (the engine's digest and a byte compare).

use backend_sim::{simulate, Link, MemoryMode, SimConfig, SimReport, WorkloadKind, WorkloadSpec};
use migrate_core::{
    EngineConfig, MemoryLayout, PageSize, Policy, PolicyConfig, PolicyKind, Precopy, PrecopyConfig,
    StopAndCopy, SwitchReason,
};
use std::time::Duration;

const GBIT: f64 = 1e9;

fn run(
    mem: u64,
    mode: MemoryMode,
    workload: WorkloadSpec,
    link: Link,
    policy: Box<dyn Policy>,
) -> SimReport {
    let r = simulate({
        let mut c = SimConfig::new(
            MemoryLayout::flat(PageSize::DEFAULT, mem).unwrap(),
            workload,
            link,
            policy,
        );
        c.mode = mode;
        c
    })
    .expect("simulated migration");
    assert_verified(&r);
    r
}

fn assert_verified(r: &SimReport) {
    assert!(
        r.stats.memory_verified,
        "destination did not verify the digest"
    );
    assert!(
        r.memory_equal,
        "destination memory differs from the source's"
    );
    assert_eq!(r.source.digest(), r.dest.digest.unwrap());
    assert_eq!(
        r.counter_at_pause, r.counter_at_resume,
        "guest progress counter did not carry over"
    );
}

fn uniform(wss_pages: u64, writes_per_sec: f64, seed: u64) -> WorkloadSpec {
    WorkloadSpec::new(WorkloadKind::Uniform, wss_pages, writes_per_sec, seed)
}

#[test]
fn sent_plus_skipped_accounts_for_every_candidate_page() {
    let mem = 256u64 << 20;
    let pages = mem / 4096;
    // 40 MB/s of writes over half of memory on a 1 Gbit/s link.
    let r = run(
        mem,
        MemoryMode::Bytes,
        uniform(pages / 2, 40e6 / 4096.0, 3),
        Link::new(GBIT, Duration::from_millis(1)),
        Box::new(Precopy::default()),
    );
    let rounds = &r.stats.rounds;
    assert!(
        rounds.len() >= 3,
        "expected several rounds, got {}",
        rounds.len()
    );
    assert_eq!(rounds[0].sent + rounds[0].skipped, pages, "round 1");
    assert!(
        rounds[0].skipped > 0,
        "a busy guest has pages skipped in round 1"
    );
    for i in 1..rounds.len() {
        let (prev, cur) = (&rounds[i - 1], &rounds[i]);
        assert_eq!(
            cur.sent + cur.skipped,
            prev.dirtied,
            "round {}: sent + skipped = pages dirtied during round {}",
            cur.round,
            prev.round
        );
    }
    assert_eq!(
        r.stats.total_pages_sent,
        rounds.iter().map(|r| r.sent).sum::<u64>()
    );
}

#[test]
fn idle_guest_needs_one_round_and_an_empty_final_copy() {
    let mem = 64u64 << 20;
    let r = run(
        mem,
        MemoryMode::Bytes,
        WorkloadSpec::idle(1),
        Link::new(GBIT, Duration::from_millis(1)),
        Box::new(Precopy::default()),
    );
    let rounds = &r.stats.rounds;
    assert_eq!(rounds.len(), 2, "one pre-copy round and the final copy");
    assert_eq!(rounds[0].sent, mem / 4096);
    assert_eq!(rounds[0].skipped, 0);
    assert!(rounds[1].final_copy);
    assert_eq!(
        rounds[1].sent, 0,
        "nothing was dirtied, nothing to copy while paused"
    );
    assert_eq!(r.stats.switch_reason, SwitchReason::Converged);
    // Downtime is then little more than a one-way trip of the last records.
    assert!(
        r.stats.downtime < Duration::from_millis(2),
        "{:?}",
        r.stats.downtime
    );
}

#[test]
fn dirty_rate_above_bandwidth_does_not_converge_and_still_verifies() {
    let mem = 128u64 << 20;
    let pages = mem / 4096;
    // 250 MB/s of writes (2 Gbit/s) over all of memory, 1 Gbit/s link:
    // the working set alone takes ~1.1 s to send.
    let r = run(
        mem,
        MemoryMode::Bytes,
        uniform(pages, 250e6 / 4096.0, 5),
        Link::new(GBIT, Duration::from_millis(1)),
        Box::new(Precopy::default()),
    );
    assert!(
        !r.stats.switch_reason.converged(),
        "{:?}",
        r.stats.switch_reason
    );
    assert_eq!(r.stats.switch_reason, SwitchReason::NoProgress);
    assert!(r.stats.to_string().contains("did not converge"));
    assert_eq!(
        serde_json::to_value(&r.stats).expect("statistics as JSON")["converged"],
        false
    );
    // The final copy is most of the working set: far above the target.
    assert!(r.stats.downtime > Duration::from_millis(300));
}

#[test]
fn round_limit_and_transfer_limit_stop_pre_copy() {
    let mem = 64u64 << 20;
    let pages = mem / 4096;
    // Only the limit under test can end pre-copy: no downtime target is
    // met, no round counts as a stall.
    let cfg = {
        let mut v = PrecopyConfig::default();
        v.max_rounds = 3;
        v.downtime_target = Duration::from_nanos(1);
        v.max_transfer_factor = 100.0;
        v.progress_ratio = 2.0;
        v
    };
    let r = run(
        mem,
        MemoryMode::Bytes,
        uniform(pages, 250e6 / 4096.0, 5),
        Link::new(GBIT, Duration::from_millis(1)),
        Box::new(Precopy::new(cfg)),
    );
    assert_eq!(r.stats.switch_reason, SwitchReason::MaxRounds);
    assert_eq!(r.stats.precopy_rounds(), 3);
    let cfg = {
        let mut v = PrecopyConfig::default();
        v.max_transfer_factor = 1.5;
        v.max_rounds = 1000;
        v.downtime_target = Duration::from_nanos(1);
        v.progress_ratio = 2.0;
        v
    };
    let r = run(
        mem,
        MemoryMode::Bytes,
        uniform(pages, 250e6 / 4096.0, 5),
        Link::new(GBIT, Duration::from_millis(1)),
        Box::new(Precopy::new(cfg)),
    );
    assert_eq!(r.stats.switch_reason, SwitchReason::TransferLimit);
    // Pre-copy rounds stayed within the limit; the final copy is what
    // must be sent anyway.
    let precopy_pages: u64 = r
        .stats
        .rounds
        .iter()
        .filter(|r| !r.final_copy)
        .map(|r| r.sent)
        .sum();
    assert!(precopy_pages as f64 <= 1.5 * pages as f64);
    assert!(r.stats.transfer_ratio() > 1.5);
}

#[test]
fn stop_and_copy_downtime_is_memory_over_bandwidth_plus_latency() {
    let mem = 128u64 << 20;
    let latency = Duration::from_millis(5);
    let r = run(
        mem,
        MemoryMode::Bytes,
        uniform(1024, 10_000.0, 2),
        Link::new(GBIT, latency),
        Box::new(StopAndCopy),
    );
    assert_eq!(r.stats.rounds.len(), 1);
    assert_eq!(r.stats.rounds[0].sent, mem / 4096);
    let ideal = Duration::from_secs_f64(mem as f64 * 8.0 / GBIT) + latency;
    let got = r.stats.downtime.as_secs_f64();
    let rel = (got - ideal.as_secs_f64()).abs() / ideal.as_secs_f64();
    // Record headers and page numbers add ~0.2% to the bytes.
    assert!(
        rel < 0.01,
        "downtime {got} s vs ideal {ideal:?} ({:.3}%)",
        rel * 100.0
    );
    // The engine's measurement is the guest's experience.
    let diff = r.stats.downtime.abs_diff(r.true_downtime);
    assert!(
        diff < Duration::from_micros(10),
        "{:?} vs {:?}",
        r.stats.downtime,
        r.true_downtime
    );
    assert_eq!(
        r.stats.downtime_bytes,
        r.stats.transferred - r.stats.precopy_bytes
    );
}

#[test]
fn uniform_writes_shrink_rounds_geometrically() {
    // M pages, dirty rate / bandwidth = λ: round i sends about M·λ^(i-1).
    let mem = 1u64 << 30;
    let m = (mem / 4096) as f64;
    let lambda = 0.05;
    let bw = GBIT;
    let writes = lambda * bw / 8.0 / 4096.0;
    let cfg = {
        let mut v = PrecopyConfig::default();
        v.downtime_target = Duration::from_micros(1);
        v
    };
    let r = run(
        mem,
        MemoryMode::Compact,
        uniform(mem / 4096, writes, 11),
        Link::new(bw, Duration::from_millis(1)),
        Box::new(Precopy::new(cfg)),
    );
    for (i, round) in r.stats.rounds.iter().take(3).enumerate() {
        let expect = m * lambda.powi(i as i32);
        let got = round.sent as f64;
        assert!(
            (got - expect).abs() / expect < 0.10,
            "round {}: sent {got}, expected {expect:.0} ± 10%",
            round.round
        );
    }
}

#[test]
fn same_seed_same_statistics_different_seed_different() {
    let go = |seed| {
        run(
            32 << 20,
            MemoryMode::Bytes,
            {
                let mut c =
                    WorkloadSpec::new(WorkloadKind::Zipf { exponent: 0.8 }, 4096, 20_000.0, seed);
                c.zero_fraction = 0.2;
                c
            },
            Link::new(GBIT, Duration::from_micros(300)),
            Box::new(Precopy::default()),
        )
    };
    let (a, b, c) = (go(9), go(9), go(10));
    assert_eq!(a.stats, b.stats, "same seed must give identical statistics");
    assert_eq!(
        serde_json::to_value(&a.stats).expect("statistics as JSON"),
        serde_json::to_value(&b.stats).expect("statistics as JSON")
    );
    assert_ne!(a.stats, c.stats, "a different seed should change the run");
}

#[test]
fn zero_pages_travel_as_flags() {
    let mem = 32u64 << 20;
    let r = run(
        mem,
        MemoryMode::Bytes,
        {
            let mut w = WorkloadSpec::idle(4);
            w.zero_fraction = 0.5;
            w
        },
        Link::new(GBIT, Duration::from_millis(1)),
        Box::new(StopAndCopy),
    );
    let pages = mem / 4096;
    let zero = r.stats.duplicate;
    assert!(
        (pages * 4 / 10..pages * 6 / 10).contains(&zero),
        "zero pages {zero}"
    );
    assert_eq!(r.stats.normal + r.stats.duplicate, pages);
    assert!(r.stats.transferred < (pages - zero) * 4096 + pages * 64);
}

#[test]
fn every_policy_on_every_workload_verifies() {
    let kinds = ["idle", "uniform", "hotcold", "zipf", "sequential", "phased"];
    for kind in kinds {
        for policy in [PolicyKind::Precopy, PolicyKind::StopAndCopy] {
            for mode in [MemoryMode::Bytes, MemoryMode::Compact] {
                let pol = policy.build(&PolicyConfig::default());
                let mut kind_v: WorkloadKind = kind.parse().unwrap();
                if let WorkloadKind::Phased { phase } = &mut kind_v {
                    *phase = Duration::from_millis(50);
                }
                let r = run(
                    16 << 20,
                    mode,
                    {
                        let mut c = WorkloadSpec::new(kind_v, 1024, 30_000.0, 1);
                        c.zero_fraction = 0.1;
                        c
                    },
                    Link::new(GBIT, Duration::from_millis(1)),
                    pol,
                );
                assert!(r.stats.downtime > Duration::ZERO, "{kind} {policy}");
            }
        }
    }
}

#[test]
fn layouts_with_holes_migrate() {
    // 4 GiB below/above the PC hole, compact so it stays cheap.
    let layout = MemoryLayout::pc(PageSize::DEFAULT, 4 << 30).unwrap();
    assert_eq!(layout.regions().len(), 2);
    let r = simulate({
        let mut c = SimConfig::new(
            layout,
            uniform(1 << 16, 5000.0, 3),
            Link::new(10.0 * GBIT, Duration::from_millis(1)),
            Box::new(Precopy::default()),
        );
        c.mode = MemoryMode::Compact;
        c
    })
    .unwrap();
    assert_verified(&r);
    assert_eq!(r.stats.rounds[0].sent + r.stats.rounds[0].skipped, 1 << 20);
}

#[test]
fn sent_content_verification_verifies_a_correct_migration() {
    for policy in [
        Box::new(Precopy::default()) as Box<dyn Policy>,
        Box::new(StopAndCopy),
    ] {
        let r = simulate({
            let mut c = SimConfig::new(
                MemoryLayout::flat(PageSize::DEFAULT, 32 << 20).unwrap(),
                uniform(4096, 20_000.0, 4),
                Link::new(GBIT, Duration::from_millis(1)),
                policy,
            );
            c.engine = {
                let mut v = EngineConfig::default();
                v.verify = migrate_core::SourceVerify::SentContent;
                v
            };
            c
        })
        .expect("simulated migration");
        assert_verified(&r);
    }
}

/// A transport that takes frames into a send buffer (as a socket does)
/// returns from a send before the frame is on the wire. A pre-copy round
/// timed until its last frame was handed over counts the buffered bytes
/// as delivered: its rate comes out above what the link carries, and the
/// policy switches over on a final copy it underestimates. Timed until
/// the destination says it received the round, the rate is at most the
/// link's and the final copy takes no longer than predicted.
#[test]
fn a_round_is_timed_until_the_destination_has_received_it() {
    let mem = 256u64 << 20;
    let pages = mem / 4096;
    // A send buffer of 32 MiB, a tenth of a second at 2.5 Gbit/s.
    let link = Link::new(2.5 * GBIT, Duration::from_millis(1)).with_send_buffer(32 << 20);
    let r = run(
        mem,
        MemoryMode::Bytes,
        uniform(pages / 2, 150e6 / 4096.0, 11),
        link,
        Box::new(Precopy::default()),
    );
    let link_rate = link.bandwidth_bps / 8.0;
    let precopy: Vec<_> = r.stats.rounds.iter().filter(|r| !r.final_copy).collect();
    assert!(!precopy.is_empty(), "no pre-copy round");
    for round in &precopy {
        let rate = round.bytes as f64 / round.delta.as_secs_f64();
        assert!(
            rate <= link_rate,
            "round {}: {rate:.0} B/s over a link of {link_rate:.0} B/s",
            round.round
        );
    }
    // Pause to resume on the simulator's clock: the final copy, the
    // device state and the last trip. The prediction holds the final
    // copy and half a round trip.
    let expected = r.stats.expected_downtime;
    assert!(
        r.true_downtime <= expected + link.latency,
        "downtime {:?}, predicted {expected:?}",
        r.true_downtime
    );
}

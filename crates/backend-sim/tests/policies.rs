//! Post-copy, hybrid and HCA on the simulated guest, against pre-copy.
//! Every migration checks the destination's memory against the source's:
//! after post-copy the source replays the destination guest's accesses
//! and the two memories are compared byte for byte.

use backend_sim::{
    simulate, Link, MemoryMode, SimConfig, SimGuest, SimReport, WorkloadKind, WorkloadSpec,
};
use migrate_core::{
    BackendErrorKind, Clock, GuestControl, Hca, HcaConfig, Hybrid, MemoryLayout, PageNum, PageSink,
    PageSize, Policy, PolicyConfig, PolicyKind, PostCopy, Precopy, Prepaging, SwitchReason,
    VirtualClock,
};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GBIT: f64 = 1e9;

fn run(mem: u64, workload: WorkloadSpec, policy: Box<dyn Policy>) -> SimReport {
    run_on(mem, MemoryMode::Bytes, workload, policy)
}

fn run_on(
    mem: u64,
    mode: MemoryMode,
    workload: WorkloadSpec,
    policy: Box<dyn Policy>,
) -> SimReport {
    run_full(mem, mode, workload, policy, Vec::new())
}

fn run_full(
    mem: u64,
    mode: MemoryMode,
    workload: WorkloadSpec,
    policy: Box<dyn Policy>,
    resume_pages: Vec<PageNum>,
) -> SimReport {
    let r = simulate({
        let mut c = SimConfig::new(
            MemoryLayout::flat(PageSize::DEFAULT, mem).unwrap(),
            workload,
            Link::new(GBIT, Duration::from_millis(1)),
            policy,
        );
        c.mode = mode;
        c.resume_pages = resume_pages;
        c
    })
    .expect("simulated migration");
    assert!(r.stats.memory_verified, "digest not verified");
    assert!(
        r.memory_equal,
        "destination memory differs from the source's"
    );
    assert_eq!(
        r.counter_at_pause, r.counter_at_resume,
        "guest counter did not carry over"
    );
    r
}

fn spec(kind: WorkloadKind, wss: u64, rate_bytes: f64, seed: u64) -> WorkloadSpec {
    WorkloadSpec::new(kind, wss / 4096, rate_bytes / 4096.0, seed)
}

fn hotcold() -> WorkloadKind {
    WorkloadKind::HotCold {
        hot_fraction: 0.1,
        hot_prob: 0.95,
    }
}

#[test]
fn postcopy_sends_every_page_exactly_once() {
    let mem = 128 * MIB;
    let mut w = spec(WorkloadKind::Uniform, 64 * MIB, 40e6, 2);
    w.reads_per_write = 1.0;
    w.zero_fraction = 0.2;
    let r = run(mem, w, Box::new(PostCopy::default()));
    let pages = mem / 4096;
    let pc = r.stats.postcopy.as_ref().expect("post-copy figures");
    assert_eq!(
        r.stats.total_pages_sent, pages,
        "each page once, no more, no less"
    );
    assert_eq!(r.dest.pages_received, pages);
    assert_eq!(pc.duplicates, 0);
    assert_eq!(pc.pages, pages);
    assert_eq!(r.stats.switch_reason, SwitchReason::PostCopy);
    assert!(pc.requests > 0, "a running guest faults");
    assert_eq!(pc.requests, r.true_faults);
    // The engine's stall figure is what the simulated vCPU went through.
    assert!(pc.vcpu_stall.abs_diff(r.true_stall) < Duration::from_micros(1));
    // A fault costs at least a round trip.
    assert!(pc.fault_latency_p50 >= Duration::from_millis(2));
    assert!(pc.fault_latency_p99 >= pc.fault_latency_p50);
    assert!(pc.fault_latency_max >= pc.fault_latency_p99);
    // Downtime is pause to resume: a one-way trip and the device state,
    // not the stalls after resume, which are reported apart.
    assert!(
        r.stats.downtime < Duration::from_millis(2),
        "{:?}",
        r.stats.downtime
    );
    assert!(r.stats.downtime.abs_diff(r.true_downtime) < Duration::from_micros(10));
    assert!(pc.vcpu_stall > r.stats.downtime);
    assert!(pc.bytes > 0 && pc.bytes < r.stats.transferred);
    assert_eq!(
        serde_json::to_value(&r.stats).expect("statistics as JSON")["postcopy-requests"],
        pc.requests
    );
}

#[test]
fn multi_pivot_bubbling_faults_less_than_sequential_push_with_locality() {
    // A hot/cold working set in the middle of memory: a sequential push
    // reaches it late, a bubble around each fault fetches its neighbours.
    let mem = 256 * MIB;
    let mut w = spec(hotcold(), 64 * MIB, 40e6, 5);
    w.reads_per_write = 3.0;
    w.wss_offset = 160 * MIB / 4096;
    let faults = |p: Prepaging| {
        let r = run(mem, w.clone(), Box::new(PostCopy::new(p)));
        let pc = r.stats.postcopy.unwrap();
        assert_eq!(r.stats.total_pages_sent, mem / 4096);
        (pc.requests, pc.vcpu_stall)
    };
    let (seq, seq_stall) = faults(Prepaging::Sequential);
    let (multi, multi_stall) = faults(Prepaging::MultiPivot { k: 7 });
    let (bubble, _) = faults(Prepaging::Bubble { both_ways: true });
    assert!(
        multi * 2 < seq,
        "multi-pivot {multi} faults vs sequential {seq}"
    );
    assert!(bubble < seq, "bubble {bubble} faults vs sequential {seq}");
    assert!(multi_stall < seq_stall);
}

#[test]
fn hca_sends_fewer_pages_than_precopy_with_no_worse_downtime_on_hot_cold() {
    for (rate, seed) in [(300e6, 5), (600e6, 6)] {
        let w = spec(hotcold(), 128 * MIB, rate, seed);
        let pre = run(256 * MIB, w.clone(), Box::new(Precopy::default()));
        let hca = run(256 * MIB, w, Box::new(Hca::default()));
        assert!(
            hca.stats.total_pages_sent < pre.stats.total_pages_sent,
            "{rate}: HCA sent {} pages, pre-copy {}",
            hca.stats.total_pages_sent,
            pre.stats.total_pages_sent
        );
        assert!(
            hca.stats.downtime <= pre.stats.downtime,
            "{rate}: HCA downtime {:?}, pre-copy {:?}",
            hca.stats.downtime,
            pre.stats.downtime
        );
    }
}

#[test]
fn hca_holds_hot_pages_back_in_its_middle_rounds() {
    // With the tail off, no round after the first sends a hot page: the
    // paused copy is the hot set.
    let w = spec(hotcold(), 128 * MIB, 300e6, 5);
    let held = run(
        256 * MIB,
        w.clone(),
        Box::new(Hca::new({
            let mut v = HcaConfig::default();
            v.hot_pass = false;
            v
        })),
    );
    let pre = run(256 * MIB, w, Box::new(Precopy::default()));
    let middle = |r: &SimReport| -> u64 {
        r.stats.rounds[1..]
            .iter()
            .filter(|x| !x.final_copy)
            .map(|x| x.sent)
            .sum()
    };
    assert!(
        middle(&held) < middle(&pre),
        "{} vs {}",
        middle(&held),
        middle(&pre)
    );
    let hot_pages = 128 * MIB / 4096 / 10;
    let last = held.stats.rounds.last().unwrap();
    assert!(
        last.final_copy && last.sent >= hot_pages * 8 / 10,
        "final copy {}",
        last.sent
    );
}

#[test]
fn hybrid_beats_precopy_downtime_where_precopy_does_not_converge() {
    let w = spec(WorkloadKind::Uniform, 256 * MIB, 300e6, 5);
    let pre = run(256 * MIB, w.clone(), Box::new(Precopy::default()));
    assert!(!pre.stats.switch_reason.converged());
    let hyb = run(256 * MIB, w, Box::new(Hybrid::default()));
    assert!(hyb.stats.postcopy.is_some(), "hybrid switched to post-copy");
    assert!(hyb.stats.precopy_rounds() >= 1);
    // The pending set goes over as a bitmap, not page by page: the bytes
    // sent with the guest paused are about one bit per guest page.
    assert!(
        hyb.stats.downtime_bytes < 256 * MIB / 4096 / 8 + 4096,
        "{} downtime bytes",
        hyb.stats.downtime_bytes
    );
    assert!(
        hyb.stats.downtime * 10 < pre.stats.downtime,
        "hybrid {:?} vs pre-copy {:?}",
        hyb.stats.downtime,
        pre.stats.downtime
    );
}

#[test]
fn pages_the_hypervisor_maps_at_resume_arrive_before_it() {
    // Xen maps a guest's vcpu_info as the guest re-registers it on resume
    // and refuses a paged-out frame instead of waiting for it. The
    // simulated destination refuses to resume in the same case, so these
    // moves succeed only if the source sent those pages while paused.
    let resume: Vec<PageNum> = vec![3, 4097, 20_000];
    let mem = 256 * MIB;
    let w = spec(WorkloadKind::Uniform, 256 * MIB, 300e6, 5);
    let post = run_full(
        mem,
        MemoryMode::Bytes,
        w.clone(),
        Box::new(PostCopy::default()),
        resume.clone(),
    );
    let pc = post.stats.postcopy.as_ref().expect("post-copy figures");
    assert_eq!(pc.resume_pages, 3);
    // Sent once, before the resume, and never again.
    assert_eq!(post.stats.total_pages_sent, mem / 4096);
    assert_eq!(pc.pages, mem / 4096 - 3);
    assert!(post.stats.to_string().contains("resume-pages: 3"));
    // They left with the guest paused, so they count as downtime bytes.
    assert!(post.stats.downtime_bytes >= 3 * 4096);
    assert!(pc.bytes + post.stats.downtime_bytes <= post.stats.transferred);

    let hyb = run_full(
        mem,
        MemoryMode::Bytes,
        w,
        Box::new(Hybrid::default()),
        resume.clone(),
    );
    let hc = hyb.stats.postcopy.as_ref().expect("hybrid switched");
    // Only those dirtied since they were last sent go again; the others
    // are in place already (the resume above would have refused if not).
    assert!((1..=3).contains(&hc.resume_pages), "{}", hc.resume_pages);
    for r in [&post, &hyb] {
        let faulted: Vec<PageNum> = r
            .destination
            .fault_log()
            .iter()
            .map(|f| f.page)
            .filter(|p| resume.contains(p))
            .collect();
        assert!(faulted.is_empty(), "faulted on {faulted:?}");
    }
}

#[test]
fn a_destination_missing_a_resume_page_refuses_to_resume() {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 16 * 4096).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    let dst =
        SimGuest::destination(layout, MemoryMode::Bytes, WorkloadSpec::idle(1), clock).unwrap();
    dst.set_resume_pages(vec![5]);
    dst.pages().discard_pages(&[4, 5, 6]).unwrap();
    let err = dst.control().resume().unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::InvalidState);
    assert!(dst.is_paused());
    dst.pages().write_page(5, &[7u8; 4096]).unwrap();
    dst.control().resume().unwrap();
    assert!(!dst.is_paused());
}

#[test]
fn a_run_of_discards_stops_at_a_page_outside_memory() {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 16 * 4096).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    let dst =
        SimGuest::destination(layout, MemoryMode::Model, WorkloadSpec::idle(1), clock).unwrap();
    dst.pages().discard_pages(&[2, 3, 3]).unwrap();
    assert_eq!(dst.absent_pages(), 2, "a page discarded twice counts once");
    let err = dst.pages().discard_pages(&[7, 8, 16, 9]).unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::InvalidArgument);
    // As page by page: those before the bad page are gone, those after not.
    assert_eq!(dst.absent_pages(), 4);
    assert!(dst.is_absent(7) && dst.is_absent(8) && !dst.is_absent(9));
    let err = dst.pages().discard(99).unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::InvalidArgument);
    assert_eq!(dst.absent_pages(), 4);
}

#[test]
fn hybrid_that_converges_finishes_as_precopy() {
    let w = spec(WorkloadKind::Uniform, 64 * MIB, 5e6, 5);
    let r = run(128 * MIB, w, Box::new(Hybrid::default()));
    assert_eq!(r.stats.switch_reason, SwitchReason::Converged);
    assert!(r.stats.postcopy.is_none());
}

#[test]
fn every_policy_on_every_workload_verifies() {
    let kinds = ["idle", "uniform", "hotcold", "zipf", "sequential", "phased"];
    for kind in kinds {
        for policy in PolicyKind::COMPARED {
            for mode in [MemoryMode::Bytes, MemoryMode::Compact, MemoryMode::Model] {
                let mut k: WorkloadKind = kind.parse().unwrap();
                if let WorkloadKind::Phased { phase } = &mut k {
                    *phase = Duration::from_millis(50);
                }
                let mut w = WorkloadSpec::new(k, 2048, 40_000.0, 1);
                w.zero_fraction = 0.1;
                w.reads_per_write = 1.0;
                w.wss_offset = 1000;
                let r = run_on(16 * MIB, mode, w, policy.build(&PolicyConfig::default()));
                assert!(
                    r.stats.downtime > Duration::ZERO,
                    "{kind} {policy} {mode:?}"
                );
                if let PolicyKind::PostCopy(_) = policy {
                    assert_eq!(r.stats.total_pages_sent, 16 * MIB / 4096, "{kind} {policy}");
                }
            }
        }
    }
}

#[test]
fn postcopy_statistics_print_in_both_dialects() {
    let mut w = spec(WorkloadKind::Uniform, 8 * MIB, 20e6, 3);
    w.reads_per_write = 1.0;
    let r = run(32 * MIB, w, Box::new(PostCopy::default()));
    let text = r.stats.to_string();
    assert!(text.contains("postcopy-requests: "), "{text}");
    assert!(text.contains("fault latency: p50 "), "{text}");
    assert!(text.contains("not part of downtime"), "{text}");
    let j = serde_json::to_value(&r.stats).expect("statistics as JSON");
    assert!(j["postcopy"]["fault-latency-p99-ms"].as_f64().unwrap() > 0.0);
    assert!(j["postcopy"]["vcpu-stall-ms"].as_f64().unwrap() > 0.0);
}

//! Steering a migration through its handle, on the virtual clock: cancel
//! in every phase, live changes of bandwidth, downtime target and
//! post-copy, the bandwidth cap, auto-converge and the engine's timers.
//! Every completed migration checks the destination's memory.

use backend_sim::{
    simulate, simulate_steered, Link, MemoryMode, SimConfig, SimError, SimGuest, SimReport, Steer,
    WorkloadKind, WorkloadSpec,
};
use migrate_core::protocol::wire_len;
use migrate_core::SourceStep;
use migrate_core::{
    AutoConverge, Clock, ControlError, DestinationEngine, EngineConfig, ErrorKind, Event, Hybrid,
    HybridConfig, MemoryLayout, MigrationError, PageSize, Phase, Policy, Precopy, PrecopyConfig,
    SourceEngine, StopAndCopy, SwitchReason, VirtualClock,
};
use std::sync::Arc;
use std::time::Duration;

const GBIT: f64 = 1e9;

fn uniform(wss_pages: u64, writes_per_sec: f64) -> WorkloadSpec {
    WorkloadSpec::new(WorkloadKind::Uniform, wss_pages, writes_per_sec, 7)
}

fn config(
    mem: u64,
    workload: WorkloadSpec,
    policy: Box<dyn Policy>,
    engine: EngineConfig,
) -> SimConfig {
    let mut c = SimConfig::new(
        MemoryLayout::flat(PageSize::DEFAULT, mem).unwrap(),
        workload,
        Link::new(GBIT, Duration::from_millis(1)),
        policy,
    );
    c.mode = MemoryMode::Compact;
    c.engine = engine;
    c
}

/// Pre-copy limits: the downtime target, at most `max_rounds` rounds, and
/// no stop for lack of progress or for the volume sent.
fn precopy_config(target: Duration, max_rounds: u32) -> PrecopyConfig {
    let mut c = PrecopyConfig::default();
    c.downtime_target = target;
    c.max_rounds = max_rounds;
    c.stall_rounds = 100;
    c.max_transfer_factor = 100.0;
    c
}

/// Pre-copy that does not converge before its round limit.
fn slow_precopy() -> Box<dyn Policy> {
    Box::new(Precopy::new(precopy_config(Duration::from_millis(1), 6)))
}

fn assert_verified(r: &SimReport) {
    assert!(r.stats.memory_verified);
    assert!(
        r.memory_equal,
        "destination memory differs from the source's"
    );
    assert_eq!(r.source.digest(), r.dest.digest.unwrap());
}

/// Cancels when `when` first holds; returns the guests and the error.
fn cancel_when(
    cfg: SimConfig,
    when: impl Fn(&Steer<'_>) -> bool,
) -> (MigrationError, SimGuest, SimGuest, Phase) {
    let mut guests = None;
    let mut asked_in = None;
    let r = simulate_steered(cfg, &mut |s| {
        if guests.is_none() {
            guests = Some((s.source_guest.clone(), s.destination_guest.clone()));
        }
        if asked_in.is_none() && when(s) {
            asked_in = Some(s.source.progress().phase);
            s.source
                .cancel()
                .expect("cancel before the point of no return");
        }
    });
    let Err(SimError::Migration(e)) = r else {
        panic!("expected a cancelled migration, got {r:?}");
    };
    let (src, dst) = guests.unwrap();
    (e, src, dst, asked_in.unwrap())
}

fn assert_cancelled_cleanly(e: &MigrationError, src: &SimGuest, dst: &SimGuest) {
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    assert!(!src.is_paused(), "the source guest must run on");
    assert!(
        dst.resumed_at().is_none(),
        "the destination must not resume"
    );
    // Tracking stopped: the guest's writes no longer reach a dirty log.
    let mut t = src.tracker();
    let mut b = migrate_core::DirtyBitmap::new(src.layout().page_end());
    assert!(
        migrate_core::DirtyTracker::collect_and_clear(&mut t, &mut b).is_err(),
        "dirty tracking still on after a cancel"
    );
    assert_eq!(src.throttle(), 0, "throttle lifted");
}

#[test]
fn cancel_in_setup_precopy_and_stop_and_copy() {
    let mem = 64u64 << 20;
    let pages = mem / 4096;
    // Setup: before the destination accepted the layout.
    let (e, s, d, phase) = cancel_when(
        config(
            mem,
            uniform(pages / 4, 2000.0),
            Box::new(Precopy::default()),
            EngineConfig::default(),
        ),
        |s| s.now > Duration::ZERO,
    );
    assert_eq!(phase, Phase::Setup);
    assert_cancelled_cleanly(&e, &s, &d);

    // Pre-copy: in the middle of round 2.
    let (e, s, d, phase) = cancel_when(
        config(
            mem,
            uniform(pages / 4, 20_000.0),
            slow_precopy(),
            EngineConfig::default(),
        ),
        |s| {
            let p = s.source.progress();
            p.round >= 2 && p.phase == Phase::Precopy
        },
    );
    assert_eq!(phase, Phase::Precopy);
    assert_cancelled_cleanly(&e, &s, &d);

    // Stop-and-copy: the guest is paused for the final copy.
    let (e, s, d, phase) = cancel_when(
        config(
            mem,
            uniform(pages / 4, 2000.0),
            Box::new(StopAndCopy),
            EngineConfig::default(),
        ),
        |s| {
            s.source.progress().phase == Phase::StopAndCopy
                && s.source.progress().normal_pages > 100
        },
    );
    assert_eq!(phase, Phase::StopAndCopy);
    assert_cancelled_cleanly(&e, &s, &d);
}

#[test]
fn cancel_on_the_destination_before_resume() {
    let mem = 32u64 << 20;
    let mut guests = None;
    let r = simulate_steered(
        config(
            mem,
            uniform(1024, 2000.0),
            Box::new(Precopy::default()),
            EngineConfig::default(),
        ),
        &mut |s| {
            if guests.is_none() {
                guests = Some((s.source_guest.clone(), s.destination_guest.clone()));
            }
            if s.destination.progress().normal_pages > 1000 && !s.destination.cancel_requested() {
                s.destination.cancel().unwrap();
            }
        },
    );
    assert!(
        matches!(r, Err(SimError::Migration(MigrationError::Cancelled))),
        "{r:?}"
    );
    let (src, dst) = guests.unwrap();
    assert!(!src.is_paused());
    assert!(dst.resumed_at().is_none());
}

#[test]
fn cancel_is_refused_once_post_copy_is_under_way_and_the_migration_completes() {
    let mem = 32u64 << 20;
    let mut refused = None;
    let r = simulate_steered(
        config(
            mem,
            uniform(2048, 5000.0),
            Box::new(migrate_core::PostCopy::default()),
            EngineConfig::default(),
        ),
        &mut |s| {
            if refused.is_none() && s.source.progress().phase == Phase::Postcopy {
                refused = Some(s.source.cancel());
            }
            if s.destination.progress().phase == Phase::Postcopy {
                assert!(matches!(
                    s.destination.cancel(),
                    Err(ControlError::PointOfNoReturn(_))
                ));
            }
        },
    )
    .expect("post-copy completes");
    assert!(r.stats.memory_verified && r.memory_equal);
    assert!(
        matches!(refused, Some(Err(ControlError::PointOfNoReturn(_)))),
        "{refused:?}"
    );
    let p = r.stats.postcopy.expect("post-copy figures");
    assert!(p.pages > 0);
}

#[test]
fn events_and_progress_follow_the_migration() {
    let mem = 32u64 << 20;
    let pages = mem / 4096;
    let mut rx = None;
    let mut last = None;
    let r = simulate_steered(
        config(
            mem,
            uniform(pages / 8, 1000.0),
            Box::new(Precopy::default()),
            EngineConfig::default(),
        ),
        &mut |s| {
            if rx.is_none() {
                rx = Some(s.source.subscribe());
            }
            last = Some(s.source.clone());
        },
    )
    .unwrap();
    assert_verified(&r);
    let events: Vec<Event> = rx.unwrap().try_iter().collect();
    let started = events
        .iter()
        .filter(|e| matches!(e, Event::RoundStarted { .. }))
        .count();
    let finished = events
        .iter()
        .filter(|e| matches!(e, Event::RoundFinished { .. }))
        .count();
    assert_eq!(started, r.stats.rounds.len());
    assert_eq!(finished, r.stats.rounds.len());
    assert!(events.iter().any(|e| matches!(
        e,
        Event::SwitchOver {
            postcopy: false,
            ..
        }
    )));
    assert!(matches!(events.last(), Some(Event::Completed)));
    let p = last.unwrap().progress();
    assert_eq!(p.phase, Phase::Completed);
    assert_eq!(p.transferred, r.stats.transferred);
    assert_eq!(p.normal_pages, r.stats.normal);
    assert_eq!(p.zero_pages, r.stats.duplicate);
    assert_eq!(p.pending_pages, 0);
}

/// Drives a source and a destination directly on a virtual clock with an
/// infinitely fast link, recording when each frame is handed out.
fn paced_run(
    cap: u64,
    change_at: Option<(Duration, u64)>,
) -> (Vec<(Duration, usize, bool)>, SimGuest, SimGuest) {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 16 << 20).unwrap();
    let clock = VirtualClock::new();
    let dc: Arc<dyn Clock> = Arc::new(clock.clone());
    let wl = uniform(512, 500.0);
    let src =
        SimGuest::source(layout.clone(), MemoryMode::Compact, wl.clone(), dc.clone()).unwrap();
    let dst = SimGuest::destination(layout, MemoryMode::Compact, wl, dc.clone()).unwrap();
    let mut cfg = EngineConfig::default();
    cfg.max_bandwidth = Some(cap);
    cfg.batch_pages = 16;
    let mut s = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        Precopy::default(),
        dc.clone(),
        cfg,
    );
    let mut d = DestinationEngine::new(dst.pages(), dst.control(), dc);
    let h = s.handle();
    let mut sent = Vec::new();
    let mut changed = false;
    loop {
        if let Some((at, new)) = change_at {
            if !changed && clock.now() >= at {
                h.set_max_bandwidth(Some(new)).unwrap();
                changed = true;
            }
        }
        match s.poll().unwrap() {
            SourceStep::Send(f) => {
                sent.push((clock.now(), wire_len(&f), src.is_paused()));
                d.handle_frame(&f).unwrap();
                while let Some(r) = d.poll_transmit() {
                    s.handle_frame(&r).unwrap();
                }
            }
            SourceStep::Wait => {
                let t = s.poll_timeout().expect("a paced source has a timer");
                assert!(t > clock.now());
                clock.set(t);
                s.handle_timeout().unwrap();
            }
            SourceStep::Done => break,
        }
    }
    assert!(d.completed());
    assert!(src.same_memory(&dst));
    (sent, src, dst)
}

#[test]
fn bandwidth_cap_is_exact_on_the_virtual_clock() {
    let cap = 50_000_000u64; // 50 MB/s
    let (sent, _, _) = paced_run(cap, None);
    let running: Vec<_> = sent.iter().filter(|(_, _, paused)| !paused).collect();
    assert!(running.len() > 50);
    // Each frame leaves when the one before has drained at the cap.
    for w in running.windows(2) {
        let (t0, len, _) = *w[0];
        let (t1, _, _) = *w[1];
        if t1 == Duration::ZERO {
            continue;
        }
        let want = Duration::from_secs_f64(len as f64 / cap as f64);
        let got = t1 - t0;
        assert!(
            got >= want.saturating_sub(Duration::from_nanos(2)),
            "{got:?} < {want:?}"
        );
    }
    // Over the pre-copy stage the rate is the cap.
    let (first, last) = (running[0], running[running.len() - 1]);
    let bytes: usize = running[..running.len() - 1].iter().map(|(_, l, _)| l).sum();
    let rate = bytes as f64 / (last.0 - first.0).as_secs_f64();
    assert!(
        (rate / cap as f64 - 1.0).abs() < 1e-6,
        "rate {rate} for a cap of {cap}"
    );
}

#[test]
fn bandwidth_cap_changes_while_running() {
    let (cap, new) = (40_000_000u64, 80_000_000u64);
    let at = Duration::from_millis(200);
    let (sent, _, _) = paced_run(cap, Some((at, new)));
    let running: Vec<_> = sent.iter().filter(|(_, _, p)| !p).collect();
    let rate = |lo: Duration, hi: Duration| {
        let w: Vec<_> = running
            .iter()
            .filter(|(t, _, _)| *t >= lo && *t < hi)
            .collect();
        let bytes: usize = w[..w.len() - 1].iter().map(|(_, l, _)| l).sum();
        bytes as f64 / (w[w.len() - 1].0 - w[0].0).as_secs_f64()
    };
    let before = rate(Duration::from_millis(10), at);
    let end = running.last().unwrap().0;
    let after = rate(at + Duration::from_millis(5), end);
    assert!((before / cap as f64 - 1.0).abs() < 0.01, "before {before}");
    assert!((after / new as f64 - 1.0).abs() < 0.01, "after {after}");
}

#[test]
fn downtime_target_changes_while_running() {
    // 100 MB/s of writes over 64 MiB on 1 Gbit/s: with a 1 ms target
    // pre-copy stops at its round limit; raised to 2 s it converges.
    let mem = 128u64 << 20;
    let wl = uniform(16384, 25_000.0);
    let pre = || Box::new(Precopy::new(precopy_config(Duration::from_millis(1), 8)));
    let r = simulate(config(mem, wl.clone(), pre(), EngineConfig::default())).unwrap();
    assert_verified(&r);
    assert_eq!(r.stats.switch_reason, SwitchReason::MaxRounds);
    let mut changed = false;
    let r = simulate_steered(config(mem, wl, pre(), EngineConfig::default()), &mut |s| {
        let p = s.source.progress();
        if !changed && p.round == 2 && p.phase == Phase::Precopy {
            s.source
                .set_downtime_target(Duration::from_secs(2))
                .unwrap();
            changed = true;
        }
    })
    .unwrap();
    assert_verified(&r);
    assert_eq!(r.stats.switch_reason, SwitchReason::Converged);
    assert!(r.stats.precopy_rounds() < 8);
}

#[test]
fn switch_to_post_copy_on_request() {
    let mem = 64u64 << 20;
    let mut hc = HybridConfig::default();
    hc.precopy = precopy_config(Duration::from_millis(1), 6);
    let hybrid = Hybrid::new(hc);
    for policy in [slow_precopy(), Box::new(hybrid)] {
        let r = simulate_steered(
            config(
                mem,
                uniform(8192, 20_000.0),
                policy,
                EngineConfig::default(),
            ),
            &mut |s| {
                let p = s.source.progress();
                if p.round == 2 && p.phase == Phase::Precopy {
                    let _ = s.source.switch_to_postcopy();
                }
            },
        )
        .unwrap();
        assert!(r.stats.memory_verified && r.memory_equal);
        assert_eq!(r.stats.switch_reason, SwitchReason::Requested);
        assert!(r.stats.postcopy.is_some());
        // Round 2 was cut short by the request; the final copy follows.
        assert_eq!(r.stats.precopy_rounds(), 2);
        assert!(r.stats.rounds[1].sent < r.stats.rounds[0].sent);
    }
}

/// The measure: a 1 GiB guest writing 200 MB/s over 512 MiB on
/// 1 Gbit/s does not converge with plain pre-copy; with auto-converge it
/// finishes within the downtime target.
#[test]
fn auto_converge_makes_a_hot_guest_converge() {
    let mem = 1u64 << 30;
    let wl = uniform((512 << 20) / 4096, 200e6 / 4096.0);
    let target = Duration::from_millis(300);
    let policy = || {
        let mut c = precopy_config(target, 30);
        c.max_transfer_factor = 30.0;
        c.stall_rounds = 30;
        Box::new(Precopy::new(c))
    };
    let plain = simulate(config(mem, wl.clone(), policy(), EngineConfig::default())).unwrap();
    assert_verified(&plain);
    assert!(
        !plain.stats.switch_reason.converged(),
        "{:?}",
        plain.stats.switch_reason
    );
    assert!(plain.stats.downtime > target);

    let mut cfg = EngineConfig::default();
    cfg.auto_converge = Some(AutoConverge::default());
    let ac = simulate(config(mem, wl, policy(), cfg)).unwrap();
    assert_verified(&ac);
    assert_eq!(ac.stats.switch_reason, SwitchReason::Converged);
    assert!(ac.stats.downtime <= target, "{:?}", ac.stats.downtime);
    let throttles: Vec<u8> = ac.stats.rounds.iter().map(|r| r.throttle_pct).collect();
    assert_eq!(throttles[0], 0);
    assert!(throttles.contains(&20), "{throttles:?}");
    assert!(throttles.windows(2).all(|w| w[1] >= w[0]));
    eprintln!(
        "plain: {} rounds, {:?}, downtime {:?}; auto-converge: {} rounds, downtime {:?}, throttle per round {:?}",
        plain.stats.rounds.len(),
        plain.stats.switch_reason,
        plain.stats.downtime,
        ac.stats.rounds.len(),
        ac.stats.downtime,
        throttles
    );
}

#[test]
fn peer_timeout_runs_on_the_virtual_clock() {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 1 << 20).unwrap();
    let clock = VirtualClock::new();
    let dc: Arc<dyn Clock> = Arc::new(clock.clone());
    let src =
        SimGuest::source(layout, MemoryMode::Compact, uniform(16, 100.0), dc.clone()).unwrap();
    let mut cfg = EngineConfig::default();
    cfg.peer_timeout = Some(Duration::from_secs(5));
    let mut s = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        Precopy::default(),
        dc,
        cfg,
    );
    // Header and layout go out; then the source waits for Ready.
    while let SourceStep::Send(_) = s.poll().unwrap() {}
    assert_eq!(s.poll_timeout(), Some(Duration::from_secs(5)));
    clock.set(Duration::from_millis(4999));
    s.handle_timeout().unwrap();
    assert!(!s.peer_timed_out());
    clock.set(Duration::from_secs(5));
    let e = s.handle_timeout().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Retry, "{e}");
    assert!(!src.is_paused());
}

/// Pre-copy that samples the dirty log every 10 ms and records when.
struct Sampler {
    inner: Precopy,
    at: Arc<std::sync::Mutex<Vec<Duration>>>,
}

impl Policy for Sampler {
    fn name(&self) -> &str {
        "sampler"
    }
    fn decide(&mut self, input: &migrate_core::PolicyInput<'_>) -> migrate_core::Decision {
        self.inner.decide(input)
    }
    fn sample_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(10))
    }
    fn on_sample(&mut self, _sample: &migrate_core::DirtyBitmap, now: Duration) {
        self.at.lock().unwrap().push(now);
    }
}

#[test]
fn dirty_log_sampling_runs_on_its_timer_while_paced() {
    // A cap of 1 MB/s and 64 KiB frames: a frame every 65.5 ms, so the
    // 10 ms samples come from the engine's timer, not from frames.
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 4 << 20).unwrap();
    let clock = VirtualClock::new();
    let dc: Arc<dyn Clock> = Arc::new(clock.clone());
    let wl = uniform(256, 200.0);
    let src =
        SimGuest::source(layout.clone(), MemoryMode::Compact, wl.clone(), dc.clone()).unwrap();
    let dst = SimGuest::destination(layout, MemoryMode::Compact, wl, dc.clone()).unwrap();
    let mut cfg = EngineConfig::default();
    cfg.max_bandwidth = Some(1_000_000);
    cfg.batch_pages = 16;
    let at = Arc::new(std::sync::Mutex::new(Vec::new()));
    let policy = Sampler {
        inner: Precopy::default(),
        at: at.clone(),
    };
    let mut s = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        dc.clone(),
        cfg,
    );
    let mut d = DestinationEngine::new(dst.pages(), dst.control(), dc);
    let mut first_round_end = None;
    let h = s.handle();
    let rx = h.subscribe();
    loop {
        match s.poll().unwrap() {
            SourceStep::Send(f) => {
                d.handle_frame(&f).unwrap();
                while let Some(r) = d.poll_transmit() {
                    s.handle_frame(&r).unwrap();
                }
            }
            SourceStep::Wait => {
                let t = s.poll_timeout().expect("a timer");
                clock.set(t);
                s.handle_timeout().unwrap();
            }
            SourceStep::Done => break,
        }
        if first_round_end.is_none()
            && rx
                .try_iter()
                .any(|e| matches!(e, Event::RoundFinished { round: 1, .. }))
        {
            first_round_end = Some(clock.now());
        }
    }
    assert!(d.completed() && src.same_memory(&dst));
    let end = first_round_end.unwrap();
    let samples: Vec<Duration> = at
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|t| *t < end)
        .collect();
    assert!(samples.len() > 50, "{} samples", samples.len());
    for w in samples.windows(2) {
        assert_eq!(w[1] - w[0], Duration::from_millis(10), "{samples:?}");
    }
}

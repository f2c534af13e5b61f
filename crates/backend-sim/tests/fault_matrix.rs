//! The fault matrix: every policy, each of six faults (cut, flipped byte,
//! dropped frame, duplicated frame, delay past the peer timeout,
//! truncated frame) at every frame index of a clean run (sampled where a
//! run has many frames), in either direction, over a Unix socket pair
//! with the simulated guest on the host clock. On every run it checks:
//!
//! - never both guests running;
//! - the destination never resumes with a page the guest can see, or a
//!   device state, unlike the source's at the pause (pages that arrive
//!   after a post-copy resume are checked as they are placed);
//! - a failure before the point of no return (any source error whose
//!   kind is not `Settle`) leaves the source guest running;
//! - a source that reports success left the guest running on the
//!   destination;
//! - no panic, and no hang (each run ends within a deadline).
//!
//! It prints a table of runs and outcomes per policy and fault (run with
//! `--nocapture` to see it) and fails on any violation.

use backend_sim::{
    Fault, FaultAt, FaultPlan, FaultyTransport, MemoryMode, SimGuest, WorkloadKind, WorkloadSpec,
};
use migrate_core::driver::{run_destination, run_source};
use migrate_core::transport::StreamTransport;
use migrate_core::{
    BackendError, Clock, DeviceState, ErrorKind, GuestControl, Hca, Hybrid, HybridConfig,
    MemoryLayout, PageNum, PageSink, PageSize, PageSource, Policy, PostCopy, Precopy,
    PrecopyConfig, StopAndCopy, SystemClock,
};
use migrate_core::{DestinationEngine, EngineConfig, SourceEngine};
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a side waits for the other.
const PEER_TIMEOUT: Duration = Duration::from_millis(300);
/// A delayed frame is held this long: past the peer's timeout.
const DELAY: Duration = Duration::from_millis(500);
/// A run that has not ended by then hangs.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// Most fault indices per direction for the instant faults; the first
/// and last frames are always among them (the switch-over lives there).
const MAX_INDICES: usize = 96;
/// Most fault indices per direction for the delay fault, which costs a
/// peer timeout each.
const MAX_DELAY_INDICES: usize = 10;

const GUEST_BYTES: u64 = 4 << 20;

// ------------------------------------------------------------- the oracle

/// What the two guests went through, seen from inside their backends.
#[derive(Default)]
struct Oracle {
    /// Source memory when its device state was saved (paused), by dense
    /// page index.
    source_memory: Option<Vec<u8>>,
    source_state: Option<DeviceState>,
    restored: Option<DeviceState>,
    dest_resumed: bool,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<Oracle>>;

fn lock(o: &Shared) -> std::sync::MutexGuard<'_, Oracle> {
    o.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_all(guest: &SimGuest) -> Vec<u8> {
    let layout = guest.layout().clone();
    let pages: Vec<PageNum> = layout.pages().collect();
    let mut out = vec![0u8; layout.total_bytes() as usize];
    guest
        .pages()
        .read_pages(&pages, &mut out)
        .expect("simulated memory reads");
    out
}

/// The source's control: snapshots memory and state as the state is saved.
struct SourceControl {
    guest: SimGuest,
    oracle: Shared,
}

impl GuestControl for SourceControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        self.guest.control().pause()
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        self.guest.control().resume()
    }
    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        let state = self.guest.control().save_state()?;
        let memory = read_all(&self.guest);
        let mut o = lock(&self.oracle);
        o.source_memory = Some(memory);
        o.source_state = Some(state.clone());
        Ok(state)
    }
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        self.guest.control().restore_state(state)
    }
    fn resume_pages(&mut self) -> Result<Vec<PageNum>, BackendError> {
        self.guest.control().resume_pages()
    }
}

/// The destination's control: checks the state and every visible page
/// against the source's at the moment of resume.
struct DestControl {
    guest: SimGuest,
    oracle: Shared,
}

impl GuestControl for DestControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        self.guest.control().pause()
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        {
            let mut o = lock(&self.oracle);
            if o.restored.is_none() || o.restored != o.source_state {
                o.violations
                    .push("resumed with a device state the source did not save".into());
            }
            match &o.source_memory {
                None => o
                    .violations
                    .push("resumed before the source saved its state".into()),
                Some(src) => {
                    let dst = read_all(&self.guest);
                    let layout = self.guest.layout();
                    let ps = layout.page_size().get();
                    let wrong = layout
                        .pages()
                        .enumerate()
                        .filter(|(i, p)| {
                            !self.guest.is_absent(*p)
                                && src[i * ps..(i + 1) * ps] != dst[i * ps..(i + 1) * ps]
                        })
                        .count();
                    if wrong > 0 {
                        o.violations.push(format!(
                            "resumed with {wrong} visible pages unlike the source's"
                        ));
                    }
                }
            }
            o.dest_resumed = true;
        }
        self.guest.control().resume()
    }
    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        self.guest.control().save_state()
    }
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        lock(&self.oracle).restored = Some(state.clone());
        self.guest.control().restore_state(state)
    }
}

/// The destination's memory: after a resume, every page placed must be
/// the source's.
struct DestMemory {
    guest: SimGuest,
    oracle: Shared,
}

impl DestMemory {
    fn check(&self, page: PageNum, data: Option<&[u8]>) {
        let mut o = lock(&self.oracle);
        if !o.dest_resumed {
            return;
        }
        let layout = self.guest.layout();
        let ps = layout.page_size().get();
        let same = match (&o.source_memory, layout.dense_index(page)) {
            (Some(src), Some(i)) => {
                let want = &src[i as usize * ps..(i as usize + 1) * ps];
                match data {
                    Some(d) => d == want,
                    None => want.iter().all(|b| *b == 0),
                }
            }
            _ => false,
        };
        if !same {
            o.violations.push(format!(
                "page {page:#x} placed after the resume unlike the source's"
            ));
        }
    }
}

impl PageSource for DestMemory {
    fn layout(&self) -> &MemoryLayout {
        self.guest.layout()
    }
    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        self.guest.pages().read_pages(pages, out)
    }
}

impl PageSink for DestMemory {
    fn layout(&self) -> &MemoryLayout {
        self.guest.layout()
    }
    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        self.check(page, Some(data));
        self.guest.pages().write_page(page, data)
    }
    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.check(page, None);
        self.guest.pages().write_zero_page(page)
    }
    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.guest.pages().discard(page)
    }
}

// --------------------------------------------------------------- one run

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    ToDest,
    ToSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PolicyKind {
    Precopy,
    PostCopy,
    StopAndCopy,
    Hybrid,
    Hca,
}

impl PolicyKind {
    const ALL: [PolicyKind; 5] = [
        PolicyKind::Precopy,
        PolicyKind::PostCopy,
        PolicyKind::StopAndCopy,
        PolicyKind::Hybrid,
        PolicyKind::Hca,
    ];

    fn make(self) -> Box<dyn Policy> {
        match self {
            // Three rounds at least, for more frames before the switch.
            PolicyKind::Precopy => Box::new(Precopy::new({
                let mut v = PrecopyConfig::default();
                v.downtime_target = Duration::ZERO;
                v.max_rounds = 3;
                v
            })),
            PolicyKind::PostCopy => Box::new(PostCopy::default()),
            PolicyKind::StopAndCopy => Box::new(StopAndCopy),
            // Switched to post-copy after two rounds, so that its
            // discards and post-copy push are under fault too.
            PolicyKind::Hybrid => Box::new(Hybrid::new({
                let mut v = HybridConfig::default();
                v.precopy = {
                    let mut v = PrecopyConfig::default();
                    v.downtime_target = Duration::ZERO;
                    v.max_rounds = 2;
                    v
                };
                v
            })),
            PolicyKind::Hca => Box::new(Hca::default()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            PolicyKind::Precopy => "pre-copy",
            PolicyKind::PostCopy => "post-copy",
            PolicyKind::StopAndCopy => "stop-and-copy",
            PolicyKind::Hybrid => "hybrid",
            PolicyKind::Hca => "HCA",
        }
    }
}

/// How a run ended.
#[derive(Debug, Default)]
struct Outcome {
    /// Frames each side sent (source, destination).
    frames: (usize, usize),
    fired: bool,
    success: bool,
    /// The source failed before the point of no return.
    source_kept: bool,
    /// The source reported an unknown outcome.
    settle: bool,
    /// Neither guest runs at the end.
    both_down: bool,
    violations: Vec<String>,
}

fn run_once(policy: PolicyKind, plan: Option<(Dir, FaultPlan)>) -> Outcome {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let layout = MemoryLayout::flat(PageSize::DEFAULT, GUEST_BYTES).unwrap();
    let w = {
        let mut c = WorkloadSpec::new(WorkloadKind::Uniform, 256, 5_000.0, 15);
        c.zero_fraction = 0.25;
        c
    };
    let src =
        SimGuest::source(layout.clone(), MemoryMode::Bytes, w.clone(), clock.clone()).unwrap();
    let dst = SimGuest::destination(layout, MemoryMode::Bytes, w, clock.clone()).unwrap();
    let oracle: Shared = Arc::default();
    let (a, b) = UnixStream::pair().unwrap();
    let to_dest = plan.filter(|(d, _)| *d == Dir::ToDest).map(|(_, p)| p);
    let to_source = plan.filter(|(d, _)| *d == Dir::ToSource).map(|(_, p)| p);
    let mut src_t = FaultyTransport::new(StreamTransport::new(a).unwrap(), to_dest);
    let mut dst_t = FaultyTransport::new(StreamTransport::new(b).unwrap(), to_source);

    let (tx, rx) = mpsc::channel();
    let dest = {
        let (g, o, c, tx) = (dst.clone(), oracle.clone(), clock.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut e = DestinationEngine::new(
                DestMemory {
                    guest: g.clone(),
                    oracle: o.clone(),
                },
                DestControl {
                    guest: g,
                    oracle: o,
                },
                c,
            );
            let r = run_destination(&mut e, &mut dst_t, None, PEER_TIMEOUT);
            let out = (r.map(|_| ()), dst_t.frames_sent(), dst_t.fired());
            drop(dst_t);
            let _ = tx.send(());
            out
        })
    };
    let source = {
        let (g, o, c) = (src.clone(), oracle.clone(), clock);
        std::thread::spawn(move || {
            let config = {
                let mut v = EngineConfig::default();
                v.batch_pages = 32;
                v.postcopy_batch_pages = 16;
                v
            };
            let mut e = SourceEngine::new(
                g.tracker(),
                g.pages(),
                SourceControl {
                    guest: g,
                    oracle: o,
                },
                policy.make(),
                c,
                config,
            );
            let r = run_source(&mut e, &mut src_t, PEER_TIMEOUT);
            let out = (r.map(|_| ()), src_t.frames_sent(), src_t.fired());
            drop(src_t);
            let _ = tx.send(());
            out
        })
    };
    let mut out = Outcome::default();
    let start = Instant::now();
    for _ in 0..2 {
        let left = RUN_DEADLINE.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                out.violations
                    .push(format!("hang: a side still ran after {RUN_DEADLINE:?}"));
                return out;
            }
            // A side panicked before it could say it ended.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let (s, d) = (source.join(), dest.join());
    let (Ok((s, s_frames, s_fired)), Ok((d, d_frames, d_fired))) = (s, d) else {
        out.violations.push("panic".into());
        return out;
    };
    out.frames = (s_frames, d_frames);
    out.fired = s_fired || d_fired;
    let src_running = !src.is_paused();
    let dst_running = !dst.is_paused();
    let mut o = lock(&oracle);
    out.violations.append(&mut o.violations);
    if src_running && dst_running {
        out.violations.push("both guests running".into());
    }
    match &s {
        Ok(()) => {
            out.success = d.is_ok();
            if !dst_running {
                out.violations
                    .push("the source reported success, the destination does not run".into());
            }
        }
        Err(e) if e.kind() == ErrorKind::Settle => out.settle = true,
        Err(e) => {
            out.source_kept = true;
            if !src_running {
                out.violations.push(format!(
                    "failure before the point of no return left the source paused: {e}"
                ));
            }
            if dst_running {
                out.violations.push(format!(
                    "failure before the point of no return, yet the destination runs: {e}"
                ));
            }
        }
    }
    out.both_down = !src_running && !dst_running;
    out
}

/// Up to `max` indices of `0..n`: the first few, the last ones (where the
/// switch-over and completion are) and evenly spaced ones between.
fn sample(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let head = max / 4;
    let tail = max / 2;
    let mut v: Vec<usize> = (0..head).chain(n - tail..n).collect();
    let middle = max - head - tail;
    for i in 0..middle {
        v.push(head + (i + 1) * (n - tail - head) / (middle + 1));
    }
    v.sort_unstable();
    v.dedup();
    v
}

#[derive(Default)]
struct Row {
    runs: usize,
    fired: usize,
    success: usize,
    source_kept: usize,
    settle: usize,
    both_down: usize,
    violations: usize,
}

#[test]
fn fault_matrix_holds_the_failure_semantics() {
    let started = Instant::now();
    let faults = [
        Fault::Cut,
        Fault::Flip,
        Fault::Drop,
        Fault::Duplicate,
        Fault::Delay(DELAY),
        Fault::Truncate,
    ];
    let mut table: BTreeMap<(PolicyKind, &'static str), Row> = BTreeMap::new();
    let mut details = Vec::new();
    let mut record = |policy: PolicyKind, fault: &'static str, o: &Outcome, what: String| {
        let row = table.entry((policy, fault)).or_default();
        row.runs += 1;
        row.fired += usize::from(o.fired);
        row.success += usize::from(o.success);
        row.source_kept += usize::from(o.source_kept);
        row.settle += usize::from(o.settle);
        row.both_down += usize::from(o.both_down);
        row.violations += usize::from(!o.violations.is_empty());
        for v in &o.violations {
            details.push(format!("{} {fault} {what}: {v}", policy.name()));
        }
    };
    for policy in PolicyKind::ALL {
        // A clean run only counts the frames; on a host busy enough to
        // time one out, try again.
        let mut clean = run_once(policy, None);
        for _ in 0..3 {
            if clean.success {
                break;
            }
            clean = run_once(policy, None);
        }
        assert!(
            clean.success && clean.violations.is_empty(),
            "{}: the clean run failed: {:?}",
            policy.name(),
            clean.violations
        );
        record(policy, "none", &clean, "clean".into());
        for fault in faults {
            for (dir, n) in [
                (Dir::ToDest, clean.frames.0),
                (Dir::ToSource, clean.frames.1),
            ] {
                let max = if matches!(fault, Fault::Delay(_)) {
                    MAX_DELAY_INDICES
                } else {
                    MAX_INDICES
                };
                for k in sample(n, max) {
                    let plan = FaultPlan::new(fault, FaultAt::Index(k));
                    let o = run_once(policy, Some((dir, plan)));
                    record(policy, fault.name(), &o, format!("{dir:?} frame {k}"));
                }
            }
        }
    }
    println!("| policy | fault | runs | fault fired | completed | failed, source runs | outcome unknown | neither runs | violations |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut total = Row::default();
    for ((policy, fault), r) in &table {
        println!(
            "| {} | {fault} | {} | {} | {} | {} | {} | {} | {} |",
            policy.name(),
            r.runs,
            r.fired,
            r.success,
            r.source_kept,
            r.settle,
            r.both_down,
            r.violations
        );
        total.runs += r.runs;
        total.fired += r.fired;
        total.success += r.success;
        total.source_kept += r.source_kept;
        total.settle += r.settle;
        total.both_down += r.both_down;
        total.violations += r.violations;
    }
    println!(
        "| all | all | {} | {} | {} | {} | {} | {} | {} |",
        total.runs,
        total.fired,
        total.success,
        total.source_kept,
        total.settle,
        total.both_down,
        total.violations
    );
    println!("matrix took {:?}", started.elapsed());
    for d in details.iter().take(40) {
        println!("violation: {d}");
    }
    assert!(total.runs > 5 * 6 * 2, "the matrix ran {} runs", total.runs);
    assert!(total.fired > total.runs / 2);
    assert_eq!(total.violations, 0, "{} violations", details.len());
}

//! Fuzz targets for the decoder and the two engines, with their oracles.
//!
//! Each target takes an input built with [`arbitrary`], so the same
//! functions run under cargo-fuzz (the `fuzz/` directory at the top of
//! the repository) and under the stable-Rust runner that the test suite
//! runs for a bounded time (`tests/fuzz.rs`). A target panics when its
//! oracle fails; it never panics otherwise.
//!
//! - [`decode`]: any bytes, as a sequence of frames, into a sequenced
//!   decoder and into decoders in each stream state. Oracle: no panic (the
//!   runner also bounds the allocation of each call).
//! - [`destination`]: the frames of a clean simulated migration (one per
//!   policy, made once), broken as a network would break them (bytes
//!   flipped, frames lost, repeated, reordered, cut short, junk inserted;
//!   frames are never re-checksummed, which would be forgery, not damage),
//!   fed to a fresh destination. Oracle: if the destination resumes, its
//!   device state and every page its guest can see are the source's.
//! - [`source`]: a fresh source run against the replies of a clean
//!   migration, broken the same way. Oracle: a source that fails before
//!   the point of no return has its guest running; one that says the
//!   outcome is unknown had passed it; one that completes was told so by
//!   an intact confirmation.

use crate::guest::{SimControl, SimGuest, SimPages, SimTracker};
use crate::memory::MemoryMode;
use crate::workload::{WorkloadKind, WorkloadSpec};
use arbitrary::Arbitrary;
use migrate_core::protocol::{Decoder, RecordType};
use migrate_core::transport::TransportError;
use migrate_core::{
    Clock, DeviceState, ErrorKind, GuestControl, Hca, Hybrid, HybridConfig, MemoryLayout,
    MigrationError, PageNum, PageSize, PageSource, Policy, PostCopy, Precopy, PrecopyConfig,
    StopAndCopy, VirtualClock,
};
use migrate_core::{DestStatus, DestinationEngine, EngineConfig, SourceEngine, SourceStep};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Pages of the fuzzed guest.
const GUEST_PAGES: u64 = 64;
/// Most engine steps of one execution before it counts as a hang.
const MAX_STEPS: usize = 100_000;

/// Input of [`decode`]: frames, fed in order.
#[derive(Arbitrary, Debug, Clone)]
pub struct DecodeInput {
    /// The frames.
    pub frames: Vec<Vec<u8>>,
}

/// Decoder target: never panics, whatever the bytes.
pub fn decode(input: &DecodeInput) {
    let mut sequenced = Decoder::sequenced();
    for f in &input.frames {
        let _ = sequenced.decode(f);
    }
    let decoders = decoders_in_every_state();
    for f in &input.frames {
        for d in &decoders {
            let _ = d.clone().decode(f);
        }
    }
}

/// A fresh decoder, one after a header, and one after a layout.
fn decoders_in_every_state() -> [Decoder; 3] {
    static DECODERS: OnceLock<[Decoder; 3]> = OnceLock::new();
    DECODERS
        .get_or_init(|| {
            let clean = clean_run(0);
            let mut after_header = Decoder::new();
            let _ = after_header.decode(&clean.to_dest[0]);
            let mut after_layout = after_header.clone();
            let _ = after_layout.decode(&clean.to_dest[1]);
            [Decoder::new(), after_header, after_layout]
        })
        .clone()
}

/// One way a network breaks a stream. Indices are taken modulo the
/// stream's length.
#[derive(Arbitrary, Debug, Clone)]
pub enum Mutation {
    /// XOR a byte of a frame with a non-zero mask.
    Flip {
        /// The frame.
        frame: u16,
        /// The byte (modulo the frame's length).
        at: u32,
        /// The mask (0 is taken as 1).
        mask: u8,
    },
    /// Lose a frame.
    Drop {
        /// The frame.
        frame: u16,
    },
    /// Send a frame twice.
    Duplicate {
        /// The frame.
        frame: u16,
    },
    /// Exchange two frames.
    Swap {
        /// One frame.
        a: u16,
        /// The other.
        b: u16,
    },
    /// Cut a frame short.
    Truncate {
        /// The frame.
        frame: u16,
        /// Bytes kept (modulo the frame's length).
        keep: u32,
    },
    /// Put bytes of no frame in the stream.
    Insert {
        /// Before this frame.
        frame: u16,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Overwrite bytes inside a frame.
    Splice {
        /// The frame.
        frame: u16,
        /// Where (modulo the frame's length).
        at: u32,
        /// The bytes.
        bytes: Vec<u8>,
    },
}

/// Input of [`destination`] and [`source`]: which clean run, and how to
/// break its frames.
#[derive(Arbitrary, Debug, Clone)]
pub struct StreamInput {
    /// The policy of the clean run (modulo the number of policies).
    pub policy: u8,
    /// What happens to the stream, in order.
    pub mutations: Vec<Mutation>,
}

/// Applies `mutations` to `frames`.
pub fn mutate(frames: &mut Vec<Vec<u8>>, mutations: &[Mutation]) {
    for m in mutations {
        if frames.is_empty() {
            return;
        }
        let n = frames.len();
        let idx = |i: u16| i as usize % n;
        match m {
            Mutation::Flip { frame, at, mask } => {
                let f = &mut frames[idx(*frame)];
                if !f.is_empty() {
                    let i = *at as usize % f.len();
                    f[i] ^= (*mask).max(1);
                }
            }
            Mutation::Drop { frame } => {
                frames.remove(idx(*frame));
            }
            Mutation::Duplicate { frame } => {
                let i = idx(*frame);
                let f = frames[i].clone();
                frames.insert(i, f);
            }
            Mutation::Swap { a, b } => frames.swap(idx(*a), idx(*b)),
            Mutation::Truncate { frame, keep } => {
                let f = &mut frames[idx(*frame)];
                let k = *keep as usize % f.len().max(1);
                f.truncate(k);
            }
            Mutation::Insert { frame, bytes } => frames.insert(idx(*frame), bytes.clone()),
            Mutation::Splice { frame, at, bytes } => {
                let f = &mut frames[idx(*frame)];
                if f.is_empty() {
                    continue;
                }
                let start = *at as usize % f.len();
                for (i, b) in bytes.iter().enumerate() {
                    match f.get_mut(start + i) {
                        Some(x) => *x = *b,
                        None => break,
                    }
                }
            }
        }
    }
}

/// A clean simulated migration, recorded.
#[derive(Debug)]
pub struct CleanRun {
    /// The frames the source sent.
    pub to_dest: Vec<Vec<u8>>,
    /// The frames the destination sent back.
    pub to_source: Vec<Vec<u8>>,
    /// The source's memory at the pause, by dense page index.
    pub source_memory: Vec<u8>,
    /// The device state the source saved.
    pub source_state: DeviceState,
}

/// Number of policies the stream targets choose from.
pub const POLICIES: u8 = 5;

fn policy(n: u8) -> Box<dyn Policy> {
    match n % POLICIES {
        0 => Box::new(Precopy::default()),
        1 => Box::new(PostCopy::default()),
        2 => Box::new(StopAndCopy),
        3 => Box::new(Hybrid::new({
            let mut v = HybridConfig::default();
            v.precopy = eager_switch();
            v
        })),
        _ => Box::new(Hca::default()),
    }
}

/// Pre-copy limits that never converge on downtime and stop after two
/// rounds: the hybrid run then switches to post-copy with stale pages to
/// discard.
fn eager_switch() -> PrecopyConfig {
    {
        let mut v = PrecopyConfig::default();
        v.downtime_target = Duration::ZERO;
        v.max_rounds = 2;
        v
    }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PageSize::DEFAULT, GUEST_PAGES * 4096).unwrap_or_else(|_| unreachable!())
}

fn workload() -> WorkloadSpec {
    WorkloadSpec {
        kind: WorkloadKind::Uniform,
        wss_pages: 16,
        writes_per_sec: 2_000.0,
        zero_fraction: 0.25,
        seed: 15,
        reads_per_write: 0.0,
        wss_offset: 0,
    }
}

fn config() -> EngineConfig {
    {
        let mut v = EngineConfig::default();
        v.batch_pages = 8;
        v.postcopy_batch_pages = 4;
        v
    }
}

fn read_all(guest: &SimGuest) -> Vec<u8> {
    let l = guest.layout().clone();
    let pages: Vec<PageNum> = l.pages().collect();
    let mut out = vec![0u8; l.total_bytes() as usize];
    let _ = guest.pages().read_pages(&pages, &mut out);
    out
}

/// The clean run of policy `n` (made once per process).
pub fn clean_run(n: u8) -> &'static CleanRun {
    static RUNS: OnceLock<Vec<CleanRun>> = OnceLock::new();
    let runs = RUNS.get_or_init(|| (0..POLICIES).map(record_clean_run).collect());
    &runs[(n % POLICIES) as usize]
}

type SimSource = SourceEngine<SimTracker, SimPages, SimControl, Box<dyn Policy>>;

/// A running source guest on a fresh virtual clock and its engine, run
/// by policy `n`.
fn sim_source(n: u8) -> (Arc<VirtualClock>, SimGuest, SimSource) {
    let vclock = Arc::new(VirtualClock::new());
    let clock: Arc<dyn Clock> = vclock.clone();
    let src = SimGuest::source(layout(), MemoryMode::Bytes, workload(), clock.clone())
        .unwrap_or_else(|e| panic!("simulated source: {e}"));
    let s = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy(n),
        clock,
        config(),
    );
    (vclock, src, s)
}

fn record_clean_run(n: u8) -> CleanRun {
    let (vclock, src, mut s) = sim_source(n);
    let clock: Arc<dyn Clock> = vclock.clone();
    let dst = SimGuest::destination(layout(), MemoryMode::Bytes, workload(), clock.clone())
        .unwrap_or_else(|e| panic!("simulated destination: {e}"));
    let mut d = DestinationEngine::new(dst.pages(), dst.control(), clock);
    let mut to_dest = Vec::new();
    let mut to_source = Vec::new();
    for _ in 0..MAX_STEPS {
        vclock.advance(Duration::from_micros(500));
        match s.poll().unwrap_or_else(|e| panic!("clean run {n}: {e}")) {
            SourceStep::Send(f) => {
                d.handle_frame(&f)
                    .unwrap_or_else(|e| panic!("clean run {n}: destination: {e}"));
                to_dest.push(f);
                while let Some(r) = d.poll_transmit() {
                    s.handle_frame(&r)
                        .unwrap_or_else(|e| panic!("clean run {n}: source: {e}"));
                    to_source.push(r);
                }
            }
            SourceStep::Wait => panic!("clean run {n}: the source waits on nothing"),
            SourceStep::Done => {
                let source_state = src
                    .control()
                    .save_state()
                    .unwrap_or_else(|e| panic!("clean run {n}: {e}"));
                return CleanRun {
                    to_dest,
                    to_source,
                    source_memory: read_all(&src),
                    source_state,
                };
            }
        }
    }
    panic!("clean run {n} did not end in {MAX_STEPS} steps")
}

/// Destination target: a broken stream never resumes a guest unlike the
/// source's.
pub fn destination(input: &StreamInput) {
    let clean = clean_run(input.policy);
    let mut frames = clean.to_dest.clone();
    mutate(&mut frames, &input.mutations);
    // No time passes: the destination guest, once resumed, does not
    // write, so what it holds at the end is what it was given.
    let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    let dst = SimGuest::destination(layout(), MemoryMode::Bytes, workload(), clock.clone())
        .unwrap_or_else(|e| panic!("simulated destination: {e}"));
    let mut e = DestinationEngine::new(dst.pages(), dst.control(), clock);
    let mut resumed = false;
    for f in &frames {
        match e.handle_frame(f) {
            Ok(DestStatus::Continue) => {}
            Ok(DestStatus::Resumed) => resumed = true,
            Ok(DestStatus::Completed) => {
                resumed = true;
                break;
            }
            Err(_) => break,
        }
        while e.poll_transmit().is_some() {}
    }
    assert_eq!(resumed, e.resumed(), "the engine's resume flag disagrees");
    assert_eq!(
        resumed,
        !dst.is_paused(),
        "the guest's state disagrees with the engine"
    );
    if !resumed {
        return;
    }
    let state = dst.control().save_state().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        state, clean.source_state,
        "resumed with a device state the source did not save"
    );
    let held = read_all(&dst);
    let ps = 4096;
    for (i, p) in layout().pages().enumerate() {
        if dst.is_absent(p) {
            continue;
        }
        assert!(
            held[i * ps..(i + 1) * ps] == clean.source_memory[i * ps..(i + 1) * ps],
            "resumed with page {p:#x} unlike the source's"
        );
    }
}

/// Source target: broken replies never leave the guest down before the
/// point of no return, nor complete a migration no destination confirmed.
pub fn source(input: &StreamInput) {
    let clean = clean_run(input.policy);
    let mut replies = clean.to_source.clone();
    mutate(&mut replies, &input.mutations);
    let resumed_frame = clean
        .to_source
        .iter()
        .find(|f| f.first() == Some(&(RecordType::Resumed as u8)));
    let (vclock, src, mut s) = sim_source(input.policy);
    let mut next = replies.iter();
    let mut delivered = Vec::new();
    let mut result: Result<(), MigrationError> = Ok(());
    let mut steps = 0usize;
    // Replies are handed over whenever the source waits, and one after
    // each frame it sends (as a driver picks up early replies).
    loop {
        steps += 1;
        assert!(steps < MAX_STEPS, "the source engine did not end");
        vclock.advance(Duration::from_micros(500));
        let step = match s.poll() {
            Ok(step) => step,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let deliver = match step {
            SourceStep::Done => break,
            SourceStep::Send(_) => next.len() > 0 && steps.is_multiple_of(4),
            SourceStep::Wait => true,
        };
        if !deliver {
            continue;
        }
        match next.next() {
            Some(r) => {
                delivered.push(r.clone());
                if let Err(e) = s.handle_frame(r) {
                    result = Err(e);
                    break;
                }
            }
            None if matches!(step, SourceStep::Wait) => {
                result = Err(s.fail(TransportError::Timeout(Duration::from_secs(1)).into()));
                break;
            }
            None => {}
        }
    }
    match result {
        Ok(()) => {
            let confirmed = resumed_frame.is_some_and(|r| delivered.iter().any(|d| d == r));
            assert!(confirmed, "completed without an intact resume confirmation");
            assert!(src.is_paused(), "completed, yet the source guest runs");
        }
        Err(e) if e.kind() == ErrorKind::Settle => {
            assert!(
                s.committed(),
                "outcome unknown before the point of no return: {e}"
            );
            assert!(
                src.is_paused(),
                "outcome unknown, yet the source guest runs"
            );
        }
        Err(e) => assert!(
            !src.is_paused(),
            "failed before the point of no return with the guest paused: {e}"
        ),
    }
}

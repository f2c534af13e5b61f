//! The stable-Rust fuzz runner: each target of `backend_sim::fuzzing` on
//! generated inputs for a bounded time, with the targets' oracles plus
//! two of its own: no execution takes long (no hang) and no allocation
//! is larger than a frame may be (no decoder call allocates more than a
//! small multiple of the frame it was given, and no engine execution more
//! than `MAX_FRAME_LEN` at once).
//!
//! `LIVEMIG_FUZZ_SECONDS` sets the time per target (default 15, so the
//! three take 45 s); `LIVEMIG_FUZZ_EXECS`, if set, runs each target for
//! that many executions instead (for a long run); `LIVEMIG_FUZZ_SEED` the
//! seed. Inputs are random bytes
//! read through `arbitrary`, as cargo-fuzz would hand them, and, for the
//! decoder, frames of clean runs broken by the stream mutations.

use arbitrary::{Arbitrary, Unstructured};
use backend_sim::fuzzing::{self, DecodeInput, StreamInput};
use migrate_core::protocol::{Decoder, MAX_FRAME_LEN};
use rand::RngExt;
use rand_pcg::Pcg64Mcg;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Records the largest single allocation made by the current thread
/// while tracking is on.
struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// thread-locals only observe sizes (const-initialised, no allocation).
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, LARGEST.with(|l| l.get()))
}

/// The longest one execution may take before it counts as a hang.
const EXEC_LIMIT: Duration = Duration::from_secs(10);

fn budget() -> Duration {
    let secs = std::env::var("LIVEMIG_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(15.0);
    Duration::from_secs_f64(secs)
}

fn execs_wanted() -> Option<u64> {
    std::env::var("LIVEMIG_FUZZ_EXECS")
        .ok()
        .and_then(|s| s.parse().ok())
}

fn seed() -> u64 {
    std::env::var("LIVEMIG_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x15)
}

/// Random bytes of a random length up to `max`.
fn bytes(rng: &mut Pcg64Mcg, max: usize, buf: &mut Vec<u8>) {
    let n = rng.random_range(0..=max);
    buf.clear();
    buf.extend((0..n).map(|_| rng.random::<u8>()));
}

/// Runs `exec` on inputs made by `make` until the budget is spent;
/// returns the executions.
fn run<T>(
    name: &str,
    rng: &mut Pcg64Mcg,
    mut make: impl FnMut(&mut Pcg64Mcg) -> Option<T>,
    mut exec: impl FnMut(&T),
) -> u64 {
    let start = Instant::now();
    let limit = budget();
    let wanted = execs_wanted();
    let mut execs = 0u64;
    while match wanted {
        Some(n) => execs < n,
        None => start.elapsed() < limit,
    } {
        let Some(input) = make(rng) else { continue };
        let t = Instant::now();
        exec(&input);
        assert!(
            t.elapsed() < EXEC_LIMIT,
            "{name}: one execution took {:?}",
            t.elapsed()
        );
        execs += 1;
    }
    println!("fuzz {name}: {execs} executions in {:?}", start.elapsed());
    execs
}

/// An arbitrary `T` from random bytes, as cargo-fuzz builds it.
fn arbitrary<T: for<'a> Arbitrary<'a>>(
    rng: &mut Pcg64Mcg,
    max: usize,
    buf: &mut Vec<u8>,
) -> Option<T> {
    bytes(rng, max, buf);
    T::arbitrary_take_rest(Unstructured::new(buf)).ok()
}

fn decode_checked(input: &DecodeInput) {
    // The target itself, then each frame in a sequenced decoder with its
    // allocations measured.
    fuzzing::decode(input);
    let mut d = Decoder::sequenced();
    for f in &input.frames {
        let (_, largest) = largest_allocation(|| d.decode(f));
        assert!(
            largest <= 4 * f.len() + 1024,
            "a {}-byte frame made a {largest}-byte allocation",
            f.len()
        );
    }
}

/// Runs a stream target with its largest allocation bounded.
fn bounded(target: fn(&StreamInput)) -> impl Fn(&StreamInput) {
    move |input| {
        let ((), largest) = largest_allocation(|| target(input));
        assert!(
            largest <= MAX_FRAME_LEN,
            "one allocation of {largest} bytes, above the frame limit"
        );
    }
}

#[test]
fn fuzz_targets_hold_their_oracles() {
    let mut rng = Pcg64Mcg::new(seed() as u128);
    let mut buf = Vec::new();
    // Make the clean runs before the clock starts.
    for p in 0..fuzzing::POLICIES {
        assert!(fuzzing::clean_run(p).to_dest.len() > 4);
    }
    // The post-copy and hybrid runs discard pages, so broken discards are
    // among the inputs.
    for p in [1, 3] {
        assert!(fuzzing::clean_run(p).to_dest.iter().any(|f| {
            f[0] == migrate_core::protocol::RecordType::Discard as u8
                || f[0] == migrate_core::protocol::RecordType::DiscardBitmap as u8
        }));
    }
    let decoded = run(
        "decoder",
        &mut rng,
        |rng| {
            if rng.random::<bool>() {
                arbitrary::<DecodeInput>(rng, 4096, &mut buf)
            } else {
                // Frames of a clean run, broken.
                let s: StreamInput = arbitrary(rng, 256, &mut buf)?;
                let mut frames = fuzzing::clean_run(s.policy).to_dest.clone();
                fuzzing::mutate(&mut frames, &s.mutations);
                Some(DecodeInput { frames })
            }
        },
        decode_checked,
    );
    let mut buf = Vec::new();
    let dest = run(
        "destination",
        &mut rng,
        |rng| arbitrary::<StreamInput>(rng, 256, &mut buf),
        bounded(fuzzing::destination),
    );
    let mut buf = Vec::new();
    let src = run(
        "source",
        &mut rng,
        |rng| arbitrary::<StreamInput>(rng, 128, &mut buf),
        bounded(fuzzing::source),
    );
    assert!(decoded > 100 && dest > 100 && src > 100);
}

/// The oracles bite: an unbroken stream resumes the destination with the
/// source's memory, and a stream with a flipped byte in its device state
/// does not resume it.
#[test]
fn stream_targets_run_clean_and_broken_streams() {
    for p in 0..fuzzing::POLICIES {
        fuzzing::destination(&StreamInput {
            policy: p,
            mutations: Vec::new(),
        });
        fuzzing::source(&StreamInput {
            policy: p,
            mutations: Vec::new(),
        });
        let clean = fuzzing::clean_run(p);
        let state_at = clean
            .to_dest
            .iter()
            .position(|f| f[0] == migrate_core::protocol::RecordType::DeviceState as u8)
            .expect("a device state record");
        fuzzing::destination(&StreamInput {
            policy: p,
            mutations: vec![fuzzing::Mutation::Flip {
                frame: state_at as u16,
                at: 20,
                mask: 1,
            }],
        });
    }
}

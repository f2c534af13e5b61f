//! Throughput of livemig's hot paths, each next to a plain `memcpy` of the
//! same number of bytes measured in the same run.
//!
//! Run with `cargo bench --bench hotpath`. For every case it prints the bytes
//! one iteration covers, the median time of an iteration, the throughput in
//! GB/s (10^9 bytes per second), the throughput of `copy_from_slice` over a
//! buffer of the same size (source and destination page-aligned), and the
//! ratio of the two. A final copy of the
//! table in Markdown, between `--- markdown ---` and `--- end ---`, can be
//! pasted into a README.
//!
//! Cases (4 KiB pages throughout):
//! - `DirtyBitmap::iter_ones` over a 64 GiB guest (16 Mi pages, a 2 MiB
//!   bitmap) at 0.1 %, 1 %, 10 %, 50 % and 100 % of pages dirty, summing the
//!   page numbers; bytes are the bitmap's, and the set pages iterated per
//!   second are shown too;
//! - `DirtyBitmap::union_with` of two such bitmaps (bytes: one bitmap; the
//!   union reads two and writes one, the copy reads one and writes one);
//! - `encode_page_batch` of 256 pages of random data into a reused buffer,
//!   and of 256 pages of which half are zero (bytes: all 256 pages);
//! - the source engine's whole path from guest memory (a page-aligned
//!   buffer) to a new frame: reading the pages into a buffer and encoding
//!   them from there (as it did), and `encode_page_batch_from`, which
//!   reads them straight into the frame a few at a time;
//! - decoding that frame with a `Decoder` (which checks the frame's CRC)
//!   and touching each page's first and last byte; decoding it and then
//!   copying every page into page-aligned destination memory (zero pages
//!   are filled with zeros), as a destination does once its guest runs;
//!   and `Decoder::decode_placing`, which checks and places in one pass,
//!   as a destination does before; and `decode_placing` with each page
//!   hashed (`page_hash`) into a table right after it is placed, while it
//!   is in cache, as the destination engine does for its completion check;
//! - 256 copies of a 4 KiB page whose destination lies 8 bytes past its
//!   source modulo 4096, with `copy_from_slice` (the C library's
//!   `memcpy`, `rep movsb` on this size) and with `copy::copy_bytes`;
//! - `is_zero_page` over 256 pages that are all zero (a full scan of each)
//!   and over 256 pages whose first byte is not zero (an early exit, so its
//!   GB/s counts the bytes classified, not the bytes read);
//! - the frame CRC (CRC32C) over a page batch of random pages
//!   (`protocol::reseal`), the one checksum encode and decode take;
//! - `page_hash` (XXH3-64, the per-page hash of the memory digest and the
//!   hash behind the batch checksum) over 256 pages of random data, which
//!   shows how much of the encode and decode cases the checksum accounts
//!   for.
//!
//! # Why not criterion or divan
//!
//! The point of each line is the ratio to `memcpy` on the same machine in
//! the same moment: on a shared 2-core machine (CI runners, VMs, a build
//! running beside) absolute numbers swing by tens of percent between runs,
//! while a ratio to a baseline taken under the same conditions moves far
//! less. Criterion and divan measure one function at a time, so a baseline
//! would be a separate benchmark taken seconds apart, and neither prints a
//! ratio between two of them. This harness uses only `std`: for each case
//! it warms up, calibrates once how many iterations last at least 20 ms,
//! then takes 15 samples of the case and 15 of the `memcpy` baseline,
//! interleaved (alternating which goes first), and reports the medians.
//! `std::hint::black_box` keeps inputs opaque and results alive so nothing
//! is optimised away.
//!
//! `cargo bench --bench hotpath -- WORD…` runs only the cases whose name
//! contains one of the words.

use livemig::core::copy::copy_bytes;
use livemig::core::digest::{is_zero_page, page_hash};
use livemig::core::protocol::{
    encode, encode_page_batch, encode_page_batch_from, reseal, Decoder, Placed, Record, VERSION,
};
use livemig::core::DirtyBitmap;
use livemig::core::{MemoryLayout, PageNum, PageSize};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Samples per case (and per baseline).
const SAMPLES: usize = 15;
/// Every sample lasts at least this long.
const SAMPLE_TIME: Duration = Duration::from_millis(20);
/// Warm-up time per measured function.
const WARMUP_TIME: Duration = Duration::from_millis(50);
/// Guest size for the bitmap cases: 64 GiB of 4 KiB pages.
const GUEST_PAGES: u64 = 16 << 20;
/// Pages per batch in the protocol and zero-page cases.
const BATCH_PAGES: usize = 256;
/// Page size in the protocol and zero-page cases.
const PAGE: usize = 4096;
/// First GFN of the batches (any valid page number would do).
const BATCH_FIRST_GFN: PageNum = 1 << 20;

#[path = "support/splitmix.rs"]
mod splitmix;
use splitmix::SplitMix64;

/// One thing to measure.
struct Case {
    name: String,
    /// Bytes one iteration covers (the memcpy baseline copies as many).
    bytes: usize,
    /// Pages one iteration handles, if pages per second means something.
    pages: Option<u64>,
    run: Box<dyn FnMut()>,
}

/// The medians of one case and its baseline.
struct Row {
    name: String,
    bytes: usize,
    pages: Option<u64>,
    case_ns: f64,
    memcpy_ns: f64,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.case_ns
    }
    fn memcpy_gbps(&self) -> f64 {
        self.bytes as f64 / self.memcpy_ns
    }
    fn ratio(&self) -> f64 {
        self.gbps() / self.memcpy_gbps()
    }
    fn cells(&self) -> [String; 7] {
        [
            self.name.clone(),
            fmt_bytes(self.bytes),
            fmt_time(self.case_ns),
            format!("{:.2}", self.gbps()),
            format!("{:.2}", self.memcpy_gbps()),
            format!("{:.3}", self.ratio()),
            match self.pages {
                Some(p) => fmt_rate(p as f64 * 1e9 / self.case_ns),
                None => "-".to_owned(),
            },
        ]
    }
}

const HEADINGS: [&str; 7] = [
    "case",
    "bytes/iter",
    "time/iter",
    "GB/s",
    "memcpy GB/s",
    "ratio",
    "pages/s",
];

fn time_iters(f: &mut dyn FnMut(), iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed()
}

/// Warms `f` up for at least `WARMUP_TIME` and returns how many iterations
/// make a sample of at least `SAMPLE_TIME`.
fn warm_and_calibrate(f: &mut dyn FnMut()) -> u64 {
    let started = Instant::now();
    let mut iters = 1u64;
    loop {
        let t = time_iters(f, iters);
        if started.elapsed() >= WARMUP_TIME && t >= SAMPLE_TIME / 4 {
            let per_iter = t.as_secs_f64() / iters as f64;
            // 10 % headroom so no sample falls short of SAMPLE_TIME.
            return ((SAMPLE_TIME.as_secs_f64() * 1.1 / per_iter).ceil() as u64).max(1);
        }
        if t < SAMPLE_TIME / 4 {
            iters = iters.saturating_mul(2);
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Measures `case` and a `memcpy` of as many bytes, samples interleaved.
fn measure(case: &mut Case) -> Row {
    // Both page-aligned: `memcpy` at its best (see `copy::copy_bytes`
    // for how much an unlucky relative alignment costs it).
    let (mut src, s_at) = page_aligned(case.bytes, 0);
    SplitMix64(0xC0FF_EE00).fill(&mut src[s_at..s_at + case.bytes]);
    let (mut dst, d_at) = page_aligned(case.bytes, 1);
    let mut memcpy = || {
        dst[d_at..d_at + case.bytes].copy_from_slice(black_box(&src[s_at..s_at + case.bytes]));
        black_box(&mut dst);
    };
    let case_iters = warm_and_calibrate(&mut case.run);
    let memcpy_iters = warm_and_calibrate(&mut memcpy);
    let mut case_ns = Vec::with_capacity(SAMPLES);
    let mut memcpy_ns = Vec::with_capacity(SAMPLES);
    let mut sample_case = |out: &mut Vec<f64>| {
        let t = time_iters(&mut case.run, case_iters);
        out.push(t.as_nanos() as f64 / case_iters as f64);
    };
    for i in 0..SAMPLES {
        if i % 2 == 1 {
            sample_case(&mut case_ns);
        }
        let t = time_iters(&mut memcpy, memcpy_iters);
        memcpy_ns.push(t.as_nanos() as f64 / memcpy_iters as f64);
        if i % 2 == 0 {
            sample_case(&mut case_ns);
        }
    }
    Row {
        name: case.name.clone(),
        bytes: case.bytes,
        pages: case.pages,
        case_ns: median(&mut case_ns),
        memcpy_ns: median(&mut memcpy_ns),
    }
}

fn fmt_bytes(b: usize) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

fn fmt_time(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

fn fmt_rate(per_sec: f64) -> String {
    if per_sec >= 1e9 {
        format!("{:.2} G", per_sec / 1e9)
    } else if per_sec >= 1e6 {
        format!("{:.1} M", per_sec / 1e6)
    } else {
        format!("{:.1} k", per_sec / 1e3)
    }
}

/// A bitmap of `GUEST_PAGES` pages, each set with probability `density`.
fn random_bitmap(density: f64, seed: u64) -> DirtyBitmap {
    let nwords = GUEST_PAGES.div_ceil(64) as usize;
    let mut rng = SplitMix64(seed);
    let words: Vec<u64> = if density >= 1.0 {
        vec![u64::MAX; nwords]
    } else {
        // Bit set when a uniform u64 falls below density * 2^64.
        let threshold = (density * 18_446_744_073_709_551_616.0) as u64;
        (0..nwords)
            .map(|_| {
                (0..64).fold(0u64, |w, bit| {
                    w | (u64::from(rng.next_u64() < threshold) << bit)
                })
            })
            .collect()
    };
    DirtyBitmap::from_words(words, GUEST_PAGES)
}

/// `BATCH_PAGES` pages of random data; if `half_zero`, a fixed random half
/// of them are zero.
fn batch_contents(half_zero: bool, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    let mut contents = vec![0u8; BATCH_PAGES * PAGE];
    rng.fill(&mut contents);
    if half_zero {
        let mut order: Vec<usize> = (0..BATCH_PAGES).collect();
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for &p in &order[..BATCH_PAGES / 2] {
            contents[p * PAGE..(p + 1) * PAGE].fill(0);
        }
    }
    contents
}

fn batch_gfns() -> Vec<PageNum> {
    (0..BATCH_PAGES as u64)
        .map(|i| BATCH_FIRST_GFN + i)
        .collect()
}

fn encode_batch(contents: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_page_batch(0, PageSize::DEFAULT, &batch_gfns(), contents, &mut frame);
    frame
}

/// A decoder that has seen the stream header and a 64 GiB layout.
fn primed_decoder() -> Decoder {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, GUEST_PAGES * PAGE as u64)
        .expect("64 GiB flat layout");
    let mut dec = Decoder::new();
    for rec in [Record::Header { version: VERSION }, Record::Layout(layout)] {
        let mut frame = Vec::new();
        encode(&rec, &mut frame);
        dec.decode(&frame).expect("header and layout decode");
    }
    dec
}

/// Decodes `frame` and copies every page into `guest` (indexed from
/// `BATCH_FIRST_GFN`), zero-filling zero pages: the frame checked first,
/// then placed, as a destination does once the guest runs (post-copy).
fn decode_into(dec: &mut Decoder, frame: &[u8], guest: &mut [u8]) {
    let Ok(Record::PageBatch(batch)) = dec.decode(frame) else {
        panic!("frame did not decode as a page batch");
    };
    for (gfn, data) in batch.iter() {
        place_page(guest, gfn, data);
    }
}

/// Decodes `frame` and copies every page into `guest` in one pass
/// (`Decoder::decode_placing`), as a destination does before the guest
/// runs.
fn decode_placing_into(dec: &mut Decoder, frame: &[u8], guest: &mut [u8]) {
    let r = dec.decode_placing(frame, |gfn, data| {
        place_page(guest, gfn, data);
        Ok::<(), ()>(())
    });
    assert!(
        matches!(r, Ok(Placed::Batch { .. })),
        "frame did not decode as a page batch"
    );
}

/// Copies a page into `guest` (indexed from `BATCH_FIRST_GFN`) as a sink
/// does, or zero-fills it.
fn place_page(guest: &mut [u8], gfn: PageNum, data: Option<&[u8]>) {
    let off = (gfn - BATCH_FIRST_GFN) as usize * PAGE;
    let dst = &mut guest[off..off + PAGE];
    match data {
        Some(d) => copy_bytes(dst, d),
        None => dst.fill(0),
    }
}

/// `len` bytes starting on a 4 KiB boundary, as guest memory is, at
/// `offset` in the returned buffer.
fn page_aligned(len: usize, fill: u8) -> (Vec<u8>, usize) {
    let buf = vec![fill; len + PAGE];
    let offset = (PAGE - buf.as_ptr() as usize % PAGE) % PAGE;
    (buf, offset)
}

/// Reads `pages` (numbered from `BATCH_FIRST_GFN`) out of `memory` into
/// `out` as a backend's `read_pages` does.
fn read_guest(memory: &[u8], pages: &[PageNum], out: &mut [u8]) {
    for (p, slot) in pages.iter().zip(out.chunks_exact_mut(PAGE)) {
        let at = (p - BATCH_FIRST_GFN) as usize * PAGE;
        copy_bytes(slot, &memory[at..at + PAGE]);
    }
}

fn bitmap_cases(cases: &mut Vec<Case>) {
    let bitmap_bytes = (GUEST_PAGES / 8) as usize;
    for (label, density) in [
        ("0.1%", 0.001),
        ("1%", 0.01),
        ("10%", 0.1),
        ("50%", 0.5),
        ("100%", 1.0),
    ] {
        let bitmap = random_bitmap(density, 0xB17_0000 + (density * 1e4) as u64);
        let set = bitmap.count_ones();
        cases.push(Case {
            name: format!("bitmap iter_ones, {label} dirty"),
            bytes: bitmap_bytes,
            pages: Some(set),
            run: Box::new(move || {
                let b = black_box(&bitmap);
                black_box(b.iter_ones().sum::<u64>());
            }),
        });
    }
    let mut a = random_bitmap(0.1, 0xA);
    let b = random_bitmap(0.1, 0xB);
    cases.push(Case {
        name: "bitmap union_with".to_owned(),
        bytes: bitmap_bytes,
        pages: None,
        run: Box::new(move || {
            a.union_with(black_box(&b));
            black_box(&mut a);
        }),
    });
}

fn protocol_cases(cases: &mut Vec<Case>) {
    let batch_bytes = BATCH_PAGES * PAGE;
    let pages = Some(BATCH_PAGES as u64);
    for (label, half_zero) in [("random", false), ("50% zero", true)] {
        let contents = batch_contents(half_zero, 0xDA7A);
        let gfns = batch_gfns();
        let mut out = Vec::new();
        cases.push(Case {
            name: format!("encode_page_batch from a buffer, {label}"),
            bytes: batch_bytes,
            pages,
            run: Box::new(move || {
                out.clear();
                let s = encode_page_batch(
                    0,
                    PageSize::DEFAULT,
                    black_box(&gfns),
                    black_box(&contents),
                    &mut out,
                );
                black_box((&mut out, s));
            }),
        });
    }
    for (label, half_zero) in [("random", false), ("50% zero", true)] {
        // Guest memory (page-aligned); the source engine's reads of it,
        // into a buffer and then the frame (as it did), or straight into
        // the frame. Each frame is a new buffer, as the engine's are.
        let (mut memory, at) = page_aligned(batch_bytes, 0);
        memory[at..at + batch_bytes].copy_from_slice(&batch_contents(half_zero, 0xDA7A));
        let gfns = batch_gfns();
        let mut buf = vec![0u8; batch_bytes];
        let guest = memory.clone();
        let gfns_b = gfns.clone();
        let check = {
            let mut a = Vec::new();
            encode_page_batch(
                0,
                PageSize::DEFAULT,
                &gfns,
                &memory[at..][..batch_bytes],
                &mut a,
            );
            a
        };
        let mut b = Vec::new();
        encode_page_batch_from(
            0,
            PageSize::DEFAULT,
            &gfns,
            &[],
            |p: &[PageNum], out: &mut [u8]| {
                read_guest(&memory[at..][..batch_bytes], p, out);
                Ok::<(), ()>(())
            },
            &mut b,
        )
        .expect("read");
        assert!(b == check, "reading into the frame made another frame");
        cases.push(Case {
            name: format!("read into a buffer, then encode, {label}"),
            bytes: batch_bytes,
            pages,
            run: Box::new(move || {
                let mem = &guest[at..][..batch_bytes];
                read_guest(black_box(mem), &gfns_b, &mut buf);
                let mut out = Vec::new();
                let s = encode_page_batch(0, PageSize::DEFAULT, &gfns_b, &buf, &mut out);
                black_box((&mut out, s));
            }),
        });
        cases.push(Case {
            name: format!("encode_page_batch_from (read into the frame), {label}"),
            bytes: batch_bytes,
            pages,
            run: Box::new(move || {
                let mem = black_box(&memory[at..][..batch_bytes]);
                let mut out = Vec::new();
                let s = encode_page_batch_from(
                    0,
                    PageSize::DEFAULT,
                    &gfns,
                    &[],
                    |p: &[PageNum], slot: &mut [u8]| {
                        read_guest(mem, p, slot);
                        Ok::<(), ()>(())
                    },
                    &mut out,
                );
                black_box((&mut out, s.is_ok()));
            }),
        });
    }
    for (label, half_zero) in [("random", false), ("50% zero", true)] {
        let contents = batch_contents(half_zero, 0xDA7A);
        let frame = encode_batch(&contents);
        // Check once that both decode-and-copy paths reproduce the pages.
        let dec = primed_decoder();
        for fused in [false, true] {
            let (mut guest, at) = page_aligned(batch_bytes, 0xAA);
            if fused {
                decode_placing_into(&mut dec.clone(), &frame, &mut guest[at..]);
            } else {
                decode_into(&mut dec.clone(), &frame, &mut guest[at..]);
            }
            assert!(
                guest[at..at + batch_bytes] == contents[..],
                "decode did not reproduce the batch"
            );
        }

        let frame_for_sum = frame.clone();
        let mut dec_sum = dec.clone();
        cases.push(Case {
            name: format!("decode + touch pages, {label}"),
            bytes: batch_bytes,
            pages,
            run: Box::new(move || {
                let Ok(Record::PageBatch(batch)) = dec_sum.decode(black_box(&frame_for_sum)) else {
                    panic!("frame did not decode as a page batch");
                };
                let mut acc = 0u64;
                for (gfn, data) in batch.iter() {
                    acc ^= gfn;
                    if let Some(d) = data {
                        acc ^= u64::from(d[0] ^ d[d.len() - 1]);
                    }
                }
                black_box(acc);
            }),
        });
        for fused in [false, true] {
            let (mut guest, at) = page_aligned(batch_bytes, 0xAA);
            let frame = frame.clone();
            let mut dec = dec.clone();
            cases.push(Case {
                name: if fused {
                    format!("decode_placing (check while placing), {label}")
                } else {
                    format!("decode, then copy into place, {label}")
                },
                bytes: batch_bytes,
                pages,
                run: Box::new(move || {
                    let g = &mut guest[at..];
                    if fused {
                        decode_placing_into(&mut dec, black_box(&frame), g);
                    } else {
                        decode_into(&mut dec, black_box(&frame), g);
                    }
                    black_box(g);
                }),
            });
        }
    }
    // The destination engine's path: place, then hash each page into a
    // table while it is in cache.
    for (label, half_zero) in [("random", false), ("50% zero", true)] {
        let frame = encode_batch(&batch_contents(half_zero, 0xDA7A));
        let mut dec = primed_decoder();
        let (mut guest, at) = page_aligned(batch_bytes, 0xAA);
        let mut table = vec![0u64; BATCH_PAGES];
        let zero_hash = page_hash(&[0u8; PAGE]);
        cases.push(Case {
            name: format!("decode_placing + page_hash into a table, {label}"),
            bytes: batch_bytes,
            pages,
            run: Box::new(move || {
                let g = &mut guest[at..];
                let r = dec.decode_placing(black_box(&frame), |gfn, data| {
                    place_page(g, gfn, data);
                    let i = (gfn - BATCH_FIRST_GFN) as usize;
                    table[i] = data.map_or(zero_hash, page_hash);
                    Ok::<(), ()>(())
                });
                assert!(matches!(r, Ok(Placed::Batch { .. })));
                black_box(&table);
            }),
        });
    }
    // 4 KiB page copies whose destination lies 8 bytes past the source
    // modulo 4096 (the alignment of the regression in decode + copy).
    for (label, blocks) in [("copy_from_slice", false), ("copy_bytes", true)] {
        let (src, s_at) = page_aligned(batch_bytes + 64, 0x5A);
        let (mut dst, d_at) = page_aligned(batch_bytes + 64, 0);
        cases.push(Case {
            name: format!("4 KiB page copies, dst 8 B past src, {label}"),
            bytes: batch_bytes,
            pages,
            run: Box::new(move || {
                let s = black_box(&src[s_at..]);
                let d = &mut dst[d_at + 8..];
                for k in 0..BATCH_PAGES {
                    let (a, b) = (&mut d[k * PAGE..][..PAGE], &s[k * PAGE..][..PAGE]);
                    if blocks {
                        copy_bytes(a, b);
                    } else {
                        a.copy_from_slice(b);
                    }
                }
                black_box(d);
            }),
        });
    }
}

fn page_check_cases(cases: &mut Vec<Case>) {
    let bytes = BATCH_PAGES * PAGE;
    // Written, not just allocated: a fresh zeroed allocation may map every
    // page to the kernel's single zero page and read unrealistically fast.
    let mut zeros = vec![0xFFu8; bytes];
    zeros.fill(black_box(0));
    let mut early = zeros.clone();
    for page in early.chunks_exact_mut(PAGE) {
        page[0] = 1;
    }
    for (label, buf) in [("all-zero pages", zeros), ("first byte non-zero", early)] {
        cases.push(Case {
            name: format!("is_zero_page, {label}"),
            bytes,
            pages: Some(BATCH_PAGES as u64),
            run: Box::new(move || {
                let buf = black_box(&buf);
                let zero = buf.chunks_exact(PAGE).filter(|p| is_zero_page(p)).count();
                black_box(zero);
            }),
        });
    }
    let mut frame = encode_batch(&batch_contents(false, 0xDA7A));
    cases.push(Case {
        name: "CRC32C of a page batch (reseal), random".to_owned(),
        bytes,
        pages: Some(BATCH_PAGES as u64),
        run: Box::new(move || {
            reseal(black_box(&mut frame));
        }),
    });
    let contents = batch_contents(false, 0xDA7A);
    cases.push(Case {
        name: "page_hash (xxh3_64), random".to_owned(),
        bytes,
        pages: Some(BATCH_PAGES as u64),
        run: Box::new(move || {
            let buf = black_box(&contents);
            let h = buf
                .chunks_exact(PAGE)
                .fold(0u64, |acc, p| acc ^ page_hash(p));
            black_box(h);
        }),
    });
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn main() {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "livemig hot paths on {} ({cores} cores available); GB = 10^9 bytes; \
         median of {SAMPLES} samples of >= {} ms, memcpy baseline interleaved",
        cpu_model(),
        SAMPLE_TIME.as_millis()
    );

    let mut cases = Vec::new();
    bitmap_cases(&mut cases);
    protocol_cases(&mut cases);
    page_check_cases(&mut cases);
    // `cargo bench --bench hotpath -- WORD` keeps the cases whose name
    // contains WORD (cargo's own `--bench` argument is ignored).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    cases.retain(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())));

    let mut widths = HEADINGS.map(|h| h.chars().count());
    widths[0] = widths[0].max(cases.iter().map(|c| c.name.len()).max().unwrap_or(0));
    for w in &mut widths[1..] {
        *w = (*w).max(11);
    }
    let line = |cells: &[String; 7]| {
        let mut s = format!("{:<w$}", cells[0], w = widths[0]);
        for (c, w) in cells.iter().zip(widths).skip(1) {
            s.push_str(&format!("  {c:>w$}"));
        }
        s
    };
    println!();
    println!("{}", line(&HEADINGS.map(str::to_owned)));
    println!("{}", line(&widths.map(|w| "-".repeat(w))));

    let mut rows = Vec::with_capacity(cases.len());
    for case in &mut cases {
        let row = measure(case);
        println!("{}", line(&row.cells()));
        rows.push(row);
    }

    println!();
    println!("--- markdown ---");
    println!("| {} |", HEADINGS.join(" | "));
    println!(
        "|{}",
        HEADINGS
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
            .collect::<String>()
    );
    for row in &rows {
        println!("| {} |", row.cells().join(" | "));
    }
    println!("--- end ---");
    eprintln!("(ran in {:.1} s)", started.elapsed().as_secs_f64());
}

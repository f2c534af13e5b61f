//! Whether XBZRLE-style deltas pay for pages sent again, set against LZ4
//! and Zstandard on the same pages and against memcpy.
//!
//! Run with `cargo bench --bench delta`. For each workload it builds
//! `PAGES` pairs of pages, the copy sent in an earlier round and the page
//! as it is when sent again, and prints in one run:
//! - memcpy of the new pages (the reference throughput);
//! - the delta (`support/xbzrle.rs`) of each new page against its old
//!   copy, given up for a page whose delta would exceed 7/8 of a page
//!   (that page is counted whole); its encode time includes copying the
//!   new page into the sender's cache of last-sent pages, which a sender
//!   of deltas must keep;
//! - LZ4 (`lz4_flex` block) and Zstandard at level 1 on the new pages in
//!   batches of 256 pages (the engine's default batch), a batch counted
//!   whole where compression does not save an eighth (the library's rule);
//!
//! each with bytes before and after, encode and decode throughput in GB/s
//! of page bytes, and the break-even link speed.
//!
//! Break-even: encoding `B` bytes takes `B / E` seconds (E the encode
//! throughput) and saves `B * s` bytes (s = 1 - after / before), which take
//! `B * s / L` seconds on a link of `L` bytes a second. Encoding pays while
//! the time saved exceeds the time spent, below `L = s * E`. The second
//! figure counts decode as well (encode and decode in series, no overlap
//! with the link): `L = s / (1 / E + 1 / D)`. Both are in Gbit/s.
//!
//! Every delta is decoded onto a copy of its old page and compared with
//! the new page, and every compressed batch is expanded and compared with
//! its input, before timing; a mismatch panics. Before that,
//! `check_delta_code` round-trips 20,000 varied changes and feeds cut-off
//! deltas to the decoder. (The delta code lives in a bench support file,
//! whose `#[cfg(test)]` tests would never run; these checks stand in for
//! them.)
//!
//! Workloads (fixed seeds, `support/splitmix.rs`):
//! - `kvm`: the KVM test payload stores its 64-bit loop counter at offset
//!   0 of one working-set page per iteration, so a page sent again differs
//!   from its last copy in the low bytes of that one word (the counter
//!   grew by a multiple of the working-set size); the rest of a
//!   working-set page is zeros, as the payload never writes it.
//! - `kvm-on-content`: the same one-word change on pages of realistic
//!   content (alternately random bytes and text-like bytes).
//! - `sim`: the simulator's byte-accurate guest: a page starts with its
//!   index + 1, the seed and, in its last word, the inverted seed, zeros
//!   elsewhere; every write stores a random odd 64-bit value in one of its
//!   512 words chosen at random. The old copy carries 0-15 earlier writes,
//!   the new page 1-3 more.
//! - `mix`: half the pages have 1-4 scattered 8-byte words changed on
//!   realistic content, half are rewritten entirely with random bytes.

#[path = "support/splitmix.rs"]
mod splitmix;
#[path = "support/text.rs"]
mod text;
#[path = "support/xbzrle.rs"]
mod xbzrle;

use splitmix::SplitMix64;
use std::hint::black_box;
use std::time::Instant;

const PAGE: usize = 4096;
const PAGES: usize = 4096;
const BATCH_PAGES: usize = 256;
const RUNS: usize = 7;
const DELTA_LIMIT: usize = PAGE - PAGE / 8;

/// Old and new copies of `PAGES` pages, each a contiguous buffer.
struct Workload {
    name: &'static str,
    old: Vec<u8>,
    new: Vec<u8>,
}

/// Realistic content: even pages random bytes, odd pages text-like.
fn content(rng: &mut SplitMix64, page: usize, buf: &mut [u8]) {
    if page.is_multiple_of(2) {
        rng.fill(buf);
    } else {
        text::fill(rng, buf);
    }
}

fn store(page: &mut [u8], slot: usize, value: u64) {
    page[slot * 8..slot * 8 + 8].copy_from_slice(&value.to_le_bytes());
}

fn kvm(on_content: bool) -> Workload {
    let mut rng = SplitMix64(0xD17A);
    let mut old = vec![0u8; PAGES * PAGE];
    let wss = 65_536u64;
    for (i, p) in old.chunks_mut(PAGE).enumerate() {
        if on_content {
            content(&mut rng, i, p);
        }
        // A counter some million iterations in, on this page's turn.
        let c = (rng.next_u64() % (1 << 32)) / wss * wss + i as u64;
        store(p, 0, c);
    }
    let mut new = old.clone();
    for p in new.chunks_mut(PAGE) {
        let mut w = [0u8; 8];
        w.copy_from_slice(&p[..8]);
        // One to a thousand laps of the working set later.
        let laps = 1 + rng.next_u64() % 1000;
        store(p, 0, u64::from_le_bytes(w) + laps * wss);
    }
    Workload {
        name: if on_content { "kvm-on-content" } else { "kvm" },
        old,
        new,
    }
}

fn sim() -> Workload {
    let mut rng = SplitMix64(0x51A);
    let seed = 0x5EED_u64;
    let mut old = vec![0u8; PAGES * PAGE];
    for (i, p) in old.chunks_mut(PAGE).enumerate() {
        store(p, 0, i as u64 + 1);
        store(p, 1, seed);
        store(p, PAGE / 8 - 1, !seed);
        for _ in 0..rng.next_u64() % 16 {
            let slot = (rng.next_u64() % 512) as usize;
            store(p, slot, rng.next_u64() | 1);
        }
    }
    let mut new = old.clone();
    for p in new.chunks_mut(PAGE) {
        for _ in 0..1 + rng.next_u64() % 3 {
            let slot = (rng.next_u64() % 512) as usize;
            store(p, slot, rng.next_u64() | 1);
        }
    }
    Workload {
        name: "sim",
        old,
        new,
    }
}

fn mix() -> Workload {
    let mut rng = SplitMix64(0x313);
    let mut old = vec![0u8; PAGES * PAGE];
    for (i, p) in old.chunks_mut(PAGE).enumerate() {
        // Content by i / 2, so both halves of the mix see both contents.
        content(&mut rng, i / 2, p);
    }
    let mut new = old.clone();
    for (i, p) in new.chunks_mut(PAGE).enumerate() {
        if i.is_multiple_of(2) {
            for _ in 0..1 + rng.next_u64() % 4 {
                let slot = (rng.next_u64() % 512) as usize;
                let v = rng.next_u64();
                store(p, slot, v);
            }
        } else {
            rng.fill(p);
        }
    }
    Workload {
        name: "mix",
        old,
        new,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `RUNS` runs of `f`.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

struct Figures {
    after: usize,
    encode_s: f64,
    decode_s: f64,
}

/// Per page: its delta, or `None` when it was given up and goes whole.
fn deltas(w: &Workload) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    w.old
        .chunks(PAGE)
        .zip(w.new.chunks(PAGE))
        .map(|(o, n)| xbzrle::encode(o, n, DELTA_LIMIT, &mut out).map(|_| out.clone()))
        .collect()
}

fn measure_delta(w: &Workload) -> Figures {
    let encoded = deltas(w);
    // The check: each delta applied to its old copy gives the new page.
    let mut page = vec![0u8; PAGE];
    for (i, d) in encoded.iter().enumerate() {
        let (o, n) = (&w.old[i * PAGE..][..PAGE], &w.new[i * PAGE..][..PAGE]);
        page.copy_from_slice(o);
        match d {
            Some(d) => xbzrle::decode(d, &mut page).expect("a delta the encoder made decodes"),
            None => page.copy_from_slice(n),
        }
        assert!(page == n, "{}: page {i} differs after the delta", w.name);
    }
    let after = encoded
        .iter()
        .map(|d| d.as_ref().map_or(PAGE, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(PAGE);
    // The sender also keeps what it sent as the old copy for next time:
    // each page is copied into a cache as well (timed with the encode).
    let mut cache = vec![0u8; w.new.len()];
    let encode_s = time(|| {
        for ((o, n), c) in w
            .old
            .chunks(PAGE)
            .zip(w.new.chunks(PAGE))
            .zip(cache.chunks_mut(PAGE))
        {
            black_box(xbzrle::encode(
                black_box(o),
                black_box(n),
                DELTA_LIMIT,
                &mut out,
            ));
            c.copy_from_slice(n);
        }
        black_box(&mut cache);
    });
    // Decoding is idempotent on a page that holds the old or the new copy,
    // so repeated runs onto the same buffer time the same work.
    let mut dst = w.old.clone();
    let decode_s = time(|| {
        for (i, d) in encoded.iter().enumerate() {
            let p = &mut dst[i * PAGE..][..PAGE];
            match d {
                Some(d) => xbzrle::decode(black_box(d), p).unwrap(),
                None => p.copy_from_slice(black_box(&w.new[i * PAGE..][..PAGE])),
            }
        }
        black_box(&mut dst);
    });
    assert!(dst == w.new, "{}: pages differ after timed decode", w.name);
    Figures {
        after,
        encode_s,
        decode_s,
    }
}

#[derive(Clone, Copy)]
enum Codec {
    Lz4,
    Zstd1,
}

fn measure_codec(w: &Workload, codec: Codec) -> Figures {
    let batch = BATCH_PAGES * PAGE;
    let budget = batch - batch / 8;
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    let mut zd = zstd::bulk::Decompressor::new().unwrap();
    let mut compress = |src: &[u8], out: &mut Vec<u8>| -> Option<usize> {
        match codec {
            Codec::Lz4 => {
                out.resize(lz4_flex::block::get_maximum_output_size(src.len()), 0);
                lz4_flex::block::compress_into(src, out)
                    .ok()
                    .filter(|n| *n < budget)
            }
            Codec::Zstd1 => {
                out.resize(budget, 0);
                z.compress_to_buffer(src, out).ok().filter(|n| *n < budget)
            }
        }
    };
    // Each batch compressed once, kept for decoding and the check.
    let mut packed: Vec<Option<Vec<u8>>> = Vec::new();
    let mut out = Vec::new();
    for b in w.new.chunks(batch) {
        packed.push(compress(b, &mut out).map(|n| out[..n].to_vec()));
    }
    let mut expand = |src: &[u8], dst: &mut [u8]| match codec {
        Codec::Lz4 => lz4_flex::block::decompress_into(src, dst).unwrap(),
        Codec::Zstd1 => zd.decompress_to_buffer(src, dst).unwrap(),
    };
    let mut dst = vec![0u8; w.new.len()];
    for (i, p) in packed.iter().enumerate() {
        let d = &mut dst[i * batch..][..batch];
        match p {
            Some(p) => assert_eq!(expand(p, d), batch),
            None => d.copy_from_slice(&w.new[i * batch..][..batch]),
        }
    }
    assert!(dst == w.new, "{}: batches differ after expansion", w.name);
    let after = packed
        .iter()
        .map(|p| p.as_ref().map_or(batch, Vec::len))
        .sum();
    let encode_s = time(|| {
        for b in w.new.chunks(batch) {
            black_box(compress(black_box(b), &mut out));
        }
    });
    let decode_s = time(|| {
        for (i, p) in packed.iter().enumerate() {
            let d = &mut dst[i * batch..][..batch];
            match p {
                Some(p) => {
                    black_box(expand(black_box(p), d));
                }
                None => d.copy_from_slice(black_box(&w.new[i * batch..][..batch])),
            }
        }
        black_box(&mut dst);
    });
    Figures {
        after,
        encode_s,
        decode_s,
    }
}

/// Round trips of the delta code on varied changes before any figure:
/// runs of changed bytes of every length at every kind of position
/// (first and last byte included), pages left alone, and cut-off deltas,
/// which must be refused without a panic.
fn check_delta_code() {
    let mut rng = SplitMix64(0xC0DE);
    let mut old = vec![0u8; PAGE];
    let mut out = Vec::new();
    for case in 0..20_000 {
        content(&mut rng, case, &mut old);
        let mut new = old.clone();
        for _ in 0..rng.next_u64() % 12 {
            let len = 1 + (rng.next_u64() % 64) as usize;
            let at = match rng.next_u64() % 4 {
                0 => 0,
                1 => PAGE - len,
                _ => (rng.next_u64() as usize) % (PAGE - len + 1),
            };
            for b in &mut new[at..at + len] {
                // Sometimes equal, so runs have gaps of every width.
                if !rng.next_u64().is_multiple_of(4) {
                    *b = b.wrapping_add(1 + (rng.next_u64() % 255) as u8);
                }
            }
        }
        let limit = [DELTA_LIMIT, 64, 8][case % 3];
        let Some(n) = xbzrle::encode(&old, &new, limit, &mut out) else {
            continue;
        };
        assert!(
            n <= limit && n == out.len(),
            "case {case}: delta past its limit"
        );
        if new == old {
            assert_eq!(n, 0, "case {case}: an unchanged page encodes to nothing");
        }
        let mut page = old.clone();
        xbzrle::decode(&out, &mut page).expect("a delta the encoder made decodes");
        assert!(page == new, "case {case}: round trip differs");
        if n > 0 {
            let mut page = old.clone();
            let cut = (rng.next_u64() as usize) % n;
            // A cut delta may still be a whole shorter one; it must not
            // panic, and must not be taken for the full delta.
            if xbzrle::decode(&out[..cut], &mut page).is_ok() {
                assert!(page != new || cut == 0 && old == new);
            }
        }
    }
}

fn main() {
    check_delta_code();
    let bytes = (PAGES * PAGE) as f64;
    println!(
        "{PAGES} re-sent pages of {PAGE} bytes per workload; median of {RUNS} runs; \
         GB/s of page bytes (1 GB = 1e9 bytes)"
    );
    println!(
        "break-even: encode pays on links slower than s * E Gbit/s (s = share of bytes saved, \
         E = encode speed); the last column counts decode too: s / (1/E + 1/D)"
    );
    for w in [kvm(false), kvm(true), sim(), mix()] {
        let mut dst = vec![0u8; w.new.len()];
        let memcpy_s = time(|| {
            dst.copy_from_slice(black_box(&w.new));
            black_box(&mut dst);
        });
        println!();
        println!("{}: memcpy {:.2} GB/s", w.name, bytes / memcpy_s / 1e9);
        println!(
            "  {:<8} {:>10} {:>10} {:>7} {:>9} {:>9} {:>8} {:>8} {:>13} {:>13}",
            "method",
            "before",
            "after",
            "after%",
            "enc GB/s",
            "dec GB/s",
            "enc/cpy",
            "dec/cpy",
            "pays <Gbit/s",
            "w/ dec Gbit/s"
        );
        for (name, f) in [
            ("delta", measure_delta(&w)),
            ("lz4", measure_codec(&w, Codec::Lz4)),
            ("zstd-1", measure_codec(&w, Codec::Zstd1)),
        ] {
            let e = bytes / f.encode_s;
            let d = bytes / f.decode_s;
            let s = 1.0 - f.after as f64 / bytes;
            let be = s * e * 8.0 / 1e9;
            let be_dec = s / (1.0 / e + 1.0 / d) * 8.0 / 1e9;
            println!(
                "  {:<8} {:>10} {:>10} {:>6.2}% {:>9.2} {:>9.2} {:>8.2} {:>8.2} {:>13.1} {:>13.1}",
                name,
                PAGES * PAGE,
                f.after,
                100.0 * f.after as f64 / bytes,
                e / 1e9,
                d / 1e9,
                memcpy_s / f.encode_s,
                memcpy_s / f.decode_s,
                be,
                be_dec
            );
        }
    }
}

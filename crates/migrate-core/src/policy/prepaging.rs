//! Post-copy pre-paging: the order in which the source pushes the pages
//! the destination does not have yet.
//!
//! - **Sequential**: ascending page order.
//! - **Bubbling** (Hines & Gopalan, VEE 2009): expand outward from a
//!   *pivot* (forward only, or alternately forward and backward), skipping
//!   pages already sent; each network fault moves the pivot to the
//!   faulting page, on the bet that the guest will touch its neighbours
//!   next.
//! - **Multi-pivot bubbling**: keep bubbles around the `k` most recent
//!   faults and expand them in turn.
//!
//! A [`Prepager`] is pure state: it is told of faults and asked for the
//! next pages; it never reads a clock or does I/O.

use crate::bitmap::DirtyBitmap;
use crate::page::PageNum;
use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

/// A pre-paging strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Prepaging {
    /// Ascending page order.
    Sequential,
    /// One bubble around the last fault.
    Bubble {
        /// Expand both ways (else forward only).
        both_ways: bool,
    },
    /// Bubbles around the `k` most recent faults (7 by default).
    MultiPivot {
        /// Number of pivots.
        k: usize,
    },
}

impl Default for Prepaging {
    fn default() -> Self {
        Prepaging::MultiPivot { k: 7 }
    }
}

impl fmt::Display for Prepaging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prepaging::Sequential => f.write_str("sequential"),
            Prepaging::Bubble { both_ways: false } => f.write_str("bubble-forward"),
            Prepaging::Bubble { both_ways: true } => f.write_str("bubble"),
            Prepaging::MultiPivot { k } => write!(f, "multi-pivot:{k}"),
        }
    }
}

/// A pre-paging name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown pre-paging {0:?} (expected sequential, bubble, bubble-forward or multi-pivot[:K])"
)]
pub struct UnknownPrepaging(pub String);

impl FromStr for Prepaging {
    type Err = UnknownPrepaging;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnknownPrepaging(s.to_owned());
        Ok(match s {
            "sequential" | "seq" => Prepaging::Sequential,
            "bubble" => Prepaging::Bubble { both_ways: true },
            "bubble-forward" => Prepaging::Bubble { both_ways: false },
            "multi-pivot" => Prepaging::default(),
            _ => match s.strip_prefix("multi-pivot:") {
                Some(k) => Prepaging::MultiPivot {
                    k: k.parse().ok().filter(|k| *k > 0).ok_or_else(bad)?,
                },
                None => return Err(bad()),
            },
        })
    }
}

/// One bubble: the next page to look at going forward, and the page
/// below which to look going backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bubble {
    forward: PageNum,
    backward: PageNum,
    turn_back: bool,
}

impl Bubble {
    fn at(pivot: PageNum) -> Self {
        Bubble {
            forward: pivot,
            backward: pivot,
            turn_back: false,
        }
    }

    /// The next pending page of this bubble, if it has any left.
    fn next(
        &mut self,
        pending: &DirtyBitmap,
        both_ways: bool,
        empty: &mut EmptyBlocks,
    ) -> Option<PageNum> {
        for _ in 0..2 {
            let back = both_ways && self.turn_back;
            self.turn_back = !self.turn_back;
            if back {
                if let Some(p) = empty.prev_one(pending, self.backward) {
                    self.backward = p;
                    return Some(p);
                }
                self.backward = 0;
            } else if let Some(p) = empty.next_one(pending, self.forward) {
                self.forward = p + 1;
                return Some(p);
            } else {
                self.forward = pending.len();
            }
            if !both_ways {
                return None;
            }
        }
        None
    }
}

/// Bitmap words per block of [`EmptyBlocks`] (4096 pages).
const BLOCK: usize = 64;

/// Blocks of the pending bitmap seen empty, so that bubbles skip what was
/// pushed already in a word per block instead of a word per 64 pages.
///
/// A post-copy push only ever takes pages out of the pending set, so a
/// block seen empty stays empty and every search gives what a plain scan
/// gives; the knowledge is dropped when the push wraps around (and when
/// the bitmap's size changes), so a page put back in the set is found by
/// the next pass at the latest. Without this, each new bubble (one per
/// network fault) scanned the pushed part of memory word by word: a cost
/// of faults times memory size, minutes for a 1 TiB guest.
#[derive(Clone, Debug, Default)]
struct EmptyBlocks {
    seen: Vec<u64>,
    words: usize,
}

impl EmptyBlocks {
    fn fit(&mut self, words: usize) {
        if self.words != words {
            self.words = words;
            self.seen = vec![0; words.div_ceil(BLOCK).div_ceil(64)];
        }
    }

    fn forget(&mut self) {
        self.seen.fill(0);
    }

    fn is_empty(&self, b: usize) -> bool {
        self.seen[b / 64] & (1 << (b % 64)) != 0
    }

    fn mark(&mut self, b: usize) {
        self.seen[b / 64] |= 1 << (b % 64);
    }

    /// The lowest pending page at or after `from`.
    fn next_one(&mut self, pending: &DirtyBitmap, from: PageNum) -> Option<PageNum> {
        let words = pending.as_words();
        self.fit(words.len());
        let n = words.len();
        let mut w = usize::try_from(from / 64).ok().filter(|w| *w < n)?;
        let first = words[w] & (u64::MAX << (from % 64));
        if first != 0 {
            return Some(w as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        w += 1;
        while w < n {
            let b = w / BLOCK;
            let whole = w.is_multiple_of(BLOCK);
            if whole && self.is_empty(b) {
                w += BLOCK;
                continue;
            }
            let end = ((b + 1) * BLOCK).min(n);
            match words[w..end].iter().position(|x| *x != 0) {
                Some(i) => {
                    let k = w + i;
                    return Some(k as u64 * 64 + u64::from(words[k].trailing_zeros()));
                }
                None => {
                    if whole {
                        self.mark(b);
                    }
                    w = end;
                }
            }
        }
        None
    }

    /// The highest pending page strictly below `before`.
    fn prev_one(&mut self, pending: &DirtyBitmap, before: PageNum) -> Option<PageNum> {
        let words = pending.as_words();
        self.fit(words.len());
        let n = words.len();
        if before == 0 || n == 0 {
            return None;
        }
        let last = before - 1;
        let mut w = usize::try_from(last / 64).unwrap_or(usize::MAX);
        if w < n {
            let cur = words[w] & (u64::MAX >> (63 - last % 64));
            if cur != 0 {
                return Some(w as u64 * 64 + 63 - u64::from(cur.leading_zeros()));
            }
        } else {
            w = n;
        }
        // Words below `w`, a block at a time.
        while w > 0 {
            let b = (w - 1) / BLOCK;
            let start = b * BLOCK;
            let whole = w == ((b + 1) * BLOCK).min(n);
            if whole && self.is_empty(b) {
                w = start;
                continue;
            }
            match words[start..w].iter().rposition(|x| *x != 0) {
                Some(i) => {
                    let k = start + i;
                    return Some(k as u64 * 64 + 63 - u64::from(words[k].leading_zeros()));
                }
                None => {
                    if whole {
                        self.mark(b);
                    }
                    w = start;
                }
            }
        }
        None
    }
}

/// Pre-paging state for one post-copy migration.
#[derive(Clone, Debug)]
pub struct Prepager {
    mode: Prepaging,
    bubbles: VecDeque<Bubble>,
    next: usize,
    empty: EmptyBlocks,
}

impl Prepager {
    /// A pre-pager starting at page 0.
    pub fn new(mode: Prepaging) -> Self {
        let mut bubbles = VecDeque::new();
        bubbles.push_back(Bubble::at(0));
        Prepager {
            mode,
            bubbles,
            next: 0,
            empty: EmptyBlocks::default(),
        }
    }

    /// The strategy.
    pub fn mode(&self) -> Prepaging {
        self.mode
    }

    /// The guest faulted on `page`: re-aim.
    pub fn on_fault(&mut self, page: PageNum) {
        match self.mode {
            Prepaging::Sequential => {}
            Prepaging::Bubble { .. } => {
                self.bubbles.clear();
                self.bubbles.push_back(Bubble::at(page + 1));
            }
            Prepaging::MultiPivot { k } => {
                self.bubbles.push_front(Bubble::at(page + 1));
                self.bubbles.truncate(k.max(1));
                self.next = 0;
            }
        }
    }

    /// Appends up to `max` pending pages, in push order.
    pub fn next_pages(&mut self, pending: &DirtyBitmap, max: usize, out: &mut Vec<PageNum>) {
        let both_ways = match self.mode {
            Prepaging::Sequential => false,
            Prepaging::Bubble { both_ways } => both_ways,
            Prepaging::MultiPivot { .. } => true,
        };
        let start = out.len();
        let mut wrapped = false;
        while out.len() - start < max && !self.bubbles.is_empty() {
            let i = self.next % self.bubbles.len();
            let before = self.bubbles[i];
            match self.bubbles[i].next(pending, both_ways, &mut self.empty) {
                Some(p) => {
                    // Bubbles may overlap; the caller takes pages out of
                    // `pending` only after this call.
                    if !out[start..].contains(&p) {
                        out.push(p);
                    }
                    self.next += 1;
                    if out.len() - start < max {
                        // The bubbles next in turn that are where this one
                        // was (bubbles that met sweep on together) find the
                        // same page, a duplicate each, and move as it did:
                        // do that at once. Same order, fewer searches.
                        let after = self.bubbles[i];
                        let len = self.bubbles.len();
                        // `j` is `self.next % len`, kept without dividing.
                        let mut j = if i + 1 == len { 0 } else { i + 1 };
                        for _ in 1..len {
                            if self.bubbles[j] != before {
                                break;
                            }
                            self.bubbles[j] = after;
                            self.next += 1;
                            j = if j + 1 == len { 0 } else { j + 1 };
                        }
                    }
                }
                None if self.bubbles.len() > 1 => {
                    self.bubbles.remove(i);
                }
                None => {
                    // The last bubble reached both ends. Start over from 0
                    // for whatever is still pending (pages that were in
                    // flight when the bubble passed them), once per call.
                    if wrapped {
                        break;
                    }
                    wrapped = true;
                    self.empty.forget();
                    self.bubbles[0] = Bubble::at(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_blocks_find_what_a_plain_scan_finds_while_pages_leave() {
        // A bitmap over a few blocks, emptied in a scattered order; after
        // every removal both searches agree with the bitmap's own from
        // many starting points.
        let n = 3 * 4096 + 100;
        let mut pending = DirtyBitmap::new(n);
        let mut x = 12345u64;
        for p in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (x >> 33).is_multiple_of(7) || (4096..8192).contains(&p) {
                pending.set(p);
            }
        }
        let mut empty = EmptyBlocks::default();
        let mut ones: Vec<PageNum> = pending.iter_ones().collect();
        let mut step = 0;
        while !ones.is_empty() {
            let i = (step * 7919) % ones.len();
            pending.clear(ones.swap_remove(i));
            step += 1;
            if step % 37 != 0 && !ones.is_empty() {
                continue;
            }
            for probe in (0..=n)
                .step_by(523)
                .chain([0, 1, 4095, 4096, 8191, 8192, n])
            {
                assert_eq!(
                    empty.next_one(&pending, probe),
                    pending.iter_ones_from(probe).next(),
                    "next from {probe}"
                );
                assert_eq!(
                    empty.prev_one(&pending, probe),
                    pending.prev_one(probe),
                    "prev before {probe}"
                );
            }
        }
        assert_eq!(empty.next_one(&pending, 0), None);
        assert_eq!(empty.prev_one(&pending, n), None);
    }

    fn all(n: u64) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(n);
        b.set_range(0..n);
        b
    }

    fn drain(p: &mut Prepager, pending: &mut DirtyBitmap, batch: usize) -> Vec<PageNum> {
        let mut order = Vec::new();
        loop {
            let mut out = Vec::new();
            p.next_pages(pending, batch, &mut out);
            if out.is_empty() {
                break;
            }
            for x in &out {
                assert!(pending.get(*x), "page {x} pushed twice");
                pending.clear(*x);
            }
            order.extend(out);
        }
        order
    }

    #[test]
    fn sequential_is_ascending_and_complete() {
        let mut pending = all(100);
        pending.clear(5);
        let order = drain(&mut Prepager::new(Prepaging::Sequential), &mut pending, 7);
        assert_eq!(order, (0..100).filter(|p| *p != 5).collect::<Vec<_>>());
    }

    #[test]
    fn bubble_expands_around_the_fault_both_ways() {
        let mut pending = all(100);
        let mut p = Prepager::new(Prepaging::Bubble { both_ways: true });
        p.on_fault(50);
        pending.clear(50);
        let mut out = Vec::new();
        p.next_pages(&pending, 6, &mut out);
        assert_eq!(out, vec![51, 49, 52, 48, 53, 47]);
        for x in &out {
            pending.clear(*x);
        }
        let rest = drain(&mut p, &mut pending, 10);
        assert_eq!(rest.len(), 93);
    }

    #[test]
    fn forward_bubble_wraps_to_cover_everything() {
        let mut pending = all(20);
        let mut p = Prepager::new(Prepaging::Bubble { both_ways: false });
        p.on_fault(15);
        pending.clear(15);
        let order = drain(&mut p, &mut pending, 3);
        assert_eq!(&order[..4], &[16, 17, 18, 19]);
        assert_eq!(order.len(), 19);
    }

    #[test]
    fn multi_pivot_serves_recent_faults_in_turn() {
        let mut pending = all(1000);
        let mut p = Prepager::new(Prepaging::MultiPivot { k: 2 });
        for f in [100, 500, 900] {
            p.on_fault(f);
            pending.clear(f);
        }
        let mut out = Vec::new();
        p.next_pages(&pending, 4, &mut out);
        // Pivots 900 and 500 (the two most recent), alternately.
        assert_eq!(out, vec![901, 501, 899, 499]);
        for x in &out {
            pending.clear(*x);
        }
        assert_eq!(drain(&mut p, &mut pending, 64).len(), 1000 - 3 - 4);
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            "sequential".parse::<Prepaging>().unwrap(),
            Prepaging::Sequential
        );
        assert_eq!(
            "multi-pivot:3".parse::<Prepaging>().unwrap(),
            Prepaging::MultiPivot { k: 3 }
        );
        assert_eq!(
            "multi-pivot".parse::<Prepaging>().unwrap(),
            Prepaging::MultiPivot { k: 7 }
        );
        assert!("multi-pivot:0".parse::<Prepaging>().is_err());
        assert!("random".parse::<Prepaging>().is_err());
    }
}

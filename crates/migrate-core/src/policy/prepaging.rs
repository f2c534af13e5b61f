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
//! next pages; it never reads a clock or does I/O. Its searches for the
//! next pending page go through the bitmap's summary levels, so a bubble
//! started by a fault skips the part of memory pushed already in a few
//! steps rather than a scan.

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
    /// 1 when the next look goes backward, else 0. A word rather than a
    /// `bool`: a bubble without padding bytes is copied and compared
    /// (several times a page pushed) in whole words; with a one-byte
    /// field, the copy of the padding after it read memory just written
    /// byte-wise, which the CPU cannot forward from its store buffer and
    /// stalls on.
    turn_back: u64,
}

impl Bubble {
    fn at(pivot: PageNum) -> Self {
        Bubble {
            forward: pivot,
            backward: pivot,
            turn_back: 0,
        }
    }

    /// The next pending page of this bubble, if it has any left.
    fn next(&mut self, pending: &DirtyBitmap, both_ways: bool) -> Option<PageNum> {
        for _ in 0..2 {
            let back = both_ways && self.turn_back == 1;
            self.turn_back ^= 1;
            if back {
                // The page next to the last one is usually still pending
                // (a bubble sweeps a run): a bit test, not a search.
                let near = self.backward.checked_sub(1).filter(|p| pending.get(*p));
                if let Some(p) = near.or_else(|| pending.prev_one(self.backward)) {
                    self.backward = p;
                    return Some(p);
                }
                self.backward = 0;
            } else if let Some(p) = Some(self.forward)
                .filter(|p| pending.get(*p))
                .or_else(|| pending.iter_ones_from(self.forward).next())
            {
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

/// Pre-paging state for one post-copy migration.
#[derive(Clone, Debug)]
pub struct Prepager {
    mode: Prepaging,
    bubbles: VecDeque<Bubble>,
    next: usize,
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
        // The bubble in turn, `self.next % self.bubbles.len()`, kept
        // without dividing but when a bubble goes.
        let mut i = self.next % self.bubbles.len().max(1);
        while out.len() - start < max && !self.bubbles.is_empty() {
            let before = self.bubbles[i];
            let mut after = before;
            let found = after.next(pending, both_ways);
            self.bubbles[i] = after;
            match found {
                Some(p) => {
                    // Bubbles may overlap; the caller takes pages out of
                    // `pending` only after this call.
                    if !out[start..].contains(&p) {
                        out.push(p);
                    }
                    self.next += 1;
                    let len = self.bubbles.len();
                    i = if i + 1 == len { 0 } else { i + 1 };
                    if out.len() - start < max {
                        // The bubbles next in turn that are where this one
                        // was (bubbles that met sweep on together) find the
                        // same page, a duplicate each, and move as it did:
                        // do that at once. Same order, fewer searches.
                        for _ in 1..len {
                            if self.bubbles[i] != before {
                                break;
                            }
                            self.bubbles[i] = after;
                            self.next += 1;
                            i = if i + 1 == len { 0 } else { i + 1 };
                        }
                    }
                }
                None if self.bubbles.len() > 1 => {
                    self.bubbles.remove(i);
                    i = self.next % self.bubbles.len();
                }
                None => {
                    // The last bubble reached both ends. Start over from 0
                    // for whatever is still pending (pages that were in
                    // flight when the bubble passed them), once per call.
                    if wrapped {
                        break;
                    }
                    wrapped = true;
                    self.bubbles[0] = Bubble::at(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

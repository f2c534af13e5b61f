//! Dirty bitmaps and per-page modification counts.
//!
//! [`DirtyBitmap`] is a GFN-indexed bit set on `bitvec` with word-at-a-time
//! iteration of set bits, union and difference.
//!
//! `bitvec` holds the storage and does what it is good at: bit-addressed
//! reads and writes, filling ranges, growing and truncating at any bit,
//! over `u64` words in least-significant-bit-first order, the very layout
//! in which KVM's `KVM_GET_DIRTY_LOG` and Xen's log-dirty hand a bitmap
//! over (so [`DirtyBitmap::from_words`] takes theirs without copying bits).
//! The whole-bitmap loops (counting, iterating set bits, union,
//! difference) go over those raw words instead, a word at a time, as the
//! collectors and the engine run them on every round. [`PageCounts`] keeps a small
//! saturating counter per page instead of a bit: how many samples of the
//! dirty log saw the page written, which the HCA policy tiers pages by.

use crate::page::PageNum;
use bitvec::prelude::*;

/// A set of pages, one bit per GFN from 0 to `len()`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    bits: BitVec<u64, Lsb0>,
}

impl DirtyBitmap {
    /// An empty bitmap covering GFNs `0..len`.
    pub fn new(len: u64) -> Self {
        DirtyBitmap {
            bits: bitvec![u64, Lsb0; 0; len as usize],
        }
    }

    /// A bitmap from 64-bit words in the layout KVM and Xen use (bit `i` of
    /// word `w` is page `64 * w + i`), truncated to `len` bits.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Self {
        let nwords = len.div_ceil(64) as usize;
        words.resize(nwords, 0);
        if !len.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        let mut bits = BitVec::from_vec(words);
        bits.truncate(len as usize);
        DirtyBitmap { bits }
    }

    /// The underlying 64-bit words (bits past `len()` are zero).
    pub fn as_words(&self) -> &[u64] {
        self.bits.as_raw_slice()
    }

    /// Number of GFNs covered.
    pub fn len(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Whether the bitmap covers no pages at all.
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Whether `page` is set; pages past the end are not.
    pub fn get(&self, page: PageNum) -> bool {
        self.bits.get(page as usize).is_some_and(|b| *b)
    }

    /// Sets `page`. Pages past the end are ignored and reported as `false`.
    pub fn set(&mut self, page: PageNum) -> bool {
        match self.bits.get_mut(page as usize) {
            Some(mut b) => {
                *b = true;
                true
            }
            None => false,
        }
    }

    /// Clears `page`.
    pub fn clear(&mut self, page: PageNum) {
        if let Some(mut b) = self.bits.get_mut(page as usize) {
            *b = false;
        }
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.bits.fill(false);
    }

    /// Sets every bit in `range`.
    pub fn set_range(&mut self, range: std::ops::Range<PageNum>) {
        let end = (range.end as usize).min(self.bits.len());
        let start = (range.start as usize).min(end);
        self.bits[start..end].fill(true);
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.as_words().iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether no bit is set.
    pub fn none(&self) -> bool {
        self.as_words().iter().all(|w| *w == 0)
    }

    /// Iterates the set pages in ascending order, a word at a time.
    pub fn iter_ones(&self) -> Ones<'_> {
        Ones {
            words: self.as_words(),
            index: 0,
            current: self.as_words().first().copied().unwrap_or(0),
        }
    }

    /// Iterates the set pages at or after `start`, ascending.
    pub fn iter_ones_from(&self, start: PageNum) -> Ones<'_> {
        let words = self.as_words();
        let index = (start / 64) as usize;
        let current = words
            .get(index)
            .map_or(0, |w| w & (u64::MAX << (start % 64)));
        Ones {
            words,
            index,
            current,
        }
    }

    /// The highest set page strictly below `before`, if any.
    pub fn prev_one(&self, before: PageNum) -> Option<PageNum> {
        let words = self.as_words();
        if before == 0 || words.is_empty() {
            return None;
        }
        let last = before - 1;
        let mut index = ((last / 64) as usize).min(words.len() - 1);
        let mut word = if (index as u64) == last / 64 {
            let keep = last % 64;
            words[index] & (u64::MAX >> (63 - keep))
        } else {
            words[index]
        };
        loop {
            if word != 0 {
                return Some(index as u64 * 64 + 63 - word.leading_zeros() as u64);
            }
            if index == 0 {
                return None;
            }
            index -= 1;
            word = words[index];
        }
    }

    /// `self |= other`. Bitmaps of different length: the shorter one's
    /// missing bits count as clear.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        if other.len() > self.len() {
            self.bits.resize(other.bits.len(), false);
        }
        let theirs = other.as_words();
        for (a, b) in self.bits.as_raw_mut_slice().iter_mut().zip(theirs) {
            *a |= *b;
        }
    }

    /// `self &= !other`: removes every page set in `other`.
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        let theirs = other.as_words();
        for (a, b) in self.bits.as_raw_mut_slice().iter_mut().zip(theirs) {
            *a &= !*b;
        }
    }

    /// `self &= other`.
    pub fn intersect_with(&mut self, other: &DirtyBitmap) {
        let theirs = other.as_words();
        let mine = self.bits.as_raw_mut_slice();
        let n = theirs.len().min(mine.len());
        for (a, b) in mine[..n].iter_mut().zip(theirs) {
            *a &= *b;
        }
        for a in &mut mine[n..] {
            *a = 0;
        }
    }

    /// Copies `other` into `self`, reusing the allocation.
    pub fn copy_from(&mut self, other: &DirtyBitmap) {
        self.bits.clone_from(&other.bits);
    }
}

/// Iterator over the set bits of a [`DirtyBitmap`].
#[derive(Clone, Debug)]
pub struct Ones<'a> {
    words: &'a [u64],
    index: usize,
    current: u64,
}

impl Iterator for Ones<'_> {
    type Item = PageNum;

    #[inline]
    fn next(&mut self) -> Option<PageNum> {
        loop {
            if self.current != 0 {
                let bit = self.current.trailing_zeros() as u64;
                self.current &= self.current - 1;
                return Some(self.index as u64 * 64 + bit);
            }
            self.index += 1;
            self.current = *self.words.get(self.index)?;
        }
    }
}

/// A saturating modification count per page, with decay.
///
/// Where a dirty bitmap says only "written since the last look", counts say
/// "written in how many of the last looks": a page seen dirty in 9 of 10
/// samples is hot, one seen once is warm, one never seen is cold.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PageCounts {
    counts: Vec<u8>,
}

impl PageCounts {
    /// All-zero counts for GFNs `0..len`.
    pub fn new(len: u64) -> Self {
        PageCounts {
            counts: vec![0; len as usize],
        }
    }

    /// Number of GFNs covered.
    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Whether no pages are covered.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The count of `page` (0 past the end).
    pub fn get(&self, page: PageNum) -> u8 {
        self.counts.get(page as usize).copied().unwrap_or(0)
    }

    /// Adds one to the count of every page set in `sample`, saturating at 255.
    pub fn add_sample(&mut self, sample: &DirtyBitmap) {
        for page in sample.iter_ones() {
            if let Some(c) = self.counts.get_mut(page as usize) {
                *c = c.saturating_add(1);
            }
        }
    }

    /// Halves every count `shift` times (`count >> shift`): old activity fades.
    pub fn decay(&mut self, shift: u32) {
        if shift == 0 {
            return;
        }
        for c in &mut self.counts {
            *c = c.checked_shr(shift).unwrap_or(0);
        }
    }

    /// Number of pages whose count is at least `threshold`.
    pub fn count_at_least(&self, threshold: u8) -> u64 {
        self.counts.iter().filter(|c| **c >= threshold).count() as u64
    }

    /// The raw counts, indexed by GFN.
    pub fn as_slice(&self) -> &[u8] {
        &self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_ones(b: &DirtyBitmap) -> Vec<u64> {
        (0..b.len()).filter(|p| b.get(*p)).collect()
    }

    proptest! {
        #[test]
        fn iteration_matches_naive(len in 0u64..700, pages in proptest::collection::vec(0u64..800, 0..200)) {
            let mut b = DirtyBitmap::new(len);
            for p in &pages { b.set(*p); }
            prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), naive_ones(&b));
            prop_assert_eq!(b.count_ones(), naive_ones(&b).len() as u64);
            let from = pages.first().copied().unwrap_or(0);
            let below: Option<u64> = naive_ones(&b).into_iter().rfind(|p| *p < from);
            prop_assert_eq!(b.prev_one(from), below);
            prop_assert_eq!(b.prev_one(u64::MAX), naive_ones(&b).last().copied());
            let expect: Vec<_> = naive_ones(&b).into_iter().filter(|p| *p >= from).collect();
            prop_assert_eq!(b.iter_ones_from(from).collect::<Vec<_>>(), expect);
        }

        #[test]
        fn set_algebra_matches_naive(a in proptest::collection::vec(0u64..300, 0..100),
                                     c in proptest::collection::vec(0u64..300, 0..100)) {
            let mut x = DirtyBitmap::new(300);
            let mut y = DirtyBitmap::new(300);
            for p in &a { x.set(*p); }
            for p in &c { y.set(*p); }
            let mut u = x.clone(); u.union_with(&y);
            let mut d = x.clone(); d.subtract(&y);
            let mut i = x.clone(); i.intersect_with(&y);
            for p in 0..300 {
                prop_assert_eq!(u.get(p), x.get(p) || y.get(p));
                prop_assert_eq!(d.get(p), x.get(p) && !y.get(p));
                prop_assert_eq!(i.get(p), x.get(p) && y.get(p));
            }
        }
    }

    #[test]
    fn words_round_trip() {
        let b = DirtyBitmap::from_words(vec![0b1011, 1 << 63], 128);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 1, 3, 127]);
        let short = DirtyBitmap::from_words(vec![u64::MAX], 10);
        assert_eq!(short.count_ones(), 10);
    }

    #[test]
    fn counts_saturate_and_decay() {
        let mut b = DirtyBitmap::new(4);
        b.set(1);
        let mut c = PageCounts::new(4);
        for _ in 0..300 {
            c.add_sample(&b);
        }
        assert_eq!(c.get(1), 255);
        assert_eq!(c.get(0), 0);
        c.decay(1);
        assert_eq!(c.get(1), 127);
        assert_eq!(c.count_at_least(100), 1);
        c.decay(8);
        assert_eq!(c.get(1), 0);
    }
}

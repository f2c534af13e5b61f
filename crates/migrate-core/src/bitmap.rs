//! Dirty bitmaps and per-page modification counts.
//!
//! [`DirtyBitmap`] is a GFN-indexed bit set over `u64` words in
//! least-significant-bit-first order (bit `i` of word `w` is page
//! `64 * w + i`), the layout in which KVM's `KVM_GET_DIRTY_LOG` and Xen's
//! log-dirty hand a bitmap over, so [`DirtyBitmap::from_words`] takes
//! theirs without moving bits and [`DirtyBitmap::as_words`] gives them
//! back.
//!
//! Above the words sit summary levels: bit `j` of a level is set exactly
//! when word `j` of the level below is not zero, up to a top level of one
//! word. Searching, counting, iterating, union, difference, clearing and
//! copying go down from the top and visit only words that hold set bits,
//! so they cost a step per set word, not a step per 64 pages of guest: a
//! 1 TiB guest's bitmap is 4 Mi words (32 MiB), and the engine and HCA
//! look at the dirty log up to several hundred times a round, while what
//! the guest dirtied in that time is a few thousand pages. A block of 64
//! words that is mostly set is taken as a slice, so a dense bitmap costs
//! what a plain one does. A write keeps the summaries exact with one extra
//! word written when a word turns from zero to not zero or back (rarely
//! more: a level up per such turn).
//!
//! [`PageCounts`] keeps a small saturating counter per page instead of a
//! bit: how many samples of the dirty log saw the page written, which the
//! HCA policy tiers pages by; decay and counting visit only the pages
//! whose count is not zero.

use crate::page::PageNum;
use std::fmt;

/// A set of pages, one bit per GFN from 0 to `len()`, with summary levels
/// so that its operations skip empty regions (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    len: u64,
    /// `levels[0]`: one bit a page. `levels[k + 1]`: bit `j` is set exactly
    /// when `levels[k][j] != 0`. At least three levels (so the words always
    /// come in blocks of 64 under a summary word that has a level above it);
    /// the last has at most one word.
    levels: Vec<Vec<u64>>,
}

/// Zeroed summary levels over `words` level-0 words (see
/// [`DirtyBitmap::levels`]): at least two, the last of at most one word.
fn summaries(mut words: usize) -> Vec<Vec<u64>> {
    let mut levels = Vec::new();
    loop {
        let up = words.div_ceil(64);
        levels.push(vec![0; up]);
        if words <= 64 && levels.len() >= 2 {
            return levels;
        }
        words = up;
    }
}

/// A block of 64 words with at least this many not zero is handled as a
/// slice (a loop the compiler vectorises), one with fewer word by word.
const DENSE: u32 = 16;

/// The set bits of `word`, lowest first.
fn bits(mut word: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if word == 0 {
            return None;
        }
        let b = word.trailing_zeros() as usize;
        word &= word - 1;
        Some(b)
    })
}

/// The words of block `b` (words `64 b ..`) in a slice of `n` words.
fn block(b: usize, n: usize) -> std::ops::Range<usize> {
    b * 64..(b * 64 + 64).min(n)
}

/// The first set bit at or after `from` in `levels[0]`, found through the
/// summaries above it.
fn next_in(levels: &[Vec<u64>], from: u64) -> Option<u64> {
    let words = levels.first()?;
    let mut j = usize::try_from(from / 64).ok()?;
    let mut cur = *words.get(j)? & (u64::MAX << (from % 64));
    loop {
        if cur != 0 {
            return Some(j as u64 * 64 + u64::from(cur.trailing_zeros()));
        }
        // The next word that is not zero, from the level above.
        j = usize::try_from(next_in(&levels[1..], j as u64 + 1)?).ok()?;
        cur = *words.get(j)?;
    }
}

/// The last set bit strictly below `before` in `levels[0]`.
fn prev_in(levels: &[Vec<u64>], before: u64) -> Option<u64> {
    let words = levels.first()?;
    if before == 0 || words.is_empty() {
        return None;
    }
    let last = (before - 1).min(words.len() as u64 * 64 - 1);
    let mut j = (last / 64) as usize;
    let mut cur = words[j] & (u64::MAX >> (63 - last % 64));
    loop {
        if cur != 0 {
            return Some(j as u64 * 64 + 63 - u64::from(cur.leading_zeros()));
        }
        j = usize::try_from(prev_in(&levels[1..], j as u64)?).ok()?;
        cur = *words.get(j)?;
    }
}

impl DirtyBitmap {
    /// An empty bitmap covering GFNs `0..len`.
    pub fn new(len: u64) -> Self {
        let nwords = len.div_ceil(64) as usize;
        let mut levels = vec![vec![0; nwords]];
        levels.extend(summaries(nwords));
        DirtyBitmap { len, levels }
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
        let mut levels = vec![words];
        levels.extend(summaries(nwords));
        let mut b = DirtyBitmap { len, levels };
        b.summarise();
        b
    }

    /// Recomputes every summary level from the words.
    fn summarise(&mut self) {
        for k in 1..self.levels.len() {
            let (below, above) = self.levels.split_at_mut(k);
            let up = &mut above[0];
            up.fill(0);
            for (j, w) in below[k - 1].iter().enumerate() {
                if *w != 0 {
                    up[j / 64] |= 1 << (j % 64);
                }
            }
        }
    }

    /// The underlying 64-bit words (bits past `len()` are zero).
    pub fn as_words(&self) -> &[u64] {
        &self.levels[0]
    }

    /// Number of GFNs covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap covers no pages at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The summaries learn that word `j` is no longer zero.
    fn mark(&mut self, j: usize) {
        self.mark_from(1, j);
    }

    /// Level `k` learns that word `j` of level `k - 1` is no longer zero
    /// (and the levels above, as far as that changes them).
    fn mark_from(&mut self, k: usize, mut j: usize) {
        for level in &mut self.levels[k..] {
            let word = &mut level[j / 64];
            let was = *word;
            *word |= 1 << (j % 64);
            if was != 0 {
                return;
            }
            j /= 64;
        }
    }

    /// The summaries learn that word `j` is now zero.
    fn unmark(&mut self, mut j: usize) {
        for level in &mut self.levels[1..] {
            let word = &mut level[j / 64];
            *word &= !(1 << (j % 64));
            if *word != 0 {
                return;
            }
            j /= 64;
        }
    }

    /// `word j |= bits`, keeping the summaries.
    #[inline]
    fn or_word(&mut self, j: usize, bits: u64) {
        let word = &mut self.levels[0][j];
        let was = *word;
        *word |= bits;
        if was == 0 && bits != 0 {
            self.mark(j);
        }
    }

    /// `word j &= bits`, keeping the summaries.
    #[inline]
    fn and_word(&mut self, j: usize, bits: u64) {
        let word = &mut self.levels[0][j];
        let was = *word;
        *word &= bits;
        if was != 0 && *word == 0 {
            self.unmark(j);
        }
    }

    /// The first word at or after `from` that is not zero.
    fn next_word(&self, from: usize) -> Option<usize> {
        next_in(&self.levels[1..], from as u64).map(|j| j as usize)
    }

    /// The indices of the words that are not zero, ascending.
    fn set_words(&self) -> Ones<'_> {
        Ones::over(&self.levels[1..], 0)
    }

    /// The blocks of 64 words that have a word not zero, with their
    /// summary word (bit `i`: word `64 b + i` is not zero), ascending.
    fn blocks(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let summary = &self.levels[1];
        Ones::over(&self.levels[2..], 0).map(|b| (b as usize, summary[b as usize]))
    }

    /// Whether `page` is set; pages past the end are not.
    #[inline]
    pub fn get(&self, page: PageNum) -> bool {
        page < self.len && (self.levels[0][(page / 64) as usize] >> (page % 64)) & 1 == 1
    }

    /// Sets `page`. Pages past the end are ignored and reported as `false`.
    #[inline]
    pub fn set(&mut self, page: PageNum) -> bool {
        if page >= self.len {
            return false;
        }
        self.or_word((page / 64) as usize, 1 << (page % 64));
        true
    }

    /// Clears `page`.
    #[inline]
    pub fn clear(&mut self, page: PageNum) {
        if page < self.len {
            self.and_word((page / 64) as usize, !(1 << (page % 64)));
        }
    }

    /// Clears every bit, visiting only the words that have some.
    pub fn clear_all(&mut self) {
        // Each level's set words are found through the level above, which
        // is cleared after it; the words a block at a time.
        let (words, above) = self.levels.split_at_mut(1);
        let words = &mut words[0];
        let n = words.len();
        for b in Ones::over(&above[1..], 0) {
            let summary = above[0][b as usize];
            let range = block(b as usize, n);
            if summary.count_ones() >= DENSE {
                words[range].fill(0);
            } else {
                for i in bits(summary) {
                    words[range.start + i] = 0;
                }
            }
        }
        for k in 1..self.levels.len() - 1 {
            let (below, above) = self.levels.split_at_mut(k + 1);
            let words = &mut below[k];
            for j in Ones::over(above, 0) {
                words[j as usize] = 0;
            }
        }
        if let Some(top) = self.levels.last_mut() {
            top.fill(0);
        }
    }

    /// Sets every bit in `range`.
    pub fn set_range(&mut self, range: std::ops::Range<PageNum>) {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        let mut page = start;
        while page < end {
            let bit = page % 64;
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.or_word((page / 64) as usize, mask);
            page += n;
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        let words = &self.levels[0];
        let ones = |w: &u64| u64::from(w.count_ones());
        self.blocks()
            .map(|(b, summary)| {
                let range = block(b, words.len());
                if summary.count_ones() >= DENSE {
                    words[range].iter().map(ones).sum::<u64>()
                } else {
                    bits(summary).map(|i| ones(&words[range.start + i])).sum()
                }
            })
            .sum()
    }

    /// Whether no bit is set.
    pub fn none(&self) -> bool {
        self.levels
            .last()
            .is_none_or(|top| top.iter().all(|w| *w == 0))
    }

    /// Iterates the set pages in ascending order.
    pub fn iter_ones(&self) -> Ones<'_> {
        Ones::over(&self.levels, 0)
    }

    /// Iterates the set pages at or after `start`, ascending.
    pub fn iter_ones_from(&self, start: PageNum) -> Ones<'_> {
        Ones::over(&self.levels, start)
    }

    /// The highest set page strictly below `before`, if any.
    pub fn prev_one(&self, before: PageNum) -> Option<PageNum> {
        prev_in(&self.levels, before)
    }

    /// A bitmap of `len` pages with the bits of this one below `len`.
    fn resized(&self, len: u64) -> DirtyBitmap {
        let mut words = self.levels[0].clone();
        words.truncate(len.div_ceil(64) as usize);
        DirtyBitmap::from_words(words, len)
    }

    /// `self |= other`. Bitmaps of different length: the shorter one's
    /// missing bits count as clear (`self` grows to `other`'s length).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        if other.len > self.len {
            *self = self.resized(other.len);
        }
        let theirs = &other.levels[0];
        let n = theirs.len();
        for (b, summary) in other.blocks() {
            let range = block(b, n);
            let mine = &mut self.levels[0][range.clone()];
            if summary.count_ones() >= DENSE {
                for (a, t) in mine.iter_mut().zip(&theirs[range]) {
                    *a |= *t;
                }
            } else {
                for i in bits(summary) {
                    mine[i] |= theirs[range.start + i];
                }
            }
            // Word `64 b + i` of `self` is now not zero where it was not or
            // where `other`'s was not.
            let was = self.levels[1][b];
            self.levels[1][b] |= summary;
            if was == 0 {
                self.mark_from(2, b);
            }
        }
    }

    /// `self &= !other`: removes every page set in `other`.
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        let theirs = &other.levels[0];
        let mine = self.levels[0].len();
        for j in other.set_words() {
            let j = j as usize;
            if j >= mine {
                break;
            }
            self.and_word(j, !theirs[j]);
        }
    }

    /// `self &= other`.
    pub fn intersect_with(&mut self, other: &DirtyBitmap) {
        let mut next = self.next_word(0);
        while let Some(j) = next {
            let theirs = other.levels[0].get(j).copied().unwrap_or(0);
            self.and_word(j, theirs);
            next = self.next_word(j + 1);
        }
    }

    /// Copies `other` into `self`, reusing the allocation: with equal
    /// lengths, a step per word set in either.
    pub fn copy_from(&mut self, other: &DirtyBitmap) {
        if self.len == other.len {
            self.clear_all();
            self.union_with(other);
        } else {
            self.clone_from(other);
        }
    }
}

impl Default for DirtyBitmap {
    fn default() -> Self {
        DirtyBitmap::new(0)
    }
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A 1 TiB guest's bitmap has 268 million bits: the length, the
        // count and the first few pages say enough.
        const SHOWN: usize = 32;
        let first: Vec<PageNum> = self.iter_ones().take(SHOWN).collect();
        f.debug_struct("DirtyBitmap")
            .field("len", &self.len)
            .field("ones", &self.count_ones())
            .field("first", &first)
            .finish()
    }
}

/// Iterator over the set bits of a [`DirtyBitmap`], ascending.
#[derive(Clone, Debug)]
pub struct Ones<'a> {
    /// The bits, then their summaries.
    levels: &'a [Vec<u64>],
    index: u64,
    current: u64,
}

impl<'a> Ones<'a> {
    /// The set bits of `levels[0]` at or after `start`.
    fn over(levels: &'a [Vec<u64>], start: u64) -> Self {
        let index = start / 64;
        let current = levels
            .first()
            .and_then(|w| w.get(usize::try_from(index).ok()?))
            .map_or(0, |w| w & (u64::MAX << (start % 64)));
        Ones {
            levels,
            index,
            current,
        }
    }
}

impl Iterator for Ones<'_> {
    type Item = PageNum;

    #[inline]
    fn next(&mut self) -> Option<PageNum> {
        loop {
            if self.current != 0 {
                let bit = u64::from(self.current.trailing_zeros());
                self.current &= self.current - 1;
                return Some(self.index * 64 + bit);
            }
            let words = self.levels.first()?;
            let next = self.index.checked_add(1)?;
            // Dense runs: the next word, without the search.
            let word = usize::try_from(next).ok().and_then(|j| words.get(j));
            if let Some(&w) = word.filter(|w| **w != 0) {
                self.index = next;
                self.current = w;
                continue;
            }
            let j = next_in(self.levels.get(1..)?, next.checked_add(1)?)?;
            self.index = j;
            self.current = *words.get(usize::try_from(j).ok()?)?;
        }
    }
}

impl std::iter::FusedIterator for Ones<'_> {}

/// A saturating modification count per page, with decay.
///
/// Where a dirty bitmap says only "written since the last look", counts say
/// "written in how many of the last looks": a page seen dirty in 9 of 10
/// samples is hot, one seen once is warm, one never seen is cold. The
/// pages whose count is not zero are kept in a [`DirtyBitmap`] too, so
/// decay and [`PageCounts::count_at_least`] visit those pages only.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PageCounts {
    counts: Vec<u8>,
    /// Pages whose count is not zero.
    nonzero: DirtyBitmap,
}

impl PageCounts {
    /// All-zero counts for GFNs `0..len`.
    pub fn new(len: u64) -> Self {
        PageCounts {
            counts: vec![0; len as usize],
            nonzero: DirtyBitmap::new(len),
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
            let Some(c) = self.counts.get_mut(page as usize) else {
                break;
            };
            *c = c.saturating_add(1);
            self.nonzero.set(page);
        }
    }

    /// Halves every count `shift` times (`count >> shift`): old activity
    /// fades. Visits only the pages whose count is not zero.
    pub fn decay(&mut self, shift: u32) {
        if shift == 0 {
            return;
        }
        let mut next = self.nonzero.next_word(0);
        while let Some(j) = next {
            let word = self.nonzero.levels[0][j];
            let mut keep = word;
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let c = &mut self.counts[j * 64 + b as usize];
                *c = c.checked_shr(shift).unwrap_or(0);
                if *c == 0 {
                    keep &= !(1 << b);
                }
            }
            self.nonzero.and_word(j, keep);
            next = self.nonzero.next_word(j + 1);
        }
    }

    /// Number of pages whose count is at least `threshold`.
    pub fn count_at_least(&self, threshold: u8) -> u64 {
        if threshold == 0 {
            return self.len();
        }
        self.nonzero
            .iter_ones()
            .filter(|p| self.counts[*p as usize] >= threshold)
            .count() as u64
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
    use std::collections::BTreeSet;

    /// The reference: a set of page numbers.
    type Naive = BTreeSet<u64>;

    fn naive_ones(b: &DirtyBitmap) -> Vec<u64> {
        (0..b.len()).filter(|p| b.get(*p)).collect()
    }

    /// Every summary bit says exactly whether the word below is not zero.
    fn assert_summaries(b: &DirtyBitmap) {
        for k in 1..b.levels.len() {
            for (j, w) in b.levels[k - 1].iter().enumerate() {
                let bit = (b.levels[k][j / 64] >> (j % 64)) & 1 == 1;
                assert_eq!(bit, *w != 0, "level {k} bit {j}");
            }
        }
        assert!(b.levels.last().is_some_and(|t| t.len() <= 1));
    }

    /// An operation on a bitmap and on the naive set.
    #[derive(Clone, Debug)]
    enum Op {
        Set(u64),
        Clear(u64),
        SetRange(u64, u64),
        ClearAll,
        Union(Other),
        Subtract(Other),
        Intersect(Other),
        Copy(Other),
    }

    /// The other bitmap of a two-bitmap operation: scattered pages, and a
    /// range (dense blocks take another path than sparse ones).
    #[derive(Clone, Debug)]
    struct Other {
        pages: Vec<u64>,
        range: std::ops::Range<u64>,
    }

    /// Lengths that cross one, two and three summary levels.
    fn len_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..200, 4000u64..4200, 262_100u64..262_200, Just(300_000)]
    }

    fn op_strategy(len: u64) -> impl Strategy<Value = Op> {
        // Pages a little past the end too: they must be ignored.
        let page = 0..len + 70;
        let pages = proptest::collection::vec(0..len + 70, 0..40);
        let other = (pages, 0..len + 70, 0u64..5000).prop_map(|(pages, s, n)| Other {
            pages,
            range: s..s + n,
        });
        prop_oneof![
            4 => page.clone().prop_map(Op::Set),
            3 => page.clone().prop_map(Op::Clear),
            1 => (page.clone(), 0u64..5000).prop_map(|(s, n)| Op::SetRange(s, s + n)),
            1 => Just(Op::ClearAll),
            1 => other.clone().prop_map(Op::Union),
            1 => other.clone().prop_map(Op::Subtract),
            1 => other.clone().prop_map(Op::Intersect),
            1 => other.prop_map(Op::Copy),
        ]
    }

    fn bitmap_of(len: u64, pages: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(len);
        for p in pages {
            b.set(*p);
        }
        b
    }

    fn naive_of(len: u64, pages: &[u64]) -> Naive {
        pages.iter().copied().filter(|p| *p < len).collect()
    }

    fn other_bitmap(len: u64, o: &Other) -> DirtyBitmap {
        let mut b = bitmap_of(len, &o.pages);
        b.set_range(o.range.clone());
        b
    }

    fn other_naive(len: u64, o: &Other) -> Naive {
        let mut n = naive_of(len, &o.pages);
        n.extend(o.range.start.min(len)..o.range.end.min(len));
        n
    }

    fn apply(b: &mut DirtyBitmap, n: &mut Naive, op: &Op) {
        let len = b.len();
        match op {
            Op::Set(p) => {
                assert_eq!(b.set(*p), *p < len);
                if *p < len {
                    n.insert(*p);
                }
            }
            Op::Clear(p) => {
                b.clear(*p);
                n.remove(p);
            }
            Op::SetRange(s, e) => {
                b.set_range(*s..*e);
                n.extend(*s..(*e).min(len));
            }
            Op::ClearAll => {
                b.clear_all();
                n.clear();
            }
            Op::Union(o) => {
                b.union_with(&other_bitmap(len, o));
                n.extend(other_naive(len, o));
            }
            Op::Subtract(o) => {
                b.subtract(&other_bitmap(len, o));
                let other = other_naive(len, o);
                n.retain(|p| !other.contains(p));
            }
            Op::Intersect(o) => {
                b.intersect_with(&other_bitmap(len, o));
                let other = other_naive(len, o);
                n.retain(|p| other.contains(p));
            }
            Op::Copy(o) => {
                b.copy_from(&other_bitmap(len, o));
                *n = other_naive(len, o);
            }
        }
    }

    /// Every query of `b` against the naive set, probing around `probes`.
    fn check(b: &DirtyBitmap, n: &Naive, probes: &[u64]) {
        assert_summaries(b);
        let ones: Vec<u64> = n.iter().copied().collect();
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), ones);
        assert_eq!(naive_ones(b), ones);
        assert_eq!(b.count_ones(), ones.len() as u64);
        assert_eq!(b.none(), ones.is_empty());
        assert_eq!(b.prev_one(u64::MAX), ones.last().copied());
        for &p in probes {
            for q in [
                p.saturating_sub(1),
                p,
                p + 1,
                p + 64,
                p.saturating_sub(4096),
            ] {
                assert_eq!(b.get(q), n.contains(&q), "get {q}");
                assert_eq!(
                    b.iter_ones_from(q).collect::<Vec<_>>(),
                    n.range(q..).copied().collect::<Vec<_>>(),
                    "from {q}"
                );
                assert_eq!(
                    b.prev_one(q),
                    n.range(..q).next_back().copied(),
                    "before {q}"
                );
            }
        }
        // The words round-trip, summaries rebuilt from them.
        let again = DirtyBitmap::from_words(b.as_words().to_vec(), b.len());
        assert_eq!(&again, b);
    }

    proptest! {
        #[test]
        fn operations_match_a_naive_set(
            (len, ops) in len_strategy().prop_flat_map(|len| {
                (Just(len), proptest::collection::vec(op_strategy(len), 0..40))
            })
        ) {
            let mut b = DirtyBitmap::new(len);
            let mut n = Naive::new();
            let mut probes = vec![0, len];
            for op in &ops {
                apply(&mut b, &mut n, op);
                if let Op::Set(p) | Op::Clear(p) | Op::SetRange(p, _) = op {
                    probes.push(*p);
                }
            }
            check(&b, &n, &probes);
        }

        #[test]
        fn union_grows_to_the_longer_bitmap(a in proptest::collection::vec(0u64..300, 0..50),
                                            c in proptest::collection::vec(0u64..5000, 0..50)) {
            let mut x = bitmap_of(300, &a);
            let y = bitmap_of(5000, &c);
            x.union_with(&y);
            prop_assert_eq!(x.len(), 5000);
            let mut n = naive_of(300, &a);
            n.extend(naive_of(5000, &c));
            check(&x, &n, &c);
            // Shorter the other way: bits past the shorter one stay.
            let mut y2 = y.clone();
            y2.subtract(&bitmap_of(300, &a));
            y2.intersect_with(&bitmap_of(300, &a));
            prop_assert!(y2.iter_ones().all(|p| p < 300));
        }

        #[test]
        fn counts_match_naive(samples in proptest::collection::vec(
                                  proptest::collection::vec(0u64..5000, 0..60), 0..12),
                              shifts in proptest::collection::vec(0u32..10, 12)) {
            let mut c = PageCounts::new(5000);
            let mut naive = vec![0u8; 5000];
            for (s, shift) in samples.iter().zip(&shifts) {
                c.add_sample(&bitmap_of(5000, s));
                for p in naive_of(5000, s) {
                    naive[p as usize] = naive[p as usize].saturating_add(1);
                }
                c.decay(*shift);
                for n in &mut naive {
                    *n = n.checked_shr(*shift).unwrap_or(0);
                }
                prop_assert_eq!(c.as_slice(), &naive[..]);
                for t in [0u8, 1, 2, 3, 200] {
                    let want = naive.iter().filter(|n| **n >= t).count() as u64;
                    prop_assert_eq!(c.count_at_least(t), want);
                }
            }
        }
    }

    #[test]
    fn words_round_trip() {
        let b = DirtyBitmap::from_words(vec![0b1011, 1 << 63], 128);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 1, 3, 127]);
        let short = DirtyBitmap::from_words(vec![u64::MAX], 10);
        assert_eq!(short.count_ones(), 10);
        assert_summaries(&short);
    }

    #[test]
    fn a_large_sparse_bitmap() {
        // 1 TiB of 4 KiB pages: four summary levels above the words.
        let len = 1 << 28;
        let mut b = DirtyBitmap::new(len);
        assert_eq!(b.levels.len(), 5);
        for p in [0, 63, 64, 4095, 4096, 262_143, 262_144, len - 1] {
            b.set(p);
        }
        assert_summaries(&b);
        assert_eq!(b.count_ones(), 8);
        assert_eq!(b.iter_ones_from(300_000).collect::<Vec<_>>(), vec![len - 1]);
        assert_eq!(b.prev_one(len - 1), Some(262_144));
        let mut c = DirtyBitmap::new(len);
        c.copy_from(&b);
        c.clear(len - 1);
        c.clear(262_144);
        assert_eq!(c.prev_one(len), Some(262_143));
        c.clear_all();
        assert!(c.none());
        assert_summaries(&c);
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
        assert_eq!(c.count_at_least(1), 0);
    }
}

//! Pages, page sizes and guest memory layouts.
//!
//! Guest memory is a set of regions of guest-physical address space with
//! holes between them (an x86 guest with more than 3 GiB usually has a hole
//! below 4 GiB). Pages are named by their guest frame number (GFN): the
//! guest-physical address divided by the page size. Dirty bitmaps are
//! indexed by GFN, so a hole simply never has a bit set.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A guest frame number: guest-physical address / page size.
pub type PageNum = u64;

/// A page size: a power of two between 512 bytes and 2 MiB (a huge page).
/// 4 KiB by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageSize(u32);

impl PageSize {
    /// The 4 KiB page of x86, ARM and most other guests.
    pub const DEFAULT: PageSize = PageSize(4096);
    /// Smallest page size accepted.
    pub const MIN: u32 = 512;
    /// Largest page size accepted (2 MiB).
    pub const MAX: u32 = 2 << 20;

    /// A page size of `bytes`, which must be a power of two in `MIN..=MAX`.
    pub fn new(bytes: u32) -> Result<Self, LayoutError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(PageSize(bytes))
        } else {
            Err(LayoutError::BadPageSize(bytes))
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes, as `usize`.
    pub fn get(self) -> usize {
        self.0 as usize
    }

    /// log2 of the size.
    pub fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl Default for PageSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B", self.0)
    }
}

/// A contiguous run of guest pages: `first_page .. first_page + pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Region {
    /// GFN of the first page.
    pub first_page: PageNum,
    /// Number of pages (never zero in a valid layout).
    pub pages: u64,
}

impl Region {
    /// One past the last page of the region.
    pub fn end(&self) -> PageNum {
        self.first_page + self.pages
    }

    /// Whether `page` lies in this region.
    pub fn contains(&self, page: PageNum) -> bool {
        page >= self.first_page && page < self.end()
    }
}

/// Errors in describing guest memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The page size is not a power of two in the accepted range.
    #[error("page size {0} is not a power of two between 512 B and 2 MiB")]
    BadPageSize(u32),
    /// A region has no pages.
    #[error("region {index} is empty")]
    EmptyRegion {
        /// Index of the region in the list given.
        index: usize,
    },
    /// Regions overlap or are not in ascending order.
    #[error("region {index} overlaps or precedes the region before it")]
    Unordered {
        /// Index of the offending region.
        index: usize,
    },
    /// The layout has no regions at all.
    #[error("a memory layout needs at least one region")]
    NoRegions,
    /// The layout is larger than the library supports (2^52 pages).
    #[error("memory layout extends past the largest supported page number")]
    TooLarge,
    /// A size is not a multiple of the page size.
    #[error("{what} ({bytes} bytes) is not a multiple of the page size {page_size}")]
    Unaligned {
        /// What was unaligned.
        what: &'static str,
        /// The size given.
        bytes: u64,
        /// The page size.
        page_size: u32,
    },
}

/// The largest GFN end a layout may have (2^52 pages: 16 EiB of 4 KiB pages).
pub const MAX_PAGE_END: u64 = 1 << 52;

/// Guest memory: a page size and ascending, non-overlapping regions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemoryLayout {
    page_size: PageSize,
    regions: Vec<Region>,
    /// `prefix[i]` = pages in regions before `i` (dense index of region i's first page).
    #[serde(skip)]
    prefix: Vec<u64>,
}

impl MemoryLayout {
    /// A layout from regions, which must be non-empty, ascending and disjoint.
    pub fn new(page_size: PageSize, regions: Vec<Region>) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::NoRegions);
        }
        let mut prefix = Vec::with_capacity(regions.len());
        let mut total = 0u64;
        let mut prev_end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            if r.pages == 0 {
                return Err(LayoutError::EmptyRegion { index });
            }
            if index > 0 && r.first_page < prev_end {
                return Err(LayoutError::Unordered { index });
            }
            let end = r
                .first_page
                .checked_add(r.pages)
                .filter(|e| *e <= MAX_PAGE_END)
                .ok_or(LayoutError::TooLarge)?;
            prefix.push(total);
            total += r.pages;
            prev_end = end;
        }
        Ok(MemoryLayout {
            page_size,
            regions,
            prefix,
        })
    }

    /// One region of `bytes` starting at guest-physical address 0.
    pub fn flat(page_size: PageSize, bytes: u64) -> Result<Self, LayoutError> {
        let pages = Self::pages_in(page_size, bytes, "memory size")?;
        Self::new(
            page_size,
            vec![Region {
                first_page: 0,
                pages,
            }],
        )
    }

    /// `bytes` of memory laid out as a PC does: up to 3 GiB below the
    /// 4 GiB boundary, the rest above it, with a 1 GiB hole between.
    pub fn pc(page_size: PageSize, bytes: u64) -> Result<Self, LayoutError> {
        const LOW: u64 = 3 << 30;
        const HIGH_START: u64 = 4 << 30;
        if bytes <= LOW {
            return Self::flat(page_size, bytes);
        }
        let low = Self::pages_in(page_size, LOW, "low memory")?;
        let high = Self::pages_in(page_size, bytes - LOW, "high memory")?;
        Self::new(
            page_size,
            vec![
                Region {
                    first_page: 0,
                    pages: low,
                },
                Region {
                    first_page: HIGH_START >> page_size.shift(),
                    pages: high,
                },
            ],
        )
    }

    fn pages_in(page_size: PageSize, bytes: u64, what: &'static str) -> Result<u64, LayoutError> {
        if !bytes.is_multiple_of(page_size.bytes() as u64) {
            return Err(LayoutError::Unaligned {
                what,
                bytes,
                page_size: page_size.bytes(),
            });
        }
        Ok(bytes >> page_size.shift())
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The regions, ascending.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Number of guest pages (holes excluded).
    pub fn total_pages(&self) -> u64 {
        self.prefix.last().copied().unwrap_or(0) + self.regions.last().map_or(0, |r| r.pages)
    }

    /// Guest memory in bytes (holes excluded).
    pub fn total_bytes(&self) -> u64 {
        self.total_pages() * self.page_size.bytes() as u64
    }

    /// One past the highest GFN: the length a GFN-indexed bitmap needs.
    pub fn page_end(&self) -> PageNum {
        self.regions.last().map_or(0, |r| r.end())
    }

    /// Whether `page` is guest memory (not in a hole, not past the end).
    pub fn contains(&self, page: PageNum) -> bool {
        self.dense_index(page).is_some()
    }

    /// The dense index of `page` (0 .. total_pages), counting only guest
    /// pages; `None` for a hole or a page past the end.
    pub fn dense_index(&self, page: PageNum) -> Option<u64> {
        let i = self.regions.partition_point(|r| r.end() <= page);
        let r = self.regions.get(i)?;
        r.contains(page)
            .then(|| self.prefix[i] + (page - r.first_page))
    }

    /// The GFN of dense index `index`, the inverse of [`Self::dense_index`].
    pub fn page_at(&self, index: u64) -> Option<PageNum> {
        let i = self
            .prefix
            .partition_point(|p| *p <= index)
            .checked_sub(1)?;
        let r = self.regions[i];
        let off = index - self.prefix[i];
        (off < r.pages).then_some(r.first_page + off)
    }

    /// Every guest page, ascending.
    pub fn pages(&self) -> impl Iterator<Item = PageNum> + '_ {
        self.regions.iter().flat_map(|r| r.first_page..r.end())
    }

    /// Rebuilds the index after deserialisation.
    pub fn reindexed(self) -> Result<Self, LayoutError> {
        Self::new(self.page_size, self.regions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_must_be_power_of_two_in_range() {
        assert!(PageSize::new(4096).is_ok());
        assert!(PageSize::new(2 << 20).is_ok());
        assert_eq!(PageSize::new(3000), Err(LayoutError::BadPageSize(3000)));
        assert_eq!(PageSize::new(256), Err(LayoutError::BadPageSize(256)));
        assert_eq!(PageSize::new(0), Err(LayoutError::BadPageSize(0)));
    }

    #[test]
    fn pc_layout_has_a_hole_below_4g() {
        let l = MemoryLayout::pc(PageSize::DEFAULT, 5 << 30).unwrap();
        assert_eq!(l.total_bytes(), 5 << 30);
        assert_eq!(l.regions().len(), 2);
        let hole = (3u64 << 30) / 4096;
        assert!(l.contains(hole - 1));
        assert!(!l.contains(hole));
        assert!(!l.contains((4u64 << 30) / 4096 - 1));
        assert!(l.contains((4u64 << 30) / 4096));
        assert_eq!(l.page_end(), (6u64 << 30) / 4096);
    }

    #[test]
    fn dense_index_round_trips() {
        let l = MemoryLayout::new(
            PageSize::DEFAULT,
            vec![
                Region {
                    first_page: 2,
                    pages: 3,
                },
                Region {
                    first_page: 10,
                    pages: 2,
                },
            ],
        )
        .unwrap();
        let pages: Vec<_> = l.pages().collect();
        assert_eq!(pages, vec![2, 3, 4, 10, 11]);
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(l.dense_index(*p), Some(i as u64));
            assert_eq!(l.page_at(i as u64), Some(*p));
        }
        assert_eq!(l.dense_index(0), None);
        assert_eq!(l.dense_index(5), None);
        assert_eq!(l.dense_index(12), None);
        assert_eq!(l.page_at(5), None);
    }

    #[test]
    fn bad_layouts_are_rejected() {
        let r = |first_page, pages| Region { first_page, pages };
        let ps = PageSize::DEFAULT;
        assert_eq!(MemoryLayout::new(ps, vec![]), Err(LayoutError::NoRegions));
        assert_eq!(
            MemoryLayout::new(ps, vec![r(0, 0)]),
            Err(LayoutError::EmptyRegion { index: 0 })
        );
        assert_eq!(
            MemoryLayout::new(ps, vec![r(0, 4), r(3, 1)]),
            Err(LayoutError::Unordered { index: 1 })
        );
        assert_eq!(
            MemoryLayout::new(ps, vec![r(u64::MAX - 1, 4)]),
            Err(LayoutError::TooLarge)
        );
        assert!(MemoryLayout::flat(ps, 4097).is_err());
    }
}

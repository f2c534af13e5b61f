//! Simulated guest memory, byte-accurate or compact.
//!
//! Byte-accurate memory holds every byte (guests up to a few GiB).
//! Compact memory holds a 32-bit version per page and generates a page's
//! bytes from its GFN and version when read, so a 1 TiB guest costs
//! 1 GiB of host memory. In compact form a page's content is:
//! all zeros for version 0; otherwise the GFN (8 bytes, little-endian),
//! the version (8 bytes), then zeros. A page written to compact memory
//! must have that shape.

use migrate_core::{BackendError, BackendErrorKind};
use migrate_core::{MemoryLayout, PageNum};

/// How simulated memory is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryMode {
    /// Every byte stored.
    Bytes,
    /// A version number per page; contents generated on read.
    Compact,
}

#[derive(Clone, Debug)]
enum Storage {
    Bytes(Vec<u8>),
    Compact(Vec<u32>),
}

/// Guest memory of a simulated guest.
#[derive(Clone, Debug)]
pub struct SimMemory {
    layout: MemoryLayout,
    storage: Storage,
}

fn out_of_range(page: PageNum) -> BackendError {
    BackendError::new(
        BackendErrorKind::InvalidArgument,
        format!("page {page:#x} is not in the simulated guest's memory"),
    )
}

impl SimMemory {
    /// All-zero memory of `layout` in `mode`.
    pub fn zeroed(layout: MemoryLayout, mode: MemoryMode) -> Self {
        let n = layout.total_pages() as usize;
        let storage = match mode {
            MemoryMode::Bytes => Storage::Bytes(vec![0u8; n * layout.page_size().get()]),
            MemoryMode::Compact => Storage::Compact(vec![0u32; n]),
        };
        SimMemory { layout, storage }
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The storage mode.
    pub fn mode(&self) -> MemoryMode {
        match self.storage {
            Storage::Bytes(_) => MemoryMode::Bytes,
            Storage::Compact(_) => MemoryMode::Compact,
        }
    }

    fn index(&self, page: PageNum) -> Result<usize, BackendError> {
        self.layout
            .dense_index(page)
            .map(|i| i as usize)
            .ok_or_else(|| out_of_range(page))
    }

    /// Copies page `page` into `out` (one page long).
    pub fn read_page(&self, page: PageNum, out: &mut [u8]) -> Result<(), BackendError> {
        let i = self.index(page)?;
        let ps = self.layout.page_size().get();
        match &self.storage {
            Storage::Bytes(b) => out.copy_from_slice(&b[i * ps..(i + 1) * ps]),
            Storage::Compact(v) => compact_content(page, v[i], out),
        }
        Ok(())
    }

    /// Overwrites page `page` with `data`.
    pub fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        let i = self.index(page)?;
        let ps = self.layout.page_size().get();
        if data.len() != ps {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("page data of {} bytes, page size {ps}", data.len()),
            ));
        }
        match &mut self.storage {
            Storage::Bytes(b) => b[i * ps..(i + 1) * ps].copy_from_slice(data),
            Storage::Compact(v) => v[i] = parse_compact(page, data)?,
        }
        Ok(())
    }

    /// Makes page `page` all zeros.
    pub fn zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        let i = self.index(page)?;
        let ps = self.layout.page_size().get();
        match &mut self.storage {
            Storage::Bytes(b) => b[i * ps..(i + 1) * ps].fill(0),
            Storage::Compact(v) => v[i] = 0,
        }
        Ok(())
    }

    /// A guest store of `value` at the 8-byte slot `slot` of the page at
    /// dense index `index` (compact memory bumps the version instead).
    pub(crate) fn store(&mut self, index: usize, slot: usize, value: u64) {
        let ps = self.layout.page_size().get();
        match &mut self.storage {
            Storage::Bytes(b) => {
                let off = index * ps + (slot % (ps / 8)) * 8;
                b[off..off + 8].copy_from_slice(&value.to_le_bytes());
            }
            Storage::Compact(v) => {
                v[index] = v[index].wrapping_add(1).max(1);
            }
        }
    }

    /// Gives the page at dense index `index` its initial, non-zero content.
    pub(crate) fn init_page(&mut self, index: usize, seed: u64) {
        let ps = self.layout.page_size().get();
        match &mut self.storage {
            Storage::Bytes(b) => {
                let off = index * ps;
                b[off..off + 8].copy_from_slice(&(index as u64 + 1).to_le_bytes());
                b[off + 8..off + 16].copy_from_slice(&seed.to_le_bytes());
                b[off + ps - 8..off + ps].copy_from_slice(&(!seed).to_le_bytes());
            }
            Storage::Compact(v) => v[index] = 1,
        }
    }

    /// Whether both memories hold the same contents (byte by byte, or
    /// version by version for compact memory).
    pub fn same_contents(&self, other: &SimMemory) -> bool {
        if self.layout != other.layout {
            return false;
        }
        match (&self.storage, &other.storage) {
            (Storage::Bytes(a), Storage::Bytes(b)) => a == b,
            (Storage::Compact(a), Storage::Compact(b)) => a == b,
            _ => {
                let ps = self.layout.page_size().get();
                let (mut x, mut y) = (vec![0u8; ps], vec![0u8; ps]);
                self.layout.pages().all(|p| {
                    self.read_page(p, &mut x).is_ok()
                        && other.read_page(p, &mut y).is_ok()
                        && x == y
                })
            }
        }
    }

    /// Pages that differ between the two memories (for diagnostics).
    pub fn differing_pages(&self, other: &SimMemory) -> Vec<PageNum> {
        let ps = self.layout.page_size().get();
        let (mut x, mut y) = (vec![0u8; ps], vec![0u8; ps]);
        self.layout
            .pages()
            .filter(|p| {
                let a = self.read_page(*p, &mut x);
                let b = other.read_page(*p, &mut y);
                a.is_err() || b.is_err() || x != y
            })
            .collect()
    }
}

fn compact_content(page: PageNum, version: u32, out: &mut [u8]) {
    out.fill(0);
    if version != 0 {
        out[..8].copy_from_slice(&page.to_le_bytes());
        out[8..16].copy_from_slice(&(version as u64).to_le_bytes());
    }
}

fn parse_compact(page: PageNum, data: &[u8]) -> Result<u32, BackendError> {
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&data[i * 8..i * 8 + 8]);
        u64::from_le_bytes(a)
    };
    let rest_zero = migrate_core::digest::is_zero_page(&data[16..]);
    let (g, v) = (word(0), word(1));
    if rest_zero && g == 0 && v == 0 {
        return Ok(0);
    }
    if rest_zero && g == page && v != 0 && v <= u32::MAX as u64 {
        return Ok(v as u32);
    }
    Err(BackendError::new(
        BackendErrorKind::InvalidArgument,
        format!("page {page:#x}: content cannot be held by compact memory"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_core::PageSize;

    #[test]
    fn compact_round_trips_through_bytes() {
        let l = MemoryLayout::flat(PageSize::DEFAULT, 64 * 4096).unwrap();
        let mut a = SimMemory::zeroed(l.clone(), MemoryMode::Compact);
        let mut b = SimMemory::zeroed(l.clone(), MemoryMode::Compact);
        a.init_page(3, 9);
        a.store(3, 0, 1);
        let mut buf = vec![0u8; 4096];
        for p in l.pages() {
            a.read_page(p, &mut buf).unwrap();
            b.write_page(p, &buf).unwrap();
        }
        assert!(a.same_contents(&b));
        buf[100] = 1;
        assert!(b.write_page(3, &buf).is_err());
    }

    #[test]
    fn bytes_and_compact_compare_by_content() {
        let l = MemoryLayout::flat(PageSize::DEFAULT, 8 * 4096).unwrap();
        let mut c = SimMemory::zeroed(l.clone(), MemoryMode::Compact);
        let mut b = SimMemory::zeroed(l.clone(), MemoryMode::Bytes);
        c.init_page(2, 0);
        let mut buf = vec![0u8; 4096];
        c.read_page(2, &mut buf).unwrap();
        assert!(!c.same_contents(&b));
        b.write_page(2, &buf).unwrap();
        assert!(c.same_contents(&b));
        assert!(b.differing_pages(&c).is_empty());
        assert!(b.read_page(99, &mut buf).is_err());
    }
}

//! Which pages of guest memory the host never populated, read from
//! `/proc/self/pagemap`.
//!
//! Each 4 KiB page of the process's address space has a 64-bit entry
//! there: bit 63 says a page frame is mapped, bit 62 that the page is in
//! swap. In a private anonymous mapping a page with neither has never
//! been written since it was mapped (or was given back with
//! `MADV_DONTNEED`), and such a page reads as zeros: the kernel fills it
//! with zeros, or maps its shared zero page, on first access. So for such
//! a mapping "neither present nor swapped" means "zero", exactly, without
//! touching the page (which would cost a page fault). For any other
//! mapping (a file, shared memory) a page absent from this process's page
//! tables may hold data another mapping wrote, so the question is not
//! asked there ([`exact_for`]).
//!
//! Reading the entries needs no privilege (only the frame numbers, which
//! are not used, are hidden from unprivileged processes).

use crate::sys::TrackedMemory;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use vm_memory::GuestMemoryBackend;

const PAGE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Entries read at once: one page of the pagemap file, 2 MiB of memory.
const WINDOW: usize = 512;

/// Whether every region of `memory` is a private anonymous mapping, the
/// only kind for which an unpopulated page is known to be zero.
pub(crate) fn exact_for(memory: &TrackedMemory) -> bool {
    memory.iter().all(|r| {
        let flags = r.flags();
        r.file_offset().is_none()
            && flags & libc::MAP_ANONYMOUS != 0
            && flags & libc::MAP_PRIVATE != 0
            && flags & libc::MAP_SHARED == 0
    })
}

/// This process's pagemap, with the window of entries last read.
#[derive(Debug)]
pub(crate) struct Pagemap {
    file: File,
    /// First page (host address / 4096) of the window.
    first: u64,
    /// Entries of the window.
    entries: Vec<u64>,
    raw: Vec<u8>,
}

impl Pagemap {
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
            first: 0,
            entries: Vec::with_capacity(WINDOW),
            raw: vec![0; WINDOW * 8],
        })
    }

    /// Sets `out[i]` when the page at host address `hosts[i]` is neither
    /// present nor swapped, and clears it otherwise. Entries are read a
    /// window at a time, so ascending addresses cost a read per 2 MiB.
    /// The answer is as of the read: the caller must know that nothing
    /// writes the pages meanwhile unseen (the dirty log sees the guest).
    pub(crate) fn unpopulated(&mut self, hosts: &[u64], out: &mut [bool]) -> io::Result<()> {
        // Every query reads afresh: a window kept from an earlier call
        // could be stale.
        self.entries.clear();
        for (host, out) in hosts.iter().zip(out.iter_mut()) {
            let page = host / PAGE;
            let index = page.wrapping_sub(self.first) as usize;
            let entry = match self.entries.get(index) {
                Some(e) => *e,
                None => {
                    self.read_window(page)?;
                    self.entries.first().copied().unwrap_or(PRESENT)
                }
            };
            *out = entry & (PRESENT | SWAPPED) == 0;
        }
        Ok(())
    }

    /// The runs of populated pages (present or swapped) in `len` bytes
    /// from host address `host`, as `(first page from host, pages)`, in
    /// ascending order. Reads the entries a window at a time.
    pub(crate) fn populated_runs(&mut self, host: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let (first, pages) = (host / PAGE, len / PAGE);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < pages {
            self.read_window(first + at)?;
            if self.entries.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "/proc/self/pagemap ended inside guest memory",
                ));
            }
            for e in self.entries.iter().take((pages - at) as usize) {
                if e & (PRESENT | SWAPPED) != 0 {
                    match runs.last_mut() {
                        Some((f, n)) if *f + *n == at => *n += 1,
                        _ => runs.push((at, 1)),
                    }
                }
                at += 1;
            }
        }
        // A later query must not take this window for its own.
        self.entries.clear();
        Ok(runs)
    }

    fn read_window(&mut self, page: u64) -> io::Result<()> {
        self.entries.clear();
        self.first = page;
        let n = self.file.read_at(&mut self.raw, page * 8)?;
        self.entries.extend(
            self.raw[..n - n % 8]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Pages written, and pages only read, are populated; the others are
    /// not, and read as zeros.
    #[test]
    fn untouched_pages_of_anonymous_memory_are_unpopulated() {
        let mem: TrackedMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE as usize)]).unwrap();
        assert!(exact_for(&mem));
        mem.write_obj(7u8, GuestAddress(3 * PAGE)).unwrap();
        mem.write_obj(9u8, GuestAddress(40 * PAGE + 100)).unwrap();
        let _: u8 = mem.read_obj(GuestAddress(5 * PAGE)).unwrap();
        let base = mem.iter().next().unwrap().as_ptr() as u64;
        let hosts: Vec<u64> = (0..64).map(|i| base + i * PAGE).collect();
        let mut out = vec![false; 64];
        let mut pm = Pagemap::open().unwrap();
        pm.unpopulated(&hosts, &mut out).unwrap();
        for (i, unpopulated) in out.iter().enumerate() {
            assert_eq!(*unpopulated, ![3, 5, 40].contains(&i), "page {i}");
        }
        // Descending and scattered addresses are read as well.
        let back: Vec<u64> = hosts.iter().rev().copied().collect();
        let mut out = vec![true; 64];
        pm.unpopulated(&back, &mut out).unwrap();
        assert_eq!(out.iter().filter(|u| !**u).count(), 3);
        // The same as runs, over the whole range and over a part.
        assert_eq!(
            pm.populated_runs(base, 64 * PAGE).unwrap(),
            vec![(3, 1), (5, 1), (40, 1)]
        );
        assert_eq!(
            pm.populated_runs(base + 4 * PAGE, 2 * PAGE).unwrap(),
            vec![(1, 1)]
        );
        let mut page = [1u8; 4096];
        mem.read_slice(&mut page, GuestAddress(9 * PAGE)).unwrap();
        assert!(page.iter().all(|b| *b == 0));
    }
}

//! Memory digests and page checks.
//!
//! The digest of guest memory is an XXH3-128 over, for every guest page in
//! ascending GFN order, the GFN and the XXH3-64 of the page's bytes. Both
//! ends compute it the same way. The completion record carries the
//! [`completion_digest`]: the memory digest bound to the device state, so
//! the destination resumes only if the memory it holds and the state it
//! is about to restore are both the source's.

use crate::backend::{BackendError, DeviceState, PageSource};
use crate::page::{MemoryLayout, PageNum};
use serde::{Deserialize, Serialize};
use std::fmt;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// A 128-bit digest of all guest memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct MemoryDigest(pub u128);

impl fmt::Debug for MemoryDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for MemoryDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Builds a [`MemoryDigest`] page by page, in ascending GFN order.
#[derive(Clone, Default)]
pub struct DigestBuilder {
    hasher: Xxh3,
}

impl DigestBuilder {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds page `page` with content `data`.
    pub fn add_page(&mut self, page: PageNum, data: &[u8]) {
        self.add_page_hash(page, xxh3_64(data));
    }

    /// Adds page `page` whose content hashes to `hash` (see [`page_hash`]).
    pub fn add_page_hash(&mut self, page: PageNum, hash: u64) {
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&page.to_le_bytes());
        rec[8..].copy_from_slice(&hash.to_le_bytes());
        self.hasher.update(&rec);
    }

    /// The digest.
    pub fn finish(&self) -> MemoryDigest {
        MemoryDigest(self.hasher.digest128())
    }
}

/// The per-page hash the memory digest is built from.
pub fn page_hash(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// The digest a completion record carries: the memory digest and the
/// device state (format, version and bytes) hashed together.
pub fn completion_digest(memory: MemoryDigest, state: &DeviceState) -> MemoryDigest {
    let mut h = Xxh3::new();
    h.update(&memory.0.to_le_bytes());
    h.update(&(state.format.len() as u64).to_le_bytes());
    h.update(state.format.as_bytes());
    h.update(&state.version.to_le_bytes());
    h.update(&(state.data.len() as u64).to_le_bytes());
    h.update(&state.data);
    MemoryDigest(h.digest128())
}

/// Pages read per call when digesting through a [`PageSource`].
const DIGEST_BATCH: usize = 256;

/// Reads every page of `layout` from `memory` and digests it. Pages the
/// source knows to be zero ([`PageSource::known_zero`]) are digested as
/// zero pages without being read.
pub fn digest_memory<S: PageSource + ?Sized>(
    memory: &mut S,
    layout: &MemoryLayout,
) -> Result<MemoryDigest, BackendError> {
    let ps = layout.page_size().get();
    let zero_hash = page_hash(&vec![0u8; ps]);
    let mut builder = DigestBuilder::new();
    let mut pages = Vec::with_capacity(DIGEST_BATCH);
    let mut known = Vec::with_capacity(DIGEST_BATCH);
    let mut to_read = Vec::with_capacity(DIGEST_BATCH);
    let mut buf = vec![0u8; DIGEST_BATCH * ps];
    let mut flush = |pages: &mut Vec<PageNum>| -> Result<(), BackendError> {
        known.clear();
        known.resize(pages.len(), false);
        memory.known_zero(pages, &mut known)?;
        to_read.clear();
        to_read.extend(
            pages
                .iter()
                .zip(&known)
                .filter(|(_, z)| !**z)
                .map(|(p, _)| *p),
        );
        let data = &mut buf[..to_read.len() * ps];
        if !to_read.is_empty() {
            memory.read_pages(&to_read, data)?;
        }
        let mut read = data.chunks_exact(ps);
        for (p, z) in pages.iter().zip(&known) {
            if *z {
                builder.add_page_hash(*p, zero_hash);
            } else if let Some(d) = read.next() {
                builder.add_page(*p, d);
            }
        }
        pages.clear();
        Ok(())
    };
    for page in layout.pages() {
        pages.push(page);
        if pages.len() == DIGEST_BATCH {
            flush(&mut pages)?;
        }
    }
    if !pages.is_empty() {
        flush(&mut pages)?;
    }
    Ok(builder.finish())
}

/// Whether a page is all zeros (64 bytes at a time, so it vectorises).
#[inline]
pub fn is_zero_page(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero_page(&p));
        assert!(is_zero_page(&[0u8; 100]));
        assert!(!is_zero_page(&[0, 0, 0, 1]));
    }

    #[test]
    fn digest_depends_on_page_numbers_and_content() {
        let mut a = DigestBuilder::new();
        a.add_page(1, b"abc");
        let mut b = DigestBuilder::new();
        b.add_page(2, b"abc");
        let mut c = DigestBuilder::new();
        c.add_page(1, b"abd");
        assert_ne!(a.finish(), b.finish());
        assert_ne!(a.finish(), c.finish());
        let mut d = DigestBuilder::new();
        d.add_page_hash(1, page_hash(b"abc"));
        assert_eq!(a.finish(), d.finish());
    }
}

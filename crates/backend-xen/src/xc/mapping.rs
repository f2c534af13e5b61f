//! Foreign memory: mapping another domain's frames into this process.

use super::{errno, Xen, XenError};
use crate::sys;
use std::sync::Arc;

impl Xen {
    /// Maps `frames` of `domid` (GFNs for HVM/PVH domains, machine frames
    /// for PV domains) into this
    /// process. Frames that cannot be mapped are reported in
    /// [`Mapping::error`]; the call fails only if nothing could be set up.
    pub(crate) fn map(
        self: &Arc<Self>,
        domid: u32,
        frames: &[u64],
        writable: bool,
    ) -> Result<Mapping, XenError> {
        if frames.is_empty() {
            return Err(XenError::Invalid("mapping no frames".into()));
        }
        let h = self.lock();
        let pfns: Vec<sys::xen_pfn_t> = frames.iter().map(|&f| f as sys::xen_pfn_t).collect();
        let mut err = vec![0i32; frames.len()];
        let prot = if writable {
            libc_prot::READ | libc_prot::WRITE
        } else {
            libc_prot::READ
        };
        // SAFETY: `pfns` and `err` both hold `frames.len()` entries.
        let addr = unsafe {
            h.fmem_lib.xenforeignmemory_map(
                h.fmem,
                domid,
                prot,
                frames.len(),
                pfns.as_ptr(),
                err.as_mut_ptr(),
            )
        };
        if addr.is_null() {
            return Err(XenError::Call {
                op: "xenforeignmemory_map",
                domid,
                source: errno(),
            });
        }
        drop(h);
        Ok(Mapping {
            xen: self.clone(),
            addr: addr.cast(),
            pages: frames.len(),
            err,
        })
    }
}

mod libc_prot {
    pub(super) const READ: i32 = 1;
    pub(super) const WRITE: i32 = 2;
}

/// Frames of a domain mapped into this process; unmapped when dropped.
pub(crate) struct Mapping {
    xen: Arc<Xen>,
    addr: *mut u8,
    pages: usize,
    err: Vec<i32>,
}

// SAFETY: the mapping is process memory that stays mapped while the value
// lives; reads and writes of it are plain memory copies.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: `&self` methods only copy to and from memory that
// stays mapped while the value lives, with volatile accesses and fences
// for the ring indices; callers that share a mapping (the paging ring)
// order their use of each slot with a lock.
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} pages)", self.pages)
    }
}

impl Mapping {
    /// The error (a negative errno) for frame `i`, 0 if it mapped.
    pub(crate) fn error(&self, i: usize) -> i32 {
        self.err.get(i).copied().unwrap_or(-22)
    }

    /// Copies frame `i` into `out` (4 KiB).
    pub(crate) fn read(&self, i: usize, out: &mut [u8]) -> Result<(), XenError> {
        self.check(i, out.len())?;
        // SAFETY: frame `i` is mapped (checked), 4 KiB long, and stays
        // mapped while `self` lives. The guest may write it meanwhile;
        // the copy then holds a mix, which the dirty log sends again.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(i * 4096), out.as_mut_ptr(), 4096) };
        Ok(())
    }

    /// Copies `data` (4 KiB) into frame `i`.
    pub(crate) fn write(&self, i: usize, data: &[u8]) -> Result<(), XenError> {
        self.check(i, data.len())?;
        // SAFETY: as in `read`; the mapping was made writable by the
        // caller's request, or Xen refused it and `error(i)` says so.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(i * 4096), 4096) };
        Ok(())
    }

    fn check(&self, i: usize, len: usize) -> Result<(), XenError> {
        if len != 4096 {
            return Err(XenError::Invalid(format!(
                "a page is 4096 bytes, not {len}"
            )));
        }
        match self.err.get(i) {
            None => Err(XenError::Invalid(format!(
                "frame {i} is outside a mapping of {}",
                self.pages
            ))),
            Some(0) => Ok(()),
            Some(e) => Err(XenError::Invalid(format!(
                "frame {i} of the mapping is not mapped (errno {})",
                -e
            ))),
        }
    }
}

impl Mapping {
    /// Reads a little-endian u32 at byte `off` of frame 0, after an
    /// acquire fence (a ring index another side writes).
    pub(crate) fn load_u32(&self, off: usize) -> Result<u32, XenError> {
        self.check_at(off, 4)?;
        // SAFETY: frame 0 is mapped (checked) and `off + 4` lies within it;
        // the read is volatile because another side writes it.
        let v = unsafe { std::ptr::read_volatile(self.addr.add(off) as *const u32) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Ok(u32::from_le(v))
    }

    /// Writes a little-endian u32 at byte `off` of frame 0, after a
    /// release fence (publishing what was written before it).
    pub(crate) fn store_u32(&self, off: usize, v: u32) -> Result<(), XenError> {
        self.check_at(off, 4)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: as in `load_u32`.
        unsafe { std::ptr::write_volatile(self.addr.add(off) as *mut u32, v.to_le()) };
        Ok(())
    }

    /// Copies bytes `off..off + out.len()` of frame 0 out.
    pub(crate) fn read_at(&self, off: usize, out: &mut [u8]) -> Result<(), XenError> {
        self.check_at(off, out.len())?;
        // SAFETY: the range lies within mapped frame 0 (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into bytes `off..off + data.len()` of frame 0.
    pub(crate) fn write_at(&self, off: usize, data: &[u8]) -> Result<(), XenError> {
        self.check_at(off, data.len())?;
        // SAFETY: as in `read_at`; the mapping is writable or Xen refused
        // it and `error(0)` says so (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(off), data.len()) };
        Ok(())
    }

    fn check_at(&self, off: usize, len: usize) -> Result<(), XenError> {
        if self.err.first() != Some(&0) {
            return Err(XenError::Invalid(
                "frame 0 of the mapping is not mapped".into(),
            ));
        }
        if off.checked_add(len).is_none_or(|e| e > 4096) || !off.is_multiple_of(4) && len == 4 {
            return Err(XenError::Invalid(format!(
                "bytes {off}..{} are not within one page",
                off.saturating_add(len)
            )));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let h = self.xen.lock();
        // SAFETY: `addr` came from xenforeignmemory_map with `pages`
        // pages and is unmapped once.
        unsafe {
            h.fmem_lib
                .xenforeignmemory_unmap(h.fmem, self.addr.cast(), self.pages)
        };
    }
}

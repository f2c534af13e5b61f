//! Log-dirty mode and the hypercall-safe bitmap it reads into.

use super::{errno, LogDirtyOp, Xen, XenError};
use crate::sys;
use std::ffi::c_void;

impl Xen {
    /// Turns log-dirty mode on.
    pub(crate) fn logdirty_enable(&self, domid: u32) -> Result<(), XenError> {
        self.logdirty_simple(domid, sys::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
    }

    /// Turns log-dirty mode off.
    pub(crate) fn logdirty_off(&self, domid: u32) -> Result<(), XenError> {
        self.logdirty_simple(domid, sys::XEN_DOMCTL_SHADOW_OP_OFF)
    }

    fn logdirty_simple(&self, domid: u32, op: u32) -> Result<(), XenError> {
        let h = self.lock();
        // SAFETY: the handle is open; ENABLE_LOGDIRTY and OFF take no
        // bitmap and no statistics.
        let r = unsafe {
            h.ctrl.xc_logdirty_control(
                h.xch,
                domid,
                op,
                std::ptr::null_mut(),
                0,
                0,
                std::ptr::null_mut(),
            )
        };
        Xen::check(r, "xc_logdirty_control", domid)
    }

    /// Fills `bitmap` (one bit per frame, least significant bit first in
    /// each word) with the frames written since log-dirty mode was turned
    /// on or last cleaned; `Clean` also clears Xen's record.
    pub(crate) fn logdirty_read(
        &self,
        domid: u32,
        op: LogDirtyOp,
        bitmap: &mut HypercallBitmap,
    ) -> Result<(), XenError> {
        let h = self.lock();
        if bitmap.owner != h.xch {
            return Err(XenError::Invalid(
                "bitmap allocated through another Xen handle".into(),
            ));
        }
        let sop = match op {
            LogDirtyOp::Clean => sys::XEN_DOMCTL_SHADOW_OP_CLEAN,
            LogDirtyOp::Peek => sys::XEN_DOMCTL_SHADOW_OP_PEEK,
        };
        // SAFETY: xc_shadow_op_stats is plain old data.
        let mut stats: sys::xc_shadow_op_stats_t = unsafe { std::mem::zeroed() };
        // SAFETY: the buffer was allocated by this handle with room for
        // `bits` bits, and stays alive for the call.
        let r = unsafe {
            h.ctrl.xc_logdirty_control(
                h.xch,
                domid,
                sop,
                &mut *bitmap.buf,
                bitmap.bits as std::os::raw::c_ulong,
                0,
                &mut stats,
            )
        };
        Xen::check(r, "xc_logdirty_control", domid)
    }

    /// Allocates a hypercall-safe bitmap of `bits` bits.
    pub(crate) fn bitmap(&self, bits: u64) -> Result<HypercallBitmap, XenError> {
        let h = self.lock();
        let pages = bits.div_ceil(8).div_ceil(4096).max(1) as i32;
        let mut buf = Box::new(sys::xc_hypercall_buffer_t {
            hbuf: std::ptr::null_mut(),
            param_shadow: std::ptr::null_mut(),
            dir: 0,
            ubuf: usize::MAX as *mut c_void,
            sz: 0,
        });
        // SAFETY: `buf` is a fresh, unbounced buffer descriptor that
        // lives (boxed, so at a fixed address) as long as the allocation.
        let p = unsafe {
            h.ctrl
                .xc__hypercall_buffer_alloc_pages(h.xch, &mut *buf, pages)
        };
        if p.is_null() {
            return Err(XenError::Call {
                op: "xc_hypercall_buffer_alloc_pages",
                domid: 0,
                source: errno(),
            });
        }
        Ok(HypercallBitmap {
            buf,
            pages,
            bits,
            owner: h.xch,
        })
    }

    /// Frees a bitmap from [`Xen::bitmap`].
    pub(crate) fn free_bitmap(&self, mut bitmap: HypercallBitmap) {
        let h = self.lock();
        if bitmap.owner == h.xch && !bitmap.buf.hbuf.is_null() {
            // SAFETY: allocated by this handle with this page count.
            unsafe {
                h.ctrl
                    .xc__hypercall_buffer_free_pages(h.xch, &mut *bitmap.buf, bitmap.pages)
            };
            bitmap.buf.hbuf = std::ptr::null_mut();
        }
    }
}

/// A bitmap in hypercall-safe memory, for log-dirty reads.
pub(crate) struct HypercallBitmap {
    buf: Box<sys::xc_hypercall_buffer_t>,
    pages: i32,
    bits: u64,
    owner: *mut sys::xc_interface,
}

// SAFETY: the buffer is memory owned by this value; nothing else refers to
// it between calls.
unsafe impl Send for HypercallBitmap {}

impl std::fmt::Debug for HypercallBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HypercallBitmap({} bits)", self.bits)
    }
}

impl HypercallBitmap {
    /// Its words, least significant bit first (Xen's layout on x86).
    pub(crate) fn words(&self) -> Vec<u64> {
        let n = self.bits.div_ceil(64) as usize;
        let mut out = vec![0u64; n];
        if !self.buf.hbuf.is_null() {
            // SAFETY: the buffer has at least `pages` pages, which cover
            // `n` words, and no hypercall is writing it now (calls take
            // `&mut self`).
            unsafe {
                std::ptr::copy_nonoverlapping(self.buf.hbuf as *const u64, out.as_mut_ptr(), n)
            };
        }
        out
    }
}

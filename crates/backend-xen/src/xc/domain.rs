//! Domain calls: state, pause and resume, HVM context and parameters, and
//! what a PV domain needs (vCPU contexts, page types, MMU operations,
//! its memory reservation).

use super::{errno, DomainInfo, Xen, XenError};

/// A Xen scheduler that can cap a domain's CPU time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    /// Credit2, Xen's default scheduler since 4.12.
    Credit2,
    /// The older credit scheduler.
    Credit,
}
use crate::sys;

impl Xen {
    /// The domain's state.
    pub fn domain_info(&self, domid: u32) -> Result<DomainInfo, XenError> {
        let h = self.lock();
        // SAFETY: xc_domaininfo_t is plain old data; all zeros is valid.
        let mut info: sys::xc_domaininfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the handle is open and `info` has room for one entry.
        let n = unsafe { h.ctrl.xc_domain_getinfolist(h.xch, domid, 1, &mut info) };
        if n < 0 {
            return Err(XenError::Call {
                op: "xc_domain_getinfolist",
                domid,
                source: errno(),
            });
        }
        if n != 1 || u32::from(info.domain) != domid {
            return Err(XenError::NoDomain(domid));
        }
        let flag = |f: u32| info.flags & f != 0;
        Ok(DomainInfo {
            domid,
            hvm: flag(sys::XEN_DOMINF_hvm_guest),
            paused: flag(sys::XEN_DOMINF_paused),
            shutdown: flag(sys::XEN_DOMINF_shutdown),
            shutdown_reason: (info.flags >> sys::XEN_DOMINF_shutdownshift)
                & sys::XEN_DOMINF_shutdownmask,
            dying: flag(sys::XEN_DOMINF_dying),
            nr_pages: info.tot_pages,
            max_vcpu_id: info.max_vcpu_id,
            cpu_time_ns: info.cpu_time,
            shared_info_frame: info.shared_info_frame,
        })
    }

    /// The highest guest frame number the domain has.
    pub fn maximum_gpfn(&self, domid: u32) -> Result<u64, XenError> {
        let mut g: sys::xen_pfn_t = 0;
        self.call("xc_domain_maximum_gpfn", domid, |h| {
            // SAFETY: the handle is open and `g` is a valid out-pointer.
            unsafe { h.ctrl.xc_domain_maximum_gpfn(h.xch, domid, &mut g) }
        })?;
        Ok(g as u64)
    }

    /// The domain's scheduler cap, percent of one physical CPU its vCPUs
    /// may use together (0: no cap), and which scheduler holds it: credit2
    /// (Xen's default) or credit. `None` when neither runs the domain, or
    /// this libxenctrl lacks their calls: the host cannot cap it.
    pub fn sched_cap(&self, domid: u32) -> Result<Option<(Scheduler, u16)>, XenError> {
        let h = self.lock();
        if h.ctrl.xc_sched_credit2_domain_get.is_ok() {
            let mut c = sys::xen_domctl_sched_credit2::default();
            // SAFETY: the handle is open, the symbol is present and `c` is
            // a valid out-pointer.
            let r = unsafe { h.ctrl.xc_sched_credit2_domain_get(h.xch, domid, &mut c) };
            if r >= 0 {
                return Ok(Some((Scheduler::Credit2, c.cap)));
            }
        }
        if h.ctrl.xc_sched_credit_domain_get.is_ok() {
            let mut c = sys::xen_domctl_sched_credit::default();
            // SAFETY: as above.
            let r = unsafe { h.ctrl.xc_sched_credit_domain_get(h.xch, domid, &mut c) };
            if r >= 0 {
                return Ok(Some((Scheduler::Credit, c.cap)));
            }
        }
        Ok(None)
    }

    /// Sets the domain's cap under `sched` (from [`Xen::sched_cap`]),
    /// keeping its weight.
    pub fn set_sched_cap(&self, domid: u32, sched: Scheduler, cap: u16) -> Result<(), XenError> {
        match sched {
            Scheduler::Credit2 => {
                let mut c = sys::xen_domctl_sched_credit2::default();
                self.call("xc_sched_credit2_domain_get", domid, |h| {
                    // SAFETY: the handle is open and `c` a valid pointer;
                    // `sched_cap` found the symbol.
                    unsafe { h.ctrl.xc_sched_credit2_domain_get(h.xch, domid, &mut c) }
                })?;
                c.cap = cap;
                self.call("xc_sched_credit2_domain_set", domid, |h| {
                    // SAFETY: as above.
                    unsafe { h.ctrl.xc_sched_credit2_domain_set(h.xch, domid, &mut c) }
                })
                .map(drop)
            }
            Scheduler::Credit => {
                let mut c = sys::xen_domctl_sched_credit::default();
                self.call("xc_sched_credit_domain_get", domid, |h| {
                    // SAFETY: as above.
                    unsafe { h.ctrl.xc_sched_credit_domain_get(h.xch, domid, &mut c) }
                })?;
                c.cap = cap;
                self.call("xc_sched_credit_domain_set", domid, |h| {
                    // SAFETY: as above.
                    unsafe { h.ctrl.xc_sched_credit_domain_set(h.xch, domid, &mut c) }
                })
                .map(drop)
            }
        }
    }

    /// Pauses the domain.
    pub fn pause(&self, domid: u32) -> Result<(), XenError> {
        self.call("xc_domain_pause", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.ctrl.xc_domain_pause(h.xch, domid) }
        })
        .map(drop)
    }

    /// Unpauses the domain.
    pub fn unpause(&self, domid: u32) -> Result<(), XenError> {
        self.call("xc_domain_unpause", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.ctrl.xc_domain_unpause(h.xch, domid) }
        })
        .map(drop)
    }

    /// Resumes a domain that suspended itself, in place: `fast` tells the
    /// guest the suspend was cancelled (it keeps its connections).
    pub fn resume(&self, domid: u32, fast: bool) -> Result<(), XenError> {
        self.call("xc_domain_resume", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.guest.xc_domain_resume(h.xch, domid, fast as i32) }
        })
        .map(drop)
    }

    /// The HVM/PVH context record (every vCPU, the LAPICs, the platform
    /// timers and interrupt controllers), as Xen's save format.
    pub(crate) fn hvm_context(&self, domid: u32) -> Result<Vec<u8>, XenError> {
        let h = self.lock();
        // SAFETY: a null buffer of size 0 asks for the size.
        let size = unsafe {
            h.ctrl
                .xc_domain_hvm_getcontext(h.xch, domid, std::ptr::null_mut(), 0)
        };
        Self::check(size, "xc_domain_hvm_getcontext(size)", domid)?;
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` has `size` bytes.
        let len = unsafe {
            h.ctrl
                .xc_domain_hvm_getcontext(h.xch, domid, buf.as_mut_ptr(), size as u32)
        };
        Self::check(len, "xc_domain_hvm_getcontext", domid)?;
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// Loads a context record taken by [`Xen::hvm_context`].
    pub(crate) fn set_hvm_context(&self, domid: u32, ctx: &[u8]) -> Result<(), XenError> {
        let mut copy = ctx.to_vec();
        self.call("xc_domain_hvm_setcontext", domid, |h| {
            // SAFETY: the buffer holds `len` bytes; Xen only reads it.
            unsafe {
                h.ctrl
                    .xc_domain_hvm_setcontext(h.xch, domid, copy.as_mut_ptr(), copy.len() as u32)
            }
        })
        .map(drop)
    }

    /// Reads an HVM parameter.
    pub(crate) fn hvm_param(&self, domid: u32, param: u32) -> Result<u64, XenError> {
        let mut v = 0u64;
        self.call("xc_hvm_param_get", domid, |h| {
            // SAFETY: the handle is open and `v` is a valid out-pointer.
            unsafe { h.ctrl.xc_hvm_param_get(h.xch, domid, param, &mut v) }
        })?;
        Ok(v)
    }

    /// Sets an HVM parameter.
    pub(crate) fn set_hvm_param(&self, domid: u32, param: u32, value: u64) -> Result<(), XenError> {
        self.call("xc_hvm_param_set", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.ctrl.xc_hvm_param_set(h.xch, domid, param, value) }
        })
        .map(drop)
    }

    /// The guest's word size in bytes (8 for a 64-bit PV guest).
    pub(crate) fn guest_width(&self, domid: u32) -> Result<u32, XenError> {
        let mut w: std::os::raw::c_uint = 0;
        self.call("xc_domain_get_guest_width", domid, |h| {
            // SAFETY: the handle is open and `w` is a valid out-pointer.
            unsafe { h.ctrl.xc_domain_get_guest_width(h.xch, domid, &mut w) }
        })?;
        Ok(w)
    }

    /// A 64-bit PV vCPU's context (`vcpu_guest_context_x86_64`), as bytes
    /// (see [`crate::pv::VcpuContext`]).
    pub(crate) fn pv_vcpu_context(&self, domid: u32, vcpu: u32) -> Result<Vec<u8>, XenError> {
        // SAFETY: the context union is plain old data; all zeros is valid.
        let mut ctx: Box<sys::vcpu_guest_context_any_t> = Box::new(unsafe { std::mem::zeroed() });
        self.call("xc_vcpu_getcontext", domid, |h| {
            // SAFETY: the handle is open and `ctx` has room for any guest's
            // context.
            unsafe { h.ctrl.xc_vcpu_getcontext(h.xch, domid, vcpu, &mut *ctx) }
        })?;
        let n = std::mem::size_of::<sys::vcpu_guest_context_x86_64>();
        let mut out = vec![0u8; n];
        // SAFETY: `x64` is the first `n` bytes of the union, which
        // xc_vcpu_getcontext filled for a 64-bit guest.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&*ctx as *const sys::vcpu_guest_context_any_t).cast::<u8>(),
                out.as_mut_ptr(),
                n,
            )
        };
        Ok(out)
    }

    /// Loads a 64-bit PV vCPU's context taken by
    /// [`Xen::pv_vcpu_context`]; `None` resets the vCPU (it goes down and
    /// drops its page tables and descriptor table).
    pub(crate) fn set_pv_vcpu_context(
        &self,
        domid: u32,
        vcpu: u32,
        ctx: Option<&[u8]>,
    ) -> Result<(), XenError> {
        let n = std::mem::size_of::<sys::vcpu_guest_context_x86_64>();
        let h = self.lock();
        let r = match ctx {
            None => {
                // SAFETY: a null context asks Xen to reset the vCPU.
                unsafe {
                    h.ctrl
                        .xc_vcpu_setcontext(h.xch, domid, vcpu, std::ptr::null_mut())
                }
            }
            Some(bytes) => {
                if bytes.len() != n {
                    return Err(XenError::Invalid(format!(
                        "a PV vCPU context is {n} bytes, not {}",
                        bytes.len()
                    )));
                }
                // SAFETY: as in `pv_vcpu_context`.
                let mut any: Box<sys::vcpu_guest_context_any_t> =
                    Box::new(unsafe { std::mem::zeroed() });
                // SAFETY: `bytes` holds `n` bytes, the size of `x64`, the
                // union's first member.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        (&mut *any as *mut sys::vcpu_guest_context_any_t).cast::<u8>(),
                        n,
                    )
                };
                // SAFETY: the handle is open; Xen reads the context.
                unsafe { h.ctrl.xc_vcpu_setcontext(h.xch, domid, vcpu, &mut *any) }
            }
        };
        Self::check(r, "xc_vcpu_setcontext", domid)
    }

    /// The page types (`XEN_DOMCTL_PFINFO_*`) of machine frames of a PV
    /// domain, one per frame.
    pub(crate) fn page_types(&self, domid: u32, frames: &[u64]) -> Result<Vec<u32>, XenError> {
        let mut out = Vec::with_capacity(frames.len());
        for chunk in frames.chunks(1024) {
            let mut arr: Vec<sys::xen_pfn_t> = chunk.to_vec();
            self.call("xc_get_pfn_type_batch", domid, |h| {
                // SAFETY: `arr` holds `chunk.len()` entries, rewritten in place.
                unsafe {
                    h.ctrl
                        .xc_get_pfn_type_batch(h.xch, domid, arr.len() as u32, arr.as_mut_ptr())
                }
            })?;
            out.extend(arr.iter().map(|&t| t as u32));
        }
        Ok(out)
    }

    /// Runs MMU extended operations (`(MMUEXT_* command, machine frame)`)
    /// on behalf of `domid`: pinning and unpinning its page tables.
    pub(crate) fn mmuext(&self, domid: u32, ops: &[(u32, u64)]) -> Result<(), XenError> {
        for chunk in ops.chunks(256) {
            let mut v: Vec<sys::mmuext_op> = chunk
                .iter()
                .map(|&(cmd, mfn)| sys::mmuext_op {
                    cmd,
                    arg1: sys::mmuext_op__bindgen_ty_1 { mfn },
                    arg2: sys::mmuext_op__bindgen_ty_2 { nr_ents: 0 },
                })
                .collect();
            self.call("xc_mmuext_op", domid, |h| {
                // SAFETY: `v` holds `chunk.len()` operations.
                unsafe {
                    h.ctrl
                        .xc_mmuext_op(h.xch, v.as_mut_ptr(), v.len() as u32, domid)
                }
            })?;
        }
        Ok(())
    }

    /// Gives back frames of a PV domain (machine frames).
    pub(crate) fn decrease_reservation(&self, domid: u32, frames: &[u64]) -> Result<(), XenError> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut arr: Vec<sys::xen_pfn_t> = frames.to_vec();
        self.call("xc_domain_decrease_reservation_exact", domid, |h| {
            // SAFETY: `arr` holds `frames.len()` entries.
            unsafe {
                h.ctrl.xc_domain_decrease_reservation_exact(
                    h.xch,
                    domid,
                    arr.len() as _,
                    0,
                    arr.as_mut_ptr(),
                )
            }
        })
        .map(drop)
    }

    /// Gives a domain memory at guest frames `pfns`; for a PV domain,
    /// returns the machine frame each got.
    pub(crate) fn populate(&self, domid: u32, pfns: &[u64]) -> Result<Vec<u64>, XenError> {
        if pfns.is_empty() {
            return Ok(Vec::new());
        }
        let mut arr: Vec<sys::xen_pfn_t> = pfns.to_vec();
        self.call("xc_domain_populate_physmap_exact", domid, |h| {
            // SAFETY: `arr` holds `pfns.len()` entries, rewritten in place.
            unsafe {
                h.ctrl.xc_domain_populate_physmap_exact(
                    h.xch,
                    domid,
                    arr.len() as _,
                    0,
                    0,
                    arr.as_mut_ptr(),
                )
            }
        })?;
        Ok(arr)
    }
}

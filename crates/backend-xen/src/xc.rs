//! A safe layer over libxenctrl and libxenforeignmemory, loaded at run
//! time.
//!
//! [`Xen::open`] loads both libraries, checks that every function the
//! backend calls is there, and opens a control interface and a foreign
//! memory handle. On a host that is not a Xen dom0 it fails with an error
//! that names what is missing: the library, a function in it, or the
//! hypervisor interface.

use crate::sys;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

/// What went wrong talking to Xen.
#[derive(Debug, Error)]
pub enum XenError {
    /// A Xen library could not be loaded.
    #[error("cannot load {tried} (is this a Xen dom0 with Xen's libraries installed? Debian: libxenmisc4.17): {source}")]
    Library {
        /// The file names tried.
        tried: String,
        /// The loader's error for the last one.
        #[source]
        source: libloading::Error,
    },
    /// A library lacks a function these bindings were made for (another
    /// Xen version).
    #[error("{library} has no {function}: the bindings are for Xen 4.17's interface")]
    Symbol {
        /// The library.
        library: &'static str,
        /// The function.
        function: &'static str,
    },
    /// The hypervisor interface could not be opened.
    #[error("{what} failed: {source} (not running in a Xen dom0, or not as root?)")]
    Open {
        /// The call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A call into Xen failed.
    #[error("{op} on domain {domid} failed: {source}")]
    Call {
        /// The call.
        op: &'static str,
        /// The domain.
        domid: u32,
        /// The OS error (errno).
        #[source]
        source: std::io::Error,
    },
    /// No such domain.
    #[error("no domain {0}")]
    NoDomain(u32),
    /// The request does not make sense.
    #[error("{0}")]
    Invalid(String),
}

/// What [`Xen::domain_info`] reports about a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain id.
    pub domid: u32,
    /// An HVM or PVH domain (its memory is addressed by GFN).
    pub hvm: bool,
    /// Paused by the toolstack.
    pub paused: bool,
    /// Shut down (see `shutdown_reason`).
    pub shutdown: bool,
    /// Why, when `shutdown`: 2 is a suspend.
    pub shutdown_reason: u32,
    /// Dying.
    pub dying: bool,
    /// Pages it has now.
    pub nr_pages: u64,
    /// Highest vCPU id.
    pub max_vcpu_id: u32,
    /// CPU time used, nanoseconds.
    pub cpu_time_ns: u64,
    /// The machine frame of its shared-info page.
    pub shared_info_frame: u64,
}

/// Xen's value for a suspended domain's `shutdown_reason`.
pub const SHUTDOWN_SUSPEND: u32 = sys::SHUTDOWN_suspend;

/// Log-dirty operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDirtyOp {
    /// Read the bitmap and clear it.
    Clean,
    /// Read the bitmap only.
    Peek,
}

struct Handles {
    ctrl: sys::XenLib,
    guest: sys::XenLib,
    fmem_lib: sys::XenLib,
    xch: *mut sys::xc_interface,
    fmem: *mut sys::xenforeignmemory_handle,
}

// SAFETY: the handles are plain pointers to library state that is not
// tied to the thread that opened it (libxenctrl and libxenforeignmemory
// handles may be used from any thread, one call at a time, which the
// mutex in `Xen` ensures).
unsafe impl Send for Handles {}

/// An open connection to the hypervisor: a libxenctrl interface and a
/// foreign-memory handle. Calls are serialised.
pub struct Xen {
    h: Mutex<Handles>,
}

impl std::fmt::Debug for Xen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xen")
    }
}

const CTRL_NAMES: &[&str] = &["libxenctrl.so.4.17", "libxenctrl.so"];
const GUEST_NAMES: &[&str] = &["libxenguest.so.4.17", "libxenguest.so"];
const FMEM_NAMES: &[&str] = &["libxenforeignmemory.so.1", "libxenforeignmemory.so"];

fn load(names: &[&str]) -> Result<sys::XenLib, XenError> {
    let mut last = None;
    for n in names {
        // SAFETY: loading a Xen library runs its initialisers, which only
        // set up the library's own state.
        match unsafe { sys::XenLib::new(n) } {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(XenError::Library {
        tried: names.join(" or "),
        source: last.expect("at least one name"),
    })
}

macro_rules! require {
    ($lib:expr, $libname:expr, $($f:ident),+) => {
        $(
            if $lib.$f.is_err() {
                return Err(XenError::Symbol { library: $libname, function: stringify!($f) });
            }
        )+
    };
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Xen {
    /// Loads the libraries and opens the hypervisor interface.
    pub fn open() -> Result<Xen, XenError> {
        let ctrl = load(CTRL_NAMES)?;
        require!(
            ctrl,
            "libxenctrl",
            xc_interface_open,
            xc_interface_close,
            xc_domain_getinfolist,
            xc_domain_maximum_gpfn,
            xc_domain_pause,
            xc_domain_unpause,
            xc_domain_hvm_getcontext,
            xc_domain_hvm_setcontext,
            xc_hvm_param_get,
            xc_hvm_param_set,
            xc_logdirty_control,
            xc__hypercall_buffer_alloc_pages,
            xc__hypercall_buffer_free_pages,
            xc_vcpu_getcontext,
            xc_vcpu_setcontext,
            xc_get_pfn_type_batch,
            xc_mmuext_op,
            xc_domain_get_guest_width,
            xc_domain_decrease_reservation_exact,
            xc_domain_populate_physmap_exact,
            xc_mem_paging_enable,
            xc_mem_paging_disable,
            xc_mem_paging_nominate,
            xc_mem_paging_evict,
            xc_mem_paging_load
        );
        let guest = load(GUEST_NAMES)?;
        require!(guest, "libxenguest", xc_domain_resume);
        let fmem_lib = load(FMEM_NAMES)?;
        require!(
            fmem_lib,
            "libxenforeignmemory",
            xenforeignmemory_open,
            xenforeignmemory_close,
            xenforeignmemory_map,
            xenforeignmemory_unmap
        );
        // SAFETY: the function is present (checked above); null loggers
        // select the library's default (stderr) logger.
        let xch = unsafe { ctrl.xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if xch.is_null() {
            return Err(XenError::Open {
                what: "xc_interface_open",
                source: errno(),
            });
        }
        // SAFETY: as above.
        let fmem = unsafe { fmem_lib.xenforeignmemory_open(std::ptr::null_mut(), 0) };
        if fmem.is_null() {
            let source = errno();
            // SAFETY: `xch` was opened above and is not used again.
            unsafe { ctrl.xc_interface_close(xch) };
            return Err(XenError::Open {
                what: "xenforeignmemory_open",
                source,
            });
        }
        Ok(Xen {
            h: Mutex::new(Handles {
                ctrl,
                guest,
                fmem_lib,
                xch,
                fmem,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Handles> {
        self.h.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the handles, makes one library call `f` with them, and turns
    /// a negative answer into [`XenError::Call`] naming `op`, with the
    /// errno the call left (read before the lock is released).
    fn call(
        &self,
        op: &'static str,
        domid: u32,
        f: impl FnOnce(&Handles) -> i32,
    ) -> Result<i32, XenError> {
        let h = self.lock();
        let r = f(&h);
        Self::check(r, op, domid)?;
        Ok(r)
    }

    fn check(r: i32, op: &'static str, domid: u32) -> Result<(), XenError> {
        if r < 0 {
            Err(XenError::Call {
                op,
                domid,
                source: errno(),
            })
        } else {
            Ok(())
        }
    }

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
    pub fn hvm_context(&self, domid: u32) -> Result<Vec<u8>, XenError> {
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
    pub fn set_hvm_context(&self, domid: u32, ctx: &[u8]) -> Result<(), XenError> {
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
    pub fn hvm_param(&self, domid: u32, param: u32) -> Result<u64, XenError> {
        let mut v = 0u64;
        self.call("xc_hvm_param_get", domid, |h| {
            // SAFETY: the handle is open and `v` is a valid out-pointer.
            unsafe { h.ctrl.xc_hvm_param_get(h.xch, domid, param, &mut v) }
        })?;
        Ok(v)
    }

    /// Sets an HVM parameter.
    pub fn set_hvm_param(&self, domid: u32, param: u32, value: u64) -> Result<(), XenError> {
        self.call("xc_hvm_param_set", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.ctrl.xc_hvm_param_set(h.xch, domid, param, value) }
        })
        .map(drop)
    }

    /// Turns log-dirty mode on.
    pub fn logdirty_enable(&self, domid: u32) -> Result<(), XenError> {
        self.logdirty_simple(domid, sys::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
    }

    /// Turns log-dirty mode off.
    pub fn logdirty_off(&self, domid: u32) -> Result<(), XenError> {
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
        if r < 0 {
            return Err(XenError::Call {
                op: "xc_logdirty_control",
                domid,
                source: errno(),
            });
        }
        Ok(())
    }

    /// Fills `bitmap` (one bit per frame, least significant bit first in
    /// each word) with the frames written since log-dirty mode was turned
    /// on or last cleaned; `Clean` also clears Xen's record.
    pub fn logdirty_read(
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
        if r < 0 {
            return Err(XenError::Call {
                op: "xc_logdirty_control",
                domid,
                source: errno(),
            });
        }
        Ok(())
    }

    /// Allocates a hypercall-safe bitmap of `bits` bits.
    pub fn bitmap(&self, bits: u64) -> Result<HypercallBitmap, XenError> {
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
    pub fn free_bitmap(&self, mut bitmap: HypercallBitmap) {
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

    /// The guest's word size in bytes (8 for a 64-bit PV guest).
    pub fn guest_width(&self, domid: u32) -> Result<u32, XenError> {
        let mut w: std::os::raw::c_uint = 0;
        self.call("xc_domain_get_guest_width", domid, |h| {
            // SAFETY: the handle is open and `w` is a valid out-pointer.
            unsafe { h.ctrl.xc_domain_get_guest_width(h.xch, domid, &mut w) }
        })?;
        Ok(w)
    }

    /// A 64-bit PV vCPU's context (`vcpu_guest_context_x86_64`), as bytes
    /// (see [`crate::pv::VcpuContext`]).
    pub fn pv_vcpu_context(&self, domid: u32, vcpu: u32) -> Result<Vec<u8>, XenError> {
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
    pub fn set_pv_vcpu_context(
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
    pub fn page_types(&self, domid: u32, frames: &[u64]) -> Result<Vec<u32>, XenError> {
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
    pub fn mmuext(&self, domid: u32, ops: &[(u32, u64)]) -> Result<(), XenError> {
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
    pub fn decrease_reservation(&self, domid: u32, frames: &[u64]) -> Result<(), XenError> {
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
    pub fn populate(&self, domid: u32, pfns: &[u64]) -> Result<Vec<u64>, XenError> {
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

    /// Turns on memory paging for an HVM/PVH domain: its paging ring (the
    /// page at `HVM_PARAM_PAGING_RING_PFN`, which the caller maps first)
    /// starts to carry requests. Returns the event channel port Xen
    /// signals on. Needs a hypervisor built with `CONFIG_MEM_PAGING`
    /// (`ENOSYS` otherwise) and a HAP guest.
    pub fn paging_enable(&self, domid: u32) -> Result<u32, XenError> {
        let mut port = 0u32;
        self.call("xc_mem_paging_enable", domid, |h| {
            // SAFETY: the handle is open and `port` is a valid out-pointer.
            unsafe { h.ctrl.xc_mem_paging_enable(h.xch, domid, &mut port) }
        })?;
        Ok(port)
    }

    /// Turns memory paging off.
    pub fn paging_disable(&self, domid: u32) -> Result<(), XenError> {
        self.call("xc_mem_paging_disable", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.ctrl.xc_mem_paging_disable(h.xch, domid) }
        })
        .map(drop)
    }

    /// Pages a guest frame out: nominates it, then evicts it (its memory
    /// is freed; the guest's next touch raises a paging request).
    pub fn page_out(&self, domid: u32, gfn: u64) -> Result<(), XenError> {
        // Both calls under one lock: nothing else pages the frame between.
        let h = self.lock();
        // SAFETY: the handle is open.
        let r = unsafe { h.ctrl.xc_mem_paging_nominate(h.xch, domid, gfn) };
        Self::check(r, "xc_mem_paging_nominate", domid)?;
        // SAFETY: as above.
        let r = unsafe { h.ctrl.xc_mem_paging_evict(h.xch, domid, gfn) };
        Self::check(r, "xc_mem_paging_evict", domid)
    }

    /// Pages a guest frame back in with `data` (4 KiB) as its content; the
    /// guest may use it at once.
    pub fn page_in(&self, domid: u32, gfn: u64, data: &[u8]) -> Result<(), XenError> {
        if data.len() != 4096 {
            return Err(XenError::Invalid(format!(
                "a page is 4096 bytes, not {}",
                data.len()
            )));
        }
        self.call("xc_mem_paging_load", domid, |h| {
            // SAFETY: `data` is 4 KiB; libxenctrl copies it into a hypercall
            // buffer and only reads it.
            unsafe {
                h.ctrl.xc_mem_paging_load(
                    h.xch,
                    domid,
                    gfn,
                    data.as_ptr() as *mut std::os::raw::c_void,
                )
            }
        })
        .map(drop)
    }

    /// Maps `frames` of `domid` (GFNs for HVM/PVH domains, machine frames
    /// for PV domains) into this
    /// process. Frames that cannot be mapped are reported in
    /// [`Mapping::error`]; the call fails only if nothing could be set up.
    pub fn map(
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
    pub const READ: i32 = 1;
    pub const WRITE: i32 = 2;
}

impl Drop for Xen {
    fn drop(&mut self) {
        let h = self.lock();
        // SAFETY: both handles were opened in `open` and are closed once.
        unsafe {
            h.fmem_lib.xenforeignmemory_close(h.fmem);
            h.ctrl.xc_interface_close(h.xch);
        }
    }
}

/// A bitmap in hypercall-safe memory, for log-dirty reads.
pub struct HypercallBitmap {
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
    /// Bits it holds.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Its words, least significant bit first (Xen's layout on x86).
    pub fn words(&self) -> Vec<u64> {
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

/// Frames of a domain mapped into this process; unmapped when dropped.
pub struct Mapping {
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
    pub fn error(&self, i: usize) -> i32 {
        self.err.get(i).copied().unwrap_or(-22)
    }

    /// Copies frame `i` into `out` (4 KiB).
    pub fn read(&self, i: usize, out: &mut [u8]) -> Result<(), XenError> {
        self.check(i, out.len())?;
        // SAFETY: frame `i` is mapped (checked), 4 KiB long, and stays
        // mapped while `self` lives. The guest may write it meanwhile;
        // the copy then holds a mix, which the dirty log sends again.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(i * 4096), out.as_mut_ptr(), 4096) };
        Ok(())
    }

    /// Copies `data` (4 KiB) into frame `i`.
    pub fn write(&self, i: usize, data: &[u8]) -> Result<(), XenError> {
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
    pub fn load_u32(&self, off: usize) -> Result<u32, XenError> {
        self.check_at(off, 4)?;
        // SAFETY: frame 0 is mapped (checked) and `off + 4` lies within it;
        // the read is volatile because another side writes it.
        let v = unsafe { std::ptr::read_volatile(self.addr.add(off) as *const u32) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Ok(u32::from_le(v))
    }

    /// Writes a little-endian u32 at byte `off` of frame 0, after a
    /// release fence (publishing what was written before it).
    pub fn store_u32(&self, off: usize, v: u32) -> Result<(), XenError> {
        self.check_at(off, 4)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: as in `load_u32`.
        unsafe { std::ptr::write_volatile(self.addr.add(off) as *mut u32, v.to_le()) };
        Ok(())
    }

    /// Copies bytes `off..off + out.len()` of frame 0 out.
    pub fn read_at(&self, off: usize, out: &mut [u8]) -> Result<(), XenError> {
        self.check_at(off, out.len())?;
        // SAFETY: the range lies within mapped frame 0 (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into bytes `off..off + data.len()` of frame 0.
    pub fn write_at(&self, off: usize, data: &[u8]) -> Result<(), XenError> {
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

/// An event channel bound to a port of another domain
/// (libxenevtchn), for a ring's notifications.
pub struct EventChannel {
    lib: sys::XenLib,
    xce: *mut sys::xenevtchn_handle,
    port: u32,
}

// SAFETY: the handle is library state not tied to the opening thread;
// each call takes `&self` and libxenevtchn's calls on one handle are
// independent reads and writes of its file descriptor.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl std::fmt::Debug for EventChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventChannel(port {})", self.port)
    }
}

const EVTCHN_NAMES: &[&str] = &["libxenevtchn.so.1", "libxenevtchn.so"];

impl EventChannel {
    /// Opens libxenevtchn and binds to `remote_port` of `domid`.
    pub fn bind(domid: u32, remote_port: u32) -> Result<Self, XenError> {
        let lib = load(EVTCHN_NAMES)?;
        require!(
            lib,
            "libxenevtchn",
            xenevtchn_open,
            xenevtchn_close,
            xenevtchn_fd,
            xenevtchn_bind_interdomain,
            xenevtchn_unbind,
            xenevtchn_notify,
            xenevtchn_pending,
            xenevtchn_unmask
        );
        // SAFETY: the function is present; a null logger is the default.
        let xce = unsafe { lib.xenevtchn_open(std::ptr::null_mut(), 0) };
        if xce.is_null() {
            return Err(XenError::Open {
                what: "xenevtchn_open",
                source: errno(),
            });
        }
        // SAFETY: `xce` is open.
        let port = unsafe { lib.xenevtchn_bind_interdomain(xce, domid, remote_port) };
        if port < 0 {
            let source = errno();
            // SAFETY: `xce` was opened above and is not used again.
            unsafe { lib.xenevtchn_close(xce) };
            return Err(XenError::Call {
                op: "xenevtchn_bind_interdomain",
                domid,
                source,
            });
        }
        Ok(EventChannel {
            lib,
            xce,
            port: port as u32,
        })
    }

    /// The file descriptor to poll for events.
    pub fn fd(&self) -> i32 {
        // SAFETY: the handle is open.
        unsafe { self.lib.xenevtchn_fd(self.xce) }
    }

    /// Takes the pending event (after `fd` polled readable) and unmasks
    /// the port for the next one.
    pub fn take(&self) -> Result<(), XenError> {
        // SAFETY: the handle is open.
        let p = unsafe { self.lib.xenevtchn_pending(self.xce) };
        if p < 0 {
            return Err(XenError::Call {
                op: "xenevtchn_pending",
                domid: 0,
                source: errno(),
            });
        }
        // SAFETY: as above; `p` is a port of this handle.
        let r = unsafe { self.lib.xenevtchn_unmask(self.xce, p as u32) };
        Xen::check(r, "xenevtchn_unmask", 0)
    }

    /// Signals the other side.
    pub fn notify(&self) -> Result<(), XenError> {
        // SAFETY: the handle is open and `port` bound.
        let r = unsafe { self.lib.xenevtchn_notify(self.xce, self.port) };
        Xen::check(r, "xenevtchn_notify", 0)
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: the port is bound and the handle open; both are released
        // once.
        unsafe {
            self.lib.xenevtchn_unbind(self.xce, self.port);
            self.lib.xenevtchn_close(self.xce);
        }
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

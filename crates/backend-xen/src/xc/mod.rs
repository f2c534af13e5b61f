//! A safe layer over libxenctrl and libxenforeignmemory, loaded at run
//! time.
//!
//! [`Xen::open`] loads both libraries, checks that every function the
//! backend calls is there, and opens a control interface and a foreign
//! memory handle. On a host that is not a Xen dom0 it fails with an error
//! that names what is missing: the library, a function in it, or the
//! hypervisor interface.

use crate::sys;
use std::sync::{Mutex, MutexGuard};
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
#[non_exhaustive]
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
pub(crate) const SHUTDOWN_SUSPEND: u32 = sys::SHUTDOWN_suspend;

/// Log-dirty operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogDirtyOp {
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

    fn check(r: impl Into<i64>, op: &'static str, domid: u32) -> Result<(), XenError> {
        if r.into() < 0 {
            Err(XenError::Call {
                op,
                domid,
                source: errno(),
            })
        } else {
            Ok(())
        }
    }
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

// After `require!`, which the submodules use.
mod domain;
mod logdirty;
mod mapping;
mod paging;

pub use domain::Scheduler;
pub(crate) use logdirty::HypercallBitmap;
pub(crate) use mapping::Mapping;
pub(crate) use paging::EventChannel;

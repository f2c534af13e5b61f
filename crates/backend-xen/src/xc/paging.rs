//! Memory paging (post-copy on HVM/PVH) and the event channel its ring
//! signals on.

use super::{errno, load, Xen, XenError};
use crate::frame::Gfn;
use crate::sys;

impl Xen {
    /// Turns on memory paging for an HVM/PVH domain: its paging ring (the
    /// page at `HVM_PARAM_PAGING_RING_PFN`, which the caller maps first)
    /// starts to carry requests. Returns the event channel port Xen
    /// signals on. Needs a hypervisor built with `CONFIG_MEM_PAGING`
    /// (`ENOSYS` otherwise) and a HAP guest.
    pub(crate) fn paging_enable(&self, domid: u32) -> Result<u32, XenError> {
        let mut port = 0u32;
        self.call("xc_mem_paging_enable", domid, |h| {
            // SAFETY: the handle is open and `port` is a valid out-pointer.
            unsafe { h.ctrl.xc_mem_paging_enable(h.xch, domid, &mut port) }
        })?;
        Ok(port)
    }

    /// Turns memory paging off.
    pub(crate) fn paging_disable(&self, domid: u32) -> Result<(), XenError> {
        self.call("xc_mem_paging_disable", domid, |h| {
            // SAFETY: the handle is open.
            unsafe { h.ctrl.xc_mem_paging_disable(h.xch, domid) }
        })
        .map(drop)
    }

    /// Pages a guest frame out: nominates it, then evicts it (its memory
    /// is freed; the guest's next touch raises a paging request).
    pub(crate) fn page_out(&self, domid: u32, gfn: Gfn) -> Result<(), XenError> {
        let gfn = gfn.0;
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
    pub(crate) fn page_in(&self, domid: u32, gfn: Gfn, data: &[u8]) -> Result<(), XenError> {
        let gfn = gfn.0;
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
}

/// An event channel bound to a port of another domain
/// (libxenevtchn), for a ring's notifications.
pub(crate) struct EventChannel {
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
    pub(crate) fn bind(domid: u32, remote_port: u32) -> Result<Self, XenError> {
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
    pub(crate) fn fd(&self) -> i32 {
        // SAFETY: the handle is open.
        unsafe { self.lib.xenevtchn_fd(self.xce) }
    }

    /// Waits up to `timeout_ms` for an event; whether one is pending (then
    /// [`EventChannel::take`] it).
    pub(crate) fn wait(&self, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        n > 0
    }

    /// Takes the pending event (after `fd` polled readable) and unmasks
    /// the port for the next one.
    pub(crate) fn take(&self) -> Result<(), XenError> {
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
    pub(crate) fn notify(&self) -> Result<(), XenError> {
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

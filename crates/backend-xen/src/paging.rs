//! Post-copy on Xen: the destination pages out what has not arrived and
//! serves the guest's touches of it through Xen's memory-paging ring.
//!
//! [`Pager::enable`] maps the domain's paging ring (the page at
//! `HVM_PARAM_PAGING_RING_PFN`), turns paging on and binds its event
//! channel. A post-copy discard pages each frame out (nominate, evict).
//! When the guest touches one, Xen pauses that vCPU and queues a request;
//! the pager's thread hands the frame to the destination engine as a
//! fault ([`migrate_core::driver::Faults`]), the engine asks the source
//! for it first, and when it arrives the sink pages it in with its content
//! (`xc_mem_paging_load`) and answers every request waiting on it, which
//! unpauses the vCPUs. Frames pushed in the background are paged in the
//! same way, before any touch.
//!
//! This needs what Xen 4.17 gives memory paging: an HVM or PVH guest on
//! HAP, no IOMMU, and a hypervisor built with `CONFIG_MEM_PAGING=y` (which
//! needs `CONFIG_UNSUPPORTED=y`). Elsewhere [`Pager::enable`] fails with
//! the hypervisor's error and the migration stops before the source
//! pauses.

use crate::frame::Gfn;
use crate::sys;
use crate::xc::{EventChannel, Mapping, Xen, XenError};
use migrate_core::driver::Faults;
use migrate_core::Clock;
use std::collections::{BTreeSet, HashMap};
use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const REQ_PROD: usize = offset_of!(sys::vm_event_sring, req_prod);
const REQ_EVENT: usize = offset_of!(sys::vm_event_sring, req_event);
const RSP_PROD: usize = offset_of!(sys::vm_event_sring, rsp_prod);
const RSP_EVENT: usize = offset_of!(sys::vm_event_sring, rsp_event);
const RING: usize = offset_of!(sys::vm_event_sring, ring);
const ENTRY: usize = std::mem::size_of::<sys::vm_event_sring_entry>();
const VERSION: usize = offset_of!(sys::vm_event_st, version);
const FLAGS: usize = offset_of!(sys::vm_event_st, flags);
const REASON: usize = offset_of!(sys::vm_event_st, reason);
const VCPU: usize = offset_of!(sys::vm_event_st, vcpu_id);
const GFN: usize = offset_of!(sys::vm_event_st, u) + offset_of!(sys::vm_event_paging, gfn);
const PAGING_FLAGS: usize =
    offset_of!(sys::vm_event_st, u) + offset_of!(sys::vm_event_paging, flags);

/// Entries a one-page ring holds: the largest power of two that fits.
pub(crate) const RING_ENTRIES: u32 = {
    let n = (4096 - RING) / ENTRY;
    1 << (usize::BITS - 1 - n.leading_zeros())
};

/// A request taken from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    /// The vCPU that touched the frame.
    pub vcpu: u32,
    /// `VM_EVENT_FLAG_*`; with `VCPU_PAUSED` the answer unpauses it.
    pub flags: u32,
    /// `VM_EVENT_REASON_*`.
    pub reason: u32,
    /// The guest frame.
    pub gfn: u64,
    /// `MEM_PAGING_*` flags (`EVICT_FAIL`: an eviction did not happen).
    pub paging_flags: u32,
}

/// Decodes one ring entry.
pub(crate) fn decode_request(entry: &[u8]) -> Request {
    let u32_at =
        |o: usize| u32::from_le_bytes([entry[o], entry[o + 1], entry[o + 2], entry[o + 3]]);
    let mut g = [0u8; 8];
    g.copy_from_slice(&entry[GFN..GFN + 8]);
    Request {
        vcpu: u32_at(VCPU),
        flags: u32_at(FLAGS),
        reason: u32_at(REASON),
        gfn: u64::from_le_bytes(g),
        paging_flags: u32_at(PAGING_FLAGS),
    }
}

/// Encodes the answer to `req` as a ring entry: the frame is back, and a
/// vCPU paused on it goes on.
pub(crate) fn encode_response(req: &Request) -> Vec<u8> {
    let mut e = vec![0u8; ENTRY];
    e[VERSION..VERSION + 4].copy_from_slice(&sys::VM_EVENT_INTERFACE_VERSION.to_le_bytes());
    e[FLAGS..FLAGS + 4]
        .copy_from_slice(&(req.flags & sys::VM_EVENT_FLAG_VCPU_PAUSED).to_le_bytes());
    e[REASON..REASON + 4].copy_from_slice(&req.reason.to_le_bytes());
    e[VCPU..VCPU + 4].copy_from_slice(&req.vcpu.to_le_bytes());
    e[GFN..GFN + 8].copy_from_slice(&req.gfn.to_le_bytes());
    e
}

#[derive(Debug, Default)]
struct State {
    /// Frames paged out and not yet back.
    out: BTreeSet<u64>,
    /// Requests waiting for their frame.
    waiting: HashMap<u64, Vec<Request>>,
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// Requests seen that the pager could not serve.
    errors: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    xen: Arc<Xen>,
    domid: u32,
    ring: Mapping,
    evtchn: EventChannel,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts answers on the ring and signals Xen.
    fn respond(&self, st: &mut State, reqs: &[Request]) -> Result<(), XenError> {
        if reqs.is_empty() {
            return Ok(());
        }
        for r in reqs {
            let slot = (st.rsp_prod_pvt % RING_ENTRIES) as usize;
            self.ring
                .write_at(RING + slot * ENTRY, &encode_response(r))?;
            st.rsp_prod_pvt = st.rsp_prod_pvt.wrapping_add(1);
        }
        self.ring.store_u32(RSP_PROD, st.rsp_prod_pvt)?;
        self.evtchn.notify()
    }

    /// Takes the requests on the ring: frames still out become faults
    /// (returned); requests for frames already back are answered at once.
    fn take_requests(&self) -> Result<Vec<u64>, XenError> {
        let mut st = self.lock();
        let mut faults = Vec::new();
        let mut answer = Vec::new();
        loop {
            let prod = self.ring.load_u32(REQ_PROD)?;
            while st.req_cons != prod {
                let slot = (st.req_cons % RING_ENTRIES) as usize;
                let mut e = vec![0u8; ENTRY];
                self.ring.read_at(RING + slot * ENTRY, &mut e)?;
                st.req_cons = st.req_cons.wrapping_add(1);
                let r = decode_request(&e);
                if r.paging_flags & sys::MEM_PAGING_EVICT_FAIL != 0 {
                    st.errors.push(format!(
                        "Xen reports that evicting frame {:#x} failed",
                        r.gfn
                    ));
                    continue;
                }
                if st.out.contains(&r.gfn) {
                    let w = st.waiting.entry(r.gfn).or_default();
                    if w.is_empty() {
                        faults.push(r.gfn);
                    }
                    w.push(r);
                } else {
                    answer.push(r);
                }
            }
            // Ask for an event at the next request, then look again in
            // case one came meanwhile.
            self.ring.store_u32(REQ_EVENT, prod.wrapping_add(1))?;
            if self.ring.load_u32(REQ_PROD)? == prod {
                break;
            }
        }
        self.respond(&mut st, &answer)?;
        Ok(faults)
    }
}

/// A destination domain's pager (see the module docs).
#[derive(Debug)]
pub struct Pager {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    ring_gfn: u64,
}

impl Pager {
    /// Turns paging on for `domid` and starts the thread that turns its
    /// requests into faults on the returned channel, stamped with
    /// `clock`.
    pub fn enable(
        xen: Arc<Xen>,
        domid: u32,
        clock: Arc<dyn Clock>,
    ) -> Result<(Pager, Receiver<Faults>), XenError> {
        let ring_gfn = xen.hvm_param(domid, sys::HVM_PARAM_PAGING_RING_PFN)?;
        if ring_gfn == 0 {
            return Err(XenError::Invalid(format!(
                "domain {domid} has no paging ring (HVM_PARAM_PAGING_RING_PFN is 0)"
            )));
        }
        let ring = xen.map(domid, &[ring_gfn], true)?;
        if ring.error(0) != 0 {
            return Err(XenError::Invalid(format!(
                "cannot map domain {domid}'s paging ring at frame {ring_gfn:#x} (errno {})",
                -ring.error(0)
            )));
        }
        let port = xen.paging_enable(domid)?;
        let evtchn = match EventChannel::bind(domid, port) {
            Ok(e) => e,
            Err(e) => {
                let _ = xen.paging_disable(domid);
                return Err(e);
            }
        };
        // An empty shared ring: no requests, no responses, an event
        // wanted at the first of each.
        ring.write_at(0, &[0u8; RING])?;
        ring.store_u32(REQ_EVENT, 1)?;
        ring.store_u32(RSP_EVENT, 1)?;
        let shared = Arc::new(Shared {
            xen,
            domid,
            ring,
            evtchn,
            state: Mutex::default(),
        });
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("xen-pager-{domid}"))
                .spawn(move || serve(&shared, &stop, &tx, clock.as_ref()))
                .map_err(|e| XenError::Invalid(format!("starting the pager thread: {e}")))?
        };
        Ok((
            Pager {
                shared,
                stop,
                thread: Mutex::new(Some(thread)),
                ring_gfn,
            },
            rx,
        ))
    }

    /// The guest frame of the ring page.
    pub fn ring_gfn(&self) -> Gfn {
        Gfn(self.ring_gfn)
    }

    /// Pages `gfn` out (a post-copy discard).
    pub fn page_out(&self, gfn: Gfn) -> Result<(), XenError> {
        let mut st = self.shared.lock();
        let frame = gfn;
        let gfn = gfn.0;
        if st.out.contains(&gfn) {
            return Ok(());
        }
        self.shared.xen.page_out(self.shared.domid, frame)?;
        st.out.insert(gfn);
        Ok(())
    }

    /// Whether `gfn` is paged out.
    pub fn is_out(&self, gfn: Gfn) -> bool {
        self.shared.lock().out.contains(&gfn.0)
    }

    /// Pages `gfn` in with `data` and answers the requests waiting on it.
    pub fn page_in(&self, gfn: Gfn, data: &[u8]) -> Result<(), XenError> {
        let mut st = self.shared.lock();
        self.shared.xen.page_in(self.shared.domid, gfn, data)?;
        let gfn = gfn.0;
        st.out.remove(&gfn);
        let waiting = st.waiting.remove(&gfn).unwrap_or_default();
        self.shared.respond(&mut st, &waiting)
    }

    /// Frames still paged out.
    pub fn missing(&self) -> usize {
        self.shared.lock().out.len()
    }

    /// Ends paging once every frame is back: stops the thread and turns
    /// paging off. Refuses while a frame is out (the guest would wait on
    /// it for ever), or if a request could not be served.
    pub fn finish(&self) -> Result<(), XenError> {
        {
            let st = self.shared.lock();
            if let Some(e) = st.errors.first() {
                return Err(XenError::Invalid(e.clone()));
            }
            if !st.out.is_empty() {
                return Err(XenError::Invalid(format!(
                    "{} frames of domain {} are still paged out",
                    st.out.len(),
                    self.shared.domid
                )));
            }
        }
        self.halt();
        self.shared.xen.paging_disable(self.shared.domid)
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        // A pager dropped without `finish` (a failed migration) stops its
        // thread but leaves paging on: frames that never arrived stay out,
        // so the guest can never read them as something they are not.
        self.halt();
    }
}

fn serve(shared: &Shared, stop: &AtomicBool, tx: &Sender<Faults>, clock: &dyn Clock) {
    while !stop.load(Ordering::Relaxed) {
        if shared.evtchn.wait(50) && shared.evtchn.take().is_err() {
            break;
        }
        match shared.take_requests() {
            Ok(pages) if !pages.is_empty() => {
                let at = clock.now();
                if tx.send(Faults { pages, at }).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.lock().errors.push(e.to_string());
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_geometry_and_entries() {
        assert_eq!(RING, 64, "the shared ring's header is 64 bytes");
        assert!(RING_ENTRIES.is_power_of_two());
        assert!(RING + RING_ENTRIES as usize * ENTRY <= 4096);
        assert!(RING + 2 * RING_ENTRIES as usize * ENTRY > 4096);
        let req = Request {
            vcpu: 3,
            flags: sys::VM_EVENT_FLAG_VCPU_PAUSED | 0x100,
            reason: sys::VM_EVENT_REASON_MEM_PAGING,
            gfn: 0x1234,
            paging_flags: 0,
        };
        let e = encode_response(&req);
        let back = decode_request(&e);
        assert_eq!(back.vcpu, 3);
        assert_eq!(back.gfn, 0x1234);
        assert_eq!(back.reason, sys::VM_EVENT_REASON_MEM_PAGING);
        assert_eq!(
            back.flags,
            sys::VM_EVENT_FLAG_VCPU_PAUSED,
            "only the pause flag is answered"
        );
        assert_eq!(
            u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            sys::VM_EVENT_INTERFACE_VERSION
        );
    }
}

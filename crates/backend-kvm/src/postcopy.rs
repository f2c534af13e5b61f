//! The post-copy destination's fault handler.
//!
//! ```text
//!  vCPU thread ── touches an absent page ──▶ kernel parks it, posts an event
//!  FaultHandler thread ── reads events ──▶ Faults{pages, at} ──▶ channel
//!  engine thread (run_destination) ── request_pages_at ──▶ source
//!  source ── page ──▶ engine thread ── UFFDIO_COPY ──▶ page mapped, vCPU woken
//!
//!  with a preempt connection:
//!  FaultHandler thread ── PreemptRequest ──▶ source's preempt thread
//!  source ── RequestedPages ──▶ preempt reader thread ── UFFDIO_COPY ──▶ vCPU woken
//! ```
//!
//! Over a transport with a post-copy preempt connection the driver has
//! the handler thread send each request itself
//! ([`FaultSource::deliver_to`]): the request leaves on the preempt
//! connection as the event is read, and the engine thread records it.
//!
//! The handler only reports faults. The engine thread places the pushed
//! pages through [`KvmPages`](crate::KvmPages); the pages asked for are
//! placed by the preempt connection's reader thread where there is one
//! (the driver hands it a placer from
//! [`PageSink::share_placer`](migrate_core::PageSink::share_placer)),
//! by the engine thread otherwise. Once such a placer is out, both place
//! a page only where it is absent (`UFFDIO_COPY` under the memory's
//! placement lock), so a page is placed once and the fault latency is
//! measured from the event to the placement that wakes the vCPU.

use crate::memory::KvmMemory;
use crate::{KvmControl, KvmError};
use migrate_core::driver::{FaultDelivery, FaultSource, Faults};
use migrate_core::{BackendError, Clock, MigrationError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the handler waits for events before it looks at its stop flag.
const WAIT: Duration = Duration::from_millis(20);

/// A thread that reads the userfaultfd of a post-copy destination and
/// reports the faulting guest pages. It stops when dropped.
pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// Where the thread hands each report, if not down the channel.
    deliver: Arc<Mutex<Option<FaultDelivery>>>,
}

impl std::fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl FaultHandler {
    /// Starts the handler for `memory`, on which
    /// [`KvmMemory::enable_postcopy`] was called. Fault times are taken on
    /// `clock`, which must be the destination engine's. [`KvmFaults`]
    /// starts one and hands its receiver to the destination driver.
    pub fn start(
        memory: Arc<KvmMemory>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, Receiver<Faults>), KvmError> {
        let uffd = memory
            .userfault()
            .ok_or_else(|| KvmError::Config("post-copy is not enabled on this memory".into()))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let deliver: Arc<Mutex<Option<FaultDelivery>>> = Arc::new(Mutex::new(None));
        let to = deliver.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                let mut addrs = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    addrs.clear();
                    let n = uffd
                        .read_faults(WAIT, &mut addrs)
                        .map_err(|e| format!("reading userfaultfd events: {e}"))?;
                    if n == 0 {
                        continue;
                    }
                    let at = clock.now();
                    let mut pages: Vec<_> = addrs
                        .iter()
                        .filter_map(|a| memory.page_at_host(*a))
                        .collect();
                    pages.sort_unstable();
                    pages.dedup();
                    let faults = Faults { pages, at };
                    if let Ok(mut d) = to.lock() {
                        if let Some(deliver) = d.as_mut() {
                            deliver(faults);
                            continue;
                        }
                    }
                    if tx.send(faults).is_err() {
                        break;
                    }
                }
                Ok(())
            })
            .map_err(KvmError::Thread)?;
        Ok((
            FaultHandler {
                stop,
                thread: Some(thread),
                deliver,
            },
            rx,
        ))
    }

    /// Stops the thread and reports whether it failed.
    pub fn stop(mut self) -> Result<(), KvmError> {
        self.halt()
    }

    fn halt(&mut self) -> Result<(), KvmError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(why))) => Err(KvmError::Config(why)),
            Some(Err(_)) => Err(KvmError::Config("the fault handler panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// A KVM destination's post-copy faults, for
/// [`migrate_core::driver::run_destination`]: the [`FaultHandler`] of a
/// memory on which [`KvmMemory::enable_postcopy`] was called, and what
/// the end of the migration does to it.
///
/// When every page has arrived the memory leaves userfaultfd and the
/// handler stops. If the source is lost after the guest resumed here in
/// post-copy, the vCPUs are told to stop, and any vCPU waiting for a page
/// that never came stays parked in the kernel: the memory stays
/// registered, so no missing page ever reads as zeros.
/// [`KvmMemory::missing_pages`] says how many are missing.
///
/// The driver's thread both restores the device state and places pages,
/// so the control's restore must not write guest memory in post-copy
/// (KVM's `KVM_SET_*` ioctls do not; a device model that did would wait
/// on a fault only that thread can serve).
pub struct KvmFaults {
    handler: Option<FaultHandler>,
    faults: Receiver<Faults>,
    memory: Arc<KvmMemory>,
    vcpus: Arc<dyn crate::Vcpus>,
}

impl std::fmt::Debug for KvmFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmFaults")
            .field("serving", &self.handler.is_some())
            .finish()
    }
}

impl KvmFaults {
    /// Starts the fault handler of `memory` if post-copy is enabled on it
    /// (otherwise there is nothing to serve, and this source of faults
    /// stays quiet). Fault times are taken on `clock`, the destination
    /// engine's; `control` is the destination guest's, stopped if the
    /// source is lost in post-copy.
    pub fn start(
        memory: &Arc<KvmMemory>,
        control: &KvmControl,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, KvmError> {
        let (handler, faults) = if memory.userfault().is_some() {
            let (h, rx) = FaultHandler::start(memory.clone(), clock)?;
            (Some(h), rx)
        } else {
            (None, mpsc::channel().1)
        };
        Ok(KvmFaults {
            handler,
            faults,
            memory: memory.clone(),
            vcpus: control.vcpus().clone(),
        })
    }
}

fn kvm_backend(op: &'static str) -> impl FnOnce(KvmError) -> MigrationError {
    move |e: KvmError| MigrationError::Backend {
        op,
        source: BackendError::from(e),
    }
}

impl FaultSource for KvmFaults {
    fn faults(&self) -> &Receiver<Faults> {
        &self.faults
    }

    fn faults_mut(&mut self) -> Option<&mut Receiver<Faults>> {
        Some(&mut self.faults)
    }

    /// The handler thread sends each request itself, the moment it reads
    /// the fault.
    fn deliver_to(&mut self, deliver: Option<FaultDelivery>) -> bool {
        let Some(h) = &self.handler else {
            return false;
        };
        match h.deliver.lock() {
            Ok(mut d) => {
                *d = deliver;
                true
            }
            Err(_) => false,
        }
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        let Some(handler) = self.handler.take() else {
            return Ok(());
        };
        self.memory
            .finish_postcopy()
            .map_err(kvm_backend("leave userfaultfd"))?;
        handler.stop().map_err(kvm_backend("the fault handler"))
    }

    fn abandon(&mut self) {
        // Kicked: a vCPU parked on an absent page leaves the guest where
        // the kernel lets a signal end the wait; none enters it again
        // either way.
        if let Err(e) = self.vcpus.pause(Duration::from_millis(100)) {
            tracing::warn!(error = %e, "a vCPU stays parked on a missing page");
        }
        self.handler = None;
    }
}

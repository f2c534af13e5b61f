//! The post-copy destination's fault handler.
//!
//! ```text
//!  vCPU thread ── touches an absent page ──▶ kernel parks it, posts an event
//!  FaultHandler thread ── reads events ──▶ Faults{pages, at} ──▶ channel
//!  engine thread (run_destination_serving) ── request_pages_at ──▶ source
//!  source ── page ──▶ engine thread ── UFFDIO_COPY ──▶ page mapped, vCPU woken
//! ```
//!
//! The handler only reports faults: the engine thread places every page,
//! pushed or asked for, through [`KvmPages`](crate::KvmPages), so a page
//! is placed once and the fault latency is measured from the event to the
//! placement that wakes the vCPU.

use crate::memory::KvmMemory;
use crate::{KvmControl, KvmError};
use migrate_core::driver::{run_destination, run_destination_serving, Faults};
use migrate_core::{
    BackendError, Clock, DestinationEngine, DestinationReport, GuestControl, MigrationError,
    PageSink, PageSource, Transport,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the handler waits for events before it looks at its stop flag.
const WAIT: Duration = Duration::from_millis(20);

/// A thread that reads the userfaultfd of a post-copy destination and
/// reports the faulting guest pages. It stops when dropped.
#[derive(Debug)]
pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl FaultHandler {
    /// Starts the handler for `memory`, on which
    /// [`KvmMemory::enable_postcopy`] was called. Fault times are taken on
    /// `clock`, which must be the destination engine's. Hand the receiver
    /// to [`migrate_core::driver::run_destination_serving`].
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
                    if tx.send(Faults { pages, at }).is_err() {
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

/// Runs a KVM destination to the end over `transport`.
///
/// If [`KvmMemory::enable_postcopy`] was called on `memory`, a
/// [`FaultHandler`] serves the guest's faults while it runs in post-copy,
/// and once every page is here the memory leaves userfaultfd. Otherwise
/// this is [`migrate_core::driver::run_destination`].
///
/// If the source is lost after the guest resumed here in post-copy, the
/// result is [`MigrationError::Incomplete`]; the vCPUs are told to stop,
/// and any vCPU waiting for a page that never came stays parked in the
/// kernel: the memory stays registered, so no missing page ever reads as
/// zeros. [`KvmMemory::missing_pages`] says how many are missing.
///
/// The calling thread both restores the device state and places pages, so
/// `control`'s restore must not write guest memory in post-copy (KVM's
/// `KVM_SET_*` ioctls do not; a device model that did would wait on a
/// fault only this thread can serve).
pub fn run_kvm_destination<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    memory: &Arc<KvmMemory>,
    control: &KvmControl,
    clock: Arc<dyn Clock>,
    peer_timeout: Duration,
) -> Result<DestinationReport, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    if memory.userfault().is_none() {
        return run_destination(engine, transport, peer_timeout);
    }
    let backend = |op: &'static str| {
        move |e: KvmError| MigrationError::Backend {
            op,
            source: BackendError::from(e),
        }
    };
    let (handler, faults) =
        FaultHandler::start(memory.clone(), clock).map_err(backend("start the fault handler"))?;
    match run_destination_serving(engine, transport, &faults, peer_timeout) {
        Ok(report) => {
            memory
                .finish_postcopy()
                .map_err(backend("leave userfaultfd"))?;
            handler.stop().map_err(backend("the fault handler"))?;
            Ok(report)
        }
        Err(e) => {
            if engine.resumed() {
                // Kicked: a vCPU parked on an absent page leaves the guest
                // where the kernel lets a signal end the wait; none enters
                // it again either way.
                if let Err(e) = control.vcpus().pause(Duration::from_millis(100)) {
                    tracing::warn!(error = %e, "a vCPU stays parked on a missing page");
                }
            }
            drop(handler);
            Err(e)
        }
    }
}

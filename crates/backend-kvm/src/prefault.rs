//! Populating a destination's memory ahead of the pages that will arrive.
//!
//! A page of fresh anonymous memory costs a page fault and a clear the
//! first time it is written (a 2 MiB clear, and possibly a compaction,
//! where it is backed by a transparent huge page). On a destination that
//! cost lands on the thread that places received pages, inside the round.
//! The source knows which of its pages are populated (`/proc/self/pagemap`)
//! and says so before its first round; a [`Prefaulter`] then populates
//! exactly those pages on a thread of its own with
//! `madvise(MADV_POPULATE_WRITE)` (Linux 5.14), while the pages stream in.
//!
//! Populating does not change what memory holds: a page already written
//! keeps its data, a fresh one reads as zeros, as it did before. So the
//! worker and the thread placing pages need no ordering between them; the
//! worker only has to run ahead for the placing thread to find its pages
//! ready. Pages the source never populated are not asked for, so the
//! destination stays as sparse as the source.
//!
//! A kernel without `MADV_POPULATE_WRITE` refuses the advice (`EINVAL`):
//! the worker records why ([`PrefaultUnavailable::Kernel`]) and stops,
//! and pages are populated where they are written, as without it.

use crate::sys::{self, Populate, TrackedMemory};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The worker's step: 2 MiB, one huge page, so that a stop is seen soon.
const STEP: u64 = 2 << 20;

/// Why a destination does not prefault.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrefaultUnavailable {
    /// Turned off ([`KvmMemory::set_prefault`](crate::KvmMemory::set_prefault)).
    Off,
    /// The memory is a post-copy destination: there a missing page is
    /// placed through userfaultfd, and touching it would ask the source
    /// for it.
    Postcopy,
    /// The kernel refused `MADV_POPULATE_WRITE` (before Linux 5.14 it does
    /// not know it); the error it gave.
    Kernel(String),
}

impl std::fmt::Display for PrefaultUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefaultUnavailable::Off => f.write_str("turned off"),
            PrefaultUnavailable::Postcopy => f.write_str("post-copy destination"),
            PrefaultUnavailable::Kernel(e) => write!(f, "madvise(MADV_POPULATE_WRITE): {e}"),
        }
    }
}

/// What a destination's prefault did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefaultReport {
    /// Pages (4 KiB) the source said will arrive.
    pub requested_pages: u64,
    /// Of those, pages populated here ahead of their data.
    pub populated_pages: u64,
    /// Time the worker spent populating.
    pub busy: Duration,
    /// Whether a request is still being worked on.
    pub busy_now: bool,
    /// Why pages were not (or stopped being) prefaulted, if so.
    pub unavailable: Option<PrefaultUnavailable>,
}

/// Shared between the owner and the worker.
#[derive(Debug, Default)]
struct Shared {
    report: Mutex<State>,
    idle: Condvar,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    report: PrefaultReport,
    /// Requests handed over and not yet done.
    queued: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request: host ranges `(address, bytes)`, in the order to populate.
type Request = Vec<(u64, u64)>;

/// Populates announced pages of one memory on a thread of its own.
#[derive(Debug)]
pub(crate) struct Prefaulter {
    memory: TrackedMemory,
    advice: Populate,
    shared: Arc<Shared>,
    worker: Mutex<Option<(Sender<Request>, JoinHandle<()>)>>,
}

impl Prefaulter {
    /// A prefaulter for `memory` (a clone, sharing its mapping, is kept by
    /// the worker while it runs); no thread starts before the first
    /// request.
    pub(crate) fn new(memory: TrackedMemory) -> Self {
        Self::with_advice(memory, Populate::Write)
    }

    /// As `new`, with another advice in place of `MADV_POPULATE_WRITE`
    /// (tests: an advice the kernel refuses stands for an old kernel).
    pub(crate) fn with_advice(memory: TrackedMemory, advice: Populate) -> Self {
        Prefaulter {
            memory,
            advice,
            shared: Arc::default(),
            worker: Mutex::new(None),
        }
    }

    /// Marks the prefault unavailable for `why`: later requests are
    /// counted and not worked on.
    pub(crate) fn disable(&self, why: PrefaultUnavailable) {
        self.shared.lock().report.unavailable = Some(why);
    }

    /// Clears an `Off` set by [`Prefaulter::disable`].
    pub(crate) fn enable(&self) {
        let mut s = self.shared.lock();
        if s.report.unavailable == Some(PrefaultUnavailable::Off) {
            s.report.unavailable = None;
        }
    }

    /// Queues host ranges `(address, bytes)` of the memory (page-aligned)
    /// to populate; returns at once. `pages` is their size in 4 KiB pages.
    pub(crate) fn request(&self, ranges: Request) {
        let pages: u64 = ranges.iter().map(|r| r.1 / 4096).sum();
        {
            let mut s = self.shared.lock();
            s.report.requested_pages += pages;
            if s.report.unavailable.is_some() || ranges.is_empty() {
                return;
            }
            s.queued += 1;
            s.report.busy_now = true;
        }
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if worker.is_none() {
            let (tx, rx) = mpsc::channel();
            let (memory, shared, advice) = (self.memory.clone(), self.shared.clone(), self.advice);
            let spawned = std::thread::Builder::new()
                .name("prefault".into())
                .spawn(move || work(&memory, &shared, advice, rx));
            match spawned {
                Ok(h) => *worker = Some((tx, h)),
                Err(e) => {
                    let mut s = self.shared.lock();
                    s.queued -= 1;
                    s.report.busy_now = false;
                    s.report.unavailable =
                        Some(PrefaultUnavailable::Kernel(format!("start a thread: {e}")));
                    return;
                }
            }
        }
        if let Some((tx, _)) = worker.as_ref() {
            if let Err(mpsc::SendError(_)) = tx.send(ranges) {
                // The worker ended (it stops on an error it recorded).
                let mut s = self.shared.lock();
                s.queued -= 1;
                s.report.busy_now = s.queued > 0;
            }
        }
    }

    /// What was done so far.
    pub(crate) fn report(&self) -> PrefaultReport {
        self.shared.lock().report.clone()
    }

    /// Waits up to `limit` for every request to be done; whether it was.
    pub(crate) fn wait_idle(&self, limit: Duration) -> bool {
        let s = self.shared.lock();
        let (s, _) = self
            .shared
            .idle
            .wait_timeout_while(s, limit, |s| s.queued > 0)
            .unwrap_or_else(|e| e.into_inner());
        s.queued == 0
    }
}

impl Drop for Prefaulter {
    /// Stops the worker at its next step and joins it.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let worker = self.worker.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((tx, h)) = worker.take() {
            drop(tx);
            if h.join().is_err() {
                tracing::warn!("the prefault thread panicked");
            }
        }
    }
}

/// The worker: populates each request's ranges a step at a time, until
/// the channel closes, a stop is asked for, or the kernel refuses.
fn work(memory: &TrackedMemory, shared: &Shared, advice: Populate, rx: Receiver<Request>) {
    while let Ok(ranges) = rx.recv() {
        let started = Instant::now();
        let mut refused = None;
        let mut done = 0;
        'ranges: for (addr, len) in ranges {
            let end = addr + len;
            let mut at = addr;
            while at < end {
                if shared.stop.load(Ordering::Relaxed) || refused.is_some() {
                    break 'ranges;
                }
                // Steps end on 2 MiB boundaries, so a huge page is
                // populated by one step.
                let next = ((at / STEP + 1) * STEP).min(end);
                match sys::populate(memory, at, next - at, advice) {
                    Ok(()) => done += (next - at) / 4096,
                    Err(e) => refused = Some(e),
                }
                at = next;
            }
        }
        let mut s = shared.lock();
        s.report.populated_pages += done;
        s.report.busy += started.elapsed();
        if let Some(e) = refused {
            tracing::warn!(error = %e, "prefault stopped; pages are populated as they are written");
            s.report.unavailable = Some(PrefaultUnavailable::Kernel(e.to_string()));
        }
        s.queued -= 1;
        s.report.busy_now = s.queued > 0;
        let stop = s.report.unavailable.is_some() || shared.stop.load(Ordering::Relaxed);
        drop(s);
        shared.idle.notify_all();
        if stop {
            break;
        }
    }
    // Requests still queued are dropped undone.
    let mut s = shared.lock();
    let left = rx.try_iter().count();
    s.queued -= left.min(s.queued);
    s.report.busy_now = false;
    drop(s);
    shared.idle.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::Pagemap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    const PAGE: u64 = 4096;

    fn unpopulated(mem: &TrackedMemory) -> Vec<bool> {
        let r = mem.iter().next().unwrap();
        let base = r.as_ptr() as u64;
        let hosts: Vec<u64> = (0..r.len() / PAGE).map(|i| base + i * PAGE).collect();
        let mut out = vec![false; hosts.len()];
        Pagemap::open()
            .unwrap()
            .unpopulated(&hosts, &mut out)
            .unwrap();
        out
    }

    /// Exactly the requested pages are populated, data already written
    /// stays, and the rest of memory stays unpopulated.
    #[test]
    fn populates_exactly_the_requested_pages_and_keeps_their_data() {
        // Not advised for huge pages: populated 4 KiB at a time.
        let mem: TrackedMemory =
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1024 * PAGE as usize)])
                .unwrap();
        mem.write_obj(0xabu8, GuestAddress(3 * PAGE + 5)).unwrap();
        let base = mem.iter().next().unwrap().as_ptr() as u64;
        let p = Prefaulter::new(mem.clone());
        // Ranges out of order, one across a 2 MiB boundary, one holding
        // the written page.
        p.request(vec![
            (base + 600 * PAGE, 20 * PAGE),
            (base + 2 * PAGE, 3 * PAGE),
        ]);
        p.request(vec![(base + 100 * PAGE, PAGE)]);
        assert!(p.wait_idle(Duration::from_secs(60)));
        let report = p.report();
        assert_eq!(report.unavailable, None, "{report:?}");
        assert_eq!((report.requested_pages, report.populated_pages), (24, 24));
        let expect: Vec<bool> = (0..1024u64)
            .map(|i| !((600..620).contains(&i) || (2..5).contains(&i) || i == 100))
            .collect();
        assert_eq!(unpopulated(&mem), expect);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(3 * PAGE + 5)).unwrap(),
            0xab
        );
        let mut page = [1u8; 4096];
        mem.read_slice(&mut page, GuestAddress(610 * PAGE)).unwrap();
        assert!(page.iter().all(|b| *b == 0));
    }

    /// A kernel that refuses the advice: the refusal is recorded, later
    /// requests are only counted, nothing is populated, and memory is as
    /// it was.
    #[test]
    fn a_refused_advice_leaves_memory_as_it_was() {
        let mem: TrackedMemory =
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE as usize)])
                .unwrap();
        mem.write_obj(7u8, GuestAddress(PAGE)).unwrap();
        let base = mem.iter().next().unwrap().as_ptr() as u64;
        // An advice no kernel knows: EINVAL, as an old kernel gives for
        // MADV_POPULATE_WRITE.
        let p = Prefaulter::with_advice(mem.clone(), Populate::Unknown);
        p.request(vec![(base, 16 * PAGE)]);
        assert!(p.wait_idle(Duration::from_secs(60)));
        let report = p.report();
        assert!(
            matches!(report.unavailable, Some(PrefaultUnavailable::Kernel(_))),
            "{report:?}"
        );
        assert_eq!(report.populated_pages, 0);
        p.request(vec![(base + 32 * PAGE, 4 * PAGE)]);
        assert!(p.wait_idle(Duration::from_secs(60)));
        assert_eq!(p.report().requested_pages, 20);
        let expect: Vec<bool> = (0..64).map(|i| i != 1).collect();
        assert_eq!(unpopulated(&mem), expect);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE)).unwrap(), 7);
    }

    /// Turned off: requests are counted and nothing is populated.
    #[test]
    fn turned_off_it_populates_nothing() {
        let mem: TrackedMemory =
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE as usize)])
                .unwrap();
        let base = mem.iter().next().unwrap().as_ptr() as u64;
        let p = Prefaulter::new(mem.clone());
        p.disable(PrefaultUnavailable::Off);
        p.request(vec![(base, 16 * PAGE)]);
        assert!(p.wait_idle(Duration::from_secs(60)));
        assert_eq!(p.report().requested_pages, 16);
        assert_eq!(p.report().populated_pages, 0);
        assert!(unpopulated(&mem).iter().all(|u| *u));
        p.enable();
        p.request(vec![(base, 2 * PAGE)]);
        assert!(p.wait_idle(Duration::from_secs(60)));
        assert_eq!(p.report().populated_pages, 2);
    }
}

//! The simulated guest: memory, a workload, dirty tracking and control.
//!
//! A [`SimGuest`] is shared state behind three handles, one per backend
//! trait: [`SimTracker`] (a [`DirtyTracker`]), [`SimPages`] (a
//! [`PageSource`] and [`PageSink`]) and [`SimControl`] (a
//! [`GuestControl`]). Every operation first lets the workload catch up
//! with the clock, so the guest writes memory as (virtual) time passes,
//! and only while it is running.

use crate::memory::{MemoryMode, SimMemory};
use crate::workload::{Access, WorkloadError, WorkloadGen, WorkloadSpec};
use migrate_core::digest::{digest_memory, MemoryDigest};
use migrate_core::DirtyBitmap;
use migrate_core::{
    BackendError, BackendErrorKind, Clock, DeviceState, DirtyTracker, GuestControl, PagePlacer,
    PageSink, PageSource,
};
use migrate_core::{MemoryLayout, PageNum};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Name of the simulator's device-state format.
pub const STATE_FORMAT: &str = "sim";
/// Version of the simulator's device-state format.
pub const STATE_VERSION: u32 = 1;
/// Most workload accesses a restore replays (a guest writing a million
/// pages a second for over an hour).
const MAX_REPLAY: u64 = 1 << 32;

struct Inner {
    memory: SimMemory,
    workload: WorkloadGen,
    clock: Arc<dyn Clock>,
    /// Host (clock) time the guest state was last brought up to.
    synced_at: Duration,
    /// Guest running time so far (not counting pauses and stalls).
    guest_time: Duration,
    paused: bool,
    tracking: bool,
    dirty: DirtyBitmap,
    paused_at: Option<Duration>,
    resumed_at: Option<Duration>,
    restored: bool,
    /// Post-copy: pages this guest does not have yet (`None`: all present).
    absent: Option<DirtyBitmap>,
    absent_count: u64,
    /// The access the vCPU is blocked on, its page, and when it faulted.
    stalled: Option<(Access, PageNum, Duration)>,
    stall_total: Duration,
    fault_count: u64,
    new_faults: Vec<(PageNum, Duration)>,
    fault_log: Vec<FaultRecord>,
    /// Pages the simulated hypervisor maps as the guest resumes.
    resume_pages: Vec<PageNum>,
    /// Post-copy: no access before this index can fault (it touches a
    /// page that was present when the accesses were looked at, and pages
    /// do not go missing while the guest runs).
    fault_horizon: u64,
    /// The workload's time of access `fault_horizon` (kept with it: the
    /// event loop asks for it after every event).
    horizon_time: Duration,
    /// Auto-converge: percent of host time the vCPU is held (0..=99).
    throttle: u8,
}

/// One post-copy fault as the simulated guest lived it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Clock time of the fault.
    pub at: Duration,
    /// The page the vCPU touched.
    pub page: PageNum,
    /// How long the vCPU waited for it.
    pub stall: Duration,
}

/// Accesses a post-copy guest looks ahead for one that may fault.
pub(crate) const LOOKAHEAD: u64 = 4096;

impl Inner {
    /// The index of the next access, within [`LOOKAHEAD`], that touches a
    /// page missing now (or the last one looked at).
    fn look_ahead(&self) -> u64 {
        let mut gen = self.workload.clone();
        let last = gen.next_index() + LOOKAHEAD - 1;
        let Some(absent) = self.absent.as_ref() else {
            return gen.next_index();
        };
        while gen.next_index() < last {
            let acc = gen.next_access();
            let page = self.memory.layout().page_at(acc.page).unwrap_or(0);
            if absent.get(page) {
                return acc.index;
            }
        }
        last
    }

    fn catch_up(&mut self) {
        let now = self.clock.now();
        if now <= self.synced_at {
            return;
        }
        let start = self.synced_at;
        let elapsed = now - start;
        self.synced_at = now;
        if self.paused || self.stalled.is_some() {
            return;
        }
        // A throttled vCPU runs (100 - throttle) % of the time: exactly
        // that share of host time becomes guest time.
        let run = self.run_share();
        let elapsed = elapsed * run / 100;
        let g0 = self.guest_time;
        let target = g0 + elapsed;
        while self.workload.writes() && self.workload.next_time() <= target {
            let t = self.workload.next_time();
            let acc = self.workload.next_access();
            let page = self.memory.layout().page_at(acc.page).unwrap_or(0);
            if self.absent.as_ref().is_some_and(|a| a.get(page)) {
                // The vCPU touches a page that is not here: it stops until
                // the page arrives.
                let fault_at = start + (t - g0) * 100 / run;
                self.guest_time = t;
                self.stalled = Some((acc, page, fault_at));
                self.fault_count += 1;
                self.new_faults.push((page, fault_at));
                return;
            }
            self.apply(acc, page);
        }
        self.guest_time = target;
    }

    /// The percentage of host time the vCPU runs.
    fn run_share(&self) -> u32 {
        100 - u32::from(self.throttle.min(99))
    }

    fn apply(&mut self, acc: Access, page: PageNum) {
        if acc.write {
            self.memory.store(acc.page as usize, acc.slot, acc.value);
            if self.tracking {
                self.dirty.set(page);
            }
        }
    }

    /// The migration wrote `page`: it is dirty (if tracked), present, and
    /// a vCPU waiting for it runs again.
    fn placed(&mut self, page: PageNum) {
        if self.tracking {
            self.dirty.set(page);
        }
        self.arrived(page);
    }

    /// A page arrived: mark it present and wake a vCPU waiting for it.
    fn arrived(&mut self, page: PageNum) {
        if let Some(a) = self.absent.as_mut() {
            if a.get(page) {
                a.clear(page);
                self.absent_count -= 1;
            }
        }
        if let Some((acc, p, fault_at)) = self.stalled {
            if p == page {
                let now = self.clock.now();
                self.stalled = None;
                self.stall_total += now.saturating_sub(fault_at);
                self.fault_log.push(FaultRecord {
                    at: fault_at,
                    page,
                    stall: now.saturating_sub(fault_at),
                });
                self.synced_at = now;
                self.apply(acc, page);
            }
        }
    }
}

/// A simulated guest. Clones share the guest.
#[derive(Clone)]
pub struct SimGuest {
    inner: Arc<Mutex<Inner>>,
    layout: MemoryLayout,
}

impl std::fmt::Debug for SimGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGuest")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl SimGuest {
    /// A running source guest whose memory starts with content (pages
    /// chosen by the workload's zero fraction start as zeros) and which
    /// writes as `workload` says while running, on `clock`.
    pub fn source(
        layout: MemoryLayout,
        mode: MemoryMode,
        workload: WorkloadSpec,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, WorkloadError> {
        let gen = WorkloadGen::new(workload, layout.total_pages())?;
        let mut memory = SimMemory::zeroed(layout.clone(), mode);
        for i in 0..layout.total_pages() {
            if !gen.starts_zero(i) {
                memory.init_page(i as usize, gen.spec().seed);
            }
        }
        Ok(Self::build(layout, memory, gen, clock, false))
    }

    /// A paused, empty destination guest that will run `workload` from
    /// where the source left it once restored and resumed.
    pub fn destination(
        layout: MemoryLayout,
        mode: MemoryMode,
        workload: WorkloadSpec,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, WorkloadError> {
        let gen = WorkloadGen::new(workload, layout.total_pages())?;
        let memory = SimMemory::zeroed(layout.clone(), mode);
        Ok(Self::build(layout, memory, gen, clock, true))
    }

    fn build(
        layout: MemoryLayout,
        memory: SimMemory,
        workload: WorkloadGen,
        clock: Arc<dyn Clock>,
        paused: bool,
    ) -> Self {
        let now = clock.now();
        SimGuest {
            inner: Arc::new(Mutex::new(Inner {
                dirty: DirtyBitmap::new(layout.page_end()),
                memory,
                workload,
                clock,
                synced_at: now,
                guest_time: Duration::ZERO,
                paused,
                tracking: false,
                paused_at: None,
                resumed_at: None,
                restored: false,
                absent: None,
                absent_count: 0,
                stalled: None,
                stall_total: Duration::ZERO,
                fault_count: 0,
                new_faults: Vec::new(),
                fault_log: Vec::new(),
                resume_pages: Vec::new(),
                fault_horizon: 0,
                horizon_time: Duration::ZERO,
                throttle: 0,
            })),
            layout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn synced(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.lock();
        g.catch_up();
        g
    }

    /// The vCPU throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.lock().throttle
    }

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Names pages that the simulated hypervisor maps as this guest
    /// resumes, the way Xen maps a guest's `vcpu_info` when the guest
    /// re-registers it: a source reports them through
    /// [`GuestControl::resume_pages`], and a destination refuses to resume
    /// while one of them is absent (Xen refuses to map a paged-out frame
    /// rather than wait for it).
    pub fn set_resume_pages(&self, pages: Vec<PageNum>) {
        self.lock().resume_pages = pages;
    }

    /// The dirty-tracking handle.
    pub fn tracker(&self) -> SimTracker {
        SimTracker(self.clone())
    }

    /// The memory handle.
    pub fn pages(&self) -> SimPages {
        SimPages(self.clone())
    }

    /// The control handle.
    pub fn control(&self) -> SimControl {
        SimControl(self.clone())
    }

    /// Memory accesses made so far: the guest's progress counter.
    pub fn progress_counter(&self) -> u64 {
        let g = self.synced();
        g.workload.next_index() - u64::from(g.stalled.is_some())
    }

    /// Post-copy: when, on the clock, the guest's next memory access is
    /// due, if it could fault (the guest runs, is not stalled and still
    /// misses pages). The simulator schedules an event then.
    ///
    /// That is the first access, looking ahead up to 4096
    /// accesses, to a page missing now: accesses to pages present now
    /// cannot fault, since pages only arrive while the guest runs. (When
    /// none of those accesses touches a missing page, the check is due at
    /// the last of them, to look further.)
    pub fn next_fault_check(&self) -> Option<Duration> {
        let mut g = self.lock();
        if g.paused || g.stalled.is_some() || g.absent_count == 0 || !g.workload.writes() {
            return None;
        }
        let from = g.workload.next_index();
        if g.fault_horizon < from {
            g.fault_horizon = g.look_ahead();
            g.horizon_time = g.workload.time_of(g.fault_horizon);
        }
        let next = g.horizon_time;
        Some(g.synced_at + next.saturating_sub(g.guest_time) * 100 / g.run_share())
    }

    /// Post-copy: brings the guest up to the clock and returns the pages it
    /// faulted on since the last call, with the clock time of each fault.
    pub fn take_faults(&self) -> Vec<(PageNum, Duration)> {
        std::mem::take(&mut self.synced().new_faults)
    }

    /// Post-copy: total time vCPUs spent waiting for pages, and the number
    /// of faults.
    pub fn stall_stats(&self) -> (Duration, u64) {
        let g = self.lock();
        (g.stall_total, g.fault_count)
    }

    /// Post-copy: every fault served so far, in order.
    pub fn fault_log(&self) -> Vec<FaultRecord> {
        self.lock().fault_log.clone()
    }

    /// Post-copy: pages still missing.
    pub fn absent_pages(&self) -> u64 {
        self.lock().absent_count
    }

    /// Post-copy: whether `page` is missing (discarded and not arrived
    /// since), so that the guest would fault on it rather than see it.
    pub fn is_absent(&self, page: PageNum) -> bool {
        self.lock().absent.as_ref().is_some_and(|a| a.get(page))
    }

    /// Makes the accesses up to (not including) `index` without regard to
    /// time, on a paused guest: a source replays what its destination did
    /// so the two memories can be compared.
    pub fn replay_to(&self, index: u64) {
        let mut g = self.lock();
        while g.workload.writes() && g.workload.next_index() < index {
            let acc = g.workload.next_access();
            let page = g.memory.layout().page_at(acc.page).unwrap_or(0);
            g.apply(acc, page);
        }
    }

    /// Guest running time so far.
    pub fn guest_time(&self) -> Duration {
        self.synced().guest_time
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Clock time of the last pause.
    pub fn paused_at(&self) -> Option<Duration> {
        self.lock().paused_at
    }

    /// Clock time of the last resume.
    pub fn resumed_at(&self) -> Option<Duration> {
        self.lock().resumed_at
    }

    /// Digest of all memory, as the completion record carries it.
    pub fn digest(&self) -> MemoryDigest {
        let mut pages = self.pages();
        let layout = self.layout.clone();
        // Reading simulated memory cannot fail for pages of its own layout.
        digest_memory(&mut pages, &layout).unwrap_or_default()
    }

    /// Whether this guest's memory equals `other`'s, byte for byte.
    pub fn same_memory(&self, other: &SimGuest) -> bool {
        let a = self.lock();
        let b = other.lock();
        a.memory.same_contents(&b.memory)
    }

    /// Pages whose contents differ from `other`'s.
    pub fn differing_pages(&self, other: &SimGuest) -> Vec<PageNum> {
        let a = self.lock();
        let b = other.lock();
        a.memory.differing_pages(&b.memory)
    }
}

/// [`DirtyTracker`] of a [`SimGuest`]: exact, every write is seen.
#[derive(Clone, Debug)]
pub struct SimTracker(SimGuest);

impl DirtyTracker for SimTracker {
    fn start(&mut self) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        g.tracking = true;
        g.dirty.clear_all();
        Ok(())
    }

    fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        if !g.tracking {
            return Err(BackendError::new(
                BackendErrorKind::InvalidState,
                "dirty tracking is not started",
            ));
        }
        if into.len() == g.dirty.len() {
            // Hand the log over rather than copy it: one pass over a
            // 1 TiB guest's 32 MiB bitmap instead of two.
            std::mem::swap(into, &mut g.dirty);
        } else {
            into.copy_from(&g.dirty);
        }
        g.dirty.clear_all();
        Ok(())
    }

    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        let g = self.0.synced();
        if !g.tracking {
            return Err(BackendError::new(
                BackendErrorKind::InvalidState,
                "dirty tracking is not started",
            ));
        }
        into.copy_from(&g.dirty);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        g.tracking = false;
        g.dirty.clear_all();
        Ok(())
    }
}

/// Memory of a [`SimGuest`], as a [`PageSource`] and a [`PageSink`].
#[derive(Clone, Debug)]
pub struct SimPages(SimGuest);

impl PageSource for SimPages {
    fn layout(&self) -> &MemoryLayout {
        &self.0.layout
    }

    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        let g = self.0.synced();
        let ps = self.0.layout.page_size().get();
        if out.len() != pages.len() * ps {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "output buffer is not one page per page number",
            ));
        }
        for (p, chunk) in pages.iter().zip(out.chunks_exact_mut(ps)) {
            g.memory.read_page(*p, chunk)?;
        }
        Ok(())
    }

    /// Compact and model memory: each page's version.
    fn read_tokens(&mut self, pages: &[PageNum], out: &mut [u64]) -> Result<(), BackendError> {
        self.check_tokens(pages.len(), out.len())?;
        self.0.synced().memory.read_tokens(pages, out)
    }

    /// The simulated memory is this process's: a read is a copy (or a
    /// page rendered from its model).
    fn small_reads_are_cheap(&self) -> bool {
        true
    }

    /// The same memory, for the preempt connection's thread.
    fn share(&self) -> Option<Box<dyn PageSource + Send>> {
        Some(Box::new(self.clone()))
    }
}

impl SimPages {
    fn check_tokens(&self, pages: usize, tokens: usize) -> Result<(), BackendError> {
        if pages != tokens {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "token buffer is not one token per page number",
            ));
        }
        Ok(())
    }
}

impl PageSink for SimPages {
    fn layout(&self) -> &MemoryLayout {
        &self.0.layout
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        g.memory.write_page(page, data)?;
        g.placed(page);
        Ok(())
    }

    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        g.memory.zero_page(page)?;
        g.placed(page);
        Ok(())
    }

    /// Compact and model memory: sets each page's version.
    fn write_tokens(&mut self, pages: &[PageNum], tokens: &[u64]) -> Result<(), BackendError> {
        self.check_tokens(pages.len(), tokens.len())?;
        let mut g = self.0.synced();
        for (p, t) in pages.iter().zip(tokens) {
            g.memory.write_token(*p, *t)?;
            g.placed(*p);
        }
        Ok(())
    }

    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.discard_pages(&[page])
    }

    /// The same memory, for the preempt connection's thread: it places
    /// only the pages the guest does not have.
    fn share_placer(&self) -> Option<Box<dyn PagePlacer>> {
        Some(Box::new(self.clone()))
    }

    /// One lock and one catch-up for the whole run (a post-copy start
    /// discards every page of the guest); the pages before a bad one are
    /// discarded, as page by page.
    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        let end = self.0.layout.page_end();
        let mut added = 0;
        let mut bad = None;
        for &page in pages {
            if !self.0.layout.contains(page) {
                bad = Some(page);
                break;
            }
            let a = g.absent.get_or_insert_with(|| DirtyBitmap::new(end));
            if !a.get(page) {
                a.set(page);
                added += 1;
            }
        }
        g.absent_count += added;
        match bad {
            Some(page) => Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("page {page:#x} is not in the simulated guest's memory"),
            )),
            None => Ok(()),
        }
    }
}

impl PagePlacer for SimPages {
    /// Places `page` only if it is absent (discarded for post-copy and
    /// not placed since), waking a vCPU waiting for it.
    fn place_absent(&mut self, page: PageNum, data: Option<&[u8]>) -> Result<bool, BackendError> {
        let mut g = self.0.synced();
        if !g.absent.as_ref().is_some_and(|a| a.get(page)) {
            return Ok(false);
        }
        match data {
            Some(d) => g.memory.write_page(page, d)?,
            None => g.memory.zero_page(page)?,
        }
        g.placed(page);
        Ok(true)
    }
}

/// [`GuestControl`] of a [`SimGuest`].
///
/// The device state is the guest's progress: the index of its next write
/// and its running time. A destination restored from it continues the
/// workload exactly where the source stopped.
#[derive(Clone, Debug)]
pub struct SimControl(SimGuest);

impl GuestControl for SimControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        if !g.paused {
            g.paused = true;
            g.paused_at = Some(g.clock.now());
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        if let Some(a) = &g.absent {
            if let Some(p) = g.resume_pages.iter().find(|p| a.get(**p)) {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    format!("page {p:#x} must be in place to resume, and it is absent"),
                ));
            }
        }
        if g.paused {
            g.paused = false;
            g.resumed_at = Some(g.clock.now());
        }
        Ok(())
    }

    /// Holds the simulated vCPU for `pct` percent of host time from now
    /// on, exactly: the guest's time advances at `100 - pct` percent of
    /// the clock's. At most 99.
    fn set_throttle(&mut self, pct: u8) -> Result<(), BackendError> {
        if pct > 99 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("throttle of {pct}%: at most 99"),
            ));
        }
        // The time so far ran at the old throttle.
        self.0.synced().throttle = pct;
        Ok(())
    }

    fn resume_pages(&mut self) -> Result<Vec<PageNum>, BackendError> {
        Ok(self.0.lock().resume_pages.clone())
    }

    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        let g = self.0.synced();
        let mut data = Vec::with_capacity(16);
        data.extend_from_slice(&g.workload.next_index().to_le_bytes());
        data.extend_from_slice(&(g.guest_time.as_nanos() as u64).to_le_bytes());
        Ok(DeviceState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            data,
        })
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        if state.format != STATE_FORMAT || state.version != STATE_VERSION {
            return Err(BackendError::new(
                BackendErrorKind::IncompatibleState,
                format!(
                    "device state {} v{} is not {STATE_FORMAT} v{STATE_VERSION}",
                    state.format, state.version
                ),
            ));
        }
        if state.data.len() != 16 {
            return Err(BackendError::new(
                BackendErrorKind::IncompatibleState,
                format!(
                    "sim device state of {} bytes, expected 16",
                    state.data.len()
                ),
            ));
        }
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&state.data[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let (next, guest_ns) = (word(0), word(8));
        let mut g = self.0.lock();
        if g.workload.next_index() > next || g.restored {
            return Err(BackendError::new(
                BackendErrorKind::InvalidState,
                "destination guest already ran or was restored",
            ));
        }
        // A state the source cannot have saved is refused before any
        // replay: its guest ran at most `guest_ns`, so its next access is
        // the first one after that, and replays are bounded.
        let ahead = next - g.workload.next_index();
        let consistent = if g.workload.writes() {
            ahead <= MAX_REPLAY
                && (next == 0
                    || g.workload.time_of(next - 1)
                        <= Duration::from_nanos(guest_ns).saturating_add(Duration::from_secs(1)))
        } else {
            ahead == 0
        };
        if !consistent {
            return Err(BackendError::new(
                BackendErrorKind::IncompatibleState,
                format!(
                    "sim device state names write {next} at guest time {guest_ns} ns: not a state this workload reaches"
                ),
            ));
        }
        // Replay the generator (not memory) to the source's position.
        while g.workload.next_index() < next {
            g.workload.next_access();
        }
        g.guest_time = Duration::from_nanos(guest_ns);
        g.synced_at = g.clock.now();
        g.restored = true;
        Ok(())
    }

    fn guest_cpu_time(&self) -> Option<Duration> {
        Some(self.0.synced().guest_time)
    }
}

//! The simulated guest: memory, a workload, dirty tracking and control.
//!
//! A [`SimGuest`] is shared state behind three handles, one per backend
//! trait: [`SimTracker`] (a [`DirtyTracker`]), [`SimPages`] (a
//! [`PageSource`] and [`PageSink`]) and [`SimControl`] (a
//! [`GuestControl`]). Every operation first lets the workload catch up
//! with the clock, so the guest writes memory as (virtual) time passes,
//! and only while it is running.

use crate::memory::{MemoryMode, SimMemory};
use crate::workload::{WorkloadError, WorkloadGen, WorkloadSpec};
use migrate_core::bitmap::DirtyBitmap;
use migrate_core::digest::{digest_memory, MemoryDigest};
use migrate_core::page::{MemoryLayout, PageNum};
use migrate_core::{
    BackendError, BackendErrorKind, Clock, DeviceState, DirtyTracker, GuestControl, PageSink,
    PageSource,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Name of the simulator's device-state format.
pub const STATE_FORMAT: &str = "sim";
/// Version of the simulator's device-state format.
pub const STATE_VERSION: u32 = 1;

struct Inner {
    memory: SimMemory,
    workload: WorkloadGen,
    clock: Arc<dyn Clock>,
    /// Host (clock) time the guest state was last brought up to.
    synced_at: Duration,
    /// Guest running time so far.
    guest_time: Duration,
    paused: bool,
    tracking: bool,
    dirty: DirtyBitmap,
    paused_at: Option<Duration>,
    resumed_at: Option<Duration>,
    restored: bool,
}

impl Inner {
    fn catch_up(&mut self) {
        let now = self.clock.now();
        let elapsed = now.saturating_sub(self.synced_at);
        self.synced_at = self.synced_at.max(now);
        if self.paused || elapsed.is_zero() {
            return;
        }
        self.guest_time += elapsed;
        while self.workload.writes() && self.workload.next_time() <= self.guest_time {
            self.apply_next_write();
        }
    }

    fn apply_next_write(&mut self) {
        let (_, index, slot, value) = self.workload.next_write();
        self.memory.store(index as usize, slot, value);
        if self.tracking {
            if let Some(page) = self.memory.layout().page_at(index) {
                self.dirty.set(page);
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

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
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

    /// Workload writes applied so far (the guest's progress counter).
    pub fn writes_applied(&self) -> u64 {
        self.synced().workload.next_index()
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
        into.copy_from(&g.dirty);
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
}

impl PageSink for SimPages {
    fn layout(&self) -> &MemoryLayout {
        &self.0.layout
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        g.memory.write_page(page, data)?;
        if g.tracking {
            g.dirty.set(page);
        }
        Ok(())
    }

    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        let mut g = self.0.synced();
        g.memory.zero_page(page)?;
        if g.tracking {
            g.dirty.set(page);
        }
        Ok(())
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
        if g.paused {
            g.paused = false;
            g.resumed_at = Some(g.clock.now());
        }
        Ok(())
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
        // Replay the generator (not memory) to the source's position.
        while g.workload.next_index() < next {
            g.workload.next_write();
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

//! Guest memory registered with KVM, its dirty log, and page access.

use crate::pagemap::{self, Pagemap};
use crate::prefault::{PrefaultReport, PrefaultUnavailable, Prefaulter};
use crate::sys::{DirtyRings, GuestSlots, Placed, Slot, TrackedMemory, Userfault};
use crate::KvmError;
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use migrate_core::DirtyBitmap;
use migrate_core::{
    BackendError, BackendErrorKind, DirtyTracker, PagePlacer, PageSink, PageSource,
};
use migrate_core::{MemoryLayout, PageNum, PageSize, Region};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

/// A VM's guest memory as KVM knows it: the VMM's `GuestMemoryMmap`, each
/// region one KVM slot, either registered here ([`KvmMemory::register`],
/// slot `i` = region `i`) or already registered by the VMM under its own
/// ids ([`KvmMemory::adopt`]). The memory
/// carries vm-memory's `AtomicBitmap`, so writes the VMM makes through it
/// (device emulation, for instance) are tracked too: KVM's dirty log sees
/// only the guest's own writes.
pub struct KvmMemory {
    /// The VM, the memory and its slots (registered here, and removed when
    /// dropped, or adopted from the VMM).
    mapped: GuestSlots,
    layout: MemoryLayout,
    /// Pages reported by KVM but not yet collected (KVM clears its log on
    /// every read, so a peek keeps what it read here).
    pending: Mutex<Pending>,
    /// On a post-copy destination: the userfaultfd and which pages are
    /// present.
    postcopy: Mutex<Option<Postcopy>>,
    /// The dirty rings, if the VM's dirty log is the ring.
    rings: Mutex<Option<DirtyRings>>,
    /// Whether collections include the VMM's own writes (vm-memory's
    /// bitmap).
    vmm_writes: AtomicBool,
    /// This process's page table entries, where they tell zero pages
    /// (every region private and anonymous; see [`pagemap`]).
    pagemap: Option<Mutex<Pagemap>>,
    /// On a destination: populates the pages the source says will
    /// arrive, ahead of their data, on a thread of its own.
    prefault: Prefaulter,
}

/// A destination's memory under userfaultfd.
#[derive(Debug)]
struct Postcopy {
    uffd: Arc<Userfault>,
    /// Pages mapped since post-copy was enabled (placed, or found present).
    present: DirtyBitmap,
}

impl std::fmt::Debug for KvmMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMemory")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl KvmMemory {
    /// Registers every region of `memory` with `vm` as slot `i` (dirty
    /// logging off) and describes it as a layout of 4 KiB pages. The slots
    /// are this struct's: dropping it removes them from the VM before the
    /// memory can be unmapped, so no vCPU still inside the guest can
    /// reach memory that is gone.
    pub fn register(vm: Arc<VmFd>, memory: TrackedMemory) -> Result<Self, KvmError> {
        let ids: Vec<u32> = (0..memory.num_regions() as u32).collect();
        let this = Self::describe(vm, memory, &ids, true)?;
        for s in this.mapped.slots() {
            this.set_slot(s, 0)?;
        }
        Ok(this)
    }

    /// Takes over slots the VMM registered itself: region `i` of `memory`
    /// is KVM slot `slot_ids[i]`, registered with this same host mapping
    /// and no flags. Nothing is registered here; the slots stay the VMM's,
    /// and dropping this struct leaves them as they are. The only change
    /// made to them is dirty logging on and off while a migration runs.
    ///
    /// `memory` is the VMM's own `GuestMemoryMmap` (a clone shares its
    /// mappings), carrying vm-memory's `AtomicBitmap` so that the VMM's
    /// writes are tracked; [`KvmMemory::guest_memory`] hands it back.
    pub fn adopt(vm: Arc<VmFd>, memory: TrackedMemory, slot_ids: &[u32]) -> Result<Self, KvmError> {
        let slots: Vec<(u32, u32)> = slot_ids.iter().map(|id| (*id, 0)).collect();
        Self::adopt_with_flags(vm, memory, &slots)
    }

    /// As [`KvmMemory::adopt`], for slots registered with flags (for
    /// example `KVM_MEM_READONLY`): region `i` is slot `slots[i].0`,
    /// registered with flags `slots[i].1`, which are kept when dirty
    /// logging is turned on and off.
    pub fn adopt_with_flags(
        vm: Arc<VmFd>,
        memory: TrackedMemory,
        slots: &[(u32, u32)],
    ) -> Result<Self, KvmError> {
        let slot_ids: Vec<u32> = slots.iter().map(|s| s.0).collect();
        if slot_ids.len() != memory.num_regions() {
            return Err(KvmError::Config(format!(
                "{} slot ids for {} memory regions",
                slot_ids.len(),
                memory.num_regions()
            )));
        }
        let mut sorted = slot_ids.to_vec();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(KvmError::Config(format!(
                "a slot id appears twice in {slot_ids:?}"
            )));
        }
        let mut this = Self::describe(vm, memory, &slot_ids, false)?;
        for (s, (_, flags)) in this.mapped.slots_mut().iter_mut().zip(slots) {
            s.flags = *flags & !KVM_MEM_LOG_DIRTY_PAGES;
        }
        Ok(this)
    }

    fn describe(
        vm: Arc<VmFd>,
        memory: TrackedMemory,
        ids: &[u32],
        owns_slots: bool,
    ) -> Result<Self, KvmError> {
        let ps = PageSize::DEFAULT;
        let mut regions = Vec::new();
        let mut slots = Vec::new();
        for (&index, r) in ids.iter().zip(memory.iter()) {
            let guest_addr = r.start_addr().raw_value();
            let size = r.len();
            if guest_addr % 4096 != 0 || size % 4096 != 0 {
                return Err(KvmError::Unaligned { guest_addr, size });
            }
            let host_addr = r.as_ptr() as u64;
            slots.push(Slot {
                index,
                flags: 0,
                guest_addr,
                size,
                host_addr,
            });
            regions.push(Region {
                first_page: guest_addr >> 12,
                pages: size >> 12,
            });
        }
        let layout = MemoryLayout::new(ps, regions).map_err(KvmError::Layout)?;
        // Without a readable pagemap every page is simply read.
        let pagemap = pagemap::exact_for(&memory)
            .then(|| Pagemap::open().ok().map(Mutex::new))
            .flatten();
        Ok(KvmMemory {
            pagemap,
            prefault: Prefaulter::new(memory.clone()),
            pending: Mutex::new(Pending {
                bits: DirtyBitmap::new(layout.page_end()),
                list: Vec::new(),
            }),
            postcopy: Mutex::new(None),
            rings: Mutex::new(None),
            vmm_writes: AtomicBool::new(true),
            mapped: GuestSlots::new(vm, memory, slots, owns_slots),
            layout,
        })
    }

    /// Sets the slot's flags: its own, plus `extra` (dirty logging or 0).
    fn set_slot(&self, s: &Slot, extra: u32) -> Result<(), KvmError> {
        self.mapped.set_slot(s, extra)
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The VMM's guest memory.
    pub fn guest_memory(&self) -> &TrackedMemory {
        self.mapped.memory()
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn postcopy_lock(&self) -> MutexGuard<'_, Option<Postcopy>> {
        self.postcopy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes this memory a post-copy destination: every page is dropped
    /// and the memory is registered with a new userfaultfd in missing-page
    /// mode, so that from now on a page is there only once it has been
    /// placed ([`KvmPages`] places pages with `UFFDIO_COPY` and
    /// `UFFDIO_ZEROPAGE`), and a vCPU that touches an absent page waits
    /// in the kernel while a fault handler ([`FaultHandler`]) asks for it.
    ///
    /// Call it on a fresh destination before the first page arrives: it
    /// discards whatever the memory holds. The same destination takes
    /// pre-copy, hybrid and post-copy streams alike.
    ///
    /// [`FaultHandler`]: crate::FaultHandler
    pub fn enable_postcopy(&self) -> Result<(), KvmError> {
        let mut pc = self.postcopy_lock();
        if pc.is_some() {
            return Err(KvmError::Config("post-copy is already enabled".into()));
        }
        let uffd = Userfault::open().map_err(|e| KvmError::Userfault {
            op: "open a userfaultfd",
            source: e,
        })?;
        for s in self.mapped.slots() {
            self.mapped
                .drop_pages(s.host_addr, s.size)
                .map_err(|e| KvmError::Userfault {
                    op: "drop the destination's pages",
                    source: e,
                })?;
            uffd.register(s.host_addr, s.size)
                .map_err(|e| KvmError::Userfault {
                    op: "UFFDIO_REGISTER",
                    source: e,
                })?;
        }
        *pc = Some(Postcopy {
            uffd: Arc::new(uffd),
            present: DirtyBitmap::new(self.layout.page_end()),
        });
        Ok(())
    }

    /// Pages not yet placed on a post-copy destination (0 if post-copy is
    /// not enabled).
    pub fn missing_pages(&self) -> u64 {
        match &*self.postcopy_lock() {
            Some(pc) => self.layout.total_pages() - pc.present.count_ones(),
            None => 0,
        }
    }

    /// Populates, on a thread of its own, the guest pages of `ranges`
    /// (`(first page, pages)`: the pages the source says will arrive with
    /// data), so that placing them later costs no page fault and no clear;
    /// returns at once. Pages outside every range are left as they are
    /// (unpopulated memory stays unpopulated). Nothing is populated on a
    /// post-copy destination, where a missing page must fault, when turned
    /// off ([`KvmMemory::set_prefault`]), or on a kernel without
    /// `MADV_POPULATE_WRITE` (Linux 5.14); [`KvmMemory::prefault_report`]
    /// says which. A page outside guest memory is refused.
    pub fn prefault(&self, ranges: &[(PageNum, u64)]) -> Result<(), KvmError> {
        let mut hosts = Vec::with_capacity(ranges.len());
        for &(first, pages) in ranges {
            let s = self
                .mapped
                .slots()
                .iter()
                .find(|s| {
                    let (start, end) = (s.guest_addr >> 12, (s.guest_addr + s.size) >> 12);
                    first >= start && pages <= end - first.min(end) && pages > 0
                })
                .ok_or_else(|| {
                    KvmError::Config(format!(
                        "pages {first:#x}+{pages} are not in one region of guest memory"
                    ))
                })?;
            hosts.push((s.host_addr + (first << 12) - s.guest_addr, pages << 12));
        }
        if self.postcopy_lock().is_some() {
            self.prefault.disable(PrefaultUnavailable::Postcopy);
        }
        self.prefault.request(hosts);
        Ok(())
    }

    /// Whether [`KvmMemory::prefault`] populates pages (on by default);
    /// off, the pages are populated where they are written, inside the
    /// round.
    pub fn set_prefault(&self, on: bool) {
        if on {
            self.prefault.enable();
        } else {
            self.prefault.disable(PrefaultUnavailable::Off);
        }
    }

    /// What [`KvmMemory::prefault`] did so far.
    pub fn prefault_report(&self) -> PrefaultReport {
        self.prefault.report()
    }

    /// Waits up to `limit` for the prefault to finish what it was asked
    /// to do; whether it did.
    pub fn wait_prefault(&self, limit: std::time::Duration) -> bool {
        self.prefault.wait_idle(limit)
    }

    /// The runs of pages the host populated, as `(first page, pages)` in
    /// ascending order; `None` where that cannot be known (memory that is
    /// not private and anonymous, or a post-copy destination): see
    /// [`PageSource::known_zero`].
    fn populated_ranges(&self) -> Result<Option<Vec<(PageNum, u64)>>, BackendError> {
        let Some(pm) = &self.pagemap else {
            return Ok(None);
        };
        if self.postcopy_lock().is_some() {
            return Ok(None);
        }
        let mut pm = pm.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for s in self.mapped.slots() {
            let first = s.guest_addr >> 12;
            let runs = pm
                .populated_runs(s.host_addr, s.size)
                .map_err(|e| BackendError::io("read /proc/self/pagemap", e))?;
            out.extend(runs.into_iter().map(|(at, n)| (first + at, n)));
        }
        Ok(Some(out))
    }

    /// Ends post-copy once every page is here: unregisters the memory
    /// from userfaultfd, so the guest's accesses never wait again. Refused
    /// while any page is missing: unregistered, a missing page would read
    /// as zeros and the guest would go on with wrong memory.
    pub fn finish_postcopy(&self) -> Result<(), KvmError> {
        let mut pc = self.postcopy_lock();
        let Some(state) = pc.as_ref() else {
            return Ok(());
        };
        let missing = self.layout.total_pages() - state.present.count_ones();
        if missing != 0 {
            return Err(KvmError::Config(format!(
                "{missing} pages are still missing; post-copy cannot end"
            )));
        }
        for s in self.mapped.slots() {
            state
                .uffd
                .unregister(s.host_addr, s.size)
                .map_err(|e| KvmError::Userfault {
                    op: "UFFDIO_UNREGISTER",
                    source: e,
                })?;
        }
        *pc = None;
        Ok(())
    }

    /// The userfaultfd of a post-copy destination.
    pub(crate) fn userfault(&self) -> Option<Arc<Userfault>> {
        self.postcopy_lock().as_ref().map(|p| p.uffd.clone())
    }

    /// The guest page at host address `addr`, if it is guest memory.
    pub(crate) fn page_at_host(&self, addr: u64) -> Option<PageNum> {
        self.mapped
            .slots()
            .iter()
            .find(|s| addr >= s.host_addr && addr - s.host_addr < s.size)
            .map(|s| (s.guest_addr + (addr - s.host_addr)) >> 12)
    }

    /// The host address of guest page `page`.
    fn host_of(&self, page: PageNum) -> Result<u64, BackendError> {
        self.slot_and_host_of(page).map(|(_, host)| host)
    }

    /// The index of the slot that holds `page`, and the page's host
    /// address.
    fn slot_and_host_of(&self, page: PageNum) -> Result<(usize, u64), BackendError> {
        let gpa = page << 12;
        self.mapped
            .slots()
            .iter()
            .enumerate()
            .find(|(_, s)| gpa >= s.guest_addr && gpa - s.guest_addr < s.size)
            .map(|(i, s)| (i, s.host_addr + (gpa - s.guest_addr)))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::InvalidArgument,
                    format!("page {page:#x} is not guest memory"),
                )
            })
    }

    /// Sets `out[i]` when `pages[i]` was never populated by the host (so
    /// reads as zero) and returns `true`; returns `false`, leaving `out`
    /// alone, where that cannot be known: memory that is not private and
    /// anonymous, or a post-copy destination (there an absent page is
    /// missing, not zero).
    fn unpopulated(&self, pages: &[PageNum], out: &mut [bool]) -> Result<bool, BackendError> {
        let Some(pm) = &self.pagemap else {
            return Ok(false);
        };
        if self.postcopy_lock().is_some() {
            return Ok(false);
        }
        let hosts = pages
            .iter()
            .map(|p| self.host_of(*p))
            .collect::<Result<Vec<u64>, _>>()?;
        pm.lock()
            .unwrap_or_else(|e| e.into_inner())
            .unpopulated(&hosts, out)
            .map_err(|e| BackendError::io("read /proc/self/pagemap", e))?;
        Ok(true)
    }

    /// Places a page on a post-copy destination; `None` if post-copy is
    /// not enabled (write normally). `data` `None` is a zero page.
    fn place(&self, page: PageNum, data: Option<&[u8]>) -> Option<Result<(), BackendError>> {
        let mut guard = self.postcopy_lock();
        let pc = guard.as_mut()?;
        Some(self.place_in(pc, page, data))
    }

    /// [`KvmMemory::place`] with the post-copy state in hand.
    fn place_in(
        &self,
        pc: &mut Postcopy,
        page: PageNum,
        data: Option<&[u8]>,
    ) -> Result<(), BackendError> {
        let host = self.host_of(page)?;
        let a = GuestAddress(page << 12);
        let io = |e: std::io::Error| BackendError::io(format!("place page {page:#x}"), e);
        if !pc.present.get(page) {
            let placed = match data {
                Some(d) => pc.uffd.copy(host, d).map_err(io)?,
                None => pc.uffd.zeropage(host, 4096).map_err(io)?,
            };
            pc.present.set(page);
            if placed == Placed::Mapped {
                return Ok(());
            }
        }
        // Present: an ordinary write reaches it without a fault.
        let zeros = [0u8; 4096];
        self.mapped
            .memory()
            .write_slice(data.unwrap_or(&zeros), a)
            .map_err(|e| {
                BackendError::with_source(
                    BackendErrorKind::Io,
                    format!("write page {page:#x}: {e}"),
                    e,
                )
            })
    }

    /// Places zero pages on a post-copy destination: each run of absent
    /// pages that are consecutive in guest and host memory and lie in one
    /// slot (one mapping: `UFFDIO_ZEROPAGE` does not cross mappings) with
    /// one `UFFDIO_ZEROPAGE` (a pre-copy round to a hybrid destination sends
    /// runs of thousands; one call per page cost a system call each), a
    /// present page with an ordinary write. `None` if post-copy is not
    /// enabled.
    fn place_zeros(&self, pages: &[PageNum]) -> Option<Result<(), BackendError>> {
        let mut guard = self.postcopy_lock();
        let pc = guard.as_mut()?;
        Some((|| {
            // (first page, its host address, pages), and its slot
            let mut run: Option<(PageNum, u64, u64)> = None;
            let mut run_slot = usize::MAX;
            for &page in pages {
                if pc.present.get(page) {
                    if let Some(r) = run.take() {
                        self.zero_run(pc, r)?;
                    }
                    self.place_in(pc, page, None)?;
                    continue;
                }
                let (slot, host) = self.slot_and_host_of(page)?;
                match &mut run {
                    Some((first, at, n))
                        if slot == run_slot && *first + *n == page && *at + (*n << 12) == host =>
                    {
                        *n += 1
                    }
                    _ => {
                        run_slot = slot;
                        if let Some(r) = run.replace((page, host, 1)) {
                            self.zero_run(pc, r)?;
                        }
                    }
                }
            }
            match run {
                Some(r) => self.zero_run(pc, r),
                None => Ok(()),
            }
        })())
    }

    /// Maps zero pages over a run of absent pages with one call; if some
    /// page of it turns out present after all (`EEXIST` part-way), places
    /// the run page by page.
    fn zero_run(
        &self,
        pc: &mut Postcopy,
        (first, host, n): (PageNum, u64, u64),
    ) -> Result<(), BackendError> {
        let io =
            |e: std::io::Error| BackendError::io(format!("place zero pages {first:#x}+{n}"), e);
        if pc.uffd.zeropage(host, n << 12).map_err(io)? == Placed::Mapped {
            pc.present.set_range(first..first + n);
            return Ok(());
        }
        (first..first + n).try_for_each(|p| self.place_in(pc, p, None))
    }

    /// Places a page on a post-copy destination only if it is absent:
    /// `Ok(false)` when it is present (placed before, or never
    /// discarded), or post-copy has ended (every page is then present).
    fn place_absent(&self, page: PageNum, data: Option<&[u8]>) -> Result<bool, BackendError> {
        let mut guard = self.postcopy_lock();
        let Some(pc) = guard.as_mut() else {
            return Ok(false);
        };
        if pc.present.get(page) {
            return Ok(false);
        }
        let host = self.host_of(page)?;
        let io = |e: std::io::Error| BackendError::io(format!("place page {page:#x}"), e);
        let placed = match data {
            Some(d) if d.len() == 4096 => pc.uffd.copy(host, d).map_err(io)?,
            Some(_) => {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidArgument,
                    "page data is not 4 KiB",
                ))
            }
            None => pc.uffd.zeropage(host, 4096).map_err(io)?,
        };
        pc.present.set(page);
        Ok(placed == Placed::Mapped)
    }

    /// Reads KVM's dirty log of every slot and the VMM's own dirty bitmap
    /// (both cleared as they are read, atomically) into `pending`.
    pub(crate) fn fetch(&self) -> Result<(), BackendError> {
        let mut pending = self.lock();
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = rings.as_mut() {
            let slots = self.mapped.slots();
            r.collect(|slot, offset| {
                // The low 16 bits are the slot, the high its address space.
                let id = slot & 0xffff;
                if let Some(s) = slots.iter().find(|s| s.index == id) {
                    if offset < s.size >> 12 {
                        pending.add((s.guest_addr >> 12) + offset);
                    }
                }
            })
            .map_err(BackendError::from)?;
        }
        let vmm_writes = self.vmm_writes.load(Ordering::Relaxed);
        for (s, region) in self.mapped.slots().iter().zip(self.mapped.memory().iter()) {
            let first = s.guest_addr >> 12;
            if vmm_writes {
                let mapping: &MmapRegion<AtomicBitmap> = region;
                merge(&mut pending, first, &mapping.bitmap().get_and_reset());
            }
            if rings.is_some() {
                continue;
            }
            let words = self
                .mapped
                .vm()
                .get_dirty_log(s.index, s.size as usize)
                .map_err(|e| {
                    BackendError::new(
                        BackendErrorKind::Io,
                        format!("KVM_GET_DIRTY_LOG slot {}: {e}", s.index),
                    )
                })?;
            merge(&mut pending, first, &words);
        }
        Ok(())
    }

    /// Makes the VM's dirty rings this memory's dirty log, in place of
    /// `KVM_GET_DIRTY_LOG` (which stops working once the ring is enabled:
    /// see [`enable_dirty_ring`](crate::enable_dirty_ring)).
    /// [`KvmDirtyTracker`] then collects from the rings; a collection
    /// costs one entry per page dirtied, not a bit per page of memory.
    pub fn use_dirty_rings(&self, rings: DirtyRings) {
        *self.rings.lock().unwrap_or_else(|e| e.into_inner()) = Some(rings);
    }

    /// Whether collections include the pages the VMM wrote through
    /// [`KvmMemory::guest_memory`] (on by default). That record is
    /// vm-memory's bitmap, a bit per page, so reading it costs time in
    /// proportion to the guest's size whichever KVM log is in use; a VMM
    /// that never writes guest memory on the guest's behalf while a
    /// migration runs can turn it off.
    pub fn track_vmm_writes(&self, on: bool) {
        self.vmm_writes.store(on, Ordering::Relaxed);
    }

    /// Whether the dirty log is the dirty ring.
    pub fn uses_dirty_rings(&self) -> bool {
        self.rings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn addr(&self, page: PageNum) -> Result<GuestAddress, BackendError> {
        if !self.layout.contains(page) {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("page {page:#x} is not guest memory"),
            ));
        }
        Ok(GuestAddress(page << 12))
    }
}

/// Pages reported dirty and not yet collected: a bitmap, and the same
/// pages as a list, so that handing them over and clearing them costs a
/// step per dirty page rather than a pass over the whole bitmap.
#[derive(Debug)]
struct Pending {
    bits: DirtyBitmap,
    list: Vec<PageNum>,
}

impl Pending {
    fn add(&mut self, page: PageNum) {
        if !self.bits.get(page) {
            self.bits.set(page);
            self.list.push(page);
        }
    }

    /// Replaces `into` with the pending pages.
    fn copy_to(&self, into: &mut DirtyBitmap) {
        into.clear_all();
        for &p in &self.list {
            into.set(p);
        }
    }

    fn clear(&mut self) {
        for p in self.list.drain(..) {
            self.bits.clear(p);
        }
    }
}

/// Adds to `into` the pages of `words` (bit `i` of word `w` is page
/// `first + 64 w + i`).
fn merge(into: &mut Pending, first: PageNum, words: &[u64]) {
    for (w, word) in words.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            into.add(first + w as u64 * 64 + b);
        }
    }
}

/// [`DirtyTracker`] on `KVM_MEM_LOG_DIRTY_PAGES` and `KVM_GET_DIRTY_LOG`,
/// merged with the VMM's own writes.
///
/// KVM clears its log on each read; `peek` keeps what it read until the
/// next `collect_and_clear`, so no bit is lost.
#[derive(Clone, Debug)]
pub struct KvmDirtyTracker(pub Arc<KvmMemory>);

impl DirtyTracker for KvmDirtyTracker {
    fn start(&mut self) -> Result<(), BackendError> {
        for s in self.0.mapped.slots() {
            self.0
                .set_slot(s, KVM_MEM_LOG_DIRTY_PAGES)
                .map_err(BackendError::from)?;
        }
        self.0.fetch()?;
        self.0.lock().clear();
        Ok(())
    }

    fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.0.fetch()?;
        let mut pending = self.0.lock();
        pending.copy_to(into);
        pending.clear();
        Ok(())
    }

    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.0.fetch()?;
        self.0.lock().copy_to(into);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        for s in self.0.mapped.slots() {
            self.0.set_slot(s, 0).map_err(BackendError::from)?;
        }
        self.0.lock().clear();
        Ok(())
    }
}

/// Bytes per copy where a whole-page copy would be slow (see
/// [`copy_in_blocks`]).
const COPY_BLOCK: usize = 256;

/// Whether a 4 KiB copy between guest memory (pages start on 4 KiB
/// boundaries on the host too) and the buffer at `buf` should go in
/// [`COPY_BLOCK`] pieces: when the destination lies 1 to 63 bytes past
/// the source modulo 4096, the C library's `memcpy` (`rep movsb` at this
/// size) runs up to 15 times slower on some AMD CPUs, and copies this
/// small do not use it (see `migrate_core::copy`). A received page lies
/// in its frame at an offset set by the batch's length, so this happens
/// for some batch sizes.
fn copy_in_blocks(to_guest: bool, buf: *const u8) -> bool {
    let off = buf as usize % 4096;
    let past = if to_guest { (4096 - off) % 4096 } else { off };
    (1..64).contains(&past)
}

/// Guest memory as a [`PageSource`] and [`PageSink`].
#[derive(Clone, Debug)]
pub struct KvmPages(pub Arc<KvmMemory>);

impl PageSource for KvmPages {
    fn layout(&self) -> &MemoryLayout {
        &self.0.layout
    }

    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        if out.len() != pages.len() * 4096 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "output buffer is not one page per page number",
            ));
        }
        if let Some(pc) = &*self.0.postcopy_lock() {
            // An absent page would block this thread until someone placed
            // it; say so instead.
            if let Some(p) = pages.iter().find(|p| !pc.present.get(**p)) {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    format!("page {p:#x} has not arrived (post-copy destination)"),
                ));
            }
        }
        let blocks = copy_in_blocks(false, out.as_ptr());
        for (p, chunk) in pages.iter().zip(out.chunks_exact_mut(4096)) {
            let a = self.0.addr(*p)?;
            let io = |e: vm_memory::GuestMemoryError| {
                BackendError::with_source(BackendErrorKind::Io, format!("read page {p:#x}: {e}"), e)
            };
            if blocks {
                for (i, b) in chunk.chunks_mut(COPY_BLOCK).enumerate() {
                    let at = GuestAddress(a.0 + (i * COPY_BLOCK) as u64);
                    self.0.mapped.memory().read_slice(b, at).map_err(io)?;
                }
            } else {
                self.0.mapped.memory().read_slice(chunk, a).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Pages of private anonymous memory the host never populated: they
    /// read as zeros (see the `pagemap` module), so they are sent as zero
    /// pages without a page fault or a read.
    fn known_zero(&mut self, pages: &[PageNum], zero: &mut [bool]) -> Result<(), BackendError> {
        self.0.unpopulated(pages, zero).map(|_| ())
    }

    /// The pages the host populated (`/proc/self/pagemap`), where the
    /// others are known to be zero (see [`PageSource::known_zero`]).
    fn populated_ranges(&mut self) -> Result<Option<Vec<(PageNum, u64)>>, BackendError> {
        self.0.populated_ranges()
    }

    /// Guest memory is mapped into this process: a read is a copy.
    fn small_reads_are_cheap(&self) -> bool {
        true
    }

    /// The same memory, for the preempt connection's thread.
    fn share(&self) -> Option<Box<dyn PageSource + Send>> {
        Some(Box::new(self.clone()))
    }
}

impl PagePlacer for KvmPages {
    fn place_absent(&mut self, page: PageNum, data: Option<&[u8]>) -> Result<bool, BackendError> {
        self.0.place_absent(page, data)
    }
}

impl PageSink for KvmPages {
    fn layout(&self) -> &MemoryLayout {
        &self.0.layout
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        if data.len() != 4096 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "page data is not 4 KiB",
            ));
        }
        let a = self.0.addr(page)?;
        if let Some(r) = self.0.place(page, Some(data)) {
            return r;
        }
        let io = |e: vm_memory::GuestMemoryError| {
            BackendError::with_source(
                BackendErrorKind::Io,
                format!("write page {page:#x}: {e}"),
                e,
            )
        };
        if copy_in_blocks(true, data.as_ptr()) {
            for (i, b) in data.chunks(COPY_BLOCK).enumerate() {
                let at = GuestAddress(a.0 + (i * COPY_BLOCK) as u64);
                self.0.mapped.memory().write_slice(b, at).map_err(io)?;
            }
            return Ok(());
        }
        self.0.mapped.memory().write_slice(data, a).map_err(io)
    }

    /// Writes zeros only if the page is not zero already: a page of fresh
    /// guest memory that was never touched reads as the kernel's shared
    /// zero page, so most of a destination's zero pages cost neither an
    /// allocation nor a write (and the destination's memory stays as
    /// sparse as the source's).
    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        let a = self.0.addr(page)?;
        if let Some(r) = self.0.place(page, None) {
            return r;
        }
        let io = |e: vm_memory::GuestMemoryError| {
            BackendError::with_source(BackendErrorKind::Io, format!("page {page:#x}: {e}"), e)
        };
        let mut now = [0u8; 4096];
        self.0.mapped.memory().read_slice(&mut now, a).map_err(io)?;
        if !migrate_core::digest::is_zero_page(&now) {
            self.0
                .mapped
                .memory()
                .write_slice(&[0u8; 4096], a)
                .map_err(io)?;
        }
        Ok(())
    }

    /// Leaves alone the pages the host never populated (zeros already,
    /// and left unpopulated, so the destination's memory stays as sparse
    /// as the source's), and makes the others zero one by one. On a
    /// post-copy destination every absent page must be placed (else the
    /// guest would fault on it): runs of them take one `UFFDIO_ZEROPAGE`
    /// each.
    fn write_zero_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        if let Some(r) = self.0.place_zeros(pages) {
            return r;
        }
        let mut unpopulated = vec![false; pages.len()];
        self.0.unpopulated(pages, &mut unpopulated)?;
        for (p, u) in pages.iter().zip(&unpopulated) {
            if !u {
                self.write_zero_page(*p)?;
            }
        }
        Ok(())
    }

    /// Hands the ranges to [`KvmMemory::prefault`]: they are populated in
    /// the background while the round streams in.
    fn expect_pages(&mut self, ranges: &[(PageNum, u64)]) -> Result<(), BackendError> {
        self.0.prefault(ranges).map_err(BackendError::from)
    }

    /// Post-copy: a handle for the preempt connection's thread, placing
    /// with `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` only the pages not present
    /// (under the same lock as every other placement). `None` before
    /// [`KvmMemory::enable_postcopy`].
    fn share_placer(&self) -> Option<Box<dyn PagePlacer>> {
        self.0.postcopy_lock().as_ref()?;
        Some(Box::new(self.clone()))
    }

    /// Post-copy: drops the page, so that the guest's next access faults
    /// and the page is asked for again. Needs [`KvmMemory::enable_postcopy`].
    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.discard_pages(&[page])
    }

    /// Drops each run of consecutive placed pages with one `madvise`
    /// (a page never placed is absent already: a fresh post-copy discards
    /// all of memory at no cost).
    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        let mut guard = self.0.postcopy_lock();
        let Some(pc) = guard.as_mut() else {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "discard of {} pages: this destination did not enable post-copy",
                    pages.len()
                ),
            ));
        };
        let mut run: Option<(u64, u64, u64)> = None; // (first page, host, pages)
        let mapped = &self.0.mapped;
        let flush = |r: Option<(u64, u64, u64)>| -> Result<(), BackendError> {
            match r {
                Some((first, host, n)) => mapped
                    .drop_pages(host, n * 4096)
                    .map_err(|e| BackendError::io(format!("discard pages from {first:#x}"), e)),
                None => Ok(()),
            }
        };
        for &page in pages {
            let host = self.0.host_of(page)?;
            if !pc.present.get(page) {
                continue;
            }
            pc.present.clear(page);
            run = match run {
                Some((f, h, n)) if f + n == page && h + n * 4096 == host => Some((f, h, n + 1)),
                other => {
                    flush(other)?;
                    Some((page, host, 1))
                }
            };
        }
        flush(run)
    }
}

//! A Xen HVM or PVH domain as a migration source or destination.
//!
//! [`XenDomain::attach`] finds which guest frames the domain has (its
//! memory layout, holes excluded) and hands out the core's backend
//! traits: [`XenDirtyTracker`] (log-dirty), [`XenPages`] (foreign
//! mappings, in batches) and [`XenControl`] (pause, resume, the HVM
//! context and parameters). A destination is a domain the toolstack
//! created, paused, with the same configuration (`xl create -p`).

use crate::xc::{
    DomainInfo, HypercallBitmap, LogDirtyOp, Mapping, Xen, XenError, SHUTDOWN_SUSPEND,
};
use crate::{sys, XenDeviceState};
use migrate_core::bitmap::DirtyBitmap;
use migrate_core::page::{MemoryLayout, PageNum, PageSize, Region};
use migrate_core::{
    BackendError, BackendErrorKind, DeviceState, DirtyTracker, GuestControl, PageSink, PageSource,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Frames mapped per foreign-mapping call.
pub const MAP_BATCH: usize = 1024;

fn be(e: XenError) -> BackendError {
    let kind = match &e {
        XenError::Library { .. } | XenError::Symbol { .. } | XenError::Open { .. } => {
            BackendErrorKind::Unsupported
        }
        XenError::NoDomain(_) | XenError::Invalid(_) => BackendErrorKind::InvalidArgument,
        XenError::Call { .. } => BackendErrorKind::Io,
    };
    BackendError::new(kind, e.to_string())
}

/// How the source stops the guest for the final copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest to suspend itself (xenstore `control/shutdown` =
    /// `suspend`, as `xl migrate` does) and wait until it has. A guest
    /// stopped this way reconnects its event channels, xenstore and
    /// console when it resumes in the destination domain.
    Suspend,
    /// Pause its vCPUs, unbeknown to it. Memory and CPU state move
    /// exactly, but a PV-aware guest's event channels live in the
    /// hypervisor and do not follow, so the destination copy runs only
    /// until it next needs one.
    Pause,
}

/// A domain attached for migration.
#[derive(Debug, Clone)]
pub struct XenDomain {
    xen: Arc<Xen>,
    domid: u32,
    layout: MemoryLayout,
    max_gpfn: u64,
}

/// Groups the frames that map into regions of consecutive frames.
pub fn regions_of(present: impl IntoIterator<Item = u64>) -> Vec<Region> {
    let mut regions: Vec<Region> = Vec::new();
    for f in present {
        match regions.last_mut() {
            Some(r) if r.first_page + r.pages == f => r.pages += 1,
            _ => regions.push(Region {
                first_page: f,
                pages: 1,
            }),
        }
    }
    regions
}

impl XenDomain {
    /// Attaches to `domid`, which must be an HVM or PVH domain. Its
    /// layout is the frames from 0 to its maximum GFN that map.
    pub fn attach(xen: Arc<Xen>, domid: u32) -> Result<Self, XenError> {
        let info = xen.domain_info(domid)?;
        if !info.hvm {
            return Err(XenError::Invalid(format!(
                "domain {domid} is a PV domain; this backend migrates HVM and PVH domains (PV frames are machine frames, reached through the guest's p2m)"
            )));
        }
        let max_gpfn = xen.maximum_gpfn(domid)?;
        let mut present = Vec::new();
        let mut first = 0u64;
        while first <= max_gpfn {
            let n = (max_gpfn + 1 - first).min(MAP_BATCH as u64);
            let frames: Vec<u64> = (first..first + n).collect();
            let m = xen.map(domid, &frames, false)?;
            present.extend(
                frames
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| m.error(*i) == 0)
                    .map(|(_, f)| *f),
            );
            first += n;
        }
        let layout = MemoryLayout::new(PageSize::DEFAULT, regions_of(present))
            .map_err(|e| XenError::Invalid(format!("domain {domid}: {e}")))?;
        Ok(XenDomain {
            xen,
            domid,
            layout,
            max_gpfn,
        })
    }

    /// The same domain with `layout` as its memory: every frame of it
    /// must be one this domain has. Source and destination must use the
    /// same layout (see [`common_layout`]).
    pub fn with_layout(mut self, layout: MemoryLayout) -> Result<Self, XenError> {
        for r in layout.regions() {
            for p in r.first_page..r.first_page + r.pages {
                if self.layout.dense_index(p).is_none() {
                    return Err(XenError::Invalid(format!(
                        "frame {p:#x} is not in domain {}'s memory",
                        self.domid
                    )));
                }
            }
        }
        self.layout = layout;
        Ok(self)
    }

    /// The domain id.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// The frames that map, holes excluded.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The domain's state now.
    pub fn info(&self) -> Result<DomainInfo, XenError> {
        self.xen.domain_info(self.domid)
    }

    /// The log-dirty tracker.
    pub fn tracker(&self) -> XenDirtyTracker {
        XenDirtyTracker {
            d: self.clone(),
            bitmap: None,
            mask: None,
        }
    }

    /// The domain's memory.
    pub fn pages(&self) -> XenPages {
        XenPages {
            d: self.clone(),
            window: None,
        }
    }

    /// Pause, resume and state; `stop` says how the source stops the
    /// guest.
    pub fn control(&self, stop: StopMode) -> XenControl {
        XenControl {
            d: self.clone(),
            stop,
            suspended: false,
            paused: false,
            suspend_timeout: Duration::from_secs(30),
        }
    }
}

/// First frame of the area near 4 GiB where HVM and PVH domains have
/// their special pages (ACPI tables, the xenstore and console rings, the
/// ioreq pages): the toolstack sets these up for each domain, connected to
/// its own xenstore and console, so they are not migrated.
pub const SPECIAL_AREA: u64 = 0xfc000;

/// The frames below [`SPECIAL_AREA`] that both `a` and `b` have: the
/// guest's RAM as both domains see it. A running guest maps a few more
/// frames of its own (its grant table and shared info, which it maps again
/// when it resumes), and a fresh domain may have a frame the running guest
/// gave back; neither is guest memory to copy.
pub fn common_layout(a: &MemoryLayout, b: &MemoryLayout) -> Result<MemoryLayout, XenError> {
    let frames = a
        .regions()
        .iter()
        .flat_map(|r| r.first_page..r.first_page + r.pages);
    let both = frames.filter(|&p| p < SPECIAL_AREA && b.dense_index(p).is_some());
    MemoryLayout::new(PageSize::DEFAULT, regions_of(both))
        .map_err(|e| XenError::Invalid(format!("the two domains share no memory: {e}")))
}

/// Xen log-dirty as a [`DirtyTracker`]: `ENABLE_LOGDIRTY`, `CLEAN`,
/// `PEEK` and `OFF`, with a bitmap sized from the domain's maximum GFN.
#[derive(Debug)]
pub struct XenDirtyTracker {
    d: XenDomain,
    bitmap: Option<HypercallBitmap>,
    /// The layout's frames, made once.
    mask: Option<DirtyBitmap>,
}

/// The frames of `layout` as a bitmap, the mask for [`bitmap_from_xen`].
pub fn layout_mask(layout: &MemoryLayout) -> DirtyBitmap {
    let mut inside = DirtyBitmap::new(layout.page_end());
    for r in layout.regions() {
        for p in r.first_page..r.first_page + r.pages {
            inside.set(p);
        }
    }
    inside
}

/// Turns Xen's bitmap words into the core's bitmap over `mask` (from
/// [`layout_mask`]): bits beyond the layout's end, or in its holes, are
/// dropped.
pub fn bitmap_from_xen(words: Vec<u64>, mask: &DirtyBitmap) -> DirtyBitmap {
    let end = mask.len();
    let mut words = words;
    words.resize(end.div_ceil(64) as usize, 0);
    let mut b = DirtyBitmap::from_words(words, end);
    b.intersect_with(mask);
    b
}

impl XenDirtyTracker {
    fn read(&mut self, op: LogDirtyOp, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        let Some(bm) = self.bitmap.as_mut() else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidState,
                "log-dirty read before start",
            ));
        };
        self.d.xen.logdirty_read(self.d.domid, op, bm).map_err(be)?;
        let mask = self.mask.get_or_insert_with(|| layout_mask(&self.d.layout));
        *into = bitmap_from_xen(bm.words(), mask);
        Ok(())
    }
}

impl DirtyTracker for XenDirtyTracker {
    fn start(&mut self) -> Result<(), BackendError> {
        if self.bitmap.is_none() {
            self.bitmap = Some(self.d.xen.bitmap(self.d.max_gpfn + 1).map_err(be)?);
        }
        self.d.xen.logdirty_enable(self.d.domid).map_err(be)
    }

    fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.read(LogDirtyOp::Clean, into)
    }

    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.read(LogDirtyOp::Peek, into)
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        let r = self.d.xen.logdirty_off(self.d.domid).map_err(be);
        if let Some(bm) = self.bitmap.take() {
            self.d.xen.free_bitmap(bm);
        }
        r
    }
}

impl Drop for XenDirtyTracker {
    fn drop(&mut self) {
        if let Some(bm) = self.bitmap.take() {
            self.d.xen.free_bitmap(bm);
        }
    }
}

/// The domain's memory through foreign mappings: reads in batches of up
/// to [`MAP_BATCH`] frames; writes go straight into a writable window of
/// [`MAP_BATCH`] consecutive frames, mapped again when a page falls
/// outside it.
#[derive(Debug)]
pub struct XenPages {
    d: XenDomain,
    window: Option<(u64, Mapping)>,
}

/// Splits `pages` into the batches one mapping call each covers.
pub fn batches(pages: &[PageNum]) -> impl Iterator<Item = &[PageNum]> {
    pages.chunks(MAP_BATCH)
}

impl XenPages {
    fn in_layout(&self, page: PageNum) -> Result<(), BackendError> {
        if self.d.layout.dense_index(page).is_none() {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("frame {page:#x} is not in domain {}'s memory", self.d.domid),
            ));
        }
        Ok(())
    }
}

impl PageSource for XenPages {
    fn layout(&self) -> &MemoryLayout {
        &self.d.layout
    }

    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        if out.len() != pages.len() * 4096 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "output buffer is not one page per frame",
            ));
        }
        let mut at = 0;
        for batch in batches(pages) {
            for &p in batch {
                self.in_layout(p)?;
            }
            let m = self.d.xen.map(self.d.domid, batch, false).map_err(be)?;
            for i in 0..batch.len() {
                m.read(i, &mut out[at..at + 4096]).map_err(be)?;
                at += 4096;
            }
        }
        Ok(())
    }
}

impl PageSink for XenPages {
    fn layout(&self) -> &MemoryLayout {
        &self.d.layout
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        if data.len() != 4096 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "page data is not 4 KiB",
            ));
        }
        self.in_layout(page)?;
        let fits = matches!(&self.window, Some((first, _)) if page >= *first && page < first + MAP_BATCH as u64);
        if !fits {
            self.window = None;
            let end = (page + MAP_BATCH as u64).min(self.d.max_gpfn + 1);
            let frames: Vec<u64> = (page..end).collect();
            let m = self.d.xen.map(self.d.domid, &frames, true).map_err(be)?;
            self.window = Some((page, m));
        }
        let (first, m) = self.window.as_ref().expect("window just mapped");
        m.write((page - first) as usize, data).map_err(be)
    }
}

/// HVM parameters that travel with the guest. Those that connect it to
/// the toolstack (the xenstore and console pages and event channels) must
/// already agree in the destination domain, created with the same
/// configuration; the others are set there.
pub const CARRIED_PARAMS: &[(u32, bool)] = &[
    (sys::HVM_PARAM_STORE_PFN, true),
    (sys::HVM_PARAM_STORE_EVTCHN, true),
    (sys::HVM_PARAM_CONSOLE_PFN, true),
    (sys::HVM_PARAM_CONSOLE_EVTCHN, true),
    (sys::HVM_PARAM_PAE_ENABLED, false),
    (sys::HVM_PARAM_TIMER_MODE, false),
    (sys::HVM_PARAM_IDENT_PT, false),
    (sys::HVM_PARAM_VM86_TSS_SIZED, false),
    (sys::HVM_PARAM_ACPI_IOPORTS_LOCATION, false),
    (sys::HVM_PARAM_VIRIDIAN, false),
    (sys::HVM_PARAM_X87_FIP_WIDTH, false),
    (sys::HVM_PARAM_MCA_CAP, false),
];

/// Pause, resume and state of a domain.
#[derive(Debug)]
pub struct XenControl {
    d: XenDomain,
    stop: StopMode,
    suspended: bool,
    paused: bool,
    suspend_timeout: Duration,
}

impl XenControl {
    /// How long [`StopMode::Suspend`] waits for the guest to suspend.
    pub fn with_suspend_timeout(mut self, t: Duration) -> Self {
        self.suspend_timeout = t;
        self
    }

    fn suspend(&mut self) -> Result<(), BackendError> {
        let path = format!("/local/domain/{}/control/shutdown", self.d.domid);
        let out = std::process::Command::new("xenstore-write")
            .args([&path, "suspend"])
            .output()
            .map_err(|e| BackendError::io("running xenstore-write (xen-utils)", e))?;
        if !out.status.success() {
            return Err(BackendError::new(
                BackendErrorKind::Io,
                format!(
                    "xenstore-write {path} suspend: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let deadline = Instant::now() + self.suspend_timeout;
        loop {
            let i = self.d.info().map_err(be)?;
            if i.shutdown && i.shutdown_reason == SHUTDOWN_SUSPEND {
                self.suspended = true;
                return Ok(());
            }
            if i.shutdown || i.dying {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    format!(
                        "domain {} shut down (reason {}) instead of suspending",
                        self.d.domid, i.shutdown_reason
                    ),
                ));
            }
            if Instant::now() > deadline {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    format!(
                        "domain {} did not suspend within {:?} (no PV suspend support?)",
                        self.d.domid, self.suspend_timeout
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl GuestControl for XenControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        match self.stop {
            StopMode::Suspend => self.suspend(),
            StopMode::Pause => {
                self.d.xen.pause(self.d.domid).map_err(be)?;
                self.paused = true;
                Ok(())
            }
        }
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        if self.suspended {
            // The source after a failed migration: the suspend is
            // cancelled and the guest goes on where it was.
            self.d.xen.resume(self.d.domid, true).map_err(be)?;
            self.suspended = false;
            return Ok(());
        }
        self.paused = false;
        self.d.xen.unpause(self.d.domid).map_err(be)
    }

    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        let context = self.d.xen.hvm_context(self.d.domid).map_err(be)?;
        let mut params = Vec::new();
        for &(p, must_match) in CARRIED_PARAMS {
            match self.d.xen.hvm_param(self.d.domid, p) {
                Ok(v) => params.push((p, v)),
                // Not every parameter exists for every guest type (PVH
                // has no VM86 TSS, for one); those that do not are not
                // carried.
                Err(XenError::Call { source, .. })
                    if !must_match && source.raw_os_error() == Some(22) => {}
                Err(e) => {
                    return Err(BackendError::new(
                        BackendErrorKind::Io,
                        format!("HVM parameter {p}: {e}"),
                    ))
                }
            }
        }
        Ok(XenDeviceState { context, params }.to_device_state())
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        let s = XenDeviceState::from_device_state(state)?;
        for &(p, v) in &s.params {
            let must_match = CARRIED_PARAMS
                .iter()
                .find(|(q, _)| *q == p)
                .is_some_and(|(_, m)| *m);
            let here = self.d.xen.hvm_param(self.d.domid, p).map_err(be)?;
            if here == v {
                continue;
            }
            if must_match {
                return Err(BackendError::new(
                    BackendErrorKind::IncompatibleState,
                    format!(
                        "HVM parameter {p} is {v:#x} on the source and {here:#x} in domain {}: create the destination with the same configuration",
                        self.d.domid
                    ),
                ));
            }
            self.d.xen.set_hvm_param(self.d.domid, p, v).map_err(be)?;
        }
        self.d
            .xen
            .set_hvm_context(self.d.domid, &s.context)
            .map_err(be)
    }

    fn guest_cpu_time(&self) -> Option<Duration> {
        self.d
            .info()
            .ok()
            .map(|i| Duration::from_nanos(i.cpu_time_ns))
    }
}

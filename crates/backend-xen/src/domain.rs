//! A Xen HVM or PVH domain as a migration source or destination.
//!
//! [`XenDomain::attach`] finds which guest frames the domain has (its
//! memory layout, holes excluded) and hands out the core's backend
//! traits: [`XenDirtyTracker`] (log-dirty), [`XenPages`] (foreign
//! mappings, in batches) and [`XenControl`] (pause, resume, the HVM
//! context and parameters). A destination is a domain the toolstack
//! created, paused, with the same configuration (`xl create -p`).

use crate::paging::Pager;
use crate::pv::{self, PvState, VcpuContext};
use crate::walk::{self, ResumeWindow};
use crate::xc::{
    DomainInfo, HypercallBitmap, LogDirtyOp, Mapping, Xen, XenError, SHUTDOWN_SUSPEND,
};
use crate::{sys, XenDeviceState};
use migrate_core::bitmap::DirtyBitmap;
use migrate_core::page::{MemoryLayout, PageNum, PageSize, Region};
use migrate_core::{
    BackendError, BackendErrorKind, DeviceState, DirtyTracker, GuestControl, PageSink, PageSource,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
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
    /// For a PV domain: its frames and what its toolstack connected.
    pv: Option<Arc<PvInfo>>,
    /// The sink's writable window, shared so that the destination's
    /// restore can drop it (a page mapped writable cannot become a page
    /// table).
    window: Arc<Mutex<Option<Window>>>,
    /// A post-copy destination's pager.
    pager: Option<Arc<Pager>>,
}

/// What a PV domain adds: its p2m and the frames its toolstack connected.
#[derive(Debug)]
struct PvInfo {
    /// Guest frame → machine frame ([`pv::INVALID_MFN`] where none).
    p2m: Vec<u64>,
    /// Machine frame → guest frame.
    m2p: HashMap<u64, u64>,
    shared_info_frame: u64,
    /// The xenstore and console ring pages: each domain has its own,
    /// connected to its own toolstack, so they are not migrated.
    store_pfn: u64,
    console_pfn: u64,
    /// On a destination: the event channels its toolstack set up.
    store_evtchn: u32,
    console_evtchn: u32,
    /// Pages last read while one of their page-table entries named a
    /// frame that is not the guest's; each must be read again, cleanly,
    /// before the end.
    unsettled: Mutex<BTreeSet<u64>>,
}

impl PvInfo {
    fn mfn(&self, pfn: u64) -> Option<u64> {
        self.p2m
            .get(pfn as usize)
            .copied()
            .and_then(pv::p2m_entry_mfn)
    }
    fn pfn(&self, mfn: u64) -> Option<u64> {
        self.m2p.get(&mfn).copied()
    }
}

fn invalid(why: impl Into<String>) -> XenError {
    XenError::Invalid(why.into())
}

/// Reads whole frames of a domain (machine frames for PV) into one
/// buffer, failing if any cannot be mapped.
fn read_frames(xen: &Arc<Xen>, domid: u32, frames: &[u64]) -> Result<Vec<u8>, XenError> {
    let mut out = vec![0u8; frames.len() * 4096];
    for (i, chunk) in frames.chunks(MAP_BATCH).enumerate() {
        let m = xen.map(domid, chunk, false)?;
        for (j, f) in chunk.iter().enumerate() {
            let at = (i * MAP_BATCH + j) * 4096;
            m.read(j, &mut out[at..at + 4096])
                .map_err(|e| invalid(format!("domain {domid}: frame {f:#x}: {e}")))?;
        }
    }
    Ok(out)
}

/// The (guest frame, machine frame) pairs a p2m backs with memory.
fn backed(p2m: &[u64]) -> Vec<(u64, u64)> {
    p2m.iter()
        .enumerate()
        .filter_map(|(p, &e)| pv::p2m_entry_mfn(e).map(|m| (p as u64, m)))
        .collect()
}

/// Reads a xenstore path with `xenstore-read` (xen-utils).
fn xenstore_read(path: &str) -> Result<String, XenError> {
    let out = std::process::Command::new("xenstore-read")
        .arg(path)
        .output()
        .map_err(|e| invalid(format!("running xenstore-read (xen-utils): {e}")))?;
    if !out.status.success() {
        return Err(invalid(format!(
            "xenstore-read {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A running PV guest's p2m, read the way the guest publishes it:
/// shared info → frame-list list → frame lists → p2m pages. Returns the
/// p2m (`arch.max_pfn` entries) and the machine frames that hold it.
fn published_p2m(
    xen: &Arc<Xen>,
    domid: u32,
    shinfo: u64,
) -> Result<(Vec<u64>, Vec<u64>), XenError> {
    let si = read_frames(xen, domid, &[shinfo])?;
    let max_pfn = pv::read_u64(&si, pv::shared_info::MAX_PFN);
    let fll = pv::read_u64(&si, pv::shared_info::FRAME_LIST_LIST);
    if max_pfn == 0 || fll == 0 {
        return Err(invalid(format!(
            "domain {domid} has not published its p2m (max_pfn {max_pfn}, frame list list {fll:#x}): is its kernel running?"
        )));
    }
    if max_pfn > 1 << 28 {
        return Err(invalid(format!(
            "domain {domid} claims a p2m of {max_pfn} frames"
        )));
    }
    let per = pv::ENTRIES as u64;
    let p2m_pages = max_pfn.div_ceil(per) as usize;
    let lists = p2m_pages.div_ceil(pv::ENTRIES);
    let top = pv::frame_entries(&read_frames(xen, domid, &[fll])?);
    let list_frames = &top[..lists];
    let lists = pv::frame_entries(&read_frames(xen, domid, list_frames)?);
    let p2m_frames: Vec<u64> = lists[..p2m_pages].to_vec();
    let mut p2m = pv::frame_entries(&read_frames(xen, domid, &p2m_frames)?);
    p2m.truncate(max_pfn as usize);
    Ok((p2m, p2m_frames))
}

/// The machine frame behind virtual address `va` in a PV address space
/// whose top-level table is `l4`.
fn pv_walk(
    xen: &Arc<Xen>,
    domid: u32,
    l4: u64,
    va: u64,
    cache: &mut HashMap<u64, Vec<u8>>,
) -> Result<u64, XenError> {
    let mut mfn = l4;
    for level in (0..4).rev() {
        let idx = ((va >> (12 + 9 * level)) & 511) as usize;
        let page = match cache.entry(mfn) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(read_frames(xen, domid, &[mfn])?)
            }
        };
        let e = pv::read_u64(page, idx * 8);
        if e & 1 == 0 {
            return Err(invalid(format!(
                "domain {domid}: address {va:#x} is not mapped (level {})",
                level + 1
            )));
        }
        mfn = (e & pv::PTE_FRAME_MASK) >> 12;
    }
    Ok(mfn)
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
    /// Attaches to `domid` as a migration source. For an HVM or PVH
    /// domain the layout is the frames from 0 to its maximum GFN that
    /// map. For a 64-bit PV domain it is the guest frames its published
    /// p2m gives memory, less its xenstore and console ring pages (see
    /// [`XenDomain::attach_pv_destination`] for the other end).
    pub fn attach(xen: Arc<Xen>, domid: u32) -> Result<Self, XenError> {
        let info = xen.domain_info(domid)?;
        if !info.hvm {
            return Self::attach_pv(xen, domid, &info);
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
            pv: None,
            window: Arc::default(),
            pager: None,
        })
    }

    fn check_pv_width(xen: &Xen, domid: u32) -> Result<(), XenError> {
        let w = xen.guest_width(domid)?;
        if w != 8 {
            return Err(invalid(format!(
                "domain {domid} is a {}-bit PV guest; this backend moves 64-bit PV guests",
                w * 8
            )));
        }
        Ok(())
    }

    fn attach_pv(xen: Arc<Xen>, domid: u32, info: &DomainInfo) -> Result<Self, XenError> {
        Self::check_pv_width(&xen, domid)?;
        let (p2m, _) = published_p2m(&xen, domid, info.shared_info_frame)?;
        let pairs = backed(&p2m);
        let mfns: Vec<u64> = pairs.iter().map(|&(_, m)| m).collect();
        let types = xen.page_types(domid, &mfns)?;
        let m2p: HashMap<u64, u64> = pairs.iter().map(|&(p, m)| (m, p)).collect();
        let ring = |what: &str| -> Result<u64, XenError> {
            let v = xenstore_read(&format!("/local/domain/{domid}/{what}/ring-ref"))?;
            let mfn: u64 = v
                .parse()
                .map_err(|_| invalid(format!("{what}/ring-ref of domain {domid} is {v:?}")))?;
            m2p.get(&mfn).copied().ok_or_else(|| {
                invalid(format!(
                    "domain {domid}'s {what} ring (frame {mfn:#x}) is not in its p2m"
                ))
            })
        };
        let store_pfn = ring("store")?;
        let console_pfn = ring("console")?;
        let present = pairs
            .iter()
            .zip(&types)
            .filter(|((p, _), &t)| !pv::unusable(t) && *p != store_pfn && *p != console_pfn)
            .map(|((p, _), _)| *p);
        let layout = MemoryLayout::new(PageSize::DEFAULT, regions_of(present))
            .map_err(|e| invalid(format!("domain {domid}: {e}")))?;
        let max_gpfn = xen.maximum_gpfn(domid)?.max(p2m.len() as u64 - 1);
        Ok(XenDomain {
            xen,
            domid,
            layout,
            max_gpfn,
            pv: Some(Arc::new(PvInfo {
                p2m,
                m2p,
                shared_info_frame: info.shared_info_frame,
                store_pfn,
                console_pfn,
                store_evtchn: 0,
                console_evtchn: 0,
                unsettled: Mutex::default(),
            })),
            window: Arc::default(),
            pager: None,
        })
    }

    /// Makes `domid`, a 64-bit PV domain the toolstack built with the
    /// source's configuration and left paused (`xl create -p`), ready to
    /// receive `source`: it reads the p2m and the xenstore and console
    /// connections the domain builder made (these ring pages must be at
    /// the same guest frames as the source's, and stay), takes the
    /// domain's vCPUs down and unpins its page tables, and gives it
    /// memory at exactly the source's guest frames. What the builder
    /// loaded is overwritten by the migration.
    pub fn attach_pv_destination(
        xen: Arc<Xen>,
        domid: u32,
        source: &SourceFrames,
    ) -> Result<Self, XenError> {
        if !source.pv {
            return Err(invalid("the source is not a PV domain"));
        }
        let info = xen.domain_info(domid)?;
        if info.hvm {
            return Err(invalid(format!(
                "domain {domid} is an HVM/PVH domain and the source is PV"
            )));
        }
        if !info.paused {
            return Err(invalid(format!(
                "domain {domid} is running; create it paused (xl create -p)"
            )));
        }
        Self::check_pv_width(&xen, domid)?;
        // What the domain builder set up: vCPU 0 starts with rsi at the
        // start-info page, which gives the p2m's virtual address.
        let ctx0 = VcpuContext::new(xen.pv_vcpu_context(domid, 0)?).map_err(invalid)?;
        let l4 = ctx0.cr3_frame();
        let mut cache = HashMap::new();
        let si_mfn = pv_walk(&xen, domid, l4, ctx0.rsi(), &mut cache)?;
        let si = read_frames(&xen, domid, &[si_mfn])?;
        use pv::start_info as sinfo;
        let nr_pages = pv::read_u64(&si, sinfo::NR_PAGES);
        let mfn_list = pv::read_u64(&si, sinfo::MFN_LIST);
        if nr_pages == 0 || nr_pages > 1 << 28 {
            return Err(invalid(format!(
                "domain {domid}'s start info claims {nr_pages} pages: has the toolstack built it?"
            )));
        }
        let p2m_pages = (nr_pages * 8).div_ceil(4096);
        let mut p2m_frames = Vec::with_capacity(p2m_pages as usize);
        for k in 0..p2m_pages {
            p2m_frames.push(pv_walk(&xen, domid, l4, mfn_list + k * 4096, &mut cache)?);
        }
        let mut p2m = pv::frame_entries(&read_frames(&xen, domid, &p2m_frames)?);
        p2m.truncate(nr_pages as usize);
        let find = |mfn: u64, what: &str| -> Result<u64, XenError> {
            p2m.iter()
                .position(|&m| m == mfn)
                .map(|p| p as u64)
                .ok_or_else(|| {
                    invalid(format!(
                        "domain {domid}'s {what} ring (frame {mfn:#x}) is not in its p2m"
                    ))
                })
        };
        let store_pfn = find(pv::read_u64(&si, sinfo::STORE_MFN), "xenstore")?;
        let console_pfn = find(pv::read_u64(&si, sinfo::CONSOLE_MFN), "console")?;
        if (store_pfn, console_pfn) != (source.store_pfn, source.console_pfn) {
            return Err(invalid(format!(
                "domain {domid} has its xenstore and console rings at frames {store_pfn:#x} and {console_pfn:#x}, the source at {:#x} and {:#x}: create the destination with the same configuration",
                source.store_pfn, source.console_pfn
            )));
        }
        let store_evtchn = pv::read_u32(&si, sinfo::STORE_EVTCHN);
        let console_evtchn = pv::read_u32(&si, sinfo::CONSOLE_EVTCHN);
        // Take the vCPUs down (they drop their page tables) and unpin
        // what the builder pinned, so that every page can be written.
        for v in 0..=info.max_vcpu_id {
            xen.set_pv_vcpu_context(domid, v, None)?;
        }
        let have = backed(&p2m);
        let mfns: Vec<u64> = have.iter().map(|&(_, m)| m).collect();
        let types = xen.page_types(domid, &mfns)?;
        let unpin: Vec<(u32, u64)> = mfns
            .iter()
            .zip(&types)
            .filter(|(_, &t)| pv::table_level(t).is_some() && pv::pinned(t))
            .map(|(&m, _)| (sys::MMUEXT_UNPIN_TABLE, m))
            .collect();
        xen.mmuext(domid, &unpin)?;
        // Memory at exactly the source's frames.
        let want: BTreeSet<u64> = source
            .layout
            .pages()
            .chain([store_pfn, console_pfn])
            .collect();
        let drop: Vec<u64> = have
            .iter()
            .filter(|(p, _)| !want.contains(p))
            .map(|&(_, m)| m)
            .collect();
        xen.decrease_reservation(domid, &drop)?;
        for &(p, _) in have.iter().filter(|(p, _)| !want.contains(p)) {
            p2m[p as usize] = pv::INVALID_MFN;
        }
        let add: Vec<u64> = want
            .iter()
            .copied()
            .filter(|&p| {
                p2m.get(p as usize)
                    .copied()
                    .and_then(pv::p2m_entry_mfn)
                    .is_none()
            })
            .collect();
        let got = xen.populate(domid, &add)?;
        for (&p, &m) in add.iter().zip(&got) {
            if p as usize >= p2m.len() {
                p2m.resize(p as usize + 1, pv::INVALID_MFN);
            }
            p2m[p as usize] = m;
        }
        let m2p: HashMap<u64, u64> = backed(&p2m).into_iter().map(|(p, m)| (m, p)).collect();
        let max_gpfn = p2m.len() as u64 - 1;
        Ok(XenDomain {
            xen,
            domid,
            layout: source.layout.clone(),
            max_gpfn,
            pv: Some(Arc::new(PvInfo {
                p2m,
                m2p,
                shared_info_frame: info.shared_info_frame,
                store_pfn,
                console_pfn,
                store_evtchn,
                console_evtchn,
                unsettled: Mutex::default(),
            })),
            window: Arc::default(),
            pager: None,
        })
    }

    /// The same destination with `pager` serving post-copy: a discard
    /// pages the frame out, and a frame that is out is paged back in with
    /// what arrives.
    pub fn with_pager(mut self, pager: Arc<Pager>) -> Self {
        self.pager = Some(pager);
        self
    }

    /// Whether this is a PV domain.
    pub fn is_pv(&self) -> bool {
        self.pv.is_some()
    }

    /// What a destination must know of this source before the stream
    /// begins.
    pub fn source_frames(&self) -> SourceFrames {
        SourceFrames {
            pv: self.pv.is_some(),
            layout: self.layout.clone(),
            store_pfn: self.pv.as_ref().map_or(0, |p| p.store_pfn),
            console_pfn: self.pv.as_ref().map_or(0, |p| p.console_pfn),
        }
    }

    /// The frame to map for guest frame `pfn`: itself for HVM/PVH, its
    /// machine frame for PV ([`pv::INVALID_MFN`] if it has none).
    fn frame(&self, pfn: u64) -> u64 {
        match &self.pv {
            None => pfn,
            Some(p) => p.mfn(pfn).unwrap_or(pv::INVALID_MFN),
        }
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
        XenPages { d: self.clone() }
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
            resume_window: ResumeWindow::default(),
        }
    }
}

/// What a destination must know of the source before the stream begins:
/// whether it is PV, its frames and, for PV, where its xenstore and
/// console rings are (a PV destination is given memory at exactly these
/// frames; an HVM/PVH destination migrates the frames both have).
///
/// Between two processes it travels as one line of text:
/// `xen-migrate/1 pv|hvm STORE CONSOLE FIRST+COUNT,...` (frames in hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFrames {
    /// A PV source.
    pub pv: bool,
    /// The frames that migrate.
    pub layout: MemoryLayout,
    /// PV: the xenstore ring's guest frame (0 otherwise).
    pub store_pfn: u64,
    /// PV: the console ring's guest frame (0 otherwise).
    pub console_pfn: u64,
}

/// The protocol tag of [`SourceFrames::to_line`].
pub const FRAMES_TAG: &str = "xen-migrate/1";

/// Writes regions as `FIRST+COUNT,...` (hex first frame, decimal count).
pub fn regions_to_text(layout: &MemoryLayout) -> String {
    layout
        .regions()
        .iter()
        .map(|r| format!("{:x}+{}", r.first_page, r.pages))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads what [`regions_to_text`] wrote, refusing anything else
/// (overlapping or unordered regions, more than `max_pages` pages).
pub fn regions_from_text(text: &str, max_pages: u64) -> Result<MemoryLayout, XenError> {
    let mut regions = Vec::new();
    let mut total = 0u64;
    for part in text.split(',') {
        let (first, n) = part
            .split_once('+')
            .ok_or_else(|| invalid(format!("region {part:?} is not FIRST+COUNT")))?;
        let first_page = u64::from_str_radix(first, 16)
            .map_err(|_| invalid(format!("region start {first:?} is not a hex frame")))?;
        let pages: u64 = n
            .parse()
            .map_err(|_| invalid(format!("region count {n:?} is not a number")))?;
        total = total.saturating_add(pages);
        if total > max_pages {
            return Err(invalid(format!("regions hold more than {max_pages} pages")));
        }
        regions.push(Region { first_page, pages });
    }
    MemoryLayout::new(PageSize::DEFAULT, regions).map_err(|e| invalid(format!("regions: {e}")))
}

/// The most pages a peer may announce (16 TiB of 4 KiB pages).
pub const MAX_ANNOUNCED_PAGES: u64 = 1 << 32;

impl SourceFrames {
    /// The line that announces it (no newline).
    pub fn to_line(&self) -> String {
        format!(
            "{FRAMES_TAG} {} {:x} {:x} {}",
            if self.pv { "pv" } else { "hvm" },
            self.store_pfn,
            self.console_pfn,
            regions_to_text(&self.layout)
        )
    }

    /// Reads a line from [`SourceFrames::to_line`]; anything else is an
    /// `Invalid` error that says what was wrong.
    pub fn from_line(line: &str) -> Result<Self, XenError> {
        let f: Vec<&str> = line.trim_end().split(' ').collect();
        if f.len() != 5 || f[0] != FRAMES_TAG {
            return Err(invalid(format!(
                "expected \"{FRAMES_TAG} pv|hvm STORE CONSOLE REGIONS\", got {:?}",
                line.chars().take(80).collect::<String>()
            )));
        }
        let pv = match f[1] {
            "pv" => true,
            "hvm" => false,
            k => return Err(invalid(format!("domain kind {k:?} is neither pv nor hvm"))),
        };
        let hex = |s: &str, what: &str| {
            u64::from_str_radix(s, 16)
                .map_err(|_| invalid(format!("{what} frame {s:?} is not hex")))
        };
        Ok(SourceFrames {
            pv,
            store_pfn: hex(f[2], "xenstore")?,
            console_pfn: hex(f[3], "console")?,
            layout: regions_from_text(f[4], MAX_ANNOUNCED_PAGES)?,
        })
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
}

/// Splits `pages` into the batches one mapping call each covers.
pub fn batches(pages: &[PageNum]) -> impl Iterator<Item = &[PageNum]> {
    pages.chunks(MAP_BATCH)
}

impl XenPages {
    /// Rewrites the page tables among `pages` (just read into `out`) to
    /// canonical form, as their types are now.
    fn canonicalise(
        &self,
        pv: &PvInfo,
        pages: &[PageNum],
        frames: &[u64],
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        let types = self.d.xen.page_types(self.d.domid, frames).map_err(be)?;
        let mut unsettled = pv.unsettled.lock().unwrap_or_else(|e| e.into_inner());
        for (i, (&p, &t)) in pages.iter().zip(&types).enumerate() {
            let Some(level) = pv::table_level(t) else {
                unsettled.remove(&p);
                continue;
            };
            let page = &mut out[i * 4096..(i + 1) * 4096];
            let foreign = pv::canonicalise_table(page, level, &|m| pv.pfn(m)).map_err(|e| {
                BackendError::new(
                    BackendErrorKind::Unsupported,
                    format!("domain {} frame {p:#x}: {e}", self.d.domid),
                )
            })?;
            if foreign > 0 {
                unsettled.insert(p);
            } else {
                unsettled.remove(&p);
            }
        }
        Ok(())
    }

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
            let frames: Vec<u64> = batch.iter().map(|&p| self.d.frame(p)).collect();
            let m = self.d.xen.map(self.d.domid, &frames, false).map_err(be)?;
            let first = at;
            for i in 0..batch.len() {
                m.read(i, &mut out[at..at + 4096]).map_err(be)?;
                at += 4096;
            }
            drop(m);
            if let Some(pv) = &self.d.pv {
                self.canonicalise(pv, batch, &frames, &mut out[first..at])?;
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
        if let Some(pager) = &self.d.pager {
            if pager.is_out(page) {
                return pager.page_in(page, data).map_err(be);
            }
        }
        let mut window = self.d.window.lock().unwrap_or_else(|e| e.into_inner());
        let fits = matches!(&*window, Some(w) if page >= w.first && page < w.first + MAP_BATCH as u64 && w.mapped[(page - w.first) as usize]);
        if !fits {
            *window = None;
            let end = (page + MAP_BATCH as u64).min(self.d.max_gpfn + 1);
            // Mapping a frame that is paged out makes libxenforeignmemory
            // wait until it is paged in, which only this thread would do:
            // such slots map `page` (which is in) again, and are not used.
            let out = |p: u64| self.d.pager.as_ref().is_some_and(|g| g.is_out(p));
            let mapped: Vec<bool> = (page..end).map(|p| !out(p)).collect();
            let frames: Vec<u64> = (page..end)
                .zip(&mapped)
                .map(|(p, &m)| {
                    if m {
                        self.d.frame(p)
                    } else {
                        self.d.frame(page)
                    }
                })
                .collect();
            let map = self.d.xen.map(self.d.domid, &frames, true).map_err(be)?;
            *window = Some(Window {
                first: page,
                map,
                mapped,
            });
        }
        let w = window.as_ref().expect("window just mapped");
        w.map.write((page - w.first) as usize, data).map_err(be)
    }

    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.discard_pages(&[page])
    }

    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        let Some(pager) = &self.d.pager else {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "domain {} has no pager: post-copy on Xen needs memory paging (see backend_xen::paging)",
                    self.d.domid
                ),
            ));
        };
        // A frame mapped here cannot be paged out.
        *self.d.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for &p in pages {
            self.in_layout(p)?;
            pager.page_out(p).map_err(be)?;
        }
        Ok(())
    }
}

/// The sink's writable window: `MAP_BATCH` frames from `first`; a slot
/// not `mapped` holds another frame and is not written through.
#[derive(Debug)]
struct Window {
    first: u64,
    map: Mapping,
    mapped: Vec<bool>,
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
    resume_window: ResumeWindow,
}

impl XenControl {
    /// How long [`StopMode::Suspend`] waits for the guest to suspend.
    pub fn with_suspend_timeout(mut self, t: Duration) -> Self {
        self.suspend_timeout = t;
        self
    }

    /// How much around each vCPU's registers a post-copy source sends
    /// before the resume (see [`GuestControl::resume_pages`] and
    /// [`crate::walk`]).
    pub fn with_resume_window(mut self, w: ResumeWindow) -> Self {
        self.resume_window = w;
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

fn pv_err(domid: u32, e: impl std::fmt::Display) -> BackendError {
    BackendError::new(
        BackendErrorKind::IncompatibleState,
        format!("PV domain {domid}: {e}"),
    )
}

impl XenControl {
    /// The source's PV state, taken while the guest is suspended.
    fn save_pv(&mut self, pv: &PvInfo) -> Result<DeviceState, BackendError> {
        let d = &self.d;
        let domid = d.domid;
        if !self.suspended {
            return Err(pv_err(
                domid,
                "the state of a PV guest is taken after it suspends itself (stop mode suspend)",
            ));
        }
        if let Some(p) = pv
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
        {
            return Err(pv_err(
                domid,
                format!("page table {p:#x} still maps a frame that is not the guest's"),
            ));
        }
        let info = d.info().map_err(be)?;
        let m2p = |m: u64| pv.pfn(m);
        let mut vcpus = Vec::new();
        for v in 0..=info.max_vcpu_id {
            let mut c = VcpuContext::new(d.xen.pv_vcpu_context(domid, v).map_err(be)?)
                .map_err(|e| pv_err(domid, e))?;
            if !c.online() {
                vcpus.push(None);
                continue;
            }
            c.translate(v == 0, &m2p)
                .map_err(|e| pv_err(domid, format!("vCPU {v}: {e}")))?;
            vcpus.push(Some(c));
        }
        let start_info_pfn = match &vcpus.first() {
            Some(Some(c)) => c.rdx(),
            _ => return Err(pv_err(domid, "vCPU 0 is down")),
        };
        let mut shared_info = read_frames(&d.xen, domid, &[pv.shared_info_frame]).map_err(be)?;
        let fll = pv::read_u64(&shared_info, pv::shared_info::FRAME_LIST_LIST);
        pv::write_u64(
            &mut shared_info,
            pv::shared_info::FRAME_LIST_LIST,
            m2p(fll).unwrap_or(0),
        );
        // The memory map must be the one the migration used.
        let (now, frames) = published_p2m(&d.xen, domid, pv.shared_info_frame).map_err(be)?;
        for p in d.layout.pages() {
            if now.get(p as usize).copied().and_then(pv::p2m_entry_mfn) != pv.mfn(p) {
                return Err(pv_err(
                    domid,
                    format!("the guest changed its memory map during the migration (frame {p:#x})"),
                ));
            }
        }
        let p2m_frames = frames
            .iter()
            .map(|&m| {
                m2p(m).ok_or_else(|| pv_err(domid, format!("p2m frame {m:#x} is not the guest's")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pages: Vec<u64> = d.layout.pages().collect();
        let mfns: Vec<u64> = pages.iter().map(|&p| d.frame(p)).collect();
        let types = d.xen.page_types(domid, &mfns).map_err(be)?;
        let page_tables = pages
            .iter()
            .zip(&types)
            .filter(|(_, &t)| pv::table_level(t).is_some())
            .map(|(&p, &t)| (p, t))
            .collect();
        Ok(PvState {
            vcpus,
            shared_info,
            start_info_pfn,
            page_tables,
            p2m_frames,
        }
        .to_device_state())
    }

    /// Makes the received PV guest runnable: local page tables, p2m,
    /// start info and shared info, pinned tables, vCPU contexts.
    fn restore_pv(&mut self, pv: &PvInfo, state: &DeviceState) -> Result<(), BackendError> {
        let s = PvState::from_device_state(state)?;
        let d = &self.d;
        let domid = d.domid;
        // Pages mapped writable cannot become page tables.
        *d.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let p2m = |p: u64| pv.mfn(p);
        let need = |p: u64, what: &str| {
            p2m(p).ok_or_else(|| {
                pv_err(
                    domid,
                    format!("{what} frame {p:#x} is not in the destination"),
                )
            })
        };
        // Rewrite pages in place, in batches.
        type Edit<'a> = &'a dyn Fn(usize, &mut [u8]) -> Result<(), String>;
        let rewrite = |list: &[(u64, usize)], f: Edit<'_>| -> Result<(), BackendError> {
            for chunk in list.chunks(MAP_BATCH) {
                let frames = chunk
                    .iter()
                    .map(|&(p, _)| need(p, "page"))
                    .collect::<Result<Vec<_>, _>>()?;
                let m = d.xen.map(domid, &frames, true).map_err(be)?;
                let mut page = vec![0u8; 4096];
                for (j, &(p, k)) in chunk.iter().enumerate() {
                    m.read(j, &mut page).map_err(be)?;
                    f(k, &mut page).map_err(|e| pv_err(domid, format!("frame {p:#x}: {e}")))?;
                    m.write(j, &page).map_err(be)?;
                }
            }
            Ok(())
        };
        let tables: Vec<(u64, usize)> = s
            .page_tables
            .iter()
            .enumerate()
            .map(|(k, &(p, _))| (p, k))
            .collect();
        rewrite(&tables, &|k, page| {
            let level = pv::table_level(s.page_tables[k].1).ok_or("not a page table")?;
            pv::localise_table(page, level, &p2m)
        })?;
        let p2m_pages: Vec<(u64, usize)> = s
            .p2m_frames
            .iter()
            .enumerate()
            .map(|(k, &p)| (p, k))
            .collect();
        rewrite(&p2m_pages, &|k, page| {
            pv::localise_p2m_page(page, (k * pv::ENTRIES) as u64, &p2m)
        })?;
        use pv::start_info as sinfo;
        let store = need(pv.store_pfn, "xenstore ring")?;
        let console = need(pv.console_pfn, "console ring")?;
        rewrite(&[(s.start_info_pfn, 0)], &|_, page| {
            pv::write_u64(page, sinfo::SHARED_INFO, pv.shared_info_frame << 12);
            pv::write_u64(page, sinfo::STORE_MFN, store);
            pv::write_u32(page, sinfo::STORE_EVTCHN, pv.store_evtchn);
            pv::write_u64(page, sinfo::CONSOLE_MFN, console);
            pv::write_u32(page, sinfo::CONSOLE_EVTCHN, pv.console_evtchn);
            Ok(())
        })?;
        // Shared info: the source's vCPU and architecture parts, no
        // event pending and every channel masked (the guest binds its
        // channels again when it resumes).
        {
            use pv::shared_info as si;
            let m = d
                .xen
                .map(domid, &[pv.shared_info_frame], true)
                .map_err(be)?;
            let mut page = vec![0u8; 4096];
            m.read(0, &mut page).map_err(be)?;
            page[si::VCPU_INFO..si::VCPU_INFO + si::VCPU_INFO_LEN]
                .copy_from_slice(&s.shared_info[si::VCPU_INFO..si::VCPU_INFO + si::VCPU_INFO_LEN]);
            page[si::ARCH..si::ARCH + si::ARCH_LEN]
                .copy_from_slice(&s.shared_info[si::ARCH..si::ARCH + si::ARCH_LEN]);
            let fll = pv::read_u64(&page, si::FRAME_LIST_LIST);
            pv::write_u64(&mut page, si::FRAME_LIST_LIST, p2m(fll).unwrap_or(0));
            page[si::EVTCHN_PENDING..si::EVTCHN_PENDING + si::EVTCHN_LEN].fill(0);
            page[si::EVTCHN_MASK..si::EVTCHN_MASK + si::EVTCHN_LEN].fill(0xff);
            for v in 0..32 {
                let at = si::VCPU_INFO + v * si::VCPU_INFO_SIZE;
                page[at + si::UPCALL_PENDING] = 0;
                pv::write_u64(&mut page, at + si::PENDING_SEL, 0);
            }
            m.write(0, &page).map_err(be)?;
        }
        let pins = s
            .page_tables
            .iter()
            .filter(|(_, t)| pv::pinned(*t))
            .map(|&(p, t)| {
                let level = pv::table_level(t).unwrap_or(1);
                Ok((pv::pin_command(level), need(p, "page-table")?))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        d.xen.mmuext(domid, &pins).map_err(be)?;
        for (v, c) in s.vcpus.iter().enumerate() {
            let Some(c) = c else { continue };
            let mut c = c.clone();
            c.translate(v == 0, &p2m)
                .map_err(|e| pv_err(domid, format!("vCPU {v}: {e}")))?;
            d.xen
                .set_pv_vcpu_context(domid, v as u32, Some(&c.0))
                .map_err(be)?;
        }
        Ok(())
    }
}

impl GuestControl for XenControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        if self.d.pv.is_some() && self.stop == StopMode::Pause {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "a PV guest must suspend itself to move (stop mode suspend): its page tables hold machine frames that only a suspended guest has put in order",
            ));
        }
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
        if let Some(pv) = self.d.pv.clone() {
            return self.save_pv(&pv);
        }
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
        if let Some(pv) = self.d.pv.clone() {
            return self.restore_pv(&pv, state);
        }
        *self.d.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
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

    /// HVM/PVH: the frames each stopped vCPU points at (its per-CPU
    /// area, stack, code and descriptor tables, and the page tables on
    /// the way), found by walking the guest's page tables from its
    /// registers. A resuming guest hands Xen frames from these (Linux's
    /// `vcpu_info` is in its per-CPU area), and Xen refuses paged-out
    /// ones. PV guests have no post-copy and name none.
    fn resume_pages(&mut self) -> Result<Vec<PageNum>, BackendError> {
        if self.d.pv.is_some() {
            return Ok(Vec::new());
        }
        let domid = self.d.domid;
        let context = self.d.xen.hvm_context(domid).map_err(be)?;
        let cpus = walk::vcpu_regs(&context).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Other,
                format!("domain {domid}: the hypervisor's context record is malformed"),
            )
        })?;
        let xen = self.d.xen.clone();
        let max = self.d.max_gpfn;
        let mut walker = walk::Walker::new(|gfn: u64| {
            if gfn > max {
                return None;
            }
            read_frames(&xen, domid, &[gfn]).ok()
        });
        let set = walker.resume_set(&cpus, self.resume_window);
        tracing::debug!(domid, vcpus = cpus.len(), pages = set.len(), "resume set");
        Ok(set.into_iter().collect())
    }

    fn guest_cpu_time(&self) -> Option<Duration> {
        self.d
            .info()
            .ok()
            .map(|i| Duration::from_nanos(i.cpu_time_ns))
    }
}

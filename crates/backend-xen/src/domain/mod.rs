//! A Xen domain (HVM, PVH or 64-bit PV) as a migration source or
//! destination.
//!
//! [`XenDomain::attach`] finds which guest frames the domain has (its
//! memory layout, holes excluded) and hands out the core's backend
//! traits: [`XenDirtyTracker`] (log-dirty), [`XenPages`] (foreign
//! mappings, in batches) and [`XenControl`] (pause, resume, the HVM
//! context and parameters, or the PV state). A destination is a domain
//! the toolstack created, paused, with the same configuration
//! (`xl create -p`).
//!
//! One file a job: `attach.rs` (finding a domain's frames), `frames.rs`
//! (which frames a migration moves), `dirty.rs` (log-dirty), `pages.rs`
//! (reading and writing frames), `control.rs` (pause, resume, state).
//! The kinds of domain differ in how frames are named and state is
//! saved; a private `DomainKind` says which one a domain is.

mod attach;
mod control;
mod dirty;
mod frames;
mod pages;
#[cfg(test)]
mod tests;

use crate::frame::{Mfn, Pfn};
use pages::Window;

pub use control::{StopMode, XenControl};
pub use dirty::XenDirtyTracker;
#[cfg(test)]
use dirty::{bitmap_from_xen, layout_mask};
pub use frames::{common_layout, SourceFrames, SPECIAL_AREA};
#[cfg(test)]
use pages::batches;
pub use pages::XenPages;

use crate::paging::Pager;
use crate::pv::{self};
use crate::xc::{DomainInfo, Xen, XenError};
use migrate_core::{BackendError, BackendErrorKind};
use migrate_core::{MemoryLayout, Region};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;

/// Frames mapped per foreign-mapping call.
pub(crate) const MAP_BATCH: usize = 1024;

pub(crate) fn be(e: XenError) -> BackendError {
    let kind = match &e {
        XenError::Library { .. } | XenError::Symbol { .. } | XenError::Open { .. } => {
            BackendErrorKind::Unsupported
        }
        XenError::NoDomain(_) | XenError::Invalid(_) => BackendErrorKind::InvalidArgument,
        XenError::Call { .. } => BackendErrorKind::Io,
    };
    BackendError::with_source(kind, e.to_string(), e)
}

/// A domain attached for migration.
#[derive(Debug, Clone)]
pub struct XenDomain {
    xen: Arc<Xen>,
    domid: u32,
    layout: MemoryLayout,
    max_gpfn: u64,
    /// HVM/PVH, or PV with its frames and what its toolstack connected.
    kind: DomainKind,
    /// The sink's writable window, shared so that the destination's
    /// restore can drop it (a page mapped writable cannot become a page
    /// table).
    window: Arc<Mutex<Option<Window>>>,
    /// A post-copy destination's pager.
    pager: Option<Arc<Pager>>,
}

/// The kinds of domain, which differ in how their memory is named and
/// their state saved: an HVM or PVH domain's frames are its guest frames
/// and its state is an HVM context; a PV domain maps machine frames
/// through its p2m, and its page tables and vCPU contexts move instead.
#[derive(Debug, Clone)]
enum DomainKind {
    /// HVM or PVH.
    Hvm,
    /// 64-bit PV, with its p2m and toolstack-connected frames.
    Pv(Arc<PvInfo>),
}

impl DomainKind {
    /// The PV part, for a PV domain.
    fn pv(&self) -> Option<&Arc<PvInfo>> {
        match self {
            DomainKind::Hvm => None,
            DomainKind::Pv(p) => Some(p),
        }
    }
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
    /// The machine frame behind guest frame `pfn`, if it has one.
    fn mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.p2m
            .get(pfn.0 as usize)
            .copied()
            .and_then(pv::p2m_entry_mfn)
            .map(Mfn)
    }
    /// The guest frame that machine frame `mfn` backs, if it is the guest's.
    fn pfn(&self, mfn: Mfn) -> Option<Pfn> {
        self.m2p.get(&mfn.0).copied().map(Pfn)
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

/// Groups the frames that map into regions of consecutive frames.
pub(crate) fn regions_of(present: impl IntoIterator<Item = u64>) -> Vec<Region> {
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
    /// The same destination with `pager` serving post-copy: a discard
    /// pages the frame out, and a frame that is out is paged back in with
    /// what arrives.
    pub fn with_pager(mut self, pager: Arc<Pager>) -> Self {
        self.pager = Some(pager);
        self
    }

    /// Whether this is a PV domain.
    pub fn is_pv(&self) -> bool {
        matches!(self.kind, DomainKind::Pv(_))
    }

    /// What a destination must know of this source before the stream
    /// begins.
    pub fn source_frames(&self) -> SourceFrames {
        SourceFrames {
            pv: self.is_pv(),
            layout: self.layout.clone(),
            store_pfn: Pfn(self.kind.pv().map_or(0, |p| p.store_pfn)),
            console_pfn: Pfn(self.kind.pv().map_or(0, |p| p.console_pfn)),
        }
    }

    /// The frame to map for guest frame `pfn`: itself for HVM/PVH, its
    /// machine frame for PV ([`pv::INVALID_MFN`] if it has none).
    fn frame(&self, pfn: u64) -> u64 {
        match &self.kind {
            DomainKind::Hvm => pfn,
            DomainKind::Pv(p) => p.mfn(Pfn(pfn)).map_or(pv::INVALID_MFN, |m| m.0),
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
}

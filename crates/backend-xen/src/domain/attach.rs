//! Attaching to a domain: reading which frames it has (and, for PV, its
//! p2m and the frames its toolstack connected), as a source or as a
//! prepared destination.

use super::frames::SourceFrames;
use super::{backed, invalid, read_frames, regions_of, DomainKind, PvInfo, XenDomain, MAP_BATCH};
use crate::pv::{self, VcpuContext};
use crate::sys;
use crate::xc::{DomainInfo, Xen, XenError};
use migrate_core::{MemoryLayout, PageSize};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;

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
pub(super) fn published_p2m(
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
            kind: DomainKind::Hvm,
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
            kind: DomainKind::Pv(Arc::new(PvInfo {
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
        if (store_pfn, console_pfn) != (source.store_pfn.0, source.console_pfn.0) {
            return Err(invalid(format!(
                "domain {domid} has its xenstore and console rings at frames {store_pfn:#x} and {console_pfn:#x}, the source at {:#x} and {:#x}: create the destination with the same configuration",
                source.store_pfn.0, source.console_pfn.0
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
            kind: DomainKind::Pv(Arc::new(PvInfo {
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
}

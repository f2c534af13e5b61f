//! 64-bit PV domains: the frame translation a PV guest needs to move.
//!
//! A PV guest is not translated: its page tables, its descriptor tables
//! and the registers that name them hold *machine* frames, which differ
//! between the source and destination domains. It keeps its own
//! pseudo-physical map (the p2m, pfn → mfn) in its memory, and tells the
//! toolstack where through its shared-info page (a three-level list of
//! the frames that hold the p2m).
//!
//! The migration moves every page by guest frame (pfn) in *canonical*
//! form: in a page that is a page table, each present entry names a pfn
//! instead of an mfn (and the hypervisor's slots of a top-level table are
//! cleared); the vCPU contexts are canonical likewise. The destination
//! writes what arrives, and when the device state comes it makes the page
//! tables and contexts local again with its own p2m, writes its p2m into
//! the guest's, fixes the start-info page, and pins the page tables that
//! were pinned on the source.
//!
//! The pure parts (entries, contexts, the state record) are here and are
//! tested without Xen; [`crate::domain`] drives them against a domain.

use crate::sys;
use migrate_core::{BackendError, BackendErrorKind, DeviceState};
use std::mem::offset_of;

/// Entries in one page of the p2m, or of a page table.
pub(crate) const ENTRIES: usize = 512;
/// Xen's "no frame".
pub(crate) const INVALID_MFN: u64 = u64::MAX;
/// A p2m entry for a frame granted by another domain.
pub(crate) const FOREIGN_FRAME_BIT: u64 = 1 << 63;
/// A p2m entry for an identity-mapped (I/O) frame.
pub(crate) const IDENTITY_FRAME_BIT: u64 = 1 << 62;
/// The frame bits of a page-table entry (bits 12 to 51).
pub(crate) const PTE_FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
const PTE_PRESENT: u64 = 1;
const PTE_PSE: u64 = 1 << 7;
/// The slots of a 64-bit PV guest's top-level table that belong to the
/// hypervisor (Xen fills them when the table is pinned).
pub(crate) const XEN_L4_SLOTS: std::ops::RangeInclusive<usize> = 256..=271;

/// The page-table level of a page type from `xc_get_pfn_type_batch`
/// (1 to 4), or `None` for a page that is not a page table.
pub(crate) fn table_level(page_type: u32) -> Option<u8> {
    match page_type & sys::XEN_DOMCTL_PFINFO_LTABTYPE_MASK {
        sys::XEN_DOMCTL_PFINFO_L1TAB => Some(1),
        sys::XEN_DOMCTL_PFINFO_L2TAB => Some(2),
        sys::XEN_DOMCTL_PFINFO_L3TAB => Some(3),
        sys::XEN_DOMCTL_PFINFO_L4TAB => Some(4),
        _ => None,
    }
}

/// Whether a page type says the frame is not usable memory (invalid,
/// allocate-only or broken).
pub(crate) fn unusable(page_type: u32) -> bool {
    // These use bit 31 too, which for a page table means pinned.
    page_type == sys::XEN_DOMCTL_PFINFO_XTAB
        || page_type == sys::XEN_DOMCTL_PFINFO_XALLOC
        || page_type == sys::XEN_DOMCTL_PFINFO_BROKEN
}

/// Whether a page type says the page table is pinned.
pub(crate) fn pinned(page_type: u32) -> bool {
    page_type & sys::XEN_DOMCTL_PFINFO_LPINTAB != 0
}

/// The `MMUEXT_PIN_L*_TABLE` command for a level.
pub(crate) fn pin_command(level: u8) -> u32 {
    match level {
        1 => sys::MMUEXT_PIN_L1_TABLE,
        2 => sys::MMUEXT_PIN_L2_TABLE,
        3 => sys::MMUEXT_PIN_L3_TABLE,
        _ => sys::MMUEXT_PIN_L4_TABLE,
    }
}

/// The machine frame in a p2m entry, or `None` for an entry with no
/// memory of the guest's own behind it (invalid, foreign or identity).
pub(crate) fn p2m_entry_mfn(entry: u64) -> Option<u64> {
    if entry == INVALID_MFN || entry & (FOREIGN_FRAME_BIT | IDENTITY_FRAME_BIT) != 0 {
        None
    } else {
        Some(entry)
    }
}

fn entry(page: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

fn set_entry(page: &mut [u8], i: usize, v: u64) {
    page[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

/// The entries of a page of frame numbers (a p2m page or a frame list).
pub(crate) fn frame_entries(page: &[u8]) -> Vec<u64> {
    (0..page.len() / 8).map(|i| entry(page, i)).collect()
}

/// Rewrites one page-table page of level `level` (1 to 4) in place to
/// canonical form: every present entry's machine frame becomes the guest
/// frame `m2p` gives; the hypervisor's slots of a top-level table are
/// cleared. An entry whose frame is not the guest's (`m2p` gives `None`,
/// as for a mapping of the shared-info page while the guest runs) is
/// cleared; the number of such entries is returned, and the page must be
/// sent again before the end (a guest that suspends itself unmaps them).
/// A superpage entry is an error: PV guests have none.
pub(crate) fn canonicalise_table(
    page: &mut [u8],
    level: u8,
    m2p: &dyn Fn(u64) -> Option<u64>,
) -> Result<usize, String> {
    let mut foreign = 0;
    for i in 0..ENTRIES {
        if level == 4 && XEN_L4_SLOTS.contains(&i) {
            set_entry(page, i, 0);
            continue;
        }
        let e = entry(page, i);
        if e & PTE_PRESENT == 0 {
            continue;
        }
        if (level == 2 || level == 3) && e & PTE_PSE != 0 {
            return Err(format!("superpage entry {i} in a level-{level} table"));
        }
        let mfn = (e & PTE_FRAME_MASK) >> 12;
        match m2p(mfn) {
            Some(pfn) => set_entry(page, i, (e & !PTE_FRAME_MASK) | (pfn << 12)),
            None => {
                set_entry(page, i, 0);
                foreign += 1;
            }
        }
    }
    Ok(foreign)
}

/// The inverse of [`canonicalise_table`] on the destination: every
/// present entry's guest frame becomes the machine frame `p2m` gives; a
/// guest frame the domain does not have is an error.
pub(crate) fn localise_table(
    page: &mut [u8],
    level: u8,
    p2m: &dyn Fn(u64) -> Option<u64>,
) -> Result<(), String> {
    for i in 0..ENTRIES {
        if level == 4 && XEN_L4_SLOTS.contains(&i) {
            continue;
        }
        let e = entry(page, i);
        if e & PTE_PRESENT == 0 {
            continue;
        }
        let pfn = (e & PTE_FRAME_MASK) >> 12;
        let mfn = p2m(pfn).ok_or_else(|| {
            format!("entry {i} of a level-{level} table names frame {pfn:#x}, which the destination does not have")
        })?;
        set_entry(page, i, (e & !PTE_FRAME_MASK) | (mfn << 12));
    }
    Ok(())
}

/// Rewrites the valid entries of a page of the guest's p2m, which covers
/// guest frames `first_pfn..first_pfn + 512`, to the destination's
/// machine frames.
pub(crate) fn localise_p2m_page(
    page: &mut [u8],
    first_pfn: u64,
    p2m: &dyn Fn(u64) -> Option<u64>,
) -> Result<(), String> {
    for i in 0..ENTRIES {
        if p2m_entry_mfn(entry(page, i)).is_none() {
            continue;
        }
        let pfn = first_pfn + i as u64;
        let mfn = p2m(pfn).ok_or_else(|| {
            format!("the guest's p2m has frame {pfn:#x}, which the destination does not have")
        })?;
        set_entry(page, i, mfn);
    }
    Ok(())
}

/// A 64-bit PV vCPU context (`vcpu_guest_context_x86_64`) as bytes, with
/// the fields that name frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VcpuContext(pub Vec<u8>);

/// Size of a 64-bit PV vCPU context.
pub(crate) const VCPU_CONTEXT_SIZE: usize = std::mem::size_of::<sys::vcpu_guest_context_x86_64>();
const OFF_FLAGS: usize = offset_of!(sys::vcpu_guest_context_x86_64, flags);
const OFF_GDT_FRAMES: usize = offset_of!(sys::vcpu_guest_context_x86_64, gdt_frames);
const OFF_GDT_ENTS: usize = offset_of!(sys::vcpu_guest_context_x86_64, gdt_ents);
const OFF_CTRLREG: usize = offset_of!(sys::vcpu_guest_context_x86_64, ctrlreg);
const OFF_RDX: usize = offset_of!(sys::vcpu_guest_context_x86_64, user_regs)
    + offset_of!(sys::cpu_user_regs_x86_64, __bindgen_anon_13);

impl VcpuContext {
    fn get(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_le_bytes(b)
    }
    fn set(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Checks the size.
    pub(crate) fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() != VCPU_CONTEXT_SIZE {
            return Err(format!(
                "a PV vCPU context is {VCPU_CONTEXT_SIZE} bytes, not {}",
                bytes.len()
            ));
        }
        Ok(VcpuContext(bytes))
    }

    /// Whether the vCPU is up (`VGCF_online`).
    pub(crate) fn online(&self) -> bool {
        self.get(OFF_FLAGS) & u64::from(sys::VGCF_online) != 0
    }

    /// The frame of its top-level page table (`ctrlreg[3]`).
    pub(crate) fn cr3_frame(&self) -> u64 {
        self.get(OFF_CTRLREG + 3 * 8) >> 12
    }

    /// `rdx`: the start-info frame of vCPU 0 of a guest that suspended
    /// itself; `rsi`'s neighbour.
    pub(crate) fn rdx(&self) -> u64 {
        self.get(OFF_RDX)
    }

    /// `rsi`: the start-info page's virtual address in a domain the
    /// toolstack built and has not started.
    pub(crate) fn rsi(&self) -> u64 {
        self.get(OFF_RDX + 8)
    }

    /// Applies `f` to every field that names a frame: the kernel and user
    /// top-level tables (`ctrlreg[3]`, `ctrlreg[1]`), the descriptor-table
    /// frames in use, and, for vCPU 0 (`start_info`), `rdx`, which holds
    /// the start-info frame when the guest suspended itself.
    pub(crate) fn translate(
        &mut self,
        start_info: bool,
        f: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(), String> {
        for (reg, name) in [(3usize, "cr3"), (1, "the user page table (ctrlreg[1])")] {
            let v = self.get(OFF_CTRLREG + reg * 8);
            if v == 0 {
                continue;
            }
            let to = f(v >> 12)
                .ok_or_else(|| format!("{name} names frame {:#x}, not the guest's", v >> 12))?;
            self.set(OFF_CTRLREG + reg * 8, (to << 12) | (v & 0xfff));
        }
        let gdt_frames = (self.get(OFF_GDT_ENTS) as usize).div_ceil(512).min(16);
        for i in 0..gdt_frames {
            let v = self.get(OFF_GDT_FRAMES + i * 8);
            let to = f(v).ok_or_else(|| format!("GDT frame {i} is {v:#x}, not the guest's"))?;
            self.set(OFF_GDT_FRAMES + i * 8, to);
        }
        if start_info {
            let v = self.rdx();
            let to = f(v).ok_or_else(|| {
                format!(
                    "vCPU 0's rdx ({v:#x}) is not a frame of the guest: it did not suspend itself"
                )
            })?;
            self.set(OFF_RDX, to);
        }
        Ok(())
    }
}

/// Offsets of the shared-info fields a migration touches.
pub(crate) mod shared_info {
    use crate::sys;
    use std::mem::offset_of;
    /// The vCPU info array (32 entries of 64 bytes).
    pub(crate) const VCPU_INFO: usize = offset_of!(sys::shared_info, vcpu_info);
    /// Bytes of the vCPU info array.
    pub(crate) const VCPU_INFO_LEN: usize = std::mem::size_of::<[sys::vcpu_info; 32]>();
    /// Bytes of one vCPU info.
    pub(crate) const VCPU_INFO_SIZE: usize = std::mem::size_of::<sys::vcpu_info>();
    /// `evtchn_upcall_pending` within a vCPU info.
    pub(crate) const UPCALL_PENDING: usize = offset_of!(sys::vcpu_info, evtchn_upcall_pending);
    /// `evtchn_pending_sel` within a vCPU info.
    pub(crate) const PENDING_SEL: usize = offset_of!(sys::vcpu_info, evtchn_pending_sel);
    /// The pending event-channel bits.
    pub(crate) const EVTCHN_PENDING: usize = offset_of!(sys::shared_info, evtchn_pending);
    /// The event-channel mask bits.
    pub(crate) const EVTCHN_MASK: usize = offset_of!(sys::shared_info, evtchn_mask);
    /// Bytes of each of the pending and mask arrays.
    pub(crate) const EVTCHN_LEN: usize = 64 * 8;
    /// The architecture part.
    pub(crate) const ARCH: usize = offset_of!(sys::shared_info, arch);
    /// Bytes of the architecture part.
    pub(crate) const ARCH_LEN: usize = std::mem::size_of::<sys::arch_shared_info>();
    /// `arch.max_pfn`: the p2m's length.
    pub(crate) const MAX_PFN: usize = ARCH + offset_of!(sys::arch_shared_info, max_pfn);
    /// `arch.pfn_to_mfn_frame_list_list`.
    pub(crate) const FRAME_LIST_LIST: usize =
        ARCH + offset_of!(sys::arch_shared_info, pfn_to_mfn_frame_list_list);
}

/// Offsets of the start-info fields a migration touches.
pub(crate) mod start_info {
    use crate::sys;
    use std::mem::offset_of;
    /// Pages the domain was built with.
    pub(crate) const NR_PAGES: usize = offset_of!(sys::start_info, nr_pages);
    /// Machine address of the shared-info page.
    pub(crate) const SHARED_INFO: usize = offset_of!(sys::start_info, shared_info);
    /// The xenstore ring's frame.
    pub(crate) const STORE_MFN: usize = offset_of!(sys::start_info, store_mfn);
    /// The xenstore event channel.
    pub(crate) const STORE_EVTCHN: usize = offset_of!(sys::start_info, store_evtchn);
    /// The console ring's frame.
    pub(crate) const CONSOLE_MFN: usize = offset_of!(sys::start_info, console);
    /// The console event channel.
    pub(crate) const CONSOLE_EVTCHN: usize = offset_of!(sys::start_info, console)
        + offset_of!(sys::start_info__bindgen_ty_1__bindgen_ty_1, evtchn);
    /// Virtual address of the p2m the domain builder wrote.
    pub(crate) const MFN_LIST: usize = offset_of!(sys::start_info, mfn_list);
}

/// Reads a little-endian u64 at `off`.
pub(crate) fn read_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Writes a little-endian u64 at `off`.
pub(crate) fn write_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads a little-endian u32 at `off`.
pub(crate) fn read_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Writes a little-endian u32 at `off`.
pub(crate) fn write_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// The [`DeviceState::format`] of a PV domain's state.
pub(crate) const FORMAT: &str = "xen-pv";
/// The version of that format this crate writes and reads.
pub(crate) const VERSION: u32 = 1;

/// A 64-bit PV domain's state besides its memory, in canonical form
/// (guest frames, not machine frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PvState {
    /// Each vCPU's context, `None` for a vCPU that is down.
    pub vcpus: Vec<Option<VcpuContext>>,
    /// The source's shared-info page; its frame-list-list field holds a
    /// guest frame (0 if it named none).
    pub shared_info: Vec<u8>,
    /// The guest frame of the start-info page.
    pub start_info_pfn: u64,
    /// Every page-table page: guest frame and page type
    /// (`XEN_DOMCTL_PFINFO_*`, with the pinned bit).
    pub page_tables: Vec<(u64, u32)>,
    /// The guest frames that hold the guest's p2m, in p2m order.
    pub p2m_frames: Vec<u64>,
}

fn bad(why: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::IncompatibleState, why)
}

impl PvState {
    /// Encodes it for the wire: the vCPU count (u32) and each as a flag
    /// byte and, if up, its context; the shared-info page (4096 bytes);
    /// the start-info frame (u64); the page tables (u32 count, each a u64
    /// frame and a u32 type); the p2m frames (u32 count, each a u64).
    pub(crate) fn to_device_state(&self) -> DeviceState {
        let mut d = Vec::new();
        d.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        for v in &self.vcpus {
            match v {
                Some(c) => {
                    d.push(1);
                    d.extend_from_slice(&c.0);
                }
                None => d.push(0),
            }
        }
        d.extend_from_slice(&self.shared_info);
        d.extend_from_slice(&self.start_info_pfn.to_le_bytes());
        d.extend_from_slice(&(self.page_tables.len() as u32).to_le_bytes());
        for (p, t) in &self.page_tables {
            d.extend_from_slice(&p.to_le_bytes());
            d.extend_from_slice(&t.to_le_bytes());
        }
        d.extend_from_slice(&(self.p2m_frames.len() as u32).to_le_bytes());
        for p in &self.p2m_frames {
            d.extend_from_slice(&p.to_le_bytes());
        }
        DeviceState {
            format: FORMAT.into(),
            version: VERSION,
            data: d,
        }
    }

    /// Decodes what [`PvState::to_device_state`] wrote; another format or
    /// version, a truncated record or counts the record cannot hold are
    /// `IncompatibleState` errors.
    pub(crate) fn from_device_state(s: &DeviceState) -> Result<Self, BackendError> {
        if s.format != FORMAT || s.version != VERSION {
            return Err(bad(format!(
                "state is {} version {}; this backend reads {FORMAT} version {VERSION} for PV domains",
                s.format, s.version
            )));
        }
        let mut r = crate::state::Reader(&s.data);
        let n = r.u32()? as usize;
        if n > r.0.len() {
            return Err(bad(format!("state claims {n} vCPUs, holds fewer")));
        }
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            match r.take(1)?[0] {
                0 => vcpus.push(None),
                1 => vcpus.push(Some(VcpuContext(r.take(VCPU_CONTEXT_SIZE)?.to_vec()))),
                f => return Err(bad(format!("vCPU flag {f} is neither 0 nor 1"))),
            }
        }
        let shared_info = r.take(4096)?.to_vec();
        let start_info_pfn = r.u64()?;
        let n = r.u32()? as usize;
        if n > r.0.len() / 12 {
            return Err(bad(format!("state claims {n} page tables, holds fewer")));
        }
        let mut page_tables = Vec::with_capacity(n);
        for _ in 0..n {
            page_tables.push((r.u64()?, r.u32()?));
        }
        let n = r.u32()? as usize;
        if n > r.0.len() / 8 {
            return Err(bad(format!("state claims {n} p2m frames, holds fewer")));
        }
        let mut p2m_frames = Vec::with_capacity(n);
        for _ in 0..n {
            p2m_frames.push(r.u64()?);
        }
        if !r.0.is_empty() {
            return Err(bad(format!("{} bytes after the state", r.0.len())));
        }
        Ok(PvState {
            vcpus,
            shared_info,
            start_info_pfn,
            page_tables,
            p2m_frames,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn page_of(entries: &[(usize, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for &(i, v) in entries {
            set_entry(&mut p, i, v);
        }
        p
    }

    #[test]
    fn page_tables_round_trip_between_two_machine_maps() {
        // Source: pfn p lives at mfn 1000 + p; destination at 5000 + 2p.
        let src_m2p: HashMap<u64, u64> = (0..100).map(|p| (1000 + p, p)).collect();
        let dst_p2m: HashMap<u64, u64> = (0..100).map(|p| (p, 5000 + 2 * p)).collect();
        let flags = 0x8000_0000_0000_0067u64; // NX, dirty, accessed, user, rw, present
        let mut page = page_of(&[
            (0, (1003 << 12) | flags),
            (1, 0x1234_5000 & !PTE_PRESENT), // not present: a swap entry stays
            (7, (1099 << 12) | 0x63),
            (260, (42 << 12) | 0x67), // a Xen slot of an L4
        ]);
        let orig = page.clone();
        let foreign = canonicalise_table(&mut page, 4, &|m| src_m2p.get(&m).copied()).unwrap();
        assert_eq!(foreign, 0);
        assert_eq!(entry(&page, 0), (3 << 12) | flags);
        assert_eq!(entry(&page, 1), entry(&orig, 1));
        assert_eq!(entry(&page, 7), (99 << 12) | 0x63);
        assert_eq!(entry(&page, 260), 0, "Xen's slots are cleared");
        localise_table(&mut page, 4, &|p| dst_p2m.get(&p).copied()).unwrap();
        assert_eq!(entry(&page, 0), (5006 << 12) | flags);
        assert_eq!(entry(&page, 7), (5198 << 12) | 0x63);
        // An L1 may use slot 260 like any other.
        let mut l1 = page_of(&[(260, (1001 << 12) | 1)]);
        canonicalise_table(&mut l1, 1, &|m| src_m2p.get(&m).copied()).unwrap();
        assert_eq!(entry(&l1, 260), (1 << 12) | 1);
    }

    #[test]
    fn foreign_entries_are_cleared_and_counted_and_superpages_refused() {
        let mut page = page_of(&[(0, (77 << 12) | 1), (1, (1000 << 12) | 1)]);
        let n = canonicalise_table(&mut page, 1, &|m| (m == 1000).then_some(0)).unwrap();
        assert_eq!(n, 1);
        assert_eq!(entry(&page, 0), 0);
        let mut big = page_of(&[(5, (1000 << 12) | PTE_PSE | 1)]);
        assert!(canonicalise_table(&mut big, 2, &|_| Some(0)).is_err());
        let mut missing = page_of(&[(2, (9 << 12) | 1)]);
        let e = localise_table(&mut missing, 1, &|_| None).unwrap_err();
        assert!(e.contains("0x9"), "{e}");
    }

    #[test]
    fn p2m_pages_take_the_destination_frames_and_keep_markers() {
        let mut page = page_of(&[
            (0, 123),
            (1, INVALID_MFN),
            (2, 7 | IDENTITY_FRAME_BIT),
            (3, 9 | FOREIGN_FRAME_BIT),
            (4, 456),
        ]);
        for i in 5..ENTRIES {
            set_entry(&mut page, i, INVALID_MFN);
        }
        localise_p2m_page(&mut page, 1024, &|p| Some(p * 10)).unwrap();
        assert_eq!(entry(&page, 0), 10240);
        assert_eq!(entry(&page, 1), INVALID_MFN);
        assert_eq!(entry(&page, 2), 7 | IDENTITY_FRAME_BIT);
        assert_eq!(entry(&page, 3), 9 | FOREIGN_FRAME_BIT);
        assert_eq!(entry(&page, 4), 10280);
        assert!(localise_p2m_page(&mut page, 0, &|_| None).is_err());
    }

    #[test]
    fn vcpu_context_frames_translate_both_ways() {
        let mut c = VcpuContext::new(vec![0u8; VCPU_CONTEXT_SIZE]).unwrap();
        c.set(OFF_FLAGS, u64::from(sys::VGCF_online));
        c.set(OFF_CTRLREG + 3 * 8, 1005 << 12);
        c.set(OFF_CTRLREG + 8, 1006 << 12);
        c.set(OFF_GDT_ENTS, 600); // two frames
        c.set(OFF_GDT_FRAMES, 1007);
        c.set(OFF_GDT_FRAMES + 8, 1008);
        c.set(OFF_GDT_FRAMES + 16, 4242); // unused: stays
        c.set(OFF_RDX, 1009);
        assert!(c.online());
        let orig = c.clone();
        c.translate(true, &|m| (1000..1100).contains(&m).then(|| m - 1000))
            .unwrap();
        assert_eq!(c.cr3_frame(), 5);
        assert_eq!(c.get(OFF_CTRLREG + 8) >> 12, 6);
        assert_eq!(c.get(OFF_GDT_FRAMES), 7);
        assert_eq!(c.get(OFF_GDT_FRAMES + 8), 8);
        assert_eq!(c.get(OFF_GDT_FRAMES + 16), 4242);
        assert_eq!(c.rdx(), 9);
        c.translate(true, &|p| Some(p + 1000)).unwrap();
        assert_eq!(c, orig);
        // A vCPU other than 0 keeps rdx; a frame that is not the guest's
        // is an error.
        let mut d = orig.clone();
        d.translate(false, &|m| Some(m - 1000)).unwrap();
        assert_eq!(d.rdx(), 1009);
        assert!(orig.clone().translate(true, &|_| None).is_err());
        assert!(VcpuContext::new(vec![0; 10]).is_err());
    }

    #[test]
    fn state_round_trips_and_refuses_damage() {
        let mut ctx = vec![0u8; VCPU_CONTEXT_SIZE];
        ctx[0] = 9;
        let s = PvState {
            vcpus: vec![Some(VcpuContext(ctx)), None],
            shared_info: (0..4096).map(|i| i as u8).collect(),
            start_info_pfn: 0x1234,
            page_tables: vec![(
                5,
                sys::XEN_DOMCTL_PFINFO_L4TAB | sys::XEN_DOMCTL_PFINFO_LPINTAB,
            )],
            p2m_frames: vec![10, 11, 12],
        };
        let d = s.to_device_state();
        assert_eq!(PvState::from_device_state(&d).unwrap(), s);
        for cut in (0..d.data.len()).step_by(97).chain([d.data.len() - 1]) {
            let mut t = d.clone();
            t.data.truncate(cut);
            let e = PvState::from_device_state(&t).unwrap_err();
            assert_eq!(e.kind, BackendErrorKind::IncompatibleState);
        }
        let mut lying = d.clone();
        lying.data[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(PvState::from_device_state(&lying).is_err());
        let mut flag = d.clone();
        flag.data[4] = 7;
        assert!(PvState::from_device_state(&flag).is_err());
        let hvm = DeviceState {
            format: crate::state::FORMAT.into(),
            ..d
        };
        assert!(PvState::from_device_state(&hvm).is_err());
        assert!(
            table_level(sys::XEN_DOMCTL_PFINFO_L2TAB | sys::XEN_DOMCTL_PFINFO_LPINTAB) == Some(2)
        );
        assert!(pinned(
            sys::XEN_DOMCTL_PFINFO_L2TAB | sys::XEN_DOMCTL_PFINFO_LPINTAB
        ));
        assert!(table_level(0).is_none());
        assert!(unusable(sys::XEN_DOMCTL_PFINFO_XTAB));
        assert!(!unusable(sys::XEN_DOMCTL_PFINFO_L1TAB));
        assert_eq!(p2m_entry_mfn(5), Some(5));
        assert_eq!(p2m_entry_mfn(INVALID_MFN), None);
    }
}

//! The pages a stopped HVM/PVH guest's vCPUs point at, found by walking
//! the guest's own page tables from the registers in Xen's context record.
//!
//! Post-copy on Xen needs them: as a guest resumes it hands the hypervisor
//! frames to map (Linux re-registers each vCPU's `vcpu_info`, which lives
//! in the per-CPU area that the GS base points to), and Xen 4.17 refuses a
//! frame that is paged out instead of waiting for it
//! (`map_vcpu_info` returns `-EINVAL`, which Linux treats as fatal). The
//! destination cannot tell which frames those will be; the source can
//! name the pages around each vCPU's registers, and the engine sends them
//! before the resume ([`migrate_core::GuestControl::resume_pages`]).

use crate::pv::{read_u32 as u32_at, read_u64 as u64_at};
use std::collections::{BTreeSet, HashMap};

/// Xen's save-record type code of a vCPU's registers (`HVM_SAVE_CODE(CPU)`).
const CPU_RECORD: u16 = 2;
/// A save record's descriptor: type code (u16), instance (u16), length (u32).
const DESCRIPTOR: usize = 8;

// Offsets in `struct hvm_hw_cpu` (xen/arch-x86/hvm/save.h, Xen 4.17).
const RSP: usize = 568;
const RIP: usize = 640;
const CR0: usize = 656;
const CR3: usize = 672;
const CR4: usize = 680;
const TR_LIMIT: usize = 792;
const IDTR_LIMIT: usize = 800;
const GDTR_LIMIT: usize = 804;
const GS_BASE: usize = 840;
const TR_BASE: usize = 856;
const IDTR_BASE: usize = 872;
const GDTR_BASE: usize = 880;
const SHADOW_GS: usize = 944;
const EFER: usize = 992;
/// The record is at least this long (it ends with `msr_efer`'s successor).
const CPU_MIN_LEN: usize = EFER + 8;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PAGE: u64 = 4096;

/// The registers of one vCPU that locate its memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VcpuRegs {
    /// The vCPU's number (the record's instance).
    pub vcpu: u16,
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Control registers 0, 3 and 4.
    pub cr0: u64,
    /// Page-table root.
    pub cr3: u64,
    /// Paging features.
    pub cr4: u64,
    /// `IA32_EFER`.
    pub efer: u64,
    /// GS base (a kernel's per-CPU area while the vCPU is in the kernel).
    pub gs_base: u64,
    /// The other GS base (`KERNEL_GS_BASE`, swapped in by `swapgs`).
    pub shadow_gs: u64,
    /// Descriptor tables and task state: (base, limit).
    pub gdt: (u64, u32),
    /// Interrupt descriptor table.
    pub idt: (u64, u32),
    /// Task-state segment.
    pub tr: (u64, u32),
}

/// The vCPU registers in a context record from
/// `xc_domain_hvm_getcontext`; `None` if the record is malformed (a
/// descriptor whose length runs past the end, or a CPU record too short).
/// vCPUs that are down have no record and are not listed.
pub(crate) fn vcpu_regs(context: &[u8]) -> Option<Vec<VcpuRegs>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + DESCRIPTOR <= context.len() {
        let code = u16::from_le_bytes([context[at], context[at + 1]]);
        let instance = u16::from_le_bytes([context[at + 2], context[at + 3]]);
        let len = u32_at(context, at + 4) as usize;
        let body = context.get(at + DESCRIPTOR..at + DESCRIPTOR + len)?;
        if code == 0 {
            break; // HVM_SAVE_CODE(END)
        }
        if code == CPU_RECORD {
            if body.len() < CPU_MIN_LEN {
                return None;
            }
            out.push(VcpuRegs {
                vcpu: instance,
                rip: u64_at(body, RIP),
                rsp: u64_at(body, RSP),
                cr0: u64_at(body, CR0),
                cr3: u64_at(body, CR3),
                cr4: u64_at(body, CR4),
                efer: u64_at(body, EFER),
                gs_base: u64_at(body, GS_BASE),
                shadow_gs: u64_at(body, SHADOW_GS),
                gdt: (u64_at(body, GDTR_BASE), u32_at(body, GDTR_LIMIT)),
                idt: (u64_at(body, IDTR_BASE), u32_at(body, IDTR_LIMIT)),
                tr: (u64_at(body, TR_BASE), u32_at(body, TR_LIMIT)),
            });
        }
        at += DESCRIPTOR + len;
    }
    Some(out)
}

/// What to include around each vCPU's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResumeWindow {
    /// Bytes from each GS base (a kernel's per-CPU area: Linux keeps
    /// `vcpu_info` in its static part, about 212 KiB on Debian 12's
    /// kernel).
    pub per_cpu: u64,
    /// Bytes of stack from the stack pointer up (the frames the vCPU
    /// returns through).
    pub stack: u64,
}

impl ResumeWindow {
    /// The same window with `bytes` from each GS base.
    pub fn with_per_cpu(self, bytes: u64) -> Self {
        ResumeWindow {
            per_cpu: bytes,
            ..self
        }
    }
}

impl Default for ResumeWindow {
    fn default() -> Self {
        ResumeWindow {
            per_cpu: 256 << 10,
            stack: 16 << 10,
        }
    }
}

/// Walks a guest's page tables, reading each table page once through
/// `read` (a guest frame's 4096 bytes, or `None` if it cannot be read).
pub(crate) struct Walker<F> {
    read: F,
    cache: HashMap<u64, Option<Vec<u8>>>,
}

impl<F: FnMut(u64) -> Option<Vec<u8>>> Walker<F> {
    /// A walker reading frames with `read`.
    pub(crate) fn new(read: F) -> Self {
        Walker {
            read,
            cache: HashMap::new(),
        }
    }

    fn entry(&mut self, table: u64, index: u64, width: u64) -> Option<u64> {
        let read = &mut self.read;
        let page = self
            .cache
            .entry(table)
            .or_insert_with(|| read(table).filter(|p| p.len() == PAGE as usize))
            .as_ref()?;
        let off = (index * width) as usize;
        Some(if width == 8 {
            u64_at(page, off)
        } else {
            u32_at(page, off) as u64
        })
    }

    /// The guest frame `va` maps to under `regs`' paging mode, with each
    /// table frame the walk went through added to `tables`; `None` if
    /// `va` is not mapped (or not canonical, or a table cannot be read).
    pub(crate) fn translate(
        &mut self,
        regs: &VcpuRegs,
        va: u64,
        tables: &mut Vec<u64>,
    ) -> Option<u64> {
        if regs.cr0 & CR0_PG == 0 {
            return Some((va & 0xffff_ffff) / PAGE);
        }
        if regs.efer & EFER_LMA != 0 {
            let levels: u32 = if regs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
            let bits = 12 + 9 * levels;
            let top = (va as i64) >> (bits - 1);
            if top != 0 && top != -1 {
                return None;
            }
            let mut table = (regs.cr3 & ADDR_MASK) / PAGE;
            for level in (0..levels).rev() {
                tables.push(table);
                let shift = 12 + 9 * level as u64;
                let e = self.entry(table, (va >> shift) & 511, 8)?;
                if e & PRESENT == 0 {
                    return None;
                }
                if level == 0 || (level <= 2 && e & LARGE != 0) {
                    let size = 1u64 << shift;
                    return Some(((e & ADDR_MASK & !(size - 1)) + (va & (size - 1))) / PAGE);
                }
                table = (e & ADDR_MASK) / PAGE;
            }
            return None;
        }
        let va = va & 0xffff_ffff;
        if regs.cr4 & CR4_PAE != 0 {
            // The four PDPTEs sit 32-byte aligned inside the CR3 frame.
            let pdpt = regs.cr3 & 0xffff_ffe0;
            let frame = pdpt / PAGE;
            tables.push(frame);
            let slot = (pdpt % PAGE) / 8 + (va >> 30);
            let e = self.entry(frame, slot, 8)?;
            if e & PRESENT == 0 {
                return None;
            }
            let mut table = (e & ADDR_MASK) / PAGE;
            for shift in [21u64, 12] {
                tables.push(table);
                let e = self.entry(table, (va >> shift) & 511, 8)?;
                if e & PRESENT == 0 {
                    return None;
                }
                if shift == 12 || e & LARGE != 0 {
                    let size = 1u64 << shift;
                    return Some(((e & ADDR_MASK & !(size - 1)) + (va & (size - 1))) / PAGE);
                }
                table = (e & ADDR_MASK) / PAGE;
            }
            return None;
        }
        let dir = (regs.cr3 & 0xffff_f000) / PAGE;
        tables.push(dir);
        let e = self.entry(dir, va >> 22, 4)?;
        if e & PRESENT == 0 {
            return None;
        }
        if e & LARGE != 0 && regs.cr4 & CR4_PSE != 0 {
            return Some((e & 0xffc0_0000) / PAGE + ((va >> 12) & 0x3ff));
        }
        let table = (e & 0xffff_f000) / PAGE;
        tables.push(table);
        let e = self.entry(table, (va >> 12) & 0x3ff, 4)?;
        (e & PRESENT != 0).then_some((e & 0xffff_f000) / PAGE)
    }

    /// The frames of `[start, start + len)` that are mapped, and the
    /// tables that map them, into `out`.
    fn range(&mut self, regs: &VcpuRegs, start: u64, len: u64, out: &mut BTreeSet<u64>) {
        if start == 0 || len == 0 {
            return;
        }
        let mut tables = Vec::new();
        let first = start & !(PAGE - 1);
        let end = start.saturating_add(len);
        let mut va = first;
        while va < end {
            tables.clear();
            let gfn = self.translate(regs, va, &mut tables);
            out.extend(tables.iter().copied());
            if let Some(g) = gfn {
                out.insert(g);
            }
            va = match va.checked_add(PAGE) {
                Some(v) => v,
                None => break,
            };
        }
    }

    /// The guest frames each vCPU of `cpus` points at: its code page, its
    /// stack, its descriptor tables and task state, the `window` after
    /// each GS base, and the page-table frames on the way to each.
    pub(crate) fn resume_set(&mut self, cpus: &[VcpuRegs], window: ResumeWindow) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for r in cpus {
            self.range(r, r.rip, 1, &mut out);
            self.range(r, r.rsp, window.stack.max(1), &mut out);
            for (base, limit) in [r.gdt, r.idt, r.tr] {
                self.range(r, base, limit as u64 + 1, &mut out);
            }
            self.range(r, r.gs_base, window.per_cpu, &mut out);
            self.range(r, r.shadow_gs, window.per_cpu, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest memory of a few frames, as a map from frame to content.
    struct Mem(HashMap<u64, Vec<u8>>);

    impl Mem {
        fn new() -> Self {
            Mem(HashMap::new())
        }
        fn set(&mut self, frame: u64, index: u64, entry: u64) {
            let p = self.0.entry(frame).or_insert_with(|| vec![0; 4096]);
            p[index as usize * 8..index as usize * 8 + 8].copy_from_slice(&entry.to_le_bytes());
        }
        fn set32(&mut self, frame: u64, index: u64, entry: u32) {
            let p = self.0.entry(frame).or_insert_with(|| vec![0; 4096]);
            p[index as usize * 4..index as usize * 4 + 4].copy_from_slice(&entry.to_le_bytes());
        }
        fn reader(&self) -> impl FnMut(u64) -> Option<Vec<u8>> + '_ {
            |f| self.0.get(&f).cloned()
        }
    }

    fn long_mode(cr3_frame: u64) -> VcpuRegs {
        VcpuRegs {
            cr0: CR0_PG | 1,
            cr3: cr3_frame * PAGE,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..VcpuRegs::default()
        }
    }

    const KERNEL: u64 = 0xffff_8880_0010_0000;

    /// Four-level tables mapping KERNEL.. with 4 KiB pages to frames
    /// 0x500.., and a 2 MiB page at 0xffff_ffff_8000_0000 to 0x1000.
    fn tables() -> Mem {
        let mut m = Mem::new();
        let idx = |va: u64, l: u32| (va >> (12 + 9 * l)) & 511;
        m.set(1, idx(KERNEL, 3), (2 * PAGE) | 3);
        m.set(2, idx(KERNEL, 2), (3 * PAGE) | 3);
        m.set(3, idx(KERNEL, 1), (4 * PAGE) | 3);
        for i in 0..8 {
            m.set(4, idx(KERNEL, 0) + i, ((0x500 + i) * PAGE) | 3);
        }
        let text = 0xffff_ffff_8000_0000u64;
        m.set(1, idx(text, 3), (5 * PAGE) | 3);
        m.set(5, idx(text, 2), (6 * PAGE) | 3);
        m.set(6, idx(text, 1), (0x1000 * PAGE) | LARGE | 3);
        m
    }

    #[test]
    fn four_level_walk_with_small_and_large_pages() {
        let m = tables();
        let mut w = Walker::new(m.reader());
        let r = long_mode(1);
        let mut t = Vec::new();
        assert_eq!(w.translate(&r, KERNEL + 0x1234, &mut t), Some(0x501));
        assert_eq!(t, vec![1, 2, 3, 4]);
        t.clear();
        let va = 0xffff_ffff_8000_0000u64 + 0x5_3000;
        assert_eq!(w.translate(&r, va, &mut t), Some(0x1000 + 0x53));
        assert_eq!(t, vec![1, 5, 6]);
        // Not mapped, not canonical, a table that cannot be read.
        assert_eq!(w.translate(&r, KERNEL + 8 * PAGE, &mut t), None);
        assert_eq!(w.translate(&r, 0x0000_8000_0000_0000, &mut t), None);
        let gone = long_mode(99);
        assert_eq!(w.translate(&gone, KERNEL, &mut t), None);
    }

    #[test]
    fn resume_set_covers_the_per_cpu_window_and_the_tables() {
        let m = tables();
        let mut w = Walker::new(m.reader());
        let r = VcpuRegs {
            gs_base: KERNEL + 0x800,
            rip: 0xffff_ffff_8000_1000,
            rsp: KERNEL + 6 * PAGE + 8,
            ..long_mode(1)
        };
        let window = ResumeWindow {
            per_cpu: 3 * PAGE,
            stack: 2 * PAGE,
        };
        let set: Vec<u64> = w.resume_set(&[r], window).into_iter().collect();
        // Tables 1-6; the per-CPU window 0x500..=0x503 (it starts inside
        // a page and spans three pages' worth); the stack 0x506, 0x507
        // (and the unmapped page after it, skipped); the code page.
        assert_eq!(
            set,
            vec![1, 2, 3, 4, 5, 6, 0x500, 0x501, 0x502, 0x503, 0x506, 0x507, 0x1001]
        );
    }

    #[test]
    fn pae_and_two_level_walks() {
        let mut m = Mem::new();
        // PAE: PDPT at 0x7020 (inside frame 7), PD frame 8, PT frame 9.
        let va = 0xc010_3000u64;
        m.set(7, 0x20 / 8 + (va >> 30), (8 * PAGE) | 1);
        m.set(8, (va >> 21) & 511, (9 * PAGE) | 3);
        m.set(9, (va >> 12) & 511, (0x77 * PAGE) | 3);
        let pae = VcpuRegs {
            cr0: CR0_PG,
            cr3: 7 * PAGE + 0x20,
            cr4: CR4_PAE,
            ..VcpuRegs::default()
        };
        let mut t = Vec::new();
        let mut w = Walker::new(m.reader());
        assert_eq!(w.translate(&pae, va, &mut t), Some(0x77));
        assert_eq!(t, vec![7, 8, 9]);

        // Two levels: a 4 KiB page and a 4 MiB page.
        let mut m = Mem::new();
        m.set32(10, va >> 22, ((11 * PAGE) | 3) as u32);
        m.set32(11, (va >> 12) & 0x3ff, ((0x88 * PAGE) | 3) as u32);
        m.set32(10, 1, 0x0040_0000 | LARGE as u32 | 3);
        let flat = VcpuRegs {
            cr0: CR0_PG,
            cr3: 10 * PAGE,
            cr4: CR4_PSE,
            ..VcpuRegs::default()
        };
        let mut w = Walker::new(m.reader());
        t.clear();
        assert_eq!(w.translate(&flat, va, &mut t), Some(0x88));
        assert_eq!(t, vec![10, 11]);
        t.clear();
        assert_eq!(w.translate(&flat, 0x0045_6000, &mut t), Some(0x456));
        // Paging off: the address is the frame.
        let real = VcpuRegs::default();
        assert_eq!(w.translate(&real, 0x9_f000, &mut t), Some(0x9f));
    }

    fn record(code: u16, instance: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&code.to_le_bytes());
        v.extend_from_slice(&instance.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn cpu_records_are_read_from_the_context_and_lies_refused() {
        let mut cpu = vec![0u8; 1032];
        cpu[RIP..RIP + 8].copy_from_slice(&0x1234u64.to_le_bytes());
        cpu[GS_BASE..GS_BASE + 8].copy_from_slice(&0xabcdu64.to_le_bytes());
        cpu[GDTR_LIMIT..GDTR_LIMIT + 4].copy_from_slice(&0x7fu32.to_le_bytes());
        let mut ctx = record(1, 0, &[0; 24]);
        ctx.extend(record(CPU_RECORD, 0, &cpu));
        ctx.extend(record(CPU_RECORD, 3, &cpu));
        ctx.extend(record(4, 0, &[0; 40]));
        ctx.extend(record(0, 0, &[]));
        let regs = vcpu_regs(&ctx).unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!((regs[0].vcpu, regs[1].vcpu), (0, 3));
        assert_eq!(regs[1].rip, 0x1234);
        assert_eq!(regs[1].gs_base, 0xabcd);
        assert_eq!(regs[1].gdt, (0, 0x7f));
        // A record longer than what is left, and a CPU record too short.
        let mut lying = record(1, 0, &[0; 24]);
        lying.extend(record(CPU_RECORD, 0, &cpu));
        lying.truncate(lying.len() - 1);
        assert_eq!(vcpu_regs(&lying), None);
        assert_eq!(vcpu_regs(&record(CPU_RECORD, 0, &cpu[..512])), None);
    }
}

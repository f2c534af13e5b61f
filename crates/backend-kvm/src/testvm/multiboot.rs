//! Loading a multiboot (version 1) ELF image into guest memory and
//! starting a vCPU at its entry, as a multiboot loader does.

use super::{flat_segments, segment};
use crate::kvm_ioctls::VcpuFd;
use crate::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use crate::{KvmError, TrackedMemory};

/// Where the multiboot information goes.
const INFO: u64 = 0x7000;
/// Where the command line goes.
const CMDLINE: u64 = 0x7100;

/// What [`load_multiboot`] loaded: where to start and what to hand over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootEntry {
    /// The image's entry point.
    pub entry: u64,
    /// The guest-physical address of the multiboot information.
    pub info: u64,
}

/// Loads a multiboot (version 1) ELF image the way a multiboot loader
/// does: its loadable segments at their physical addresses, the command
/// line and the multiboot information at 0x7000. Refuses an image that is
/// not a 32-bit x86 ELF with a multiboot header, or whose segments fall
/// outside `memory` or below 0x8000.
pub fn load_multiboot(
    memory: &TrackedMemory,
    image: &[u8],
    cmdline: &str,
) -> Result<MultibootEntry, KvmError> {
    let elf = Elf32::parse(image)?;
    if cmdline.len() >= 0xf00 || cmdline.contains('\0') {
        return Err(KvmError::Config(
            "the command line must be under 3840 bytes, without NUL".into(),
        ));
    }
    let end = memory.last_addr().0 + 1;
    for seg in &elf.segments {
        if seg.paddr + seg.memsz > end || seg.paddr < 0x8000 {
            return Err(KvmError::Config(format!(
                "image segment at {:#x} of {} bytes is outside guest memory above 0x8000",
                seg.paddr, seg.memsz
            )));
        }
    }
    let load = || -> Result<(), crate::vm_memory::GuestMemoryError> {
        for seg in &elf.segments {
            let data = &image[seg.offset as usize..(seg.offset + seg.filesz) as usize];
            memory.write_slice(data, GuestAddress(seg.paddr))?;
            let bss = vec![0u8; (seg.memsz - seg.filesz) as usize];
            memory.write_slice(&bss, GuestAddress(seg.paddr + seg.filesz))?;
        }
        // flags: bit 2, the command line is valid.
        memory.write_obj(1u32 << 2, GuestAddress(INFO))?;
        memory.write_obj(CMDLINE as u32, GuestAddress(INFO + 16))?;
        let mut line = cmdline.as_bytes().to_vec();
        line.push(0);
        memory.write_slice(&line, GuestAddress(CMDLINE))
    };
    load().map_err(|e| KvmError::Config(format!("loading the image: {e}")))?;
    Ok(MultibootEntry {
        entry: elf.entry,
        info: INFO,
    })
}

/// Puts `vcpu` where a multiboot loader leaves the processor: 32-bit
/// protected mode at CPL 0 with flat segments and paging off, at the
/// entry, with `eax` = 0x2BADB002 and `ebx` = the information's address.
pub fn enter_multiboot(vcpu: &VcpuFd, at: &MultibootEntry) -> Result<(), KvmError> {
    let ioctl = |op| move |source| KvmError::Ioctl { op, source };
    let mut s = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    // Kernel code and data, 32-bit.
    flat_segments(
        &mut s,
        segment(0x08, 11, 0, 1, 0),
        segment(0x10, 3, 0, 1, 0),
    );
    s.cr0 = 0x11; // ET | PE
    s.cr4 = 0;
    s.efer = 0;
    vcpu.set_sregs(&s).map_err(ioctl("KVM_SET_SREGS"))?;
    let mut r = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    r.rip = at.entry;
    r.rflags = 0x2;
    r.rax = 0x2BAD_B002;
    r.rbx = at.info;
    vcpu.set_regs(&r).map_err(ioctl("KVM_SET_REGS"))
}

struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The parts of a 32-bit little-endian x86 ELF executable a multiboot
/// loader uses.
struct Elf32 {
    entry: u64,
    segments: Vec<Segment>,
}

impl Elf32 {
    fn parse(image: &[u8]) -> Result<Self, KvmError> {
        let bad = |why: &str| KvmError::Config(format!("not a multiboot ELF image: {why}"));
        let u16_at = |at: usize| {
            image
                .get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u64)
                .ok_or_else(|| bad("truncated"))
        };
        let u32_at = |at: usize| {
            image
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64)
                .ok_or_else(|| bad("truncated"))
        };
        if image.get(..7) != Some(&[0x7f, b'E', b'L', b'F', 1, 1, 1][..]) {
            return Err(bad("no 32-bit little-endian ELF header"));
        }
        if u16_at(18)? != 3 {
            return Err(bad("not for x86"));
        }
        // A multiboot header: a 4-aligned magic in the first 8 KiB whose
        // next two words sum with it to zero.
        let has_header = (0..8192.min(image.len().saturating_sub(12)))
            .step_by(4)
            .any(|at| {
                matches!(
                    (u32_at(at), u32_at(at + 4), u32_at(at + 8)),
                    (Ok(0x1BAD_B002), Ok(f), Ok(c)) if (0x1BAD_B002u64 + f + c) as u32 == 0
                )
            });
        if !has_header {
            return Err(bad("no multiboot header in the first 8 KiB"));
        }
        let entry = u32_at(24)?;
        let phoff = u32_at(28)? as usize;
        let phentsize = u16_at(42)? as usize;
        let phnum = u16_at(44)? as usize;
        if phentsize < 32 {
            return Err(bad("program headers too small"));
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let at = phoff
                .checked_add(i * phentsize)
                .ok_or_else(|| bad("program headers out of range"))?;
            if u32_at(at)? != 1 {
                continue; // not PT_LOAD
            }
            let seg = Segment {
                offset: u32_at(at + 4)?,
                paddr: u32_at(at + 12)?,
                filesz: u32_at(at + 16)?,
                memsz: u32_at(at + 20)?,
            };
            if seg.filesz > seg.memsz || seg.offset + seg.filesz > image.len() as u64 {
                return Err(bad("a segment lies outside the file"));
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            return Err(bad("nothing to load"));
        }
        Ok(Elf32 { entry, segments })
    }
}

//! Every unsafe operation of this crate, and nothing else: the rest of
//! the crate denies `unsafe_code` and reaches the kernel through the safe
//! types and functions here.
//!
//! - [`kick`]: the vCPU kick, a signal handler that sets `immediate_exit`
//!   in the running vCPU's `kvm_run`;
//! - [`ring`]: the dirty rings, mapped from the vCPU fds;
//! - [`slots`]: guest memory and the KVM memory slots into it, owned
//!   together so a slot never outlives its mapping;
//! - [`uffd`]: userfaultfd for post-copy destinations;
//! - here: the huge-page advice for guest memory, populating it ahead
//!   of its data (`MADV_POPULATE_WRITE`), and `KVM_SET_XSAVE`.

pub(crate) mod kick;
pub(crate) mod ring;
pub(crate) mod slots;
pub(crate) mod uffd;

pub use kick::{default_kick_signal, VcpuKick};
pub use ring::{enable_dirty_ring, max_ring_entries, DirtyRings};
pub use slots::TrackedMemory;
pub(crate) use slots::{GuestSlots, Slot};
pub(crate) use uffd::{Placed, Userfault};

use crate::KvmError;
use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// `KVM_SET_XSAVE` with the legacy 4 KiB `kvm_xsave`, on a host whose
/// XSAVE state fits it (`fits_legacy`: `KVM_CAP_XSAVE2` at most 4096, as
/// [`crate::VcpuCaps`] probes); refused otherwise.
pub(crate) fn set_xsave_legacy(
    fd: &VcpuFd,
    xsave: &kvm_xsave,
    fits_legacy: bool,
) -> Result<(), KvmError> {
    if !fits_legacy {
        return Err(KvmError::Config(
            "this host's XSAVE state does not fit the legacy kvm_xsave".into(),
        ));
    }
    // SAFETY: `fits_legacy` says this host's XSAVE state fits the 4 KiB
    // `kvm_xsave`, so the ioctl reads no further than the struct passed.
    unsafe { fd.set_xsave(xsave) }.map_err(|source| KvmError::Ioctl {
        op: "KVM_SET_XSAVE",
        source,
    })
}

/// Asks the kernel to back `memory` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)` on each region), as QEMU does for guest RAM:
/// a first touch then costs one fault per 2 MiB rather than per 4 KiB.
/// KVM's dirty log stays exact per 4 KiB page: while a slot logs dirty
/// pages, KVM maps it at 4 KiB in the guest's page tables. Returns how
/// many bytes were advised. A host where THP is off ("never") refuses
/// the advice; that is an error here, so a caller can tell.
pub fn advise_huge_pages(memory: &TrackedMemory) -> Result<u64, KvmError> {
    let mut bytes = 0;
    for r in memory.iter() {
        let (addr, len) = (r.as_ptr() as usize, r.len() as usize);
        // Whole 2 MiB pages only: advise the aligned middle of the region.
        let start = addr.next_multiple_of(HUGE_PAGE);
        let end = (addr + len) / HUGE_PAGE * HUGE_PAGE;
        if end <= start {
            continue;
        }
        // SAFETY: the range lies inside a mapping `memory` owns and keeps;
        // MADV_HUGEPAGE changes how the kernel backs it, not its contents.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(KvmError::Config(format!(
                "madvise(MADV_HUGEPAGE): {}",
                std::io::Error::last_os_error()
            )));
        }
        bytes += (end - start) as u64;
    }
    Ok(bytes)
}

/// The advice [`populate`] gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Populate {
    /// `MADV_POPULATE_WRITE`.
    Write,
    /// An advice number no kernel defines, refused with `EINVAL` as an
    /// older kernel refuses `MADV_POPULATE_WRITE` (tests).
    #[cfg(test)]
    Unknown,
}

/// Populates `len` bytes of `memory` from host address `addr` as a write
/// would, without writing: `madvise(MADV_POPULATE_WRITE)` (Linux 5.14;
/// older kernels refuse it with `EINVAL`). Refused with `InvalidInput`
/// unless the range is page-aligned and lies inside one region of
/// `memory`.
pub(crate) fn populate(
    memory: &TrackedMemory,
    addr: u64,
    len: u64,
    advice: Populate,
) -> std::io::Result<()> {
    let advice = match advice {
        Populate::Write => libc::MADV_POPULATE_WRITE,
        #[cfg(test)]
        Populate::Unknown => 12345,
    };
    let inside = memory.iter().any(|r| {
        let start = r.as_ptr() as u64;
        addr >= start && addr.checked_add(len).is_some_and(|e| e <= start + r.len())
    });
    if !inside || !addr.is_multiple_of(4096) || !len.is_multiple_of(4096) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{len} bytes at {addr:#x} are not pages of guest memory"),
        ));
    }
    // The advice is MADV_POPULATE_WRITE or one the kernel refuses.
    // MADV_POPULATE_WRITE faults pages in as writable and changes no byte
    // of them: a page holding data keeps it, a fresh one reads as zeros,
    // as before. Guest memory is only accessed through volatile
    // accessors, never through Rust references, so populating under
    // another thread's access is sound.
    // SAFETY: the range lies inside a mapping `memory` holds (checked
    // above), mapped while `memory` lives; the advice changes no byte.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

//! KVM's dirty ring: a per-vCPU ring of the pages the vCPU wrote.
//!
//! With `KVM_CAP_DIRTY_LOG_RING` enabled on a VM (before its vCPUs are
//! created), each vCPU gets a ring of `struct kvm_dirty_gfn { u32 flags;
//! u32 slot; u64 offset; }` entries, mapped from the vCPU fd at page
//! `KVM_DIRTY_LOG_PAGE_OFFSET`. When the vCPU first writes a page of a
//! slot that has `KVM_MEM_LOG_DIRTY_PAGES`, KVM appends `(slot, offset)`
//! with the DIRTY flag. The VMM collects entries in order from its own
//! fetch index, marks each RESET, and calls `KVM_RESET_DIRTY_RINGS` on
//! the VM, which write-protects those pages again and frees the entries.
//! A vCPU whose ring fills exits with `KVM_EXIT_DIRTY_RING_FULL` until
//! the VMM collects.
//!
//! The cost of a collection is one entry per page dirtied, whatever the
//! size of the guest, where the bitmap (`KVM_GET_DIRTY_LOG`) copies and
//! scans a bit for every page of every slot.
//!
//! kvm-ioctls has no wrapper for the ring; this is a small one.

use crate::KvmError;
use kvm_bindings::{kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: u64 = 0xAEC7;
/// `KVM_DIRTY_GFN_F_DIRTY`: KVM filled the entry.
const GFN_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM collected it.
const GFN_RESET: u32 = 2;
/// `sizeof(struct kvm_dirty_gfn)`.
const ENTRY_BYTES: usize = 16;

/// The largest ring this host's KVM allows, in entries (0: no dirty ring).
pub fn max_ring_entries(vm: &VmFd) -> u32 {
    let bytes = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING as _);
    (bytes.max(0) as usize / ENTRY_BYTES) as u32
}

/// Enables the dirty ring on `vm` with `entries` entries per vCPU (a power
/// of two). Call it before the first vCPU is created; the VM's dirty log
/// is then the ring, and `KVM_GET_DIRTY_LOG` no longer works on it.
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<(), KvmError> {
    let max = max_ring_entries(vm);
    if max == 0 {
        return Err(KvmError::Config(
            "this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)".into(),
        ));
    }
    if !entries.is_power_of_two() || entries > max || entries < 256 {
        return Err(KvmError::Config(format!(
            "a dirty ring of {entries} entries: it must be a power of two from 256 (one page) to {max}"
        )));
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = entries as u64 * ENTRY_BYTES as u64;
    vm.enable_cap(&cap).map_err(|source| KvmError::Ioctl {
        op: "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)",
        source,
    })
}

/// One vCPU's ring, mapped.
struct Ring {
    base: NonNull<u8>,
    entries: u32,
    /// The next entry to collect.
    fetch: u32,
}

/// The dirty rings of a VM's vCPUs.
///
/// The rings keep the VM they belong to (`KVM_RESET_DIRTY_RINGS` goes to
/// its fd), so it cannot be closed while they are mapped.
pub struct DirtyRings {
    vm: Arc<VmFd>,
    rings: Vec<Ring>,
}

/// The host's page size, in bytes: the unit of the ring's mmap offset.
fn host_page_size() -> Result<usize, KvmError> {
    // SAFETY: sysconf reads a system constant and has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .ok_or_else(|| KvmError::Config(format!("sysconf(_SC_PAGESIZE) answered {n}")))
}

// SAFETY: the rings are shared mappings owned by this struct (unmapped only
// in drop); every access to an entry goes through atomics, and `collect`
// takes `&mut self`, so one thread at a time moves the fetch indexes.
unsafe impl Send for DirtyRings {}
// SAFETY: no method that takes `&self` touches the mappings.
unsafe impl Sync for DirtyRings {}

impl std::fmt::Debug for DirtyRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRings")
            .field("vcpus", &self.rings.len())
            .finish_non_exhaustive()
    }
}

impl DirtyRings {
    /// Maps the ring of each of `vcpus` (of `vm`, on which
    /// [`enable_dirty_ring`] was called with `entries`). The rings hold a
    /// reference to `vm`.
    pub fn map(vm: &Arc<VmFd>, vcpus: &[&VcpuFd], entries: u32) -> Result<Self, KvmError> {
        let mut rings = DirtyRings {
            vm: vm.clone(),
            rings: Vec::new(),
        };
        let len = entries as usize * ENTRY_BYTES;
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET as usize * host_page_size()?;
        for v in vcpus {
            // SAFETY: maps `len` bytes of the vCPU's ring at the offset KVM
            // documents; a fresh shared mapping aliases no Rust memory.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    v.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            let base = match NonNull::new(p as *mut u8) {
                Some(base) if p != libc::MAP_FAILED => base,
                _ => {
                    return Err(KvmError::Config(format!(
                        "mapping a vCPU's dirty ring: {}",
                        std::io::Error::last_os_error()
                    )))
                }
            };
            rings.rings.push(Ring {
                base,
                entries,
                fetch: 0,
            });
        }
        Ok(rings)
    }

    /// Collects every dirty entry of every ring, calling `page(slot,
    /// offset)` for each (`slot` as KVM numbers it, `offset` in pages from
    /// the slot's start), and re-arms the collected pages with
    /// `KVM_RESET_DIRTY_RINGS`. Returns the number of entries.
    pub fn collect(&mut self, mut page: impl FnMut(u32, u64)) -> Result<u64, KvmError> {
        let mut n = 0u64;
        for r in &mut self.rings {
            loop {
                // The kernel writes an entry's slot and offset before it
                // sets DIRTY (with release), so reading the flags with
                // acquire makes them visible.
                let i = (r.fetch % r.entries) as usize * ENTRY_BYTES;
                // SAFETY: `i` starts a 16-byte, 8-aligned entry in the mapping.
                let (flags, slot, offset) = unsafe {
                    let e = r.base.as_ptr().add(i);
                    let flags = &*(e as *const AtomicU32);
                    let slot = &*(e.add(4) as *const AtomicU32);
                    let offset = &*(e.add(8) as *const AtomicU64);
                    (flags, slot, offset)
                };
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                page(slot.load(Ordering::Relaxed), offset.load(Ordering::Relaxed));
                flags.store(GFN_RESET, Ordering::Release);
                r.fetch = r.fetch.wrapping_add(1);
                n += 1;
            }
        }
        if n > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is the
            // VM's, open while `self.vm` is held.
            let rc = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _, 0) };
            if rc < 0 {
                return Err(KvmError::Config(format!(
                    "KVM_RESET_DIRTY_RINGS: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for DirtyRings {
    fn drop(&mut self) {
        for r in &self.rings {
            // SAFETY: unmaps exactly the mapping `map` made; nothing refers
            // to it after this.
            unsafe {
                libc::munmap(
                    r.base.as_ptr() as *mut libc::c_void,
                    r.entries as usize * ENTRY_BYTES,
                );
            }
        }
    }
}

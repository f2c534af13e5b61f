//! Guest memory registered with KVM as memory slots: the one owner of
//! the mapping and of the slots that point into it, so that no slot can
//! outlive the memory it names.

use super::uffd;
use crate::KvmError;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::sync::Arc;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory whose VMM-side writes are recorded in a dirty bitmap.
pub type TrackedMemory = GuestMemoryMmap<AtomicBitmap>;

/// One KVM memory slot: region `index` of the memory, at `guest_addr`,
/// mapped at `host_addr` in this process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) index: u32,
    /// Flags the slot keeps besides dirty logging.
    pub(crate) flags: u32,
    pub(crate) guest_addr: u64,
    pub(crate) size: u64,
    pub(crate) host_addr: u64,
}

impl Slot {
    fn contains(&self, host: u64, len: u64) -> bool {
        host >= self.host_addr
            && host
                .checked_add(len)
                .is_some_and(|end| end <= self.host_addr + self.size)
    }
}

/// The VM, its guest memory, and the slots that map one into the other.
///
/// The slots were either registered here (`owns_slots`), and are removed
/// in `drop` before the memory is unmapped, or registered by the VMM
/// under its own ids over this same mapping, and stay the VMM's.
pub(crate) struct GuestSlots {
    vm: Arc<VmFd>,
    memory: TrackedMemory,
    slots: Vec<Slot>,
    owns_slots: bool,
}

impl GuestSlots {
    /// Takes `memory` with its `slots` (one per region, in order);
    /// registers nothing yet.
    pub(crate) fn new(
        vm: Arc<VmFd>,
        memory: TrackedMemory,
        slots: Vec<Slot>,
        owns_slots: bool,
    ) -> Self {
        GuestSlots {
            vm,
            memory,
            slots,
            owns_slots,
        }
    }

    /// The VM.
    pub(crate) fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The guest memory.
    pub(crate) fn memory(&self) -> &TrackedMemory {
        &self.memory
    }

    /// The slots, one per region of the memory.
    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The slots, to set the flags each keeps.
    pub(crate) fn slots_mut(&mut self) -> &mut [Slot] {
        &mut self.slots
    }

    /// (Re)registers slot `s` (one of [`GuestSlots::slots`]) with its own
    /// flags plus `extra` (dirty logging, or 0).
    pub(crate) fn set_slot(&self, s: &Slot, extra: u32) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: s.index,
            guest_phys_addr: s.guest_addr,
            memory_size: s.size,
            userspace_addr: s.host_addr,
            flags: s.flags | extra,
        };
        // `s` describes a region of `self.memory` (built from it in `new`'s
        // caller and never changed), which this struct owns and unmaps
        // only after `drop` has removed the slots it registered.
        // SAFETY: the slot points at that live mapping; KVM reads and
        // writes it only as guest memory.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| KvmError::Ioctl {
            op: "KVM_SET_USER_MEMORY_REGION",
            source: e,
        })
    }

    /// Drops the contents of `len` bytes at host address `host`, which
    /// must lie inside one slot, so that they read as absent (a
    /// registered userfaultfd then reports the next access).
    pub(crate) fn drop_pages(&self, host: u64, len: u64) -> std::io::Result<()> {
        if !self.slots.iter().any(|s| s.contains(host, len)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{len} bytes at {host:#x} are not guest memory"),
            ));
        }
        // Guest memory is only ever accessed through vm-memory's volatile
        // accessors, never through Rust references, so its contents may
        // change under them.
        // SAFETY: the range lies inside the mapping of `self.memory`,
        // which this struct owns (checked above).
        unsafe { uffd::drop_pages(host, len) }
    }
}

impl Drop for GuestSlots {
    /// Removes the slots this struct registered before its mapping can go:
    /// once KVM has deleted a slot, no vCPU reaches that memory, whether or
    /// not the VMM stopped its vCPUs first. Adopted slots stay the VMM's.
    fn drop(&mut self) {
        if !self.owns_slots {
            return;
        }
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.index,
                guest_phys_addr: s.guest_addr,
                memory_size: 0,
                userspace_addr: s.host_addr,
                flags: 0,
            };
            // SAFETY: a size of 0 deletes the slot; KVM stops using the
            // mapping before the ioctl returns and does not touch it again.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
                tracing::warn!(slot = s.index, error = %e, "could not remove a memory slot");
            }
        }
    }
}

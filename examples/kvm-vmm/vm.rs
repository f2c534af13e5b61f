//! The VM of this VMM: memory in two regions registered as its own KVM
//! slots, the vCPUs, and the loaders.

use super::*;

// The VM: memory, slots, vCPUs.

/// One VM of this VMM.
pub(crate) struct Vm {
    /// The vCPU threads; stopped and joined first when the VM goes.
    pub(crate) vcpus: Arc<VcpuThreads>,
    /// The guest memory, as the backend sees it.
    pub(crate) memory: Arc<KvmMemory>,
    /// Pause, resume, save and restore for the migration engines.
    pub(crate) control: KvmControl,
}

impl Drop for Vm {
    /// Stops and joins every vCPU thread before the memory can be unmapped:
    /// the slots are this VMM's (adopted, not owned by `KvmMemory`), so
    /// nothing else keeps a vCPU from reaching memory that is gone.
    fn drop(&mut self) {
        self.vcpus.shutdown();
    }
}

impl Vm {
    /// A VM with `mem` bytes of memory in two slots from `first_slot`, an
    /// in-kernel irqchip and PIT, and `vcpus` vCPUs, each on its own
    /// thread, paused. `setup_vcpu0` prepares the first vCPU (and guest
    /// memory) before its thread starts.
    pub(crate) fn new(
        mem: u64,
        vcpus: usize,
        first_slot: u32,
        setup_vcpu0: impl FnOnce(&TrackedMemory, &VcpuFd) -> Result<(), Failure>,
    ) -> Result<Vm, Failure> {
        let kvm = Kvm::new().map_err(setup("opening /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?);

        // Guest memory with vm-memory's dirty bitmap (so the VMM's own
        // writes are tracked too): two regions, two slots.
        let memory = TrackedMemory::from_ranges(&[
            (GuestAddress(0), LOW_REGION as usize),
            (GuestAddress(LOW_REGION), (mem - LOW_REGION) as usize),
        ])
        .map_err(setup("guest memory"))?;
        if let Err(e) = advise_huge_pages(&memory) {
            eprintln!("kvm-vmm {}: guest memory on 4 KiB pages ({e})", role());
        }
        let slot_ids = register_slots(&vm, &memory, first_slot)?;

        vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config::default())
            .map_err(setup("KVM_CREATE_PIT2"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
        let mut fds = Vec::new();
        for id in 0..vcpus as u64 {
            let fd = vm.create_vcpu(id).map_err(setup("KVM_CREATE_VCPU"))?;
            let own = vcpu_cpuid(&cpuid, id as u32);
            fd.set_cpuid2(&own).map_err(setup("KVM_SET_CPUID2"))?;
            fds.push(fd);
        }
        setup_vcpu0(&memory, &fds[0])?;

        // The backend takes the memory over; the slots stay this VMM's.
        let memory = Arc::new(
            KvmMemory::adopt(vm.clone(), memory, &slot_ids).map_err(setup("adopting memory"))?,
        );
        let vcpus = Arc::new(VcpuThreads::start(fds).map_err(setup("vCPU threads"))?);
        let control = KvmControl::new(vm, Arc::new(VcpuCaps::probe(&kvm)), vcpus.clone());
        Ok(Vm {
            vcpus,
            memory,
            control,
        })
    }
}

/// Registers each region of `memory` with `vm` as slot `first_slot + i`,
/// the way a VMM does before any migration library is involved.
pub(crate) fn register_slots(
    vm: &VmFd,
    memory: &TrackedMemory,
    first_slot: u32,
) -> Result<Vec<u32>, Failure> {
    let mut ids = Vec::new();
    for (i, r) in memory.iter().enumerate() {
        let slot = first_slot + i as u32;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: r.start_addr().raw_value(),
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the slot maps a region of `memory`, which the VM keeps
        // (through `KvmMemory`) until its vCPU threads are joined; KVM uses
        // the mapping only as this guest's memory.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| Failure::Setup(format!("KVM_SET_USER_MEMORY_REGION slot {slot}: {e}")))?;
        ids.push(slot);
    }
    Ok(ids)
}

/// Puts a boot sector at 0x7c00 and the first vCPU where a BIOS leaves
/// it: real mode, CS = 0, IP = 0x7c00, DL = 0x80 (the boot drive).
pub(crate) fn load_boot_sector(
    memory: &TrackedMemory,
    vcpu: &VcpuFd,
    code: &[u8],
) -> Result<(), Failure> {
    if code.is_empty() || code.len() as u64 > BOOT_END - BOOT_ADDR {
        return Err(Failure::Usage(format!(
            "a boot sector is 1 to {} bytes, not {}",
            BOOT_END - BOOT_ADDR,
            code.len()
        )));
    }
    memory
        .write_slice(code, GuestAddress(BOOT_ADDR))
        .map_err(setup("loading the boot sector"))?;
    let mut s = vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
    // After reset CS is f000 with base ffff0000; a BIOS jumps to 0:7c00.
    s.cs.selector = 0;
    s.cs.base = 0;
    vcpu.set_sregs(&s).map_err(setup("KVM_SET_SREGS"))?;
    let mut r = vcpu.get_regs().map_err(setup("KVM_GET_REGS"))?;
    r.rip = BOOT_ADDR;
    r.rflags = 0x2;
    r.rdx = 0x80;
    vcpu.set_regs(&r).map_err(setup("KVM_SET_REGS"))
}

// vCPU threads and the Vcpus trait.

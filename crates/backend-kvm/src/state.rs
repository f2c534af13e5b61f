//! A guest's migratable state: reading and writing it over a VMM's own
//! `&VmFd` and `&VcpuFd`s, and the versioned form a migration carries.

use crate::KvmError;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use migrate_core::{BackendError, BackendErrorKind, DeviceState};
use serde::{Deserialize, Serialize};

/// Name of this backend's device-state format.
pub const STATE_FORMAT: &str = "kvm";
/// Version of that format.
pub const STATE_VERSION: u32 = 2;

/// The state of one vCPU that a migration carries. Parts the host or VM
/// does not have (no in-kernel LAPIC, no XSAVE) are `None`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU and SSE state (used when XSAVE is not carried).
    pub fpu: Fpu,
    /// Extended processor state.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Model-specific registers: every one in the host's save list that
    /// this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The in-kernel local APIC.
    pub lapic: Option<kvm_lapic_state>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: Option<kvm_vcpu_events>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Run state (running, halted, waiting for INIT/SIPI).
    pub mp_state: Option<kvm_mp_state>,
}

/// VM-wide device state: the in-kernel interrupt controllers, PIT and
/// kvmclock, where the VM has them.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
}

/// What a vCPU can carry on this host, worked out once.
#[derive(Clone, Debug, Default)]
pub struct VcpuCaps {
    /// MSR indices to save (the host's list).
    pub msr_indices: Vec<u32>,
    /// Whether XSAVE state fits the legacy 4 KiB `kvm_xsave`, so that
    /// `KVM_SET_XSAVE` copies no more than the struct holds.
    pub xsave_legacy: bool,
}

impl VcpuCaps {
    /// Asks the host.
    pub fn probe(kvm: &kvm_ioctls::Kvm) -> Self {
        use kvm_ioctls::Cap;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let xsave = kvm.check_extension(Cap::Xsave);
        let size = kvm.check_extension_int(Cap::Xsave2);
        VcpuCaps {
            msr_indices,
            xsave_legacy: xsave && size <= 4096,
        }
    }
}

/// `kvm_fpu`, field for field, in a form serde can carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// SSE registers.
    pub xmm: Vec<[u8; 16]>,
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl Fpu {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// A guest's migratable state: the VM's devices and its vCPUs, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct GuestState {
    /// VM-wide state.
    pub vm: VmState,
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuState>,
}

/// Reads the VM-wide state.
pub fn save_vm(vm: &VmFd) -> VmState {
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        if vm.get_irqchip(&mut c).is_ok() {
            irqchips.push(c);
        }
    }
    VmState {
        irqchips,
        pit: vm.get_pit2().ok(),
        clock: vm.get_clock().ok(),
    }
}

/// Writes the VM-wide state.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), KvmError> {
    for c in &s.irqchips {
        vm.set_irqchip(c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    if let Some(p) = &s.pit {
        vm.set_pit2(p).map_err(ioctl("KVM_SET_PIT2"))?;
    }
    if let Some(c) = &s.clock {
        // Only the clock value carries over; flags describe the source host.
        let clock = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    }
    Ok(())
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Reads the MSRs in `indices` that the vCPU can read. `KVM_GET_MSRS`
/// stops at the first it cannot; that one is skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let chunk = &indices[i..(i + 256).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|index| kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        i += if n < chunk.len() { n + 1 } else { n };
    }
    Ok(out)
}

/// Reads a vCPU's state.
pub fn save_vcpu(fd: &VcpuFd, caps: &VcpuCaps) -> Result<VcpuState, KvmError> {
    Ok(VcpuState {
        regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
        fpu: Fpu::from(&fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?),
        xsave: if caps.xsave_legacy {
            fd.get_xsave().ok()
        } else {
            None
        },
        xcrs: fd.get_xcrs().ok(),
        msrs: read_msrs(fd, &caps.msr_indices)?,
        lapic: fd.get_lapic().ok(),
        events: fd.get_vcpu_events().ok(),
        debugregs: fd.get_debug_regs().ok(),
        mp_state: fd.get_mp_state().ok(),
    })
}

/// Writes a vCPU's state, in the order KVM needs: special registers, then
/// general ones, FPU or XSAVE and XCRs, MSRs, events, the LAPIC, the run
/// state and the debug registers.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState, caps: &VcpuCaps) -> Result<(), KvmError> {
    fd.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
    match &s.xsave {
        Some(x) if caps.xsave_legacy => crate::sys::set_xsave_legacy(fd, x, caps.xsave_legacy)?,
        _ => fd.set_fpu(&s.fpu.to_kvm()).map_err(ioctl("KVM_SET_FPU"))?,
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    if !s.msrs.is_empty() {
        let msrs = Msrs::from_entries(&s.msrs)
            .map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if n != s.msrs.len() {
            return Err(KvmError::Config(format!(
                "the destination refused MSR {:#x} ({} of {} set)",
                s.msrs[n].index,
                n,
                s.msrs.len()
            )));
        }
    }
    if let Some(e) = &s.events {
        fd.set_vcpu_events(e)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    }
    if let Some(l) = &s.lapic {
        fd.set_lapic(l).map_err(ioctl("KVM_SET_LAPIC"))?;
    }
    if let Some(m) = s.mp_state {
        fd.set_mp_state(m).map_err(ioctl("KVM_SET_MP_STATE"))?;
    }
    if let Some(d) = &s.debugregs {
        fd.set_debug_regs(d).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    }
    Ok(())
}

/// Saves the whole guest, the VM's devices and each of `vcpus` in order,
/// as the [`DeviceState`] a migration carries. Every vCPU must be out of
/// `KVM_RUN` and kept out until this returns.
pub fn save_guest(vm: &VmFd, vcpus: &[&VcpuFd], caps: &VcpuCaps) -> Result<DeviceState, KvmError> {
    let vcpus = vcpus
        .iter()
        .map(|fd| save_vcpu(fd, caps))
        .collect::<Result<Vec<_>, _>>()?;
    encode_guest(&GuestState {
        vm: save_vm(vm),
        vcpus,
    })
}

/// The [`DeviceState`] form of a guest's state (what [`save_guest`]
/// returns, for a VMM that saved the parts itself).
pub fn encode_guest(state: &GuestState) -> Result<DeviceState, KvmError> {
    let data = serde_json::to_vec(state)
        .map_err(|e| KvmError::Config(format!("encoding the guest state: {e}")))?;
    Ok(DeviceState {
        format: STATE_FORMAT.into(),
        version: STATE_VERSION,
        data,
    })
}

/// Decodes a [`DeviceState`] saved by [`save_guest`], checking its format,
/// version and vCPU count against a VM of `vcpus` vCPUs.
pub fn decode_guest(state: &DeviceState, vcpus: usize) -> Result<GuestState, BackendError> {
    if state.format != STATE_FORMAT || state.version != STATE_VERSION {
        return Err(BackendError::new(
            BackendErrorKind::IncompatibleState,
            format!(
                "state {} v{} is not {STATE_FORMAT} v{STATE_VERSION}",
                state.format, state.version
            ),
        ));
    }
    let g: GuestState = serde_json::from_slice(&state.data).map_err(|e| {
        BackendError::with_source(
            BackendErrorKind::IncompatibleState,
            format!("bad kvm state: {e}"),
            e,
        )
    })?;
    if g.vcpus.len() != vcpus {
        return Err(BackendError::new(
            BackendErrorKind::IncompatibleState,
            format!("state has {} vCPUs, this VM {vcpus}", g.vcpus.len()),
        ));
    }
    Ok(g)
}

/// The CPUID a VMM gives vCPU `id`: the host's supported entries
/// (`Kvm::get_supported_cpuid`) with this vCPU's own APIC IDs, the initial
/// APIC ID in leaf 1's EBX\[31:24\] and the x2APIC ID in EDX of leaves 0xb
/// and 0x1f. Guests find their CPU number there, and a restored guest
/// must see the same numbers as on its source.
pub fn vcpu_cpuid(supported: &kvm_bindings::CpuId, id: u32) -> kvm_bindings::CpuId {
    let mut own = supported.clone();
    for e in own.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    own
}

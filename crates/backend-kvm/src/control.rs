//! Pausing, resuming, saving and restoring a guest whose vCPU threads
//! belong to the VMM.

use crate::state::{
    decode_guest, encode_guest, restore_vcpu, restore_vm, save_vcpu, save_vm, GuestState, VcpuCaps,
};
use crate::KvmError;
use kvm_ioctls::{VcpuFd, VmFd};
use migrate_core::{BackendError, BackendErrorKind, DeviceState, GuestControl};
use std::sync::Arc;
use std::time::Duration;

/// A VMM's vCPUs, as the migration needs them: the VMM keeps its own
/// threads and exit handling and implements this over them.
///
/// A VMM built on kvm-ioctls runs each vCPU in a loop on its own thread.
/// To implement `pause`, enter the guest through a [`VcpuKick`]
/// (`kick.run(&mut vcpu)` in place of `vcpu.run()`), have `pause` set the
/// VMM's own "paused" flag and call `kick.kick()` for each vCPU, and have
/// the loop park when it sees the flag; `resume` clears the flag, calls
/// `kick.reset()` and wakes the loop. `examples/kvm-vmm/` does exactly
/// this; `docs/kvm.md` walks through it.
///
/// [`VcpuKick`]: crate::VcpuKick
pub trait Vcpus: Send + Sync {
    /// How many vCPUs the guest has; the order of `with_vcpu`'s indices is
    /// the order their state is saved and restored in.
    fn count(&self) -> usize;

    /// Stops every vCPU and waits, at most `timeout`, until none is inside
    /// `KVM_RUN`. Once it returns `Ok`, no vCPU enters the guest until
    /// [`Vcpus::resume`]. Even when it times out, no vCPU may enter the
    /// guest again until `resume`.
    ///
    /// A vCPU that parks right after an I/O or MMIO exit must first have
    /// that access completed ([`VcpuKick::complete_pending`]): KVM
    /// finishes it only on the next entry, and the saved state would
    /// otherwise have the destination run the instruction again.
    ///
    /// [`VcpuKick::complete_pending`]: crate::VcpuKick::complete_pending
    fn pause(&self, timeout: Duration) -> Result<(), KvmError>;

    /// Lets every vCPU run again.
    fn resume(&self) -> Result<(), KvmError>;

    /// Runs `f` on vCPU `index`'s fd. Called only while paused.
    fn with_vcpu(
        &self,
        index: usize,
        f: &mut dyn FnMut(&VcpuFd) -> Result<(), KvmError>,
    ) -> Result<(), KvmError>;

    /// CPU time the vCPU threads have used, where the VMM can say (the
    /// statistics' guest CPU figures); `None` by default.
    fn cpu_time(&self) -> Option<Duration> {
        None
    }

    /// Why the guest cannot run, if it cannot (a vCPU stopped on an exit
    /// the VMM could not handle); a resume is refused with this. `None`
    /// by default.
    fn fault(&self) -> Option<String> {
        None
    }

    /// Auto-converge: holds every vCPU out of the guest for `pct` percent
    /// of the time from now on (at most 99; 0 lifts it). A VMM that
    /// cannot keeps the default, which refuses with
    /// [`KvmError::Unsupported`]; the migration then runs unthrottled.
    ///
    /// One way, QEMU's: after each stay in the guest, a vCPU thread
    /// sleeps `pct / (100 - pct)` times as long as it ran, and a timer
    /// kicks every vCPU out of the guest each few milliseconds so that a
    /// guest that never exits is held too.
    fn set_throttle(&self, pct: u8) -> Result<(), KvmError> {
        Err(KvmError::Unsupported(format!(
            "this VMM cannot throttle its vCPUs (asked for {pct}%)"
        )))
    }
}

/// How long [`KvmControl`] waits for the vCPUs to pause.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// [`GuestControl`] over a VM and the VMM's [`Vcpus`]: pause and resume
/// through the VMM, the state saved and restored as [`save_guest`] and
/// [`restore_vcpu`] do.
///
/// [`save_guest`]: crate::save_guest
#[derive(Clone)]
pub struct KvmControl {
    vm: Arc<VmFd>,
    caps: Arc<VcpuCaps>,
    vcpus: Arc<dyn Vcpus>,
}

impl std::fmt::Debug for KvmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmControl")
            .field("vcpus", &self.vcpus.count())
            .finish_non_exhaustive()
    }
}

impl KvmControl {
    /// Control over `vm` and its `vcpus`; `caps` from [`VcpuCaps::probe`].
    pub fn new(vm: Arc<VmFd>, caps: Arc<VcpuCaps>, vcpus: Arc<dyn Vcpus>) -> Self {
        KvmControl { vm, caps, vcpus }
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &Arc<dyn Vcpus> {
        &self.vcpus
    }
}

impl GuestControl for KvmControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        self.vcpus.pause(PAUSE_TIMEOUT).map_err(BackendError::from)
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        if let Some(f) = self.vcpus.fault() {
            return Err(BackendError::new(BackendErrorKind::InvalidState, f));
        }
        self.vcpus.resume().map_err(BackendError::from)
    }

    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        // The trait lends each fd only inside its closure: vCPU by vCPU.
        let n = self.vcpus.count();
        let mut saved = Vec::with_capacity(n);
        for i in 0..n {
            self.vcpus
                .with_vcpu(i, &mut |fd| {
                    saved.push(save_vcpu(fd, &self.caps)?);
                    Ok(())
                })
                .map_err(BackendError::from)?;
        }
        encode_guest(&GuestState {
            vm: save_vm(&self.vm),
            vcpus: saved,
        })
        .map_err(BackendError::from)
    }

    fn guest_cpu_time(&self) -> Option<Duration> {
        self.vcpus.cpu_time()
    }

    fn set_throttle(&mut self, pct: u8) -> Result<(), BackendError> {
        self.vcpus.set_throttle(pct).map_err(BackendError::from)
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        let g = decode_guest(state, self.vcpus.count())?;
        restore_vm(&self.vm, &g.vm).map_err(BackendError::from)?;
        for (i, s) in g.vcpus.iter().enumerate() {
            self.vcpus
                .with_vcpu(i, &mut |fd| restore_vcpu(fd, s, &self.caps))
                .map_err(BackendError::from)?;
        }
        Ok(())
    }
}

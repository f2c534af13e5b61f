//! # backend-kvm
//!
//! Real KVM guests for the livemig live-migration library, through
//! `kvm-ioctls` and `vm-memory`:
//!
//! - [`KvmMemory`]: a VMM's `GuestMemoryMmap` registered with KVM, one
//!   slot per region; [`KvmDirtyTracker`] on `KVM_MEM_LOG_DIRTY_PAGES` and
//!   `KVM_GET_DIRTY_LOG`, merged with the VMM's own writes through
//!   vm-memory's dirty bitmap (a peek keeps what it read, so no bit is lost);
//!   [`KvmPages`] reads and writes pages for the source and destination;
//! - [`Vcpus`]: the VMM's own vCPU threads, as the migration needs them
//!   (pause, resume, the fds while paused); [`VcpuKick`] gets a vCPU out
//!   of `KVM_RUN` whatever its guest does, for the VMM's pause;
//!   [`KvmControl`] pauses, resumes, saves and restores the guest through
//!   them as a versioned state ([`save_guest`], [`restore_vcpu`],
//!   [`restore_vm`]): per vCPU the general, special and debug registers,
//!   FPU or XSAVE and XCRs, the MSRs of the host's save list, the LAPIC,
//!   pending events and the run state; per VM the PIC, IOAPIC, PIT and
//!   kvmclock;
//! - with the `test-vmm` feature, `TestVm`, a small VMM with a 75-byte
//!   payload that dirties pages and reports its progress, for tests and
//!   examples; it is built on this public API alone.
//!
//! - [`DirtyRings`]: KVM's per-vCPU dirty ring as the dirty log, in place
//!   of the bitmap, for guests whose memory is large and whose writes are
//!   few;
//! - post-copy destinations: [`KvmMemory::enable_postcopy`] puts the memory
//!   under userfaultfd, a [`FaultHandler`] reports the guest's faults, and
//!   [`KvmFaults`] hands them to the core's destination driver
//!   (`migrate_core::driver::run_destination`), which asks the source for
//!   those pages first;
//! - auto-converge: [`Vcpus::set_throttle`] holds the VMM's vCPUs out of
//!   the guest for a share of each period.
//!
//! ```text
//!  VMM: VmFd + GuestMemoryMmap + VcpuFd
//!        │            │              │
//!        ▼            ▼              ▼
//!  KvmDirtyTracker  KvmPages     KvmControl ──▶ migrate_core engines
//! ```

//! ## From a VMM
//!
//! A VMM hands over what it already has: its `VmFd`, its guest memory
//! and the slot ids it registered it under, and its vCPU threads behind
//! the [`Vcpus`] trait (`no_run`: it needs `/dev/kvm` and a guest). The
//! versions of kvm-ioctls, kvm-bindings and vm-memory this crate speaks
//! are re-exported as [`kvm_ioctls`], [`kvm_bindings`] and [`vm_memory`].
//! `docs/kvm.md` walks through the whole wiring, with
//! `examples/kvm-vmm/`.
//!
//! ```no_run
//! use backend_kvm::{KvmControl, KvmMemory, KvmDirtyTracker, KvmPages, TrackedMemory, VcpuCaps, Vcpus};
//! use backend_kvm::kvm_ioctls::Kvm;
//! use backend_kvm::vm_memory::GuestAddress;
//! use migrate_core::driver::{run_source, DEFAULT_PEER_TIMEOUT};
//! use migrate_core::{Clock, EngineConfig, Precopy, SourceEngine, StreamTransport, SystemClock};
//! use std::sync::Arc;
//!
//! # fn vmm_vcpus() -> Arc<dyn Vcpus> { panic!("stands for the VMM's own vCPUs") }
//! let kvm = Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! // The VMM's memory (with vm-memory's dirty bitmap, so its own writes
//! // are tracked too), which it registered as slot 3.
//! let memory = TrackedMemory::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
//! let memory = Arc::new(KvmMemory::adopt(vm.clone(), memory, &[3])?);
//! // The VMM's vCPU threads, which enter the guest through a VcpuKick.
//! let vcpus: Arc<dyn Vcpus> = vmm_vcpus();
//!
//! let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
//! let mut engine = SourceEngine::new(
//!     KvmDirtyTracker(memory.clone()),
//!     KvmPages(memory.clone()),
//!     KvmControl::new(vm.clone(), Arc::new(VcpuCaps::probe(&kvm)), vcpus),
//!     Precopy::default(),
//!     clock,
//!     EngineConfig::default(),
//! );
//! let mut transport = StreamTransport::connect_tcp("destination.example:7000")?;
//! let stats = run_source(&mut engine, &mut transport, DEFAULT_PEER_TIMEOUT)?;
//! println!("{stats}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)]
#![warn(unreachable_pub)]

pub use kvm_bindings;
pub use kvm_ioctls;
pub use vm_memory;

mod control;
mod memory;
mod pagemap;
mod postcopy;
mod prefault;
mod state;
#[allow(unsafe_code)]
mod sys;
#[cfg(feature = "test-vmm")]
mod testvm;

pub use control::{KvmControl, Vcpus, PAUSE_TIMEOUT};
pub use memory::{KvmDirtyTracker, KvmMemory, KvmPages};
pub use postcopy::{FaultHandler, KvmFaults};
pub use prefault::{PrefaultReport, PrefaultUnavailable};
pub use state::{
    decode_guest, encode_guest, restore_vcpu, restore_vm, save_guest, save_vcpu, save_vm,
    vcpu_cpuid, Fpu, GuestState, VcpuCaps, VcpuState, VmState, STATE_FORMAT, STATE_VERSION,
};
pub use sys::{
    advise_huge_pages, default_kick_signal, enable_dirty_ring, max_ring_entries, DirtyRings,
    TrackedMemory, VcpuKick,
};
#[cfg(feature = "test-vmm")]
pub use testvm::{
    enter_multiboot, load_multiboot, DirtyLog, MultibootEntry, Pacing, Report, RingFull, Runners,
    TestVm, Throttle, VcpuRecord, VcpuRunner, VcpuWatch, COMPUTE_PAYLOAD, PAYLOAD, PAYLOAD_ADDR,
    REPORT_PORT, THROTTLE_SLICE, WSS_BASE,
};

use std::time::Duration;

/// Errors of the KVM backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Open(String),
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A memory region not aligned to 4 KiB.
    #[error("memory region at {guest_addr:#x} of {size} bytes is not 4 KiB aligned")]
    Unaligned {
        /// Its guest-physical start.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// The memory does not form a valid layout.
    #[error("invalid memory layout: {0}")]
    Layout(#[source] migrate_core::LayoutError),
    /// A vCPU did not leave the guest in time.
    #[error("vCPU did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// A thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// A userfaultfd operation failed (post-copy destinations).
    #[error("userfaultfd: {op} failed: {source}")]
    Userfault {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM cannot do what was asked (throttle its vCPUs, for one).
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl From<KvmError> for migrate_core::BackendError {
    /// The error as the core's backend error, of the kind a caller can act
    /// on, with the KVM error kept as its source.
    fn from(e: KvmError) -> Self {
        use migrate_core::BackendErrorKind as Kind;
        let kind = match &e {
            KvmError::PauseTimeout(_) => Kind::InvalidState,
            KvmError::Open(_) | KvmError::Unsupported(_) => Kind::Unsupported,
            KvmError::Unaligned { .. } | KvmError::Layout(_) | KvmError::Config(_) => {
                Kind::InvalidArgument
            }
            _ => Kind::Io,
        };
        migrate_core::BackendError::with_source(kind, e.to_string(), e)
    }
}

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
//! - [`VcpuRunner`] runs a vCPU on a thread and pauses it at its next
//!   exit; [`KvmControl`] pauses, resumes, saves and restores the guest as
//!   a versioned state: per vCPU the general, special and debug registers,
//!   FPU or XSAVE and XCRs, the MSRs of the host's save list, the LAPIC,
//!   pending events and the run state; per VM the PIC, IOAPIC, PIT and
//!   kvmclock;
//! - [`TestVm`], a small VMM with a 75-byte payload that dirties pages and
//!   reports its progress, for tests and examples.
//!
//! - [`DirtyRings`]: KVM's per-vCPU dirty ring as the dirty log, in place
//!   of the bitmap, for guests whose memory is large and whose writes are
//!   few;
//! - post-copy destinations: [`KvmMemory::enable_postcopy`] puts the memory
//!   under userfaultfd, a [`FaultHandler`] reports the guest's faults, and
//!   [`run_kvm_destination`] asks the source for those pages first.
//!
//! ```text
//!  VMM: VmFd + GuestMemoryMmap + VcpuFd
//!        │            │              │
//!        ▼            ▼              ▼
//!  KvmDirtyTracker  KvmPages     KvmControl ──▶ migrate_core engines
//! ```

//! ## From a VMM
//!
//! A VMM hands over what it already has; here a VM built from scratch
//! stands in for it (`no_run`: it needs `/dev/kvm` and a guest to run).
//!
//! ```no_run
//! use backend_kvm::{KvmControl, KvmMemory, KvmDirtyTracker, KvmPages, TrackedMemory, VcpuCaps, VcpuRunner};
//! use kvm_ioctls::Kvm;
//! use migrate_core::driver::{run_source, DEFAULT_PEER_TIMEOUT};
//! use migrate_core::{Clock, EngineConfig, Precopy, SourceEngine, StreamTransport, SystemClock};
//! use std::sync::Arc;
//! use vm_memory::GuestAddress;
//!
//! // What the VMM has: a VM, its memory (with vm-memory's dirty bitmap, so
//! // the VMM's own writes are tracked too) and its vCPUs.
//! let kvm = Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let memory = TrackedMemory::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
//! let memory = Arc::new(KvmMemory::register(vm.clone(), memory)?);
//! let vcpu = vm.create_vcpu(0)?;
//! // ... the VMM loads its guest and sets up the vCPU here ...
//! let runners = Arc::new(vec![VcpuRunner::new(vcpu, None)?]);
//! runners[0].resume();
//!
//! // Migrating it: three handles and an engine.
//! let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
//! let mut engine = SourceEngine::new(
//!     KvmDirtyTracker(memory.clone()),
//!     KvmPages(memory.clone()),
//!     KvmControl::new(vm.clone(), Arc::new(VcpuCaps::probe(&kvm)), runners),
//!     Precopy::default(),
//!     clock,
//!     EngineConfig::default(),
//! );
//! let mut transport = StreamTransport::connect_tcp("destination.example:7000")?;
//! let stats = run_source(&mut engine, &mut transport, DEFAULT_PEER_TIMEOUT)?;
//! println!("{stats}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod memory;
mod postcopy;
mod ring;
mod testvm;
mod uffd;
mod vcpu;

pub use memory::{KvmDirtyTracker, KvmMemory, KvmPages, TrackedMemory};
pub use postcopy::{run_kvm_destination, FaultHandler};
pub use ring::{enable_dirty_ring, max_ring_entries, DirtyRings};
pub use testvm::{DirtyLog, Pacing, TestVm, PAYLOAD, PAYLOAD_ADDR, REPORT_PORT, WSS_BASE};
pub use vcpu::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, Fpu, GuestState, KvmControl, Report, RingFull,
    Throttle, VcpuCaps, VcpuRunner, VcpuState, VmState, STATE_FORMAT, STATE_VERSION,
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
    Layout(migrate_core::page::LayoutError),
    /// A vCPU did not leave the guest in time.
    #[error("vCPU did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// A thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
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
}

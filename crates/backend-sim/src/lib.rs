//! # backend-sim
//!
//! A deterministic simulated guest for the livemig live-migration library:
//! guest memory (byte-accurate, or compact for guests up to 1 TiB), seeded
//! workloads that write it as virtual time passes, exact dirty tracking,
//! a link with bandwidth and latency, and a harness that runs a whole
//! migration in virtual time.
//!
//! ```text
//!  VirtualClock ──────────────┬──────────────────────────┐
//!  SimGuest (source)          │                          │   SimGuest (destination)
//!   workload ─▶ memory ─▶ SourceEngine ─▶ Link ─▶ DestinationEngine ─▶ memory
//!   dirty bitmap ─────────▶     ▲                    │
//!                               └──── Link ◀─────────┘
//! ```
//!
//! The same seed gives the same statistics, bit for bit. The simulator
//! models time spent on the link, not host CPU time: copying and digesting
//! pages take no virtual time.
//!
//! ```
//! use backend_sim::{simulate, Link, SimConfig, WorkloadKind, WorkloadSpec};
//! use migrate_core::{MemoryLayout, PageSize, Precopy};
//! use std::time::Duration;
//!
//! let mut workload = WorkloadSpec::new(WorkloadKind::Uniform, 1024, 2000.0, 7);
//! workload.zero_fraction = 0.1;
//! let report = simulate(SimConfig::new(
//!     MemoryLayout::flat(PageSize::DEFAULT, 16 << 20).unwrap(),
//!     workload,
//!     Link::new(1e9, Duration::from_millis(1)),
//!     Box::new(Precopy::default()),
//! ))
//! .unwrap();
//! assert!(report.memory_equal && report.stats.memory_verified);
//! ```

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod evacuate;
mod fault;
pub mod fuzzing;
mod guest;
mod harness;
mod memory;
mod workload;

pub use evacuate::{
    evacuate, fleet, EvacConfig, EvacGuest, EvacReport, FleetShape, GuestOutcome, PolicyFactory,
    Strategy,
};
pub use fault::{Fault, FaultAt, FaultPlan, FaultyTransport};
pub use guest::{
    FaultRecord, SimControl, SimGuest, SimPages, SimTracker, STATE_FORMAT, STATE_VERSION,
};
pub use harness::{simulate, simulate_steered, Link, SimConfig, SimError, SimReport, Steer};
pub use memory::{MemoryMode, SimMemory};
pub use workload::{WorkloadGen, WorkloadKind, WorkloadSpec};

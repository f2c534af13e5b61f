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
//! use backend_sim::{simulate, Link, MemoryMode, SimConfig, WorkloadKind, WorkloadSpec};
//! use migrate_core::{EngineConfig, MemoryLayout, PageSize, Precopy};
//! use std::time::Duration;
//!
//! let report = simulate(SimConfig {
//!     layout: MemoryLayout::flat(PageSize::DEFAULT, 16 << 20).unwrap(),
//!     mode: MemoryMode::Bytes,
//!     workload: WorkloadSpec {
//!         kind: WorkloadKind::Uniform,
//!         wss_pages: 1024,
//!         writes_per_sec: 2000.0,
//!         zero_fraction: 0.1,
//!         seed: 7,
//!         reads_per_write: 0.0,
//!         wss_offset: 0,
//!     },
//!     link: Link::new(1e9, Duration::from_millis(1)),
//!     policy: Box::new(Precopy::default()),
//!     engine: EngineConfig::default(),
//!     time_limit: Duration::from_secs(3600),
//!     resume_pages: Vec::new(),
//! })
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

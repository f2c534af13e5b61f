//! # livemig
//!
//! Live migration of virtual machines. This facade re-exports the core
//! ([`core`]: pages, bitmaps, traits, policies, protocol, engine,
//! statistics) and, behind features, the backends:
//!
//! | feature | module | what it adds |
//! |---|---|---|
//! | `sim` (default) | `sim` | a deterministic simulated guest and link; builds everywhere |
//! | `kvm` | `kvm` | real KVM guests (Linux x86-64) |
//! | `xen` | `xen`, `xen_log` | Xen domains (libraries loaded at run time, so it builds without Xen), and the reader of Xen's own migration logs |
//! | `full` | all of the above | |
//!
//! A VMM implements [`core::DirtyTracker`], [`core::PageSource`] and
//! [`core::GuestControl`] on the source, [`core::PageSink`] (with
//! `PageSource`, for verification) and `GuestControl` on the destination,
//! and runs the two engines over a [`core::Transport`]. Here the simulated
//! guest stands in for a VMM's, on the host clock, over a Unix socket pair:
//!
//! ```
//! # #[cfg(feature = "sim")] {
//! use livemig::core::driver::{run_destination, run_source, DEFAULT_PEER_TIMEOUT};
//! use livemig::core::{
//!     Clock, DestinationEngine, EngineConfig, MemoryLayout, PageSize, Precopy, SourceEngine,
//!     StreamTransport, SystemClock,
//! };
//! use livemig::sim::{MemoryMode, SimGuest, WorkloadKind, WorkloadSpec};
//! use std::os::unix::net::UnixStream;
//! use std::sync::Arc;
//!
//! let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
//! let layout = MemoryLayout::flat(PageSize::DEFAULT, 16 << 20).unwrap();
//! // A guest writing 20,000 pages a second over 1,024 pages.
//! let work = WorkloadSpec::new(WorkloadKind::Uniform, 1024, 20_000.0, 1);
//! let src = SimGuest::source(layout.clone(), MemoryMode::Bytes, work.clone(), clock.clone()).unwrap();
//! let dst = SimGuest::destination(layout, MemoryMode::Bytes, work, clock.clone()).unwrap();
//!
//! let (a, b) = UnixStream::pair().unwrap();
//! let (d, c) = (dst.clone(), clock.clone());
//! let destination = std::thread::spawn(move || {
//!     let mut transport = StreamTransport::new(b).unwrap();
//!     let mut engine = DestinationEngine::new(d.pages(), d.control(), c);
//!     run_destination(&mut engine, &mut transport, None, DEFAULT_PEER_TIMEOUT)
//! });
//!
//! let mut transport = StreamTransport::new(a).unwrap();
//! let mut engine = SourceEngine::new(
//!     src.tracker(),
//!     src.pages(),
//!     src.control(),
//!     Precopy::default(),
//!     clock,
//!     EngineConfig::default(),
//! );
//! let stats = run_source(&mut engine, &mut transport, DEFAULT_PEER_TIMEOUT).unwrap();
//! let report = destination.join().unwrap().unwrap();
//!
//! assert!(stats.memory_verified && report.resume_confirmed);
//! assert_eq!(report.digest.unwrap(), src.digest()); // what arrived is what the source had
//! println!("{stats}");
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod units;

/// The core, [`migrate_core`], re-exported.
pub use migrate_core as core;

#[cfg(feature = "sim")]
pub use backend_sim as sim;

#[cfg(feature = "kvm")]
pub use backend_kvm as kvm;
#[cfg(feature = "xen")]
pub use backend_xen as xen;
#[cfg(feature = "xen")]
pub use xen_log;

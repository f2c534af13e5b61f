//! # migrate-core
//!
//! The core of a live-migration library for virtual machines: it moves a
//! running guest's memory and device state from a source host to a
//! destination host while the guest keeps running, and measures what the
//! move cost (rounds, pages, bytes, downtime and its parts).
//!
//! ```text
//!  source                                               destination
//!  DirtyTracker ─bitmap─▶ SourceEngine ◀─Decision─ Policy
//!  PageSource ──pages──▶      │
//!  GuestControl ◀─pause─      ▼
//!                    protocol records ─▶ Transport ─▶ DestinationEngine
//!                                            ◀── Ready / Resumed ──┤
//!                                                                  ├─▶ PageSink
//!                                                                  └─▶ GuestControl
//! ```
//!
//! What it does:
//! - pages, layouts with holes, dirty bitmaps and per-page counts
//!   ([`page`], [`bitmap`]);
//! - the traits a backend implements ([`backend`]): [`DirtyTracker`],
//!   [`PageSource`], [`PageSink`], [`GuestControl`]; and [`Clock`];
//! - policies that decide, purely, what to send and when to switch over
//!   ([`policy`]): [`Precopy`], [`StopAndCopy`], [`PostCopy`] with
//!   [`Prepaging`] strategies, [`Hybrid`] and [`Hca`];
//! - a bounded, checksummed wire protocol whose decoder never panics
//!   ([`protocol`]) and transports for it ([`transport`]);
//! - source and destination engines as sans-I/O state machines
//!   ([`engine`]) with blocking drivers ([`driver`]);
//! - mutual TLS for the stream transport, every connection bound to
//!   its migration session (`tls`, feature `tls`);
//! - statistics in Xen's per-round and QEMU's total vocabulary ([`stats`]).
//!
//! What it does not do: talk to a hypervisor (that is the backends'
//! work: `backend-sim`, and in time KVM and Xen), compress pages, or choose a destination host.
//!
//! This crate has no unsafe code.

#![forbid(unsafe_code)]

pub mod backend;
pub mod bitmap;
pub mod clock;
pub mod conformance;
pub mod digest;
pub mod driver;
pub mod engine;
pub mod error;
pub mod hca;
pub mod page;
pub mod policy;
pub mod postcopy;
pub mod prepaging;
pub mod protocol;
pub mod stats;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
pub mod units;

pub use backend::{
    BackendError, BackendErrorKind, DeviceState, DirtyTracker, GuestControl, PageSink, PageSource,
};
pub use bitmap::{DirtyBitmap, PageCounts};
pub use clock::{Clock, SystemClock, VirtualClock};
pub use digest::MemoryDigest;
pub use engine::{
    DestStatus, DestinationEngine, DestinationReport, EngineConfig, SourceEngine, SourceStep,
    SourceVerify,
};
pub use error::{ErrorKind, MigrationError};
pub use hca::{Hca, HcaConfig};
pub use page::{MemoryLayout, PageNum, PageSize, Region};
pub use policy::{
    Decision, PageSelection, Policy, PolicyInput, Precopy, PrecopyConfig, StopAndCopy,
};
pub use postcopy::{Hybrid, HybridConfig, PostCopy};
pub use prepaging::{Prepager, Prepaging};
pub use stats::{MigrationStats, PostcopyStats, RoundStats, SwitchReason};
pub use transport::{channel_pair, StreamTransport, Transport, TransportError};

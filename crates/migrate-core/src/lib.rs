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
//!   ([`MemoryLayout`], [`DirtyBitmap`], [`PageCounts`]);
//! - the traits a backend implements: [`DirtyTracker`], [`PageSource`],
//!   [`PageSink`], [`GuestControl`]; and [`Clock`];
//! - policies that decide, purely, what to send and when to switch over
//!   ([`policy`], a file each): [`Precopy`], [`StopAndCopy`], [`PostCopy`]
//!   with [`Prepaging`] strategies, [`Hybrid`] and [`Hca`], chosen by name
//!   with [`PolicyKind`];
//! - a bounded, checksummed wire protocol whose decoder never panics
//!   ([`protocol`]) and transports for it ([`transport`]);
//! - source and destination engines as sans-I/O state machines
//!   ([`SourceEngine`], [`DestinationEngine`]), every timer inside them
//!   and driven by `now`, with blocking drivers ([`driver`]);
//! - a [`MigrationHandle`] on each side of a running migration, for a
//!   VMM's other threads: [`Progress`], [`Event`]s, cancel, and live
//!   changes of the bandwidth cap, the downtime target and the switch to
//!   post-copy; auto-converge ([`AutoConverge`]) through
//!   [`GuestControl::set_throttle`]; `tracing` spans per migration, phase
//!   and round;
//! - statistics in Xen's per-round and QEMU's total vocabulary
//!   ([`MigrationStats`], [`RoundStats`]);
//! - mutual TLS for the stream transport, every connection bound to
//!   its migration session (`tls`, feature `tls`);
//! - with the `conformance` feature, the backend contract as generic
//!   checks a backend's tests run (`conformance`).
//!
//! The modules that stay public are namespaces of their own: the
//! [`driver`]s, the wire [`protocol`], the [`transport`]s, the memory
//! [`digest`], page [`copy`]ing, the simulator's page [`model`]s and
//! the [`policy`] building blocks; everything else is
//! re-exported here. Parsing sizes and rates as people type them is the
//! programs' business (the `livemig` facade's `units`).
//!
//! What it does not do: talk to a hypervisor (that is the backends'
//! work: `backend-sim`, `backend-kvm`, `backend-xen`), compress pages, or
//! choose a destination host.
//!
//! This crate has no unsafe code.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

mod backend;
mod bitmap;
mod clock;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod copy;
pub mod digest;
pub mod driver;
mod engine;
mod error;
pub mod model;
pub mod multistream;
mod page;
pub mod policy;
pub mod protocol;
mod stats;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;

pub use backend::{
    BackendError, BackendErrorKind, DeviceState, DirtyTracker, GuestControl, PagePlacer, PageSink,
    PageSource,
};
pub use bitmap::{DirtyBitmap, Ones, PageCounts};
pub use clock::{Clock, SystemClock, VirtualClock};
pub use digest::MemoryDigest;
pub use engine::{
    AutoConverge, ControlError, DestStatus, DestinationEngine, DestinationReport,
    DestinationVerify, EngineConfig, Event, MigrationHandle, Phase, Progress, SourceEngine,
    SourceStep, SourceVerify, PACING_SLACK,
};
pub use error::{ErrorKind, MigrationError};
pub use model::Payload;
pub use multistream::MultiTransport;
pub use page::{LayoutError, MemoryLayout, PageNum, PageSize, Region, MAX_PAGE_END};
pub use policy::{
    Decision, Hca, HcaConfig, Hybrid, HybridConfig, PageSelection, Policy, PolicyConfig,
    PolicyInput, PolicyKind, PostCopy, Precopy, PrecopyConfig, Prepager, Prepaging, RoundSummary,
    StopAndCopy,
};
pub use stats::{
    CompressionStats, DowntimeParts, MigrationStats, PostcopyStats, RoundStats, SwitchReason,
};
pub use transport::{channel_pair, StreamTransport, Transport, TransportError};

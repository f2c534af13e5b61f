//! # livemig
//!
//! Live migration of virtual machines. This facade re-exports the core
//! ([`core`]: pages, bitmaps, traits, policies, protocol, engine,
//! statistics) and, behind features, the backends: [`sim`] (feature
//! `sim`, on by default) is a deterministic simulated guest and link.

#![forbid(unsafe_code)]

pub use migrate_core as core;

#[cfg(feature = "sim")]
pub use backend_sim as sim;

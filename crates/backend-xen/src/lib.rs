//! Xen backend for livemig: log-dirty tracking, foreign memory mapping,
//! domain control and post-copy paging of Xen domains.
//!
//! Reading the logs Xen itself writes during a migration is the work of
//! the separate `xen-log` crate.
//!
//! All unsafe code is in `xc` (the safe layer over the Xen libraries)
//! and the generated bindings under it; the rest of the crate denies it.

#![deny(unsafe_code)]

pub mod destination;
pub mod domain;
pub mod paging;
pub mod pv;
pub mod state;
#[allow(unsafe_code)]
mod sys;
pub mod walk;
#[allow(unsafe_code)]
pub mod xc;

pub use destination::{prepare_destination, receive, DestinationError, Prepared};
pub use domain::{StopMode, XenControl, XenDirtyTracker, XenDomain, XenPages};
pub use state::XenDeviceState;
pub use xc::{Xen, XenError};

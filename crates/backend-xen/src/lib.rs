//! Xen backend for livemig, and a reader for Xen's own migration logs.
//!
//! [`log`] reads the round lines that xend's `XendCheckpoint` and libxc's
//! `xc:` logging print during a migration into the core's round
//! statistics, and checks their arithmetic.

pub mod domain;
pub mod log;
pub mod paging;
pub mod pv;
pub mod state;
#[allow(unsafe_code)]
mod sys;
pub mod walk;
pub mod xc;

pub use domain::{StopMode, XenControl, XenDirtyTracker, XenDomain, XenPages};
pub use state::XenDeviceState;
pub use xc::{Xen, XenError};

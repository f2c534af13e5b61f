//! Xen backend for livemig: log-dirty tracking, foreign memory mapping,
//! domain control and post-copy paging of Xen domains.
//!
//! Reading the logs Xen itself writes during a migration is the work of
//! the separate `xen-log` crate.
//!
//! All unsafe code is in `xc` (the safe layer over the Xen libraries)
//! and the generated bindings under it; the rest of the crate denies it.

#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod destination;
mod domain;
mod frame;
mod handshake;
mod paging;
mod pv;
mod state;
// Generated bindings: every item is `pub`, as bindgen writes them.
#[allow(unsafe_code, unreachable_pub)]
mod sys;
mod walk;
#[allow(unsafe_code)]
mod xc;

pub use destination::{prepare_destination, receive, DestinationError, Prepared, ReceiveOptions};
pub use domain::{
    common_layout, SourceFrames, StopMode, XenControl, XenDirtyTracker, XenDomain, XenPages,
    SPECIAL_AREA,
};
pub use frame::{Gfn, Mfn, Pfn};
pub use handshake::{answer, offer, AnswerError, HandshakeError, FRAMES_FORMAT, FRAMES_VERSION};
pub use state::XenDeviceState;
pub use walk::ResumeWindow;
pub use xc::{DomainInfo, Scheduler, Xen, XenError};

//! Xen backend for livemig, and a reader for Xen's own migration logs.
//!
//! [`log`] reads the round lines that xend's `XendCheckpoint` and libxc's
//! `xc:` logging print during a migration into the core's round
//! statistics, and checks their arithmetic.

pub mod log;

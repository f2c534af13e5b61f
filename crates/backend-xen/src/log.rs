//! Xen migration logs (being written).

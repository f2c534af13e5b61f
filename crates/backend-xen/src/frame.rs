//! Frame numbers, kept apart by type. Xen names a 4 KiB frame three ways:
//!
//! - [`Gfn`], a guest frame number: the frame as an HVM or PVH guest, and
//!   Xen's p2m for it, name it (what memory paging takes);
//! - [`Pfn`], a PV guest's pseudo-physical frame: the index of its own
//!   p2m, contiguous from 0;
//! - [`Mfn`], a machine frame: where the memory really is, which a PV
//!   guest's page tables hold and a foreign mapping of a PV guest takes.
//!
//! The migration moves pages by the core's `PageNum`, which is the `Gfn`
//! of an HVM/PVH guest and the `Pfn` of a PV guest.

use std::fmt;

macro_rules! frame_number {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}:{:#x}", stringify!($name).to_lowercase(), self.0)
            }
        }
    };
}

frame_number!(
    /// A guest frame number (HVM/PVH).
    Gfn
);
frame_number!(
    /// A PV guest's pseudo-physical frame number.
    Pfn
);
frame_number!(
    /// A machine frame number.
    Mfn
);

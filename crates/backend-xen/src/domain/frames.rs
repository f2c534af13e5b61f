//! Which frames a migration moves: what a source announces to its
//! destination, and the frames two domains have in common.

use super::regions_of;
use crate::frame::Pfn;
use crate::xc::XenError;
use migrate_core::{MemoryLayout, PageSize};

/// What a destination must know of the source before the stream begins:
/// whether it is PV, its frames and, for PV, where its xenstore and
/// console rings are (a PV destination is given memory at exactly these
/// frames; an HVM/PVH destination migrates the frames both have).
///
/// Between two processes it travels as the offer of the handshake
/// ([`crate::offer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFrames {
    /// A PV source.
    pub pv: bool,
    /// The frames that migrate.
    pub layout: MemoryLayout,
    /// PV: the xenstore ring's guest frame (0 otherwise).
    pub store_pfn: Pfn,
    /// PV: the console ring's guest frame (0 otherwise).
    pub console_pfn: Pfn,
}

/// First frame of the area near 4 GiB where HVM and PVH domains have
/// their special pages (ACPI tables, the xenstore and console rings, the
/// ioreq pages): the toolstack sets these up for each domain, connected to
/// its own xenstore and console, so they are not migrated.
pub const SPECIAL_AREA: u64 = 0xfc000;

/// The frames below [`SPECIAL_AREA`] that both `a` and `b` have: the
/// guest's RAM as both domains see it. A running guest maps a few more
/// frames of its own (its grant table and shared info, which it maps again
/// when it resumes), and a fresh domain may have a frame the running guest
/// gave back; neither is guest memory to copy.
pub fn common_layout(a: &MemoryLayout, b: &MemoryLayout) -> Result<MemoryLayout, XenError> {
    let frames = a
        .regions()
        .iter()
        .flat_map(|r| r.first_page..r.first_page + r.pages);
    let both = frames.filter(|&p| p < SPECIAL_AREA && b.dense_index(p).is_some());
    MemoryLayout::new(PageSize::DEFAULT, regions_of(both))
        .map_err(|e| XenError::Invalid(format!("the two domains share no memory: {e}")))
}

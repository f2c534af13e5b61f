//! Which frames a migration moves: what a source announces to its
//! destination, and the frames two domains have in common.

use super::{invalid, regions_of};
use crate::xc::XenError;
use migrate_core::page::{MemoryLayout, PageSize, Region};

/// What a destination must know of the source before the stream begins:
/// whether it is PV, its frames and, for PV, where its xenstore and
/// console rings are (a PV destination is given memory at exactly these
/// frames; an HVM/PVH destination migrates the frames both have).
///
/// Between two processes it travels as one line of text:
/// `xen-migrate/1 pv|hvm STORE CONSOLE FIRST+COUNT,...` (frames in hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFrames {
    /// A PV source.
    pub pv: bool,
    /// The frames that migrate.
    pub layout: MemoryLayout,
    /// PV: the xenstore ring's guest frame (0 otherwise).
    pub store_pfn: u64,
    /// PV: the console ring's guest frame (0 otherwise).
    pub console_pfn: u64,
}

/// The protocol tag of [`SourceFrames::to_line`].
pub const FRAMES_TAG: &str = "xen-migrate/1";

/// Writes regions as `FIRST+COUNT,...` (hex first frame, decimal count).
pub fn regions_to_text(layout: &MemoryLayout) -> String {
    layout
        .regions()
        .iter()
        .map(|r| format!("{:x}+{}", r.first_page, r.pages))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads what [`regions_to_text`] wrote, refusing anything else
/// (overlapping or unordered regions, more than `max_pages` pages).
pub fn regions_from_text(text: &str, max_pages: u64) -> Result<MemoryLayout, XenError> {
    let mut regions = Vec::new();
    let mut total = 0u64;
    for part in text.split(',') {
        let (first, n) = part
            .split_once('+')
            .ok_or_else(|| invalid(format!("region {part:?} is not FIRST+COUNT")))?;
        let first_page = u64::from_str_radix(first, 16)
            .map_err(|_| invalid(format!("region start {first:?} is not a hex frame")))?;
        let pages: u64 = n
            .parse()
            .map_err(|_| invalid(format!("region count {n:?} is not a number")))?;
        total = total.saturating_add(pages);
        if total > max_pages {
            return Err(invalid(format!("regions hold more than {max_pages} pages")));
        }
        regions.push(Region { first_page, pages });
    }
    MemoryLayout::new(PageSize::DEFAULT, regions).map_err(|e| invalid(format!("regions: {e}")))
}

/// The most pages a peer may announce (16 TiB of 4 KiB pages).
pub const MAX_ANNOUNCED_PAGES: u64 = 1 << 32;

impl SourceFrames {
    /// The line that announces it (no newline).
    pub fn to_line(&self) -> String {
        format!(
            "{FRAMES_TAG} {} {:x} {:x} {}",
            if self.pv { "pv" } else { "hvm" },
            self.store_pfn,
            self.console_pfn,
            regions_to_text(&self.layout)
        )
    }

    /// Reads a line from [`SourceFrames::to_line`]; anything else is an
    /// `Invalid` error that says what was wrong.
    pub fn from_line(line: &str) -> Result<Self, XenError> {
        let f: Vec<&str> = line.trim_end().split(' ').collect();
        if f.len() != 5 || f[0] != FRAMES_TAG {
            return Err(invalid(format!(
                "expected \"{FRAMES_TAG} pv|hvm STORE CONSOLE REGIONS\", got {:?}",
                line.chars().take(80).collect::<String>()
            )));
        }
        let pv = match f[1] {
            "pv" => true,
            "hvm" => false,
            k => return Err(invalid(format!("domain kind {k:?} is neither pv nor hvm"))),
        };
        let hex = |s: &str, what: &str| {
            u64::from_str_radix(s, 16)
                .map_err(|_| invalid(format!("{what} frame {s:?} is not hex")))
        };
        Ok(SourceFrames {
            pv,
            store_pfn: hex(f[2], "xenstore")?,
            console_pfn: hex(f[3], "console")?,
            layout: regions_from_text(f[4], MAX_ANNOUNCED_PAGES)?,
        })
    }
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

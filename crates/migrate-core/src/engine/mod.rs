//! The engine: a source and a destination state machine.
//!
//! Neither machine does network I/O. The source is polled for frames to
//! send ([`SourceEngine::poll`]) and handed the frames that come back
//! ([`SourceEngine::handle_frame`]); the destination is handed frames and
//! yields replies. A driver moves the frames: [`crate::driver`] over a
//! real [`crate::transport::Transport`], the simulator over a modelled
//! link in virtual time. The engines call the backend traits directly
//! (reading and writing guest memory is local work) and read time through
//! a [`Clock`]; the [`Policy`] they consult is handed `now`.
//!
//! Guarantees:
//! - no page is lost: a page leaves the pending set only when it is put in
//!   a frame, and every page the tracker reports dirty goes back in;
//! - every frame is numbered and checksummed ([`crate::protocol`]): each
//!   engine refuses a frame that is altered, cut, lost, repeated or out of
//!   order, and fails as below;
//! - the point of no return is the moment the record past which the
//!   destination may resume is handed out by [`SourceEngine::poll`]: the
//!   completion record in pre-copy, the device state in post-copy. If the
//!   source fails before it, or the transport reports that this very
//!   frame could not be sent ([`SourceEngine::send_failed`]), it resumes
//!   its guest (if it had paused it) and stops dirty tracking; after it
//!   the guest may be running on the destination, so the source stays
//!   paused and reports [`MigrationError::OutcomeUnknown`] (its kind is
//!   [`crate::ErrorKind::Settle`]);
//! - the destination resumes a pre-copied guest only after a completion
//!   record whose digest matches the memory it holds (read back from its
//!   sink) and the device state it received, with every page received.
//!   A post-copied guest resumes on its device state only if every page
//!   was either received or discarded (so it faults on every page it does
//!   not hold), and the destination never places a page over one it
//!   already has: it reports [`DestStatus::Completed`] only when every
//!   page has arrived and the digest of what arrived, bound to the device
//!   state it restored, matches the source's.

use crate::backend::{DeviceState, DirtyTracker, GuestControl, PageSink, PageSource};
use crate::bitmap::DirtyBitmap;
use crate::clock::Clock;
use crate::digest::{completion_digest, digest_memory, page_hash, DigestBuilder, MemoryDigest};
use crate::error::MigrationError;
use crate::model::{token_digest_memory, token_digest_table, Payload, TokenDigest};
use crate::page::{MemoryLayout, PageNum};
use crate::policy::{Decision, PageSelection, Policy, PolicyInput, RoundSummary};
use crate::protocol::{
    self, encode_model_batch, encode_page_batch, max_batch_pages, wire_len, Decoder, ModelBatch,
    PostcopyReport, ProtocolError, Record, RecordType, ResumeReport, Sequencer, MAX_DISCARD_RANGES,
    MAX_DISCARD_WORDS, MAX_REQUEST_PAGES, VERSION,
};
use crate::stats::{DowntimeParts, MigrationStats, PostcopyStats, RoundStats, SwitchReason};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// What the source's completion digest covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceVerify {
    /// Every page of guest memory, read again after the pause: proves the
    /// destination got memory exactly as it is, so a dirty tracker that
    /// missed a write is caught. Costs a pass over all of memory during
    /// the downtime (figures for one host in `docs/kvm.md`, *Verification
    /// and its cost*).
    #[default]
    FullScan,
    /// The content of each page as it was last sent, hashed while sending:
    /// proves every page arrived as sent, in its latest version, and costs
    /// a pass over a table of hashes (milliseconds); it trusts the dirty
    /// tracker to have reported every write.
    SentContent,
}

impl std::str::FromStr for SourceVerify {
    type Err = String;

    /// `full` ([`SourceVerify::FullScan`]) or `sent`
    /// ([`SourceVerify::SentContent`]), as the programs' `--verify` takes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(SourceVerify::FullScan),
            "sent" => Ok(SourceVerify::SentContent),
            _ => Err(format!(
                "unknown verification {s:?} (expected full or sent)"
            )),
        }
    }
}

impl std::fmt::Display for SourceVerify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceVerify::FullScan => "full",
            SourceVerify::SentContent => "sent",
        })
    }
}

/// Engine settings that are not policy.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Pages per page-batch record (capped by the protocol's limit).
    pub batch_pages: usize,
    /// Pages per batch in post-copy, where a faulting vCPU waits behind
    /// whatever batch is on the wire (small batches keep that short).
    pub postcopy_batch_pages: usize,
    /// Re-read the dirty log (peek) for skipping after this many pages.
    pub peek_interval_pages: u64,
    /// At most this many peeks per round (large guests peek less often).
    pub max_peeks_per_round: u64,
    /// What the completion digest covers.
    pub verify: SourceVerify,
    /// What page batches carry: bytes, or content tokens for a backend
    /// that models pages (see [`crate::model`]).
    pub payload: Payload,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_pages: 256,
            postcopy_batch_pages: 16,
            peek_interval_pages: 1024,
            max_peeks_per_round: 256,
            verify: SourceVerify::FullScan,
            payload: Payload::Bytes,
        }
    }
}

mod destination;
mod source;

pub use destination::{DestStatus, DestinationEngine, DestinationReport};
pub use source::{SourceEngine, SourceStep};

/// The memory digest from a table of per-page hashes (by dense index).
fn digest_table(layout: &MemoryLayout, hashes: &[u64]) -> MemoryDigest {
    let mut b = DigestBuilder::new();
    for (page, hash) in layout.pages().zip(hashes) {
        b.add_page_hash(page, *hash);
    }
    b.finish()
}

fn zero_page_hash(page_size: usize) -> u64 {
    use std::sync::OnceLock;
    static CACHE: OnceLock<(usize, u64)> = OnceLock::new();
    let (size, hash) = *CACHE.get_or_init(|| (4096, page_hash(&[0u8; 4096])));
    if size == page_size {
        hash
    } else {
        page_hash(&vec![0u8; page_size])
    }
}

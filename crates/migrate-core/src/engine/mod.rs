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
//! Every timer is inside the engines and runs on that clock, in the manner
//! of quinn-proto's `poll_timeout`/`handle_timeout`: the source's peer
//! timeout, its dirty-log sampling and its bandwidth pacing, the
//! destination's peer timeout. A driver asks [`SourceEngine::poll_timeout`]
//! when the next falls due, waits for a frame until then, and calls
//! [`SourceEngine::handle_timeout`] if none came; on the simulator's
//! virtual clock the same calls make every timer exact.
//!
//! Each engine hands out a [`MigrationHandle`]: progress, events, cancel
//! and live parameters from any thread (see `docs/steering.md`).
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
//!   sink, or with [`DestinationVerify::Received`] the hashes of the pages
//!   as it placed them) and the device state it received, with every page
//!   received.
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
    self, encode_model_batch, max_batch_pages, wire_len, BatchCompressor, BatchExpander,
    Capabilities, Codec, Decoder, ModelBatch, PostcopyReport, ProtocolError, Record, RecordType,
    ResumeReport, Sequencer, MAX_DISCARD_RANGES, MAX_DISCARD_WORDS, MAX_REQUEST_PAGES, VERSION,
};
use crate::stats::{
    CompressionStats, DowntimeParts, MigrationStats, PostcopyStats, RoundStats, SwitchReason,
};
use handle::Side;
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

/// What the destination checks the source's completion digest against,
/// before it resumes a pre-copied guest (a post-copied guest has been
/// running and writing, so its check is always of what arrived).
///
/// Either way the guest resumes only if the digest matches and every page
/// arrived; the modes differ in what the match proves and in what it
/// costs inside the downtime. The default is [`DestinationVerify::ReadBack`]
/// (see `docs/kvm.md`, *Verification and its cost*, for why and for the
/// figures).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestinationVerify {
    /// Read all of guest memory back from the sink after the last page
    /// and digest it: proves the sink holds, byte for byte, the memory the
    /// source digested (including pages the sink chose not to write
    /// because it judged them zero already). Costs a pass over all of
    /// memory during the downtime.
    #[default]
    ReadBack,
    /// Digest the table of per-page hashes kept as each page was placed
    /// (the hash of its bytes as they arrived, after decompression; the
    /// zero page's hash for a zero page): proves every page arrived
    /// exactly as the source sent it, in its latest version, and costs a
    /// pass over the table (milliseconds). It trusts the sink to have
    /// stored what it was given.
    Received,
}

impl std::str::FromStr for DestinationVerify {
    type Err = String;

    /// `read-back` ([`DestinationVerify::ReadBack`]) or `received`
    /// ([`DestinationVerify::Received`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read-back" => Ok(DestinationVerify::ReadBack),
            "received" => Ok(DestinationVerify::Received),
            _ => Err(format!(
                "unknown destination verification {s:?} (expected read-back or received)"
            )),
        }
    }
}

impl std::fmt::Display for DestinationVerify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DestinationVerify::ReadBack => "read-back",
            DestinationVerify::Received => "received",
        })
    }
}

impl From<SourceVerify> for DestinationVerify {
    /// The destination's counterpart of a source's choice, for programs
    /// that take one `--verify` for both sides: a full scan reads back,
    /// sent content checks what was received.
    fn from(v: SourceVerify) -> Self {
        match v {
            SourceVerify::FullScan => DestinationVerify::ReadBack,
            SourceVerify::SentContent => DestinationVerify::Received,
        }
    }
}

/// Auto-converge: slow the guest's vCPUs when pre-copy does not converge
/// (QEMU's `auto-converge` capability, with its defaults).
///
/// After each pre-copy round the source compares the bytes the guest
/// dirtied during it with the bytes sent in it; each time the first
/// exceeds `trigger_pct` percent of the second for the second time (not
/// necessarily in a row), the throttle goes up: to `initial_pct` the
/// first time, then by `increment_pct`, up to `max_pct`. The throttle is
/// applied through [`GuestControl::set_throttle`]; a backend that refuses
/// it leaves the migration unthrottled (with a warning). The throttle is
/// lifted when the migration fails or is cancelled, and stays in force
/// through a successful switch-over (the source guest is paused then and
/// does not run again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AutoConverge {
    /// First throttle, percent of each period the vCPUs are held (20).
    pub initial_pct: u8,
    /// Added at each later step (10).
    pub increment_pct: u8,
    /// Highest throttle (99).
    pub max_pct: u8,
    /// Dirtied bytes over sent bytes in a round, percent, past which the
    /// round counts as not converging (50).
    pub trigger_pct: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        AutoConverge {
            initial_pct: 20,
            increment_pct: 10,
            max_pct: 99,
            trigger_pct: 50,
        }
    }
}

impl AutoConverge {
    /// The throttle after one more step from `current`, percent.
    pub fn next(&self, current: u8) -> u8 {
        let max = self.max_pct.clamp(1, 99);
        if current == 0 {
            self.initial_pct.clamp(1, max)
        } else {
            current.saturating_add(self.increment_pct).min(max)
        }
    }
}

/// Engine settings that are not policy.
///
/// Build it from [`EngineConfig::default`] and change the fields you need.
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
    /// Bandwidth cap of the pre-copy stage, bytes per second (`None`: no
    /// cap). The source paces the frames it hands out; the final copy with
    /// the guest paused and post-copy are not capped (as QEMU's
    /// `max-bandwidth`). [`MigrationHandle::set_max_bandwidth`] changes it
    /// while the migration runs.
    pub max_bandwidth: Option<u64>,
    /// Auto-converge (`None`: off).
    pub auto_converge: Option<AutoConverge>,
    /// How long a side waits for a frame from its peer when it has
    /// nothing else to do (`None`: for ever). The drivers in
    /// [`crate::driver`] set it from their `peer_timeout`.
    pub peer_timeout: Option<Duration>,
    /// Post-copy recovery: how long the source waits for a new
    /// connection when the connection breaks after the switch-over
    /// (`None`: it does not wait, and the migration ends with
    /// [`MigrationError::OutcomeUnknown`]). With it set the source names
    /// its session to the destination, which may then wait too
    /// ([`DestinationEngine::set_recover_timeout`]). See
    /// [`SourceEngine::connection_lost`].
    pub recover_timeout: Option<Duration>,
    /// Compress page batches with this codec (`None`: do not). Used only
    /// if the destination announced the codec; a batch it does not pay
    /// for goes uncompressed. The statistics report what it did
    /// ([`MigrationStats::compression`]).
    pub compression: Option<Codec>,
    /// Post-copy: send the pages the destination asks for as
    /// [`Record::RequestedPages`], numbered apart from the push, so that a
    /// transport with a preempt connection
    /// ([`crate::multistream::MultiTransport`]) carries them ahead of the
    /// push data already queued. Used only if the destination announced
    /// [`Capabilities::PREEMPT`], and only with [`Payload::Bytes`];
    /// otherwise requested pages go first in the push, as without it.
    /// A requested page goes even if the push already sent it (it may be
    /// still on its way): the destination keeps the first copy.
    pub postcopy_preempt: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_prints_as_the_reason_its_peer_recognises() {
        assert_eq!(MigrationError::Cancelled.to_string(), CANCELLED_REASON);
    }

    #[test]
    fn auto_converge_steps_as_qemu() {
        let ac = AutoConverge::default();
        let mut pct = 0;
        let mut steps = Vec::new();
        for _ in 0..12 {
            pct = ac.next(pct);
            steps.push(pct);
        }
        assert_eq!(steps, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99, 99]);
    }
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
            max_bandwidth: None,
            auto_converge: None,
            peer_timeout: None,
            recover_timeout: None,
            compression: None,
            postcopy_preempt: false,
        }
    }
}

mod destination;
mod handle;
mod placing;
mod source;

pub use destination::{DestStatus, DestinationEngine, DestinationReport};
pub use handle::{ControlError, Event, MigrationHandle, Phase, Progress};
pub use source::{SourceEngine, SourceStep, PACING_SLACK};

/// The abort reason a side sends when it was cancelled (what a
/// [`MigrationError::Cancelled`] prints, so the drivers' abort on any
/// error carries it): its peer fails with [`MigrationError::Cancelled`]
/// too.
const CANCELLED_REASON: &str = "cancelled";

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

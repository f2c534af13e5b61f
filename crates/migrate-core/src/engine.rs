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
use crate::page::{MemoryLayout, PageNum};
use crate::policy::{Decision, PageSelection, Policy, PolicyInput, RoundSummary};
use crate::protocol::{
    self, encode_page_batch, max_batch_pages, Decoder, PostcopyReport, ProtocolError, Record,
    RecordType, ResumeReport, Sequencer, MAX_DISCARD_RANGES, MAX_DISCARD_WORDS, MAX_REQUEST_PAGES,
    VERSION,
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_pages: 256,
            postcopy_batch_pages: 16,
            peek_interval_pages: 1024,
            max_peeks_per_round: 256,
            verify: SourceVerify::FullScan,
        }
    }
}

/// What the source wants done next.
#[derive(Debug)]
pub enum SourceStep {
    /// Send this frame to the destination.
    Send(Vec<u8>),
    /// Nothing to send until a frame from the destination arrives.
    Wait,
    /// The migration is complete; [`SourceEngine::stats`] has the figures.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SrcState {
    Init,
    AwaitReady,
    Decide,
    Round,
    Final,
    Postcopy,
    AwaitResumed,
    AwaitVerified,
    Done,
    Failed,
}

/// The order a round walks its pages in.
enum RoundOrder {
    Ascending { cursor: PageNum },
    Ordered { pages: Vec<PageNum>, next: usize },
}

struct Round {
    number: u32,
    final_copy: bool,
    order: RoundOrder,
    started: Duration,
    cpu_start: Option<Duration>,
    guest_cpu_start: Option<Duration>,
    sent: u64,
    skipped: u64,
    zero: u64,
    bytes: u64,
    examined_since_peek: u64,
    peek_every: u64,
}

/// The source side of a migration.
pub struct SourceEngine<T, S, G, P> {
    tracker: T,
    memory: S,
    control: G,
    policy: P,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    layout: MemoryLayout,
    decoder: Decoder,
    sequencer: Sequencer,
    state: SrcState,
    outbox: VecDeque<Vec<u8>>,
    /// The type of the record whose hand-out is the point of no return,
    /// once it is queued.
    commit_record: Option<u8>,
    /// Whether the last frame handed out was that record.
    last_was_commit: bool,
    /// Post-copy: the device state sent, for the completion digest.
    sent_state: Option<DeviceState>,
    /// Whether the destination's abort came with every frame before it.
    abort_in_sequence: bool,
    pending: DirtyBitmap,
    skip: DirtyBitmap,
    scratch: DirtyBitmap,
    round_dirty: DirtyBitmap,
    round_dirty_used: bool,
    sample_every: Option<Duration>,
    next_sample_at: Duration,
    round: Option<Round>,
    rounds_done: u32,
    last_summary: Option<RoundSummary>,
    batch: Vec<PageNum>,
    push: Vec<PageNum>,
    urgent: VecDeque<PageNum>,
    read_buf: Vec<u8>,
    /// `SentContent`: the hash of each page as last sent, by dense index.
    sent_hashes: Vec<u64>,
    // estimates and times
    bandwidth: f64,
    dirty_rate: f64,
    started_at: Option<Duration>,
    layout_sent_at: Duration,
    rtt: Duration,
    first_page_at: Option<Duration>,
    paused_at: Option<Duration>,
    resumed_seen: Option<(Duration, ResumeReport)>,
    tracking: bool,
    postcopy: bool,
    committed: bool,
    switch_reason: Option<SwitchReason>,
    expected_downtime: Duration,
    parts: DowntimeParts,
    // counters
    transferred: u64,
    precopy_bytes: u64,
    downtime_bytes: u64,
    postcopy_bytes: u64,
    postcopy_pages: u64,
    postcopy_requests: u64,
    resume_pages_sent: u64,
    /// Frames in the outbox that leave with the guest paused (the
    /// post-copy switch-over's), for the byte counts.
    paused_frames: usize,
    pages_sent: u64,
    zero_sent: u64,
    dirty_syncs: u64,
    rounds: Vec<RoundStats>,
    stats: Option<MigrationStats>,
}

impl<T, S, G, P> SourceEngine<T, S, G, P>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
{
    /// A source engine over a guest's tracker, memory and control, run by
    /// `policy`, reading time from `clock`.
    pub fn new(
        tracker: T,
        memory: S,
        control: G,
        policy: P,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Self {
        let layout = memory.layout().clone();
        let end = layout.page_end();
        let mut config = config;
        let cap = max_batch_pages(layout.page_size());
        config.batch_pages = config.batch_pages.clamp(1, cap);
        config.postcopy_batch_pages = config.postcopy_batch_pages.clamp(1, cap);
        let sample_every = policy.sample_interval().filter(|d| !d.is_zero());
        let sent_hashes = match config.verify {
            SourceVerify::SentContent => vec![0; layout.total_pages() as usize],
            SourceVerify::FullScan => Vec::new(),
        };
        SourceEngine {
            tracker,
            memory,
            control,
            policy,
            clock,
            layout,
            decoder: Decoder::sequenced(),
            sequencer: Sequencer::new(),
            state: SrcState::Init,
            outbox: VecDeque::new(),
            commit_record: None,
            last_was_commit: false,
            sent_state: None,
            abort_in_sequence: false,
            pending: DirtyBitmap::new(end),
            skip: DirtyBitmap::new(end),
            scratch: DirtyBitmap::new(end),
            round_dirty: DirtyBitmap::new(end),
            round_dirty_used: false,
            sample_every,
            next_sample_at: Duration::ZERO,
            round: None,
            rounds_done: 0,
            last_summary: None,
            batch: Vec::with_capacity(config.batch_pages),
            push: Vec::new(),
            urgent: VecDeque::new(),
            read_buf: Vec::new(),
            sent_hashes,
            config,
            bandwidth: 0.0,
            dirty_rate: 0.0,
            started_at: None,
            layout_sent_at: Duration::ZERO,
            rtt: Duration::ZERO,
            first_page_at: None,
            paused_at: None,
            resumed_seen: None,
            tracking: false,
            postcopy: false,
            committed: false,
            switch_reason: None,
            expected_downtime: Duration::ZERO,
            parts: DowntimeParts::default(),
            transferred: 0,
            precopy_bytes: 0,
            downtime_bytes: 0,
            postcopy_bytes: 0,
            postcopy_pages: 0,
            postcopy_requests: 0,
            resume_pages_sent: 0,
            paused_frames: 0,
            pages_sent: 0,
            zero_sent: 0,
            dirty_syncs: 0,
            rounds: Vec::new(),
            stats: None,
        }
    }

    /// The guest's memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Whether the source guest is paused by this engine.
    pub fn guest_paused(&self) -> bool {
        self.paused_at.is_some()
    }

    /// Whether the point of no return was passed: the guest may run on the
    /// destination, so the source must not resume it on failure.
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// The statistics, once [`SourceStep::Done`] was returned.
    pub fn stats(&self) -> Option<&MigrationStats> {
        self.stats.as_ref()
    }

    /// The policy (for reading what it learnt).
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Gives the backend parts back.
    pub fn into_parts(self) -> (T, S, G, P) {
        (self.tracker, self.memory, self.control, self.policy)
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Result<SourceStep, MigrationError> {
        if self.state == SrcState::Failed {
            return Err(MigrationError::InvalidUse(
                "source engine polled after failure",
            ));
        }
        match self.poll_inner() {
            Ok(mut step) => {
                if let SourceStep::Send(f) = &mut step {
                    self.sequencer.seal(f);
                    self.account(f);
                    self.last_was_commit = false;
                    if self.commit_record.is_some() && f.first().copied() == self.commit_record {
                        // Handed to the caller to send: from here the
                        // destination may resume the guest.
                        self.commit_record = None;
                        self.committed = true;
                        self.last_was_commit = true;
                    }
                }
                Ok(step)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The frame the last [`SourceEngine::poll`] handed out could not be
    /// sent: the transport failed and the frame did not reach the peer
    /// whole. If it was the point-of-no-return record, the point was not
    /// passed after all: the source resumes its guest. Otherwise as
    /// [`SourceEngine::fail`]. Returns the error to report.
    ///
    /// Call this only when the transport guarantees that a failed send
    /// delivered no complete frame (the library's transports do); when in
    /// doubt call [`SourceEngine::fail`], which keeps the source paused
    /// after the point of no return.
    pub fn send_failed(&mut self, err: MigrationError) -> MigrationError {
        if self.last_was_commit && self.state != SrcState::Done {
            self.committed = false;
            self.last_was_commit = false;
        }
        self.fail(err)
    }

    /// An abort record telling the destination why, numbered as the next
    /// frame of this stream.
    pub fn abort_frame(&mut self, reason: &str) -> Vec<u8> {
        let mut f = protocol::abort_frame(reason);
        self.sequencer.seal(&mut f);
        f
    }

    /// Handles a frame from the destination.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        if self.state == SrcState::Failed {
            return Err(MigrationError::InvalidUse(
                "source engine used after failure",
            ));
        }
        match self.handle_inner(frame) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Records that the migration failed outside the engine (a transport
    /// error, a timeout) and cleans up: before the point of no return the
    /// guest is resumed and tracking stopped. Returns the error to report
    /// ([`MigrationError::OutcomeUnknown`] after the point of no return).
    pub fn fail(&mut self, err: MigrationError) -> MigrationError {
        if self.state == SrcState::Done {
            return err;
        }
        self.state = SrcState::Failed;
        if self.tracking {
            let _ = self.tracker.stop();
            self.tracking = false;
        }
        // A destination that resumes says so before anything else it
        // sends (its frames are ordered and numbered, so none was lost):
        // an abort with no resume confirmation before it means the guest
        // was not resumed there.
        let refused = self.resumed_seen.is_none()
            && self.abort_in_sequence
            && matches!(err, MigrationError::PeerAborted(_));
        if self.committed && !refused {
            return match err {
                MigrationError::OutcomeUnknown(_) => err,
                other => MigrationError::OutcomeUnknown(other.to_string()),
            };
        }
        if self.paused_at.take().is_some() {
            if let Err(e) = self.control.resume() {
                tracing::error!(error = %e, "could not resume the source guest after a failed migration");
            }
        }
        err
    }

    fn account(&mut self, frame: &[u8]) {
        let bytes = frame.len() as u64;
        self.transferred += bytes;
        if self.paused_frames > 0 {
            // Queued at a post-copy switch-over, sent before the resume.
            self.paused_frames -= 1;
            self.downtime_bytes += bytes;
            if let Some(r) = self.round.as_mut() {
                r.bytes += bytes;
            }
            return;
        }
        let after_resume = self.postcopy
            && self.committed
            && matches!(
                frame.first().copied(),
                Some(t) if t == RecordType::PageBatch as u8
                    || t == RecordType::RoundEnd as u8
                    || t == RecordType::Complete as u8
            );
        if after_resume {
            self.postcopy_bytes += bytes;
        } else if self.paused_at.is_some() {
            self.downtime_bytes += bytes;
        } else {
            self.precopy_bytes += bytes;
        }
        if let Some(r) = self.round.as_mut() {
            r.bytes += bytes;
        }
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn poll_inner(&mut self) -> Result<SourceStep, MigrationError> {
        loop {
            if let Some(f) = self.outbox.pop_front() {
                return Ok(SourceStep::Send(f));
            }
            match self.state {
                SrcState::Init => {
                    self.started_at = Some(self.now());
                    self.outbox
                        .push_back(protocol::encode_to_vec(&Record::Header {
                            version: VERSION,
                        }));
                    self.outbox
                        .push_back(protocol::encode_to_vec(&Record::Layout(
                            self.layout.clone(),
                        )));
                    self.layout_sent_at = self.now();
                    self.state = SrcState::AwaitReady;
                }
                SrcState::AwaitReady | SrcState::AwaitResumed | SrcState::AwaitVerified => {
                    return Ok(SourceStep::Wait)
                }
                SrcState::Decide => self.decide()?,
                SrcState::Round | SrcState::Final | SrcState::Postcopy => {
                    if let Some(frame) = self.next_batch_frame()? {
                        return Ok(SourceStep::Send(frame));
                    }
                    self.end_round()?;
                }
                SrcState::Done => return Ok(SourceStep::Done),
                SrcState::Failed => {
                    return Err(MigrationError::InvalidUse(
                        "source engine polled after failure",
                    ))
                }
            }
        }
    }

    fn handle_inner(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        let rec = self.decoder.decode(frame)?;
        let postcopy_live = matches!(self.state, SrcState::Postcopy | SrcState::AwaitVerified);
        match (rec, self.state) {
            (Record::Header { .. }, _) => Ok(()),
            (Record::Abort { reason }, _) => {
                self.abort_in_sequence = self.decoder.last_in_sequence();
                Err(MigrationError::PeerAborted(reason))
            }
            (Record::Ready, SrcState::AwaitReady) => {
                let now = self.now();
                self.rtt = now.saturating_sub(self.layout_sent_at);
                self.tracker
                    .start()
                    .map_err(MigrationError::backend("start dirty tracking"))?;
                self.tracking = true;
                if let Some(iv) = self.sample_every {
                    self.next_sample_at = now + iv;
                }
                let all = self.layout.regions().to_vec();
                for r in all {
                    self.pending.set_range(r.first_page..r.end());
                }
                self.state = SrcState::Decide;
                Ok(())
            }
            (Record::Resumed(report), SrcState::AwaitResumed) => {
                self.finish(self.now(), report, None);
                Ok(())
            }
            (Record::Resumed(report), _) if postcopy_live && self.resumed_seen.is_none() => {
                self.resumed_seen = Some((self.now(), report));
                Ok(())
            }
            (Record::PageRequest(pages), _) if postcopy_live => {
                let now = self.now();
                for p in pages {
                    if !self.layout.contains(p) {
                        return Err(MigrationError::PageOutOfRange(p));
                    }
                    self.postcopy_requests += 1;
                    self.policy.on_fault(p, now);
                    if self.pending.get(p) {
                        self.urgent.push_back(p);
                    }
                }
                Ok(())
            }
            (Record::Verified(report), SrcState::AwaitVerified) => {
                let Some((at, resume)) = self.resumed_seen else {
                    return Err(MigrationError::UnexpectedRecord {
                        got: RecordType::Verified,
                        state: "waiting for the destination to resume",
                    });
                };
                self.finish(at, resume, Some(report));
                Ok(())
            }
            (rec, state) => Err(MigrationError::UnexpectedRecord {
                got: rec.record_type(),
                state: match state {
                    SrcState::AwaitReady => "waiting for the destination to accept the layout",
                    SrcState::AwaitResumed => "waiting for the destination to resume",
                    SrcState::Postcopy | SrcState::AwaitVerified => "pushing pages in post-copy",
                    _ => "sending pages",
                },
            }),
        }
    }

    fn decide(&mut self) -> Result<(), MigrationError> {
        let now = self.now();
        let pending_pages = self.pending.count_ones();
        let input = PolicyInput {
            now,
            rounds_done: self.rounds_done,
            guest_pages: self.layout.total_pages(),
            page_size: self.layout.page_size(),
            last_round: self.last_summary.as_ref(),
            pending: &self.pending,
            pending_pages,
            total_pages_sent: self.pages_sent,
            bytes_transferred: self.transferred,
            bandwidth: self.bandwidth,
            dirty_rate: self.dirty_rate,
            rtt: self.rtt,
        };
        let expected = input.expected_downtime();
        match self.policy.decide(&input) {
            Decision::Precopy(sel) => {
                let (order, candidates) = match sel {
                    PageSelection::AllPending => {
                        (RoundOrder::Ascending { cursor: 0 }, pending_pages)
                    }
                    PageSelection::Ordered(pages) => {
                        let n = pages.len() as u64;
                        (RoundOrder::Ordered { pages, next: 0 }, n)
                    }
                };
                self.begin_round(order, false, candidates);
            }
            Decision::StopAndCopy(reason) => {
                self.switch_reason = Some(reason);
                self.expected_downtime = expected.unwrap_or_default();
                self.pause_and_collect()?;
                let number = self.rounds_done + 1;
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::SwitchOver {
                        round: number,
                        postcopy: false,
                    }));
                self.begin_round(RoundOrder::Ascending { cursor: 0 }, true, 0);
            }
            Decision::PostCopy(reason) => {
                self.switch_reason = Some(reason);
                self.expected_downtime = self.rtt / 2;
                self.pause_and_collect()?;
                if self.tracking {
                    self.tracker
                        .stop()
                        .map_err(MigrationError::backend("stop dirty tracking"))?;
                    self.tracking = false;
                }
                let number = self.rounds_done + 1;
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::SwitchOver {
                        round: number,
                        postcopy: true,
                    }));
                let t0 = self.now();
                let state = self
                    .control
                    .save_state()
                    .map_err(MigrationError::backend("save device state"))?;
                let t1 = self.now();
                self.parts.device_save = t1 - t0;
                // Pages the backend needs in place before the guest runs
                // leave the pending set, so they are neither discarded nor
                // left to a fault, and go now with the guest paused.
                let mut early = self
                    .control
                    .resume_pages()
                    .map_err(MigrationError::backend("list the pages needed at resume"))?;
                early.sort_unstable();
                early.dedup();
                early.retain(|p| self.layout.contains(*p) && self.pending.get(*p));
                for p in &early {
                    self.pending.clear(*p);
                }
                self.queue_discards();
                self.begin_round(RoundOrder::Ascending { cursor: 0 }, true, 0);
                self.send_now(&early)?;
                self.resume_pages_sent = early.len() as u64;
                self.parts.final_copy = self.now() - t1;
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::DeviceState(state.clone())));
                self.sent_state = Some(state);
                self.paused_frames = self.outbox.len();
                // The destination may resume the guest once this record
                // has been handed out (see `poll`).
                self.commit_record = Some(RecordType::DeviceState as u8);
                self.postcopy = true;
                self.state = SrcState::Postcopy;
            }
            Decision::Abort(reason) => return Err(MigrationError::PolicyAborted(reason)),
        }
        Ok(())
    }

    fn pause_and_collect(&mut self) -> Result<(), MigrationError> {
        // Downtime starts when the pause is asked for: a vCPU that has
        // stopped waits for the others, and a failed pause still resumes
        // the ones that did stop.
        let asked = self.now();
        self.paused_at = Some(asked);
        self.control
            .pause()
            .map_err(MigrationError::backend("pause the guest"))?;
        self.parts.pause = self.now().saturating_sub(asked);
        if self.tracking {
            self.tracker
                .collect_and_clear(&mut self.scratch)
                .map_err(MigrationError::backend("collect the dirty log"))?;
            self.dirty_syncs += 1;
            self.pending.union_with(&self.scratch);
        }
        Ok(())
    }

    /// Post-copy: tells the destination which pages it must fault on,
    /// chunk by chunk, as ranges or as a bitmap, whichever is smaller
    /// (a few long runs for a fresh post-copy, a scattered bitmap after
    /// pre-copy rounds). These bytes are sent with the guest paused.
    fn queue_discards(&mut self) {
        let words = self.pending.as_words();
        for (c, chunk) in words.chunks(MAX_DISCARD_WORDS).enumerate() {
            let Some(lo) = chunk.iter().position(|w| *w != 0) else {
                continue;
            };
            let hi = chunk.iter().rposition(|w| *w != 0).unwrap_or(lo);
            let base = (c * MAX_DISCARD_WORDS) as u64 * 64;
            let span = &chunk[lo..=hi];
            let first_page = base + lo as u64 * 64;
            // Runs of set bits: each 0->1 edge starts one.
            let mut runs = 0u64;
            let mut carry = 0u64;
            for w in span {
                runs += (w & !((w << 1) | carry)).count_ones() as u64;
                carry = w >> 63;
            }
            if runs * 16 <= span.len() as u64 * 8 {
                let pages = DirtyBitmap::from_words(span.to_vec(), span.len() as u64 * 64);
                let mut ranges: Vec<(PageNum, u64)> = Vec::new();
                for p in pages.iter_ones() {
                    let p = first_page + p;
                    match ranges.last_mut() {
                        Some((f, n)) if *f + *n == p => *n += 1,
                        _ => {
                            if ranges.len() == MAX_DISCARD_RANGES {
                                let full = std::mem::take(&mut ranges);
                                self.outbox
                                    .push_back(protocol::encode_to_vec(&Record::Discard(full)));
                            }
                            ranges.push((p, 1));
                        }
                    }
                }
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Discard(ranges)));
            } else {
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::DiscardBitmap {
                        first_page,
                        words: span.to_vec(),
                    }));
            }
        }
    }

    fn begin_round(&mut self, order: RoundOrder, final_copy: bool, candidates: u64) {
        let peek_every = self
            .config
            .peek_interval_pages
            .max(candidates / self.config.max_peeks_per_round.max(1))
            .max(1);
        self.round = Some(Round {
            number: self.rounds_done + 1,
            final_copy,
            order,
            started: self.now(),
            cpu_start: self.clock.thread_cpu_time(),
            guest_cpu_start: self.control.guest_cpu_time(),
            sent: 0,
            skipped: 0,
            zero: 0,
            bytes: 0,
            examined_since_peek: u64::MAX,
            peek_every,
        });
        self.state = if final_copy {
            SrcState::Final
        } else {
            SrcState::Round
        };
    }

    /// HCA and friends: a sample of the dirty log, if one is due.
    fn maybe_sample(&mut self) -> Result<(), MigrationError> {
        let Some(iv) = self.sample_every else {
            return Ok(());
        };
        let now = self.now();
        if now < self.next_sample_at {
            return Ok(());
        }
        self.tracker
            .collect_and_clear(&mut self.scratch)
            .map_err(MigrationError::backend("sample the dirty log"))?;
        self.dirty_syncs += 1;
        self.policy.on_sample(&self.scratch, now);
        self.round_dirty.union_with(&self.scratch);
        self.round_dirty_used = true;
        self.next_sample_at = now + iv;
        Ok(())
    }

    /// Picks the pages of the next batch, taking each out of `pending`.
    fn select_batch(&mut self) -> Result<(), MigrationError> {
        self.batch.clear();
        let postcopy = self.state == SrcState::Postcopy;
        if postcopy {
            let cap = self.config.postcopy_batch_pages;
            while self.batch.len() < cap {
                let Some(p) = self.urgent.pop_front() else {
                    break;
                };
                if self.pending.get(p) {
                    self.pending.clear(p);
                    self.batch.push(p);
                }
            }
            if self.batch.len() < cap {
                self.push.clear();
                self.policy
                    .next_push(&self.pending, cap - self.batch.len(), &mut self.push);
                for &p in &self.push {
                    if self.batch.len() < cap && self.pending.get(p) {
                        self.pending.clear(p);
                        self.batch.push(p);
                    }
                }
            }
            if self.batch.is_empty() {
                // A policy that offers nothing still gets every page sent.
                let take: Vec<PageNum> = self.pending.iter_ones().take(cap).collect();
                for p in take {
                    self.pending.clear(p);
                    self.batch.push(p);
                }
            }
            return Ok(());
        }
        let Some(round) = self.round.as_mut() else {
            return Ok(());
        };
        while self.batch.len() < self.config.batch_pages {
            let page = match &mut round.order {
                RoundOrder::Ascending { cursor } => {
                    match self.pending.iter_ones_from(*cursor).next() {
                        Some(p) => {
                            *cursor = p + 1;
                            p
                        }
                        None => break,
                    }
                }
                RoundOrder::Ordered { pages, next, .. } => match pages.get(*next) {
                    Some(p) => {
                        *next += 1;
                        if !self.pending.get(*p) {
                            continue;
                        }
                        *p
                    }
                    None => break,
                },
            };
            if !round.final_copy {
                if round.examined_since_peek >= round.peek_every {
                    self.tracker
                        .peek(&mut self.skip)
                        .map_err(MigrationError::backend("peek at the dirty log"))?;
                    if self.round_dirty_used {
                        self.skip.union_with(&self.round_dirty);
                    }
                    round.examined_since_peek = 0;
                }
                round.examined_since_peek += 1;
                if self.skip.get(page) {
                    round.skipped += 1;
                    continue;
                }
            }
            self.pending.clear(page);
            self.batch.push(page);
        }
        Ok(())
    }

    /// Queues `pages` (already out of `pending`) as page-batch frames of
    /// the current round, ahead of anything queued after.
    fn send_now(&mut self, pages: &[PageNum]) -> Result<(), MigrationError> {
        for chunk in pages.chunks(self.config.batch_pages) {
            self.batch.clear();
            self.batch.extend_from_slice(chunk);
            if let Some(frame) = self.encode_batch()? {
                self.outbox.push_back(frame);
            }
        }
        self.batch.clear();
        Ok(())
    }

    /// Builds the next page-batch frame of the round, or `None` when the
    /// round has no more pages.
    fn next_batch_frame(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if self.state == SrcState::Round {
            self.maybe_sample()?;
        }
        self.select_batch()?;
        self.encode_batch()
    }

    /// Reads the pages of `batch` and encodes them as one frame of the
    /// current round, keeping the counts and the sent-content hashes.
    fn encode_batch(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if self.batch.is_empty() {
            return Ok(None);
        }
        let Some(round) = self.round.as_mut() else {
            return Ok(None);
        };
        let ps = self.layout.page_size();
        let need = self.batch.len() * ps.get();
        if self.read_buf.len() < need {
            self.read_buf.resize(need, 0);
        }
        self.memory
            .read_pages(&self.batch, &mut self.read_buf[..need])
            .map_err(MigrationError::backend("read guest pages"))?;
        if !self.sent_hashes.is_empty() {
            let chunks = self.read_buf[..need].chunks_exact(ps.get());
            for (p, data) in self.batch.iter().zip(chunks) {
                if let Some(i) = self.layout.dense_index(*p) {
                    self.sent_hashes[i as usize] = page_hash(data);
                }
            }
        }
        let mut frame = Vec::new();
        let summary = encode_page_batch(
            round.number,
            ps,
            &self.batch,
            &self.read_buf[..need],
            &mut frame,
        );
        round.sent += summary.pages as u64;
        round.zero += summary.zero_pages as u64;
        self.pages_sent += summary.pages as u64;
        self.zero_sent += summary.zero_pages as u64;
        if self.postcopy {
            self.postcopy_pages += summary.pages as u64;
        }
        if self.first_page_at.is_none() {
            self.first_page_at = Some(self.now());
        }
        Ok(Some(frame))
    }

    fn end_round(&mut self) -> Result<(), MigrationError> {
        let Some(round) = self.round.take() else {
            return Err(MigrationError::InvalidUse("round ended twice"));
        };
        let now = self.now();
        let delta = now.saturating_sub(round.started);
        let mut dirtied = 0;
        if round.final_copy && !self.postcopy {
            // Anything written while paused (device emulation) goes too.
            self.tracker
                .collect_and_clear(&mut self.scratch)
                .map_err(MigrationError::backend("collect the dirty log"))?;
            self.dirty_syncs += 1;
            if !self.scratch.none() {
                self.pending.union_with(&self.scratch);
                self.round = Some(Round {
                    order: RoundOrder::Ascending { cursor: 0 },
                    ..round
                });
                return Ok(());
            }
        } else if !round.final_copy {
            self.tracker
                .collect_and_clear(&mut self.scratch)
                .map_err(MigrationError::backend("collect the dirty log"))?;
            self.dirty_syncs += 1;
            if self.sample_every.is_some() {
                self.policy.on_sample(&self.scratch, now);
                self.next_sample_at = now + self.sample_every.unwrap_or_default();
            }
            if self.round_dirty_used {
                self.scratch.union_with(&self.round_dirty);
                self.round_dirty.clear_all();
                self.round_dirty_used = false;
            }
            self.pending.union_with(&self.scratch);
            dirtied = self.scratch.count_ones();
        }
        let pct = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !delta.is_zero() => {
                (b.saturating_sub(a).as_secs_f64() / delta.as_secs_f64() * 100.0).min(100.0)
            }
            _ => 0.0,
        };
        let dom0_pct = pct(round.cpu_start, self.clock.thread_cpu_time());
        let target_pct = if round.final_copy {
            0.0
        } else {
            pct(round.guest_cpu_start, self.control.guest_cpu_time())
        };
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::RoundEnd {
                round: round.number,
                pages_sent: round.sent,
            }));
        self.rounds.push(RoundStats {
            round: round.number,
            sent: round.sent,
            skipped: round.skipped,
            zero: round.zero,
            bytes: round.bytes,
            delta,
            dom0_pct,
            target_pct,
            dirtied,
            final_copy: round.final_copy,
            page_size: self.layout.page_size().bytes(),
        });
        if round.final_copy {
            return if self.postcopy {
                self.complete_postcopy()
            } else {
                self.send_tail(now)
            };
        }
        if !delta.is_zero() {
            let secs = delta.as_secs_f64();
            if round.bytes > 0 {
                self.bandwidth = round.bytes as f64 / secs;
            }
            self.dirty_rate = dirtied as f64 / secs;
        }
        self.rounds_done = round.number;
        self.last_summary = Some(RoundSummary {
            round: round.number,
            sent: round.sent,
            skipped: round.skipped,
            bytes: round.bytes,
            duration: delta,
            dirtied,
        });
        self.state = SrcState::Decide;
        Ok(())
    }

    /// The completion digest, as [`EngineConfig::verify`] says.
    fn source_digest(&mut self) -> Result<MemoryDigest, MigrationError> {
        if self.sent_hashes.is_empty() {
            return digest_memory(&mut self.memory, &self.layout)
                .map_err(MigrationError::backend("digest guest memory"));
        }
        Ok(digest_table(&self.layout, &self.sent_hashes))
    }

    /// After the final pages: device state, digest, completion.
    fn send_tail(&mut self, pages_done: Duration) -> Result<(), MigrationError> {
        let paused = self.paused_at.unwrap_or(pages_done) + self.parts.pause;
        self.parts.final_copy = pages_done.saturating_sub(paused);
        let t0 = self.now();
        let state: DeviceState = self
            .control
            .save_state()
            .map_err(MigrationError::backend("save device state"))?;
        let t1 = self.now();
        let digest = completion_digest(self.source_digest()?, &state);
        let t2 = self.now();
        self.parts.device_save = t1 - t0;
        self.parts.source_verify = t2 - t1;
        if self.tracking {
            self.tracker
                .stop()
                .map_err(MigrationError::backend("stop dirty tracking"))?;
            self.tracking = false;
        }
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::DeviceState(state)));
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::Complete {
                total_pages: self.layout.total_pages(),
                digest,
            }));
        // The destination may resume the guest once the completion record
        // has been handed out (see `poll`).
        self.commit_record = Some(RecordType::Complete as u8);
        self.state = SrcState::AwaitResumed;
        Ok(())
    }

    /// Post-copy: every page is on its way; the source's memory has been
    /// frozen since the pause, so its digest is taken now, outside downtime.
    fn complete_postcopy(&mut self) -> Result<(), MigrationError> {
        let memory = self.source_digest()?;
        let Some(state) = self.sent_state.as_ref() else {
            return Err(MigrationError::InvalidUse(
                "post-copy completion without a device state",
            ));
        };
        let digest = completion_digest(memory, state);
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::Complete {
                total_pages: self.layout.total_pages(),
                digest,
            }));
        self.state = SrcState::AwaitVerified;
        Ok(())
    }

    fn finish(
        &mut self,
        resume_ack_at: Duration,
        report: ResumeReport,
        post: Option<PostcopyReport>,
    ) {
        let now = self.now();
        let paused = self.paused_at.unwrap_or(resume_ack_at);
        let start = self.started_at.unwrap_or_default();
        let dest_part = Duration::from_nanos(report.total_ns);
        let measured = resume_ack_at
            .saturating_sub(paused)
            .saturating_sub(self.rtt / 2);
        let source_part = self.parts.pause
            + self.parts.final_copy
            + self.parts.device_save
            + self.parts.source_verify;
        let downtime = measured.max(source_part + dest_part);
        let mut parts = self.parts.clone();
        parts.dest_verify = Duration::from_nanos(report.verify_ns);
        parts.device_restore = Duration::from_nanos(report.restore_ns);
        parts.resume = Duration::from_nanos(report.resume_ns);
        parts.transit = downtime
            .saturating_sub(source_part)
            .saturating_sub(dest_part);
        let total_time = now.saturating_sub(start);
        let ps = self.layout.page_size().bytes() as u64;
        let normal = self.pages_sent - self.zero_sent;
        let resumed_at = paused + downtime;
        let postcopy = post.map(|r| PostcopyStats {
            requests: self.postcopy_requests.max(r.faults),
            duplicates: r.duplicates,
            fault_latency_p50: Duration::from_nanos(r.latency_p50_ns),
            fault_latency_p99: Duration::from_nanos(r.latency_p99_ns),
            fault_latency_max: Duration::from_nanos(r.latency_max_ns),
            vcpu_stall: Duration::from_nanos(r.stall_ns),
            resume_pages: self.resume_pages_sent,
            pages: self.postcopy_pages,
            bytes: self.postcopy_bytes,
            duration: now.saturating_sub(self.rtt / 2).saturating_sub(resumed_at),
        });
        self.stats = Some(MigrationStats {
            policy: self.policy.name().to_owned(),
            switch_reason: self.switch_reason.unwrap_or(SwitchReason::StopAndCopy),
            guest_pages: self.layout.total_pages(),
            page_size: ps as u32,
            total_time,
            setup_time: self.first_page_at.unwrap_or(now).saturating_sub(start),
            downtime,
            downtime_parts: parts,
            expected_downtime: self.expected_downtime,
            transferred: self.transferred,
            remaining: self.pending.count_ones() * ps,
            duplicate: self.zero_sent,
            normal,
            normal_bytes: normal * ps,
            total_pages_sent: self.pages_sent,
            dirty_pages_rate: self.dirty_rate,
            mbps: if total_time.is_zero() {
                0.0
            } else {
                self.transferred as f64 * 8.0 / total_time.as_secs_f64() / 1e6
            },
            dirty_sync_count: self.dirty_syncs,
            precopy_bytes: self.precopy_bytes,
            downtime_bytes: self.downtime_bytes,
            rtt: self.rtt,
            postcopy,
            rounds: std::mem::take(&mut self.rounds),
            memory_verified: true,
        });
        self.paused_at = None;
        self.state = SrcState::Done;
    }
}

/// What the destination did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestStatus {
    /// Keep feeding frames.
    Continue,
    /// Post-copy: the guest was restored and resumed here; pages are still
    /// to come. Send the queued replies and keep feeding frames.
    Resumed,
    /// The migration is complete: the guest runs here with all its memory,
    /// verified. Send the queued reply and stop.
    Completed,
}

/// Counters of the destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestinationReport {
    /// Page records applied (a page sent twice counts twice).
    pub pages_received: u64,
    /// Of those, zero pages.
    pub zero_pages: u64,
    /// Bytes of frames received.
    pub bytes_received: u64,
    /// Round markers seen.
    pub rounds: u32,
    /// Digest of the destination's memory, once verified.
    pub digest: Option<MemoryDigest>,
    /// The destination's timings of its resume.
    pub resume: ResumeReport,
    /// Post-copy figures, if the guest was post-copied.
    pub postcopy: Option<PostcopyReport>,
    /// Whether the resume confirmation reached the transport. `false`
    /// means the guest runs here but the source may not know: it stays
    /// paused, and the operator must not resume it.
    pub resume_confirmed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DstState {
    AwaitHeader,
    AwaitLayout,
    Receiving,
    PostcopyRunning,
    Completed,
    Failed,
}

/// The destination side of a migration.
pub struct DestinationEngine<K, G> {
    memory: K,
    control: G,
    clock: Arc<dyn Clock>,
    decoder: Decoder,
    sequencer: Sequencer,
    layout: MemoryLayout,
    state: DstState,
    received: DirtyBitmap,
    /// Pages received or discarded at least once: a post-copy guest
    /// resumes only when this is every page.
    accounted: DirtyBitmap,
    /// Post-copy: the device state restored, for the completion digest.
    restored_state: Option<DeviceState>,
    hashes: Vec<u64>,
    switched_over: bool,
    postcopy: bool,
    discard_cursor: PageNum,
    device_state: Option<DeviceState>,
    outbox: VecDeque<Vec<u8>>,
    requested: HashMap<PageNum, Duration>,
    latencies: Vec<u64>,
    faults: u64,
    duplicates: u64,
    resumed_at: Option<Duration>,
    report: DestinationReport,
}

impl<K, G> DestinationEngine<K, G>
where
    K: PageSink + PageSource,
    G: GuestControl,
{
    /// A destination writing into `memory` (whose layout must equal the
    /// source's) and restoring through `control`.
    pub fn new(memory: K, control: G, clock: Arc<dyn Clock>) -> Self {
        let layout = PageSink::layout(&memory).clone();
        DestinationEngine {
            received: DirtyBitmap::new(layout.page_end()),
            accounted: DirtyBitmap::new(layout.page_end()),
            restored_state: None,
            hashes: vec![0; layout.total_pages() as usize],
            memory,
            control,
            clock,
            decoder: Decoder::sequenced(),
            sequencer: Sequencer::new(),
            layout,
            state: DstState::AwaitHeader,
            switched_over: false,
            postcopy: false,
            discard_cursor: 0,
            device_state: None,
            outbox: VecDeque::new(),
            requested: HashMap::new(),
            latencies: Vec::new(),
            faults: 0,
            duplicates: 0,
            resumed_at: None,
            report: DestinationReport::default(),
        }
    }

    /// The next frame to send back to the source, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let mut f = self.outbox.pop_front()?;
        self.sequencer.seal(&mut f);
        Some(f)
    }

    /// An abort record telling the source why, numbered as the next frame
    /// of this stream (frames still queued are not sent after it). A
    /// source takes an abort that follows every frame before it, with no
    /// resume confirmation among them, as proof that the guest was not
    /// resumed here.
    pub fn abort_frame(&mut self, reason: &str) -> Vec<u8> {
        self.outbox.clear();
        let mut f = protocol::abort_frame(reason);
        self.sequencer.seal(&mut f);
        f
    }

    /// Whether the guest has been resumed here.
    pub fn resumed(&self) -> bool {
        self.resumed_at.is_some()
    }

    /// Whether the migration completed here.
    pub fn completed(&self) -> bool {
        self.state == DstState::Completed
    }

    /// Whether the guest runs here in post-copy, with pages still missing.
    pub fn in_postcopy(&self) -> bool {
        self.state == DstState::PostcopyRunning
    }

    /// Whether `page` is here (received and not discarded).
    pub fn has_page(&self, page: PageNum) -> bool {
        self.received.get(page)
    }

    /// Counters so far.
    pub fn report(&self) -> &DestinationReport {
        &self.report
    }

    /// Gives the backend parts back.
    pub fn into_parts(self) -> (K, G) {
        (self.memory, self.control)
    }

    /// Post-copy: the guest touched these pages and they are not here.
    /// Queues a request for those not already requested and not present;
    /// the fault latency of each is measured from now until it is placed.
    pub fn request_pages(&mut self, pages: &[PageNum]) -> Result<(), MigrationError> {
        let now = self.clock.now();
        self.request_pages_at(pages, now)
    }

    /// As [`DestinationEngine::request_pages`] for faults seen at `now`
    /// on this engine's clock (by a fault handler on another thread): the
    /// fault latency is measured from then.
    pub fn request_pages_at(
        &mut self,
        pages: &[PageNum],
        now: Duration,
    ) -> Result<(), MigrationError> {
        if self.state != DstState::PostcopyRunning {
            return Err(MigrationError::InvalidUse(
                "pages can be requested only while the guest runs in post-copy",
            ));
        }
        let mut want = Vec::new();
        for &p in pages {
            if !self.layout.contains(p) {
                return Err(MigrationError::PageOutOfRange(p));
            }
            if self.received.get(p) || self.requested.contains_key(&p) {
                continue;
            }
            self.requested.insert(p, now);
            self.faults += 1;
            want.push(p);
        }
        for chunk in want.chunks(MAX_REQUEST_PAGES) {
            self.outbox
                .push_back(protocol::encode_to_vec(&Record::PageRequest(
                    chunk.to_vec(),
                )));
        }
        Ok(())
    }

    /// Applies one frame from the source.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<DestStatus, MigrationError> {
        match self.state {
            DstState::Failed => {
                return Err(MigrationError::InvalidUse("destination used after failure"))
            }
            DstState::Completed => {
                return Err(MigrationError::InvalidUse("destination already completed"))
            }
            _ => {}
        }
        self.report.bytes_received += frame.len() as u64;
        let r = self.handle_inner(frame);
        if r.is_err() {
            self.state = DstState::Failed;
        }
        r
    }

    /// Marks the migration failed from outside (the stream ended or timed
    /// out). A guest not yet resumed is not resumed.
    pub fn fail(&mut self) {
        if self.state != DstState::Completed {
            self.state = DstState::Failed;
        }
    }

    fn place(&mut self, page: PageNum, data: Option<&[u8]>) -> Result<(), MigrationError> {
        let Some(i) = self.layout.dense_index(page) else {
            return Err(MigrationError::PageOutOfRange(page));
        };
        if self.state == DstState::PostcopyRunning && self.received.get(page) {
            // Already here and maybe written by the running guest since.
            self.duplicates += 1;
            return Ok(());
        }
        let hash = match data {
            Some(d) => {
                self.memory
                    .write_page(page, d)
                    .map_err(MigrationError::backend("write a guest page"))?;
                page_hash(d)
            }
            None => {
                self.report.zero_pages += 1;
                self.memory
                    .write_zero_page(page)
                    .map_err(MigrationError::backend("write a guest page"))?;
                zero_page_hash(self.layout.page_size().get())
            }
        };
        self.hashes[i as usize] = hash;
        self.received.set(page);
        self.accounted.set(page);
        self.report.pages_received += 1;
        if let Some(t) = self.requested.remove(&page) {
            let lat = self.clock.now().saturating_sub(t);
            self.latencies.push(lat.as_nanos() as u64);
        }
        Ok(())
    }

    fn handle_inner(&mut self, frame: &[u8]) -> Result<DestStatus, MigrationError> {
        let rec = self.decoder.decode(frame)?;
        let unexpected = |rec: &Record<'_>, state| MigrationError::UnexpectedRecord {
            got: rec.record_type(),
            state,
        };
        let receiving = matches!(self.state, DstState::Receiving | DstState::PostcopyRunning);
        match (self.state, rec) {
            (_, Record::Abort { reason }) => Err(MigrationError::PeerAborted(reason)),
            (DstState::AwaitHeader, Record::Header { .. }) => {
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Header {
                        version: VERSION,
                    }));
                self.state = DstState::AwaitLayout;
                Ok(DestStatus::Continue)
            }
            (DstState::AwaitLayout, Record::Layout(layout)) => {
                if layout != self.layout {
                    return Err(MigrationError::LayoutMismatch {
                        source_pages: layout.total_pages(),
                        dest_pages: self.layout.total_pages(),
                    });
                }
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Ready));
                self.state = DstState::Receiving;
                Ok(DestStatus::Continue)
            }
            (_, Record::PageBatch(batch)) if receiving => {
                for (page, data) in batch.iter() {
                    self.place(page, data)?;
                }
                Ok(DestStatus::Continue)
            }
            (_, Record::RoundEnd { .. }) if receiving => {
                self.report.rounds += 1;
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving, Record::SwitchOver { postcopy, .. }) if !self.switched_over => {
                self.switched_over = true;
                self.postcopy = postcopy;
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving, Record::Discard(ranges)) if self.postcopy => {
                for (first, count) in ranges {
                    // Ranges ascend and do not overlap, across the whole
                    // stream: a source cannot make us walk memory twice.
                    if first < self.discard_cursor {
                        return Err(MigrationError::Protocol(ProtocolError::OutOfRange {
                            what: "discard range start (ranges must ascend)",
                            value: first,
                        }));
                    }
                    let end = first + count;
                    // Walk no further than the end of guest memory.
                    let stop = end.min(self.layout.page_end()).max(first);
                    let mut pages = Vec::with_capacity((stop - first) as usize);
                    for page in first..stop {
                        if !self.layout.contains(page) {
                            return Err(MigrationError::PageOutOfRange(page));
                        }
                        self.received.clear(page);
                        self.accounted.set(page);
                        pages.push(page);
                    }
                    self.memory
                        .discard_pages(&pages)
                        .map_err(MigrationError::backend("discard stale pages"))?;
                    if end > stop {
                        return Err(MigrationError::PageOutOfRange(stop));
                    }
                    self.discard_cursor = end;
                }
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving, Record::DiscardBitmap { first_page, words }) if self.postcopy => {
                if first_page < self.discard_cursor {
                    return Err(MigrationError::Protocol(ProtocolError::OutOfRange {
                        what: "discard bitmap start (discards must ascend)",
                        value: first_page,
                    }));
                }
                let n = words.len() as u64 * 64;
                let bits = DirtyBitmap::from_words(words, n);
                let mut pages = Vec::new();
                for i in bits.iter_ones() {
                    let page = first_page + i;
                    if !self.layout.contains(page) {
                        return Err(MigrationError::PageOutOfRange(page));
                    }
                    self.received.clear(page);
                    self.accounted.set(page);
                    pages.push(page);
                }
                self.memory
                    .discard_pages(&pages)
                    .map_err(MigrationError::backend("discard stale pages"))?;
                self.discard_cursor = first_page + n;
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving, Record::DeviceState(s))
                if self.switched_over && self.device_state.is_none() =>
            {
                if self.postcopy {
                    self.resume_postcopy(s)
                } else {
                    self.device_state = Some(s);
                    Ok(DestStatus::Continue)
                }
            }
            (
                DstState::Receiving,
                Record::Complete {
                    total_pages,
                    digest,
                },
            ) if !self.postcopy => self.complete(total_pages, digest),
            (
                DstState::PostcopyRunning,
                Record::Complete {
                    total_pages,
                    digest,
                },
            ) => self.complete_postcopy(total_pages, digest),
            (DstState::AwaitHeader, rec) => Err(unexpected(&rec, "waiting for the stream header")),
            (DstState::AwaitLayout, rec) => Err(unexpected(&rec, "waiting for the memory layout")),
            (DstState::PostcopyRunning, rec) => Err(unexpected(&rec, "running in post-copy")),
            (_, rec) => Err(unexpected(&rec, "receiving pages")),
        }
    }

    fn check_all_here(&self, total_pages: u64) -> Result<(), MigrationError> {
        if !self.switched_over {
            return Err(MigrationError::Incomplete(
                "completion before the switch-over record".into(),
            ));
        }
        if total_pages != self.layout.total_pages() {
            return Err(MigrationError::Incomplete(format!(
                "completion claims {total_pages} pages, the layout has {}",
                self.layout.total_pages()
            )));
        }
        let have = self.received.count_ones();
        if have != total_pages {
            return Err(MigrationError::Incomplete(format!(
                "{} of {total_pages} pages never arrived",
                total_pages - have
            )));
        }
        Ok(())
    }

    fn complete(
        &mut self,
        total_pages: u64,
        digest: MemoryDigest,
    ) -> Result<DestStatus, MigrationError> {
        let t0 = self.clock.now();
        self.check_all_here(total_pages)?;
        let Some(state) = self.device_state.take() else {
            return Err(MigrationError::Incomplete(
                "no device state was sent".into(),
            ));
        };
        // The digest of memory as this side holds it, read back from the
        // sink, bound to the device state about to be restored: the guest
        // resumes only on the source's memory and the source's state.
        let held = digest_memory(&mut self.memory, &self.layout)
            .map_err(MigrationError::backend("digest guest memory"))?;
        let actual = completion_digest(held, &state);
        if actual != digest {
            return Err(MigrationError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        let t1 = self.clock.now();
        self.report.digest = Some(held);
        self.restore_and_resume(&state, t0, t1)?;
        self.state = DstState::Completed;
        Ok(DestStatus::Completed)
    }

    fn resume_postcopy(&mut self, state: DeviceState) -> Result<DestStatus, MigrationError> {
        let t0 = self.clock.now();
        // Every page the guest can see must be the source's: each was
        // either received (and not discarded since) or discarded, so that
        // the guest faults on it.
        let accounted = self.accounted.count_ones();
        let total = self.layout.total_pages();
        if accounted != total {
            return Err(MigrationError::Incomplete(format!(
                "{} of {total} pages were neither received nor discarded before the post-copy resume",
                total - accounted
            )));
        }
        self.restore_and_resume(&state, t0, t0)?;
        self.restored_state = Some(state);
        self.state = DstState::PostcopyRunning;
        Ok(DestStatus::Resumed)
    }

    /// Restores the device state, resumes the guest and queues the
    /// confirmation with the timings: `t0` is when the destination began
    /// (the record that triggered the resume arrived), `verified` when its
    /// verification ended.
    fn restore_and_resume(
        &mut self,
        state: &DeviceState,
        t0: Duration,
        verified: Duration,
    ) -> Result<(), MigrationError> {
        self.control
            .restore_state(state)
            .map_err(MigrationError::backend("restore device state"))?;
        let restored = self.clock.now();
        self.control
            .resume()
            .map_err(MigrationError::backend("resume the guest"))?;
        let resumed = self.clock.now();
        self.resumed_at = Some(resumed);
        let ns = |d: Duration| d.as_nanos() as u64;
        self.report.resume = ResumeReport {
            verify_ns: ns(verified - t0),
            restore_ns: ns(restored - verified),
            resume_ns: ns(resumed - restored),
            total_ns: ns(resumed - t0),
        };
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::Resumed(
                self.report.resume,
            )));
        Ok(())
    }

    fn complete_postcopy(
        &mut self,
        total_pages: u64,
        digest: MemoryDigest,
    ) -> Result<DestStatus, MigrationError> {
        self.check_all_here(total_pages)?;
        // The guest has been writing since it resumed, so the digest is of
        // what arrived, page by page, not of memory as it is now.
        let held = digest_table(&self.layout, &self.hashes);
        let Some(state) = self.restored_state.as_ref() else {
            return Err(MigrationError::Incomplete(
                "post-copy completion without a device state".into(),
            ));
        };
        let actual = completion_digest(held, state);
        if actual != digest {
            return Err(MigrationError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        let mut lat = std::mem::take(&mut self.latencies);
        lat.sort_unstable();
        let pct = |q: f64| -> u64 {
            if lat.is_empty() {
                0
            } else {
                lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1]
            }
        };
        let report = PostcopyReport {
            faults: self.faults,
            duplicates: self.duplicates,
            latency_p50_ns: pct(0.50),
            latency_p99_ns: pct(0.99),
            latency_max_ns: lat.last().copied().unwrap_or(0),
            stall_ns: lat.iter().sum(),
        };
        self.report.digest = Some(held);
        self.report.postcopy = Some(report);
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::Verified(report)));
        self.state = DstState::Completed;
        Ok(DestStatus::Completed)
    }
}

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

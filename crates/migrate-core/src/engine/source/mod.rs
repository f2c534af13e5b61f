//! The source engine: its states, its public face and how it moves
//! frames; the rounds, the end and the steering (handle, timers,
//! auto-converge, tracing) are in `rounds.rs`, `finish.rs` and
//! `steering.rs`.

use super::*;

mod finish;
mod recovery;
mod rounds;
mod steering;

use recovery::Recovery;

pub use steering::PACING_SLACK;

/// What the source wants done next.
#[derive(Debug)]
pub enum SourceStep {
    /// Send this frame to the destination.
    Send(Vec<u8>),
    /// Nothing to send now: wait for a frame from the destination, or
    /// until [`SourceEngine::poll_timeout`], then poll again.
    Wait,
    /// The migration is complete; [`SourceEngine::stats`] has the figures.
    Done,
}

/// Where the source is. Each state carries what only it needs.
enum SrcState {
    /// Nothing sent yet.
    Init,
    /// Header and layout handed out; waiting for the destination to
    /// accept the layout. The time they went measures the round trip.
    AwaitReady { layout_sent_at: Duration },
    /// Between rounds: the policy decides what comes next.
    Decide,
    /// A pre-copy round, with the guest running.
    Precopy(Round),
    /// A pre-copy round whose pages and marker were all handed out,
    /// waiting for the destination to say it received them
    /// ([`Record::RoundReceived`]); the round's time and rate run until
    /// then.
    AwaitRoundReceived(Round),
    /// The final copy of a stop-and-copy, with the guest paused.
    Final(Round),
    /// Post-copy: the guest was switched over and the rest of its pages
    /// are pushed, those the destination asks for first.
    Postcopy(Box<Postcopy>),
    /// Pre-copy: the completion was handed out; waiting for the
    /// destination to resume.
    AwaitResumed,
    /// Post-copy: every page was handed out; waiting for the destination
    /// to verify what it holds.
    AwaitVerified(Box<Postcopy>),
    /// Post-copy whose connection broke: waiting for a new one, then for
    /// the destination to say which pages it holds.
    Recovering(Box<Recovery>),
    /// The migration completed.
    Done(Box<MigrationStats>),
    /// The migration failed or was cancelled.
    Failed,
}

/// The post-copy stage's own data.
struct Postcopy {
    /// The round that pushes the rest of memory.
    round: Round,
    /// The device state sent, for the completion digest.
    sent_state: DeviceState,
    /// Pages the destination asked for, to go first.
    urgent: VecDeque<PageNum>,
    /// When the destination said its guest runs, with its timings.
    resumed: Option<(Duration, ResumeReport)>,
    /// Whether the round's line is in the statistics (every page had been
    /// handed out once; a recovery may send some again).
    recorded: bool,
}

/// The order a round walks its pages in.
enum RoundOrder {
    Ascending { cursor: PageNum },
    Ordered { pages: Vec<PageNum>, next: usize },
}

/// One round: its place in the walk and its figures so far.
struct Round {
    number: u32,
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
    /// The vCPU throttle in force when the round started, percent.
    throttle: u8,
}

/// The round of a state that has one.
fn round_of(state: &mut SrcState) -> Option<&mut Round> {
    match state {
        SrcState::Precopy(r) | SrcState::Final(r) => Some(r),
        SrcState::Postcopy(p) => Some(&mut p.round),
        _ => None,
    }
}

/// The frames going out and coming in, and the point of no return.
struct Wire {
    decoder: Decoder,
    sequencer: Sequencer,
    outbox: VecDeque<Vec<u8>>,
    /// The type of the record whose hand-out is the point of no return,
    /// once it is queued.
    commit_record: Option<u8>,
    /// Whether the last frame handed out was that record.
    last_was_commit: bool,
    /// Whether the point of no return was passed.
    committed: bool,
    /// Whether the destination's abort came with every frame before it.
    abort_in_sequence: bool,
    /// Frames in the outbox that leave with the guest paused (the
    /// post-copy switch-over's), for the byte counts.
    paused_frames: usize,
    /// What the destination announced it can decode.
    peer_caps: Capabilities,
    /// The page-batch compressor, once the destination announced its
    /// codec.
    compressor: Option<BatchCompressor>,
    /// Post-copy: requested pages go as [`Record::RequestedPages`]
    /// (configured, and announced by the destination).
    preempt: bool,
    /// Numbers the [`Record::RequestedPages`] frames, apart from the rest.
    preempt_sequencer: Sequencer,
    /// Reads the [`Record::PreemptRequest`] frames that reach the engine
    /// (numbered on their own).
    preempt_decoder: Decoder,
    /// The driver serves the destination's requests on the preempt
    /// connection's own thread ([`SourceEngine::serve_requests_apart`]).
    served_apart: bool,
    /// The destination answers each pre-copy round marker with
    /// [`Record::RoundReceived`] (it announced
    /// [`Capabilities::ROUND_RECEIVED`] and was asked to).
    round_acks: bool,
}

/// The page sets and the buffers pages pass through.
struct Pages {
    pending: DirtyBitmap,
    /// How many pages `pending` holds, kept as pages come and go.
    pending_count: u64,
    skip: DirtyBitmap,
    scratch: DirtyBitmap,
    round_dirty: DirtyBitmap,
    round_dirty_used: bool,
    batch: Vec<PageNum>,
    push: Vec<PageNum>,
    /// The batch's pages read in one call, for a source whose calls cost
    /// ([`PageSource::small_reads_are_cheap`]).
    read_buf: Vec<u8>,
    /// Which pages of the batch the source knows to be zero.
    known_zero: Vec<bool>,
    /// The pages of the batch the source must read.
    to_read: Vec<PageNum>,
    /// [`Payload::Model`]: the tokens of the batch being encoded.
    tokens: Vec<u64>,
    /// `SentContent`: the hash (the token, with [`Payload::Model`]) of
    /// each page as last sent, by dense index.
    sent_hashes: Vec<u64>,
}

impl Pages {
    /// Takes `page` out of the pending set; whether it was there.
    fn take(&mut self, page: PageNum) -> bool {
        if self.pending.get(page) {
            self.pending.clear(page);
            self.pending_count -= 1;
            true
        } else {
            false
        }
    }

    /// Adds the pages of `scratch` to the pending set.
    fn merge_scratch(&mut self) {
        self.pending.union_with(&self.scratch);
        self.pending_count = self.pending.count_ones();
    }
}

/// What the engine holds of the guest beyond its traits.
#[derive(Default)]
struct GuestHold {
    /// Dirty tracking runs.
    tracking: bool,
    /// When this engine asked the guest to pause, while it is paused.
    paused_at: Option<Duration>,
    /// The vCPU throttle applied now (auto-converge), percent.
    throttle: u8,
}

/// Times, estimates and counters: what the statistics are made of.
#[derive(Default)]
struct Figures {
    started_at: Option<Duration>,
    rtt: Duration,
    first_page_at: Option<Duration>,
    bandwidth: f64,
    dirty_rate: f64,
    expected_downtime: Duration,
    switch_reason: Option<SwitchReason>,
    /// The migration switched over to post-copy.
    postcopy: bool,
    parts: DowntimeParts,
    transferred: u64,
    precopy_bytes: u64,
    downtime_bytes: u64,
    postcopy_bytes: u64,
    postcopy_pages: u64,
    postcopy_requests: u64,
    /// Requested pages sent as [`Record::RequestedPages`], and their bytes.
    preempt_pages: u64,
    preempt_bytes: u64,
    resume_pages_sent: u64,
    pages_sent: u64,
    zero_sent: u64,
    dirty_syncs: u64,
    rounds: Vec<RoundStats>,
    rounds_done: u32,
    last_summary: Option<RoundSummary>,
    /// Post-copy recoveries, the pages they sent again and the time from
    /// each break to the destination's answer, summed.
    recoveries: u32,
    recovered_pages: u64,
    recovery_time: Duration,
}

/// The engine's timers: each a deadline on its clock.
struct Timers {
    /// The policy's dirty-log sampling period.
    sample_every: Option<Duration>,
    next_sample_at: Duration,
    /// Pacing: the earliest time the next capped frame may go out.
    pace_at: Duration,
    /// When the engine started waiting for its peer.
    wait_since: Option<Duration>,
}

/// What a VMM steers through the handle, as the engine applies it.
struct Steering {
    handle: MigrationHandle,
    /// The bandwidth cap in force, bytes per second.
    max_bandwidth: Option<u64>,
    auto_converge: Option<AutoConverge>,
    /// Rounds whose dirtied bytes passed the auto-converge trigger since
    /// the last step.
    high_dirty_rounds: u32,
    /// The VMM asked for post-copy: the round ends and the engine
    /// switches.
    postcopy_requested: bool,
}

/// The tracing spans: the migration's, the current phase's and round's.
struct Spans {
    migration: tracing::Span,
    phase: Option<(Phase, tracing::Span)>,
    round: Option<tracing::Span>,
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
    state: SrcState,
    wire: Wire,
    pages: Pages,
    guest: GuestHold,
    figures: Figures,
    timers: Timers,
    steer: Steering,
    spans: Spans,
    /// The session id the destination is told (post-copy recovery).
    session: u128,
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
        let max_bandwidth = config.max_bandwidth.filter(|b| *b > 0);
        let handle = MigrationHandle::new(Side::Source);
        {
            let mut h = handle.lock();
            h.progress.guest_pages = layout.total_pages();
            h.progress.page_size = layout.page_size().bytes();
            h.progress.max_bandwidth = max_bandwidth;
        }
        let sent_hashes = match config.verify {
            SourceVerify::SentContent => vec![0; layout.total_pages() as usize],
            SourceVerify::FullScan => Vec::new(),
        };
        SourceEngine {
            timers: Timers {
                sample_every: policy.sample_interval().filter(|d| !d.is_zero()),
                next_sample_at: Duration::ZERO,
                pace_at: Duration::ZERO,
                wait_since: None,
            },
            steer: Steering {
                handle,
                max_bandwidth,
                auto_converge: config.auto_converge,
                high_dirty_rounds: 0,
                postcopy_requested: false,
            },
            spans: Spans {
                migration: tracing::info_span!(
                    "migration",
                    side = "source",
                    policy = policy.name(),
                    guest_pages = layout.total_pages(),
                    transferred = tracing::field::Empty,
                    downtime_ms = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                ),
                phase: None,
                round: None,
            },
            session: recovery::session_id(),
            pages: Pages {
                pending: DirtyBitmap::new(end),
                pending_count: 0,
                skip: DirtyBitmap::new(end),
                scratch: DirtyBitmap::new(end),
                round_dirty: DirtyBitmap::new(end),
                round_dirty_used: false,
                batch: Vec::with_capacity(config.batch_pages),
                push: Vec::new(),
                read_buf: Vec::new(),
                known_zero: Vec::new(),
                to_read: Vec::new(),
                tokens: Vec::new(),
                sent_hashes,
            },
            wire: Wire {
                decoder: Decoder::sequenced(),
                sequencer: Sequencer::new(),
                outbox: VecDeque::new(),
                commit_record: None,
                last_was_commit: false,
                committed: false,
                abort_in_sequence: false,
                peer_caps: Capabilities::default(),
                compressor: None,
                paused_frames: 0,
                preempt: false,
                preempt_sequencer: Sequencer::new(),
                preempt_decoder: Decoder::preempt(layout.page_size()),
                served_apart: false,
                round_acks: false,
            },
            tracker,
            memory,
            control,
            policy,
            clock,
            config,
            layout,
            state: SrcState::Init,
            guest: GuestHold::default(),
            figures: Figures::default(),
        }
    }

    /// The handle on this migration: progress, events, cancel and live
    /// parameters, from any thread.
    pub fn handle(&self) -> MigrationHandle {
        self.steer.handle.clone()
    }

    /// The guest's memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Whether the source guest is paused by this engine.
    pub fn guest_paused(&self) -> bool {
        self.guest.paused_at.is_some()
    }

    /// Whether the point of no return was passed: the guest may run on the
    /// destination, so the source must not resume it on failure.
    pub fn committed(&self) -> bool {
        self.wire.committed
    }

    /// The statistics, once [`SourceStep::Done`] was returned.
    pub fn stats(&self) -> Option<&MigrationStats> {
        match &self.state {
            SrcState::Done(stats) => Some(stats),
            _ => None,
        }
    }

    /// The policy (for reading what it learnt).
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Gives the backend parts back.
    pub fn into_parts(self) -> (T, S, G, P) {
        (self.tracker, self.memory, self.control, self.policy)
    }

    /// Post-copy with [`EngineConfig::postcopy_preempt`]: the next frame
    /// of pages the destination asked for, if one is waiting; nothing
    /// else. A driver whose push is held up by a busy link calls it (after
    /// handing the engine what arrived) to serve requests meanwhile: such
    /// frames are numbered apart from the push, so they may be sent
    /// before a push frame handed out earlier.
    pub fn poll_preempt(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if !self.wire.preempt {
            return Ok(None);
        }
        let span = self.current_span();
        let _entered = span.enter();
        let r = match self.preempt_frame() {
            Ok(Some(mut f)) => match self.hand_out(&mut f) {
                Ok(()) => Ok(Some(f)),
                Err(e) => Err(self.fail(e)),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(self.fail(e)),
        };
        self.publish();
        r
    }

    /// Whether requested pages go as [`Record::RequestedPages`] from this
    /// engine (the configuration asked for it, the destination announced
    /// it, and the driver does not serve them apart).
    pub fn preempt_active(&self) -> bool {
        self.wire.preempt
    }

    /// A second handle on the guest's memory for the thread that serves
    /// the destination's requests on the preempt connection
    /// ([`PageSource::share`]); `None` where the memory cannot give one or
    /// the pages travel as models ([`Payload::Model`]).
    pub fn shared_pages(&self) -> Option<Box<dyn PageSource + Send>> {
        if self.config.payload != Payload::Bytes {
            return None;
        }
        self.memory.share()
    }

    /// The driver serves the destination's page requests on the preempt
    /// connection's own thread, from [`SourceEngine::shared_pages`], and
    /// tells the engine what it served
    /// ([`SourceEngine::requested_pages_served`]). Call it before the
    /// destination accepts the layout: the engine then sends no
    /// [`Record::RequestedPages`] itself, and the requests that still reach
    /// it (a recovering destination asks again on the new connection's
    /// stream) go first in the push.
    pub fn serve_requests_apart(&mut self) {
        self.wire.served_apart = true;
        self.wire.preempt = false;
    }

    /// The number of the post-copy push's round once the destination's
    /// requests may be served: the guest was switched over to post-copy
    /// and stays paused here, so every copy of a page has the same bytes.
    /// `None` before the switch-over (a request then is a protocol error)
    /// and once the migration ended.
    pub fn request_round(&self) -> Option<u32> {
        self.guest.paused_at?;
        match &self.state {
            SrcState::Postcopy(p) | SrcState::AwaitVerified(p) => Some(p.round.number),
            SrcState::Recovering(r) => Some(r.postcopy.round.number),
            _ => None,
        }
    }

    /// The driver sent this [`Record::RequestedPages`] frame on the
    /// preempt connection: its pages count as requested and sent (their
    /// hashes as sent, for [`SourceVerify::SentContent`]). They stay in
    /// the push, so that the completion, which follows the push in
    /// sequence, never overtakes them.
    pub fn requested_pages_served(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        let now = self.now();
        let ps = self.layout.page_size();
        let batch = protocol::page_batch_of(frame, ps)?;
        let (n, zero) = (batch.len() as u64, batch.zero_pages() as u64);
        let bytes = wire_len(frame) as u64;
        let f = &mut self.figures;
        f.transferred += bytes;
        f.postcopy_bytes += bytes;
        f.preempt_bytes += bytes;
        f.preempt_pages += n;
        f.postcopy_requests += n;
        f.pages_sent += n;
        f.zero_sent += zero;
        f.postcopy_pages += n;
        // The pages stay in the push: see `preempt_frame`.
        for (p, data) in batch.iter() {
            if !self.layout.contains(p) {
                return Err(MigrationError::PageOutOfRange(p));
            }
            self.policy.on_fault(p, now);
            if !self.pages.sent_hashes.is_empty() {
                let hash = data.map_or_else(|| zero_page_hash(ps.get()), page_hash);
                if let Some(i) = self.layout.dense_index(p) {
                    self.pages.sent_hashes[i as usize] = hash;
                }
            }
        }
        self.publish();
        Ok(())
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Result<SourceStep, MigrationError> {
        if matches!(self.state, SrcState::Failed) {
            return Err(MigrationError::InvalidUse(
                "source engine polled after failure",
            ));
        }
        let span = self.current_span();
        let _entered = span.enter();
        if let Err(e) = self.apply_controls() {
            return Err(self.fail(e));
        }
        let r = match self.poll_inner() {
            Ok(SourceStep::Send(mut f)) => match self.hand_out(&mut f) {
                Ok(()) => Ok(SourceStep::Send(f)),
                Err(e) => Err(self.fail(e)),
            },
            Ok(SourceStep::Wait) => {
                if self.waiting_for_peer() {
                    let now = self.now();
                    self.timers.wait_since.get_or_insert(now);
                }
                Ok(SourceStep::Wait)
            }
            Ok(SourceStep::Done) => Ok(SourceStep::Done),
            Err(e) => Err(self.fail(e)),
        };
        self.publish();
        r
    }

    /// Seals and counts a frame about to be handed out, and passes the
    /// point of no return if it is the record that marks it.
    fn hand_out(&mut self, f: &mut [u8]) -> Result<(), MigrationError> {
        self.wire.last_was_commit = false;
        if self.wire.commit_record.is_some() && f.first().copied() == self.wire.commit_record {
            // Handed to the caller to send: from here the destination may
            // resume the guest, and a cancel is refused. A cancel that
            // came first wins.
            let mut h = self.steer.handle.lock();
            if h.cancel {
                return Err(MigrationError::Cancelled);
            }
            h.committed = true;
            drop(h);
            self.wire.commit_record = None;
            self.wire.committed = true;
            self.wire.last_was_commit = true;
        }
        if f.first() == Some(&(RecordType::RequestedPages as u8)) {
            self.wire.preempt_sequencer.seal(f);
        } else {
            self.wire.sequencer.seal(f);
        }
        self.account(f);
        self.pace(wire_len(f));
        Ok(())
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
        if self.wire.last_was_commit && !matches!(self.state, SrcState::Done(_)) {
            self.wire.committed = false;
            self.wire.last_was_commit = false;
            self.steer.handle.lock().committed = false;
        }
        self.fail(err)
    }

    /// An abort record telling the destination why, numbered as the next
    /// frame of this stream.
    pub fn abort_frame(&mut self, reason: &str) -> Vec<u8> {
        let mut f = protocol::abort_frame(reason);
        self.wire.sequencer.seal(&mut f);
        f
    }

    /// Handles a frame from the destination.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        if matches!(self.state, SrcState::Failed) {
            return Err(MigrationError::InvalidUse(
                "source engine used after failure",
            ));
        }
        self.timers.wait_since = None;
        let span = self.current_span();
        let _entered = span.enter();
        let r = match self.handle_inner(frame) {
            Ok(()) => Ok(()),
            // The link broke (a damaged, lost or repeated frame) after
            // the switch-over: the post-copy waits for a new connection
            // ([`SourceEngine::needs_connection`]).
            Err(e) if e.is_link_failure() && self.recoverable() => {
                let shown = MigrationError::Protocol(match &e {
                    MigrationError::Protocol(p) => p.clone(),
                    _ => ProtocolError::Malformed("broken link"),
                });
                self.lose_connection(shown);
                Err(e)
            }
            Err(e) => Err(self.fail(e)),
        };
        self.publish();
        r
    }

    /// Records that the migration failed outside the engine (a transport
    /// error, a timeout) and cleans up: before the point of no return the
    /// guest is resumed, its throttle lifted and tracking stopped. Returns
    /// the error to report ([`MigrationError::OutcomeUnknown`] after the
    /// point of no return).
    pub fn fail(&mut self, err: MigrationError) -> MigrationError {
        if matches!(self.state, SrcState::Done(_) | SrcState::Failed) {
            return err;
        }
        // A destination that resumes says so before anything else it
        // sends (its frames are ordered and numbered, so none was lost):
        // an abort with no resume confirmation before it means the guest
        // was not resumed there.
        let refused = self.resumed_seen().is_none()
            && self.wire.abort_in_sequence
            && matches!(
                err,
                MigrationError::PeerAborted(_) | MigrationError::Cancelled
            );
        self.state = SrcState::Failed;
        if self.guest.tracking {
            let _ = self.tracker.stop();
            self.guest.tracking = false;
        }
        if self.wire.committed && !refused {
            let err = match err {
                MigrationError::OutcomeUnknown(_) => err,
                other => MigrationError::OutcomeUnknown(other.to_string()),
            };
            self.ended(&err);
            return err;
        }
        self.lift_throttle();
        if self.guest.paused_at.take().is_some() {
            if let Err(e) = self.control.resume() {
                tracing::error!(error = %e, "could not resume the source guest after a failed migration");
            }
        }
        self.ended(&err);
        err
    }

    /// When the destination said its post-copied guest runs.
    fn resumed_seen(&self) -> Option<(Duration, ResumeReport)> {
        match &self.state {
            SrcState::Postcopy(p) | SrcState::AwaitVerified(p) => p.resumed,
            SrcState::Recovering(r) => r.postcopy.resumed,
            _ => None,
        }
    }

    fn account(&mut self, frame: &[u8]) {
        let bytes = wire_len(frame) as u64;
        let f = &mut self.figures;
        f.transferred += bytes;
        if let Some(r) = round_of(&mut self.state) {
            r.bytes += bytes;
        }
        if frame.first() == Some(&(RecordType::RequestedPages as u8)) {
            // Only after the resume, and never among the switch-over's.
            f.postcopy_bytes += bytes;
            f.preempt_bytes += bytes;
            return;
        }
        if self.wire.paused_frames > 0 {
            // Queued at a post-copy switch-over, sent before the resume.
            self.wire.paused_frames -= 1;
            f.downtime_bytes += bytes;
            return;
        }
        let after_resume = f.postcopy
            && self.wire.committed
            && matches!(
                frame.first().copied(),
                Some(t) if t == RecordType::PageBatch as u8
                    || t == RecordType::ModelBatch as u8
                    || t == RecordType::RoundEnd as u8
                    || t == RecordType::Complete as u8
            );
        if after_resume {
            f.postcopy_bytes += bytes;
        } else if self.guest.paused_at.is_some() {
            f.downtime_bytes += bytes;
        } else {
            f.precopy_bytes += bytes;
        }
    }

    fn poll_inner(&mut self) -> Result<SourceStep, MigrationError> {
        loop {
            let capped = !self.wire.outbox.is_empty() || matches!(self.state, SrcState::Precopy(_));
            if capped && self.paced() {
                return Ok(SourceStep::Wait);
            }
            if let Some(f) = self.preempt_frame()? {
                return Ok(SourceStep::Send(f));
            }
            if let Some(f) = self.wire.outbox.pop_front() {
                return Ok(SourceStep::Send(f));
            }
            match &self.state {
                SrcState::Init => {
                    let now = self.now();
                    self.figures.started_at = Some(now);
                    self.wire
                        .outbox
                        .push_back(protocol::encode_to_vec(&Record::Header {
                            version: VERSION,
                        }));
                    if self.config.recover_timeout.is_some() {
                        self.wire
                            .outbox
                            .push_back(protocol::encode_to_vec(&Record::Session {
                                id: self.session,
                                resume: false,
                            }));
                    }
                    self.wire
                        .outbox
                        .push_back(protocol::encode_to_vec(&Record::Layout(
                            self.layout.clone(),
                        )));
                    self.state = SrcState::AwaitReady {
                        layout_sent_at: now,
                    };
                }
                SrcState::AwaitReady { .. }
                | SrcState::AwaitRoundReceived(_)
                | SrcState::AwaitResumed
                | SrcState::AwaitVerified(_)
                | SrcState::Recovering(_) => return Ok(SourceStep::Wait),
                SrcState::Decide => self.decide()?,
                SrcState::Precopy(_) if self.steer.postcopy_requested => {
                    // End the round here: what it did not send stays
                    // pending, and the switch follows.
                    self.end_round()?;
                }
                SrcState::Precopy(_) | SrcState::Final(_) | SrcState::Postcopy(_) => {
                    if let Some(frame) = self.next_batch_frame()? {
                        return Ok(SourceStep::Send(frame));
                    }
                    self.end_round()?;
                }
                SrcState::Done(_) => return Ok(SourceStep::Done),
                SrcState::Failed => {
                    return Err(MigrationError::InvalidUse(
                        "source engine polled after failure",
                    ))
                }
            }
        }
    }

    /// Tells the destination which pages will arrive with data
    /// ([`Record::Populated`]), as the memory says after tracking began (a
    /// page populated later is dirty and sent anyway). A hint only: a
    /// source that cannot tell, or fails to, sends nothing.
    fn announce_populated(&mut self) {
        let ranges = match self.memory.populated_ranges() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "which pages are populated is not known; none announced");
                return;
            }
        };
        for chunk in ranges.chunks(protocol::MAX_DISCARD_RANGES) {
            self.wire
                .outbox
                .push_back(protocol::encode_to_vec(&Record::Populated(chunk.to_vec())));
        }
    }

    fn handle_inner(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        // Requests on the preempt connection are numbered on their own;
        // served by the engine when the driver does not serve them apart.
        let apart = frame.first() == Some(&(RecordType::PreemptRequest as u8));
        let rec = if apart {
            match self.wire.preempt_decoder.decode(frame)? {
                Record::PreemptRequest(pages) => Record::PageRequest(pages),
                other => other,
            }
        } else {
            self.wire.decoder.decode(frame)?
        };
        let now = self.now();
        match (rec, &mut self.state) {
            (Record::Header { .. }, _) => Ok(()),
            (Record::Capabilities(caps), SrcState::AwaitReady { .. }) => {
                self.wire.peer_caps = caps;
                Ok(())
            }
            (Record::Abort { reason }, _) => {
                self.wire.abort_in_sequence = self.wire.decoder.last_in_sequence();
                Err(if reason == CANCELLED_REASON {
                    MigrationError::Cancelled
                } else {
                    MigrationError::PeerAborted(reason)
                })
            }
            (Record::Ready, SrcState::AwaitReady { layout_sent_at }) => {
                self.figures.rtt = now.saturating_sub(*layout_sent_at);
                if let Some(codec) = self.config.compression {
                    if self.wire.peer_caps.contains(codec.capability()) {
                        self.wire.compressor = Some(BatchCompressor::new(codec).ok_or(
                            MigrationError::InvalidUse(
                                "compression level out of the codec's range",
                            ),
                        )?);
                    }
                }
                self.wire.preempt = self.config.postcopy_preempt
                    && !self.wire.served_apart
                    && self.config.payload == Payload::Bytes
                    && self.wire.peer_caps.contains(Capabilities::PREEMPT);
                self.tracker
                    .start()
                    .map_err(MigrationError::backend("start dirty tracking"))?;
                self.guest.tracking = true;
                if self.wire.peer_caps.contains(Capabilities::ROUND_RECEIVED) {
                    // Ask for round acknowledgements: a round's rate is then
                    // what reached the destination, not what the transport
                    // took into its buffers.
                    self.wire
                        .outbox
                        .push_back(protocol::encode_to_vec(&Record::Capabilities(
                            Capabilities::ROUND_RECEIVED,
                        )));
                    self.wire.round_acks = true;
                }
                if self.wire.peer_caps.contains(Capabilities::POPULATED) {
                    self.announce_populated();
                }
                if let Some(iv) = self.timers.sample_every {
                    self.timers.next_sample_at = now + iv;
                }
                for r in self.layout.regions() {
                    self.pages.pending.set_range(r.first_page..r.end());
                }
                self.pages.pending_count = self.pages.pending.count_ones();
                self.state = SrcState::Decide;
                Ok(())
            }
            (Record::RoundReceived { round }, SrcState::AwaitRoundReceived(r))
                if round == r.number =>
            {
                // The destination handled the marker half a round trip ago.
                let received = now.saturating_sub(self.figures.rtt / 2).max(r.started);
                match std::mem::replace(&mut self.state, SrcState::Decide) {
                    SrcState::AwaitRoundReceived(r) => self.end_precopy_round(r, received, true),
                    _ => Ok(()),
                }
            }
            // A round the source did not wait for (one cut short by a
            // request for post-copy): nothing to time.
            (Record::RoundReceived { round }, _) if round <= self.figures.rounds_done => Ok(()),
            (Record::Resumed(report), SrcState::AwaitResumed) => {
                self.steer.handle.emit(Event::Resumed);
                self.finish(now, report, None);
                Ok(())
            }
            (Record::Resumed(report), SrcState::Postcopy(p)) if p.resumed.is_none() => {
                p.resumed = Some((now, report));
                self.steer.handle.emit(Event::Resumed);
                Ok(())
            }
            (Record::Resumed(report), SrcState::AwaitVerified(p)) if p.resumed.is_none() => {
                p.resumed = Some((now, report));
                self.steer.handle.emit(Event::Resumed);
                Ok(())
            }
            // A recovering destination says again that its guest runs
            // (the first confirmation may have been lost with the link).
            (Record::Resumed(report), SrcState::Recovering(r)) => {
                if r.postcopy.resumed.is_none() {
                    r.postcopy.resumed = Some((now, report));
                    self.steer.handle.emit(Event::Resumed);
                }
                Ok(())
            }
            (Record::ReceivedBitmap { first_page, words }, SrcState::Recovering(r)) => {
                r.add_held(&self.layout, first_page, &words)
            }
            (Record::Recovered { held }, SrcState::Recovering(_)) => self.recovered(held, now),
            (
                Record::PageRequest(pages),
                state @ (SrcState::Postcopy(_) | SrcState::AwaitVerified(_)),
            ) => {
                for p in pages {
                    if !self.layout.contains(p) {
                        return Err(MigrationError::PageOutOfRange(p));
                    }
                    self.figures.postcopy_requests += 1;
                    self.policy.on_fault(p, now);
                    tracing::trace!(target: "livemig::fault", page = p, pending = self.pages.pending.get(p), "fault: request received");
                    match state {
                        // On their own connection: even a page the push
                        // sent already, which may be queued behind
                        // megabytes of it.
                        SrcState::Postcopy(pc) | SrcState::AwaitVerified(pc)
                            if self.wire.preempt =>
                        {
                            pc.urgent.push_back(p)
                        }
                        SrcState::Postcopy(pc) if self.pages.pending.get(p) => {
                            pc.urgent.push_back(p)
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            (Record::Verified(report), SrcState::AwaitVerified(p)) => {
                let Some((at, resume)) = p.resumed else {
                    return Err(MigrationError::UnexpectedRecord {
                        got: RecordType::Verified,
                        state: "waiting for the destination to resume",
                    });
                };
                self.finish(at, resume, Some(report));
                Ok(())
            }
            (rec, state) => Err(MigrationError::UnexpectedRecord {
                got: if apart {
                    RecordType::PreemptRequest
                } else {
                    rec.record_type()
                },
                state: match state {
                    SrcState::AwaitReady { .. } => {
                        "waiting for the destination to accept the layout"
                    }
                    SrcState::AwaitResumed => "waiting for the destination to resume",
                    SrcState::AwaitRoundReceived(_) => {
                        "waiting for the destination to receive the round"
                    }
                    SrcState::Postcopy(_) | SrcState::AwaitVerified(_) => {
                        "pushing pages in post-copy"
                    }
                    SrcState::Recovering(_) => "resuming post-copy over a new connection",
                    _ => "sending pages",
                },
            }),
        }
    }
}

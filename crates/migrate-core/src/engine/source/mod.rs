//! The source engine: its states, its public face and how it moves
//! frames; the rounds and the end are in `rounds.rs` and `finish.rs`.

use super::*;

mod finish;
mod rounds;

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
    /// [`Payload::Model`]: the tokens of the batch being encoded.
    tokens: Vec<u64>,
    /// `SentContent`: the hash (the token, with [`Payload::Model`]) of each page as last sent, by dense index.
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
            tokens: Vec::new(),
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
        let bytes = wire_len(frame) as u64;
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
                    || t == RecordType::ModelBatch as u8
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
}

//! The destination engine.

use super::*;
use crate::protocol::CompressionFigures;
use crate::transport::{PreemptServe, TransportError};
use placing::{PagePlacing, Placed, PlacedPage};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;

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
    /// Times the connection broke in post-copy and the migration went on
    /// over a new one.
    pub recoveries: u32,
    /// Compressed batches expanded: how many, their bytes on the wire and
    /// expanded, and the time it took.
    pub compression: CompressionFigures,
    /// Post-copy: pages that came as [`Record::RequestedPages`] (on the
    /// preempt connection), counted as they arrived (a duplicate too).
    pub preempt_pages: u64,
}

/// Where the destination is. Each state carries what only it needs.
enum DstState {
    AwaitHeader,
    AwaitLayout,
    /// Pages arrive; once the source switched over, what that started.
    Receiving(Option<Switched>),
    /// Post-copy: the guest runs here on the device state it was
    /// restored to (for the completion digest), and the rest of its pages
    /// follow.
    PostcopyRunning {
        restored: DeviceState,
    },
    /// Post-copy whose connection broke: waiting for the source to
    /// connect again. With the device state restored (`Some`) the guest
    /// runs on; without (it was lost with the link) it was never resumed.
    Recovering {
        restored: Option<DeviceState>,
    },
    Completed,
    Failed,
}

/// What the source's switch-over started.
struct Switched {
    /// The rest of memory goes by post-copy.
    postcopy: bool,
    /// Post-copy: discards ascend across the stream; the first page the
    /// next may name.
    discard_cursor: PageNum,
    /// Pre-copy: the device state, kept until the completion.
    device_state: Option<DeviceState>,
}

/// The destination side of a migration.
pub struct DestinationEngine<K, G> {
    memory: K,
    control: G,
    clock: Arc<dyn Clock>,
    decoder: Decoder,
    /// Reads the [`Record::RequestedPages`] frames, numbered on their own
    /// (shared with the preempt connection's reader thread while it
    /// places them, see [`DestinationEngine::preempt_placing`]).
    preempt_decoder: Arc<Mutex<Decoder>>,
    /// Post-copy, once a preempt thread places requested pages: the
    /// engine's own handle, through which it places only absent pages.
    placer: Option<Box<dyn crate::backend::PagePlacer>>,
    /// What the preempt threads placed, for [`Self::absorb_placed`].
    placed_tx: Sender<Placed>,
    placed_rx: Receiver<Placed>,
    /// Counts the connections (each [`Self::reset_link`]): a preempt
    /// thread's failure counts only on the connection it served.
    link: u64,
    sequencer: Sequencer,
    layout: MemoryLayout,
    state: DstState,
    received: DirtyBitmap,
    /// Pages received or discarded at least once: a post-copy guest
    /// resumes only when this is every page.
    accounted: DirtyBitmap,
    hashes: Vec<u64>,
    /// The zero pages of the batch being placed.
    zero_batch: Vec<PageNum>,
    /// Expands compressed batches.
    expander: BatchExpander,
    /// [`Payload::Model`]: the digest of the tokens that arrived (kept as
    /// a sum, in place of `hashes`), once the first model batch came.
    model: Option<TokenDigest>,
    model_pages: Vec<PageNum>,
    model_tokens: Vec<u64>,
    outbox: VecDeque<Vec<u8>>,
    requested: HashMap<PageNum, Duration>,
    latencies: Vec<u64>,
    faults: u64,
    duplicates: u64,
    resumed_at: Option<Duration>,
    report: DestinationReport,
    /// What the completion digest is checked against (pre-copy).
    verify: DestinationVerify,
    /// How long to wait for a frame from the source (`None`: for ever).
    peer_timeout: Option<Duration>,
    /// How long a post-copy waits for a new connection after its
    /// connection broke (`None`: it does not wait, the migration fails).
    recover_timeout: Option<Duration>,
    /// The session the source named, if it can resume a post-copy.
    session: Option<u128>,
    /// When the connection broke, while recovering.
    lost_at: Option<Duration>,
    /// When the last frame arrived (or the wait for the first began).
    heard_at: Option<Duration>,
    /// When the first frame arrived.
    started_at: Option<Duration>,
    /// When the last round ended (or the first frame came) and the bytes
    /// received by then.
    round_mark: (Duration, u64),
    /// Whether the source asked for [`Record::RoundReceived`] after each
    /// pre-copy round ([`Capabilities::ROUND_RECEIVED`]).
    answer_rounds: bool,
    handle: MigrationHandle,
    /// Tracing: the migration's span on this side.
    span: tracing::Span,
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
        let (placed_tx, placed_rx) = mpsc::channel();
        DestinationEngine {
            received: DirtyBitmap::new(layout.page_end()),
            accounted: DirtyBitmap::new(layout.page_end()),
            hashes: vec![0; layout.total_pages() as usize],
            zero_batch: Vec::new(),
            expander: BatchExpander::new(),
            model: None,
            model_pages: Vec::new(),
            model_tokens: Vec::new(),
            memory,
            control,
            clock,
            decoder: {
                let mut d = Decoder::sequenced();
                d.accept(Capabilities::ALL);
                d
            },
            preempt_decoder: Arc::new(Mutex::new(Decoder::preempt(layout.page_size()))),
            placer: None,
            placed_tx,
            placed_rx,
            link: 0,
            sequencer: Sequencer::new(),
            state: DstState::AwaitHeader,
            outbox: VecDeque::new(),
            requested: HashMap::new(),
            latencies: Vec::new(),
            faults: 0,
            duplicates: 0,
            resumed_at: None,
            report: DestinationReport::default(),
            verify: DestinationVerify::default(),
            peer_timeout: None,
            recover_timeout: None,
            session: None,
            lost_at: None,
            heard_at: None,
            started_at: None,
            round_mark: (Duration::ZERO, 0),
            answer_rounds: false,
            handle: {
                let h = MigrationHandle::new(Side::Destination);
                h.lock().progress.guest_pages = layout.total_pages();
                h.lock().progress.page_size = layout.page_size().bytes();
                h
            },
            span: tracing::info_span!(
                "migration",
                side = "destination",
                guest_pages = layout.total_pages(),
                received = tracing::field::Empty,
                outcome = tracing::field::Empty,
            ),
            layout,
        }
    }

    /// The handle on this migration: progress, events and cancel, from
    /// any thread. A cancel before the guest resumed here makes the engine
    /// fail with [`MigrationError::Cancelled`] at its next frame or
    /// [`DestinationEngine::handle_timeout`]: the guest is never resumed
    /// and what arrived is for the caller to drop. Live parameters are the
    /// source's; the destination's handle refuses them.
    pub fn handle(&self) -> MigrationHandle {
        self.handle.clone()
    }

    /// Sets what a pre-copied guest's completion digest is checked
    /// against before it resumes ([`DestinationVerify::ReadBack`] unless
    /// set). Either way the engine keeps the table of per-page hashes a
    /// post-copy's check needs, so the choice changes only the work done
    /// at the completion.
    pub fn set_verify(&mut self, verify: DestinationVerify) {
        self.verify = verify;
    }

    /// Sets how long the destination waits for a frame from its source
    /// before it gives up (`None`: for ever). The drivers in
    /// [`crate::driver`] set it from their `peer_timeout`.
    pub fn set_peer_timeout(&mut self, timeout: Option<Duration>) {
        self.peer_timeout = timeout;
    }

    /// Sets how long a post-copy whose connection broke waits for the
    /// source to connect again (`None`, the default: it does not wait and
    /// fails with [`MigrationError::SourceLost`]). Recovery needs a
    /// source that named its session ([`EngineConfig::recover_timeout`]
    /// set there too).
    pub fn set_recover_timeout(&mut self, timeout: Option<Duration>) {
        self.recover_timeout = timeout;
    }

    /// When the next timer falls due on the engine's clock: the peer
    /// timeout, if one is set and the wait for the source has begun (the
    /// last frame, or the first [`DestinationEngine::handle_timeout`]);
    /// while recovering, the end of the wait for a new connection.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            DstState::Completed | DstState::Failed => None,
            DstState::Recovering { .. } => Some(self.lost_at? + self.recover_timeout?),
            _ => Some(self.heard_at? + self.peer_timeout?),
        }
    }

    /// Whether the post-copy's connection broke and the engine waits for
    /// the source to connect again ([`Phase::PostcopyPaused`]). The guest
    /// runs on (if it was resumed); the frames of a new connection go to
    /// [`DestinationEngine::handle_frame`] as usual.
    pub fn recovering(&self) -> bool {
        matches!(self.state, DstState::Recovering { .. })
    }

    /// Whether a broken connection would now be recovered from rather
    /// than end the migration: the source named its session, a recovery
    /// timeout is set, and the guest runs here in post-copy, or the
    /// source switched to post-copy and its device state may have been
    /// lost with the link (the source then counts on a resume here: on
    /// its new connection it is told the guest was not resumed, and
    /// resumes its own).
    pub fn recoverable(&self) -> bool {
        let state = match &self.state {
            DstState::Receiving(Some(sw)) => sw.postcopy,
            DstState::PostcopyRunning { .. } | DstState::Recovering { .. } => true,
            _ => false,
        };
        state && self.session.is_some() && self.recover_timeout.is_some()
    }

    /// The connection to the source broke (`err` says how). If the
    /// migration can recover ([`DestinationEngine::recoverable`]) the
    /// engine forgets the connection's frames and waits for a new one:
    /// the guest runs on, faults on missing pages are recorded and asked
    /// for once the source is back; `Ok` then, and the driver waits for
    /// the source to connect again. Otherwise the engine fails and the
    /// error to report comes back ([`MigrationError::SourceLost`] once
    /// the guest runs here).
    pub fn connection_lost(&mut self, err: MigrationError) -> Result<(), MigrationError> {
        if matches!(self.state, DstState::Completed | DstState::Failed) {
            return Err(err);
        }
        if !self.recoverable() {
            let err = if self.in_postcopy() {
                MigrationError::SourceLost(format!(
                    "{err}; the guest runs here without all of its memory and cannot go on"
                ))
            } else {
                err
            };
            self.state = DstState::Failed;
            self.ended(&err);
            return Err(err);
        }
        let now = self.clock.now();
        let restored = match std::mem::replace(&mut self.state, DstState::Failed) {
            DstState::PostcopyRunning { restored } => Some(restored),
            DstState::Recovering { restored } => {
                self.state = DstState::Recovering { restored };
                self.reset_link();
                return Ok(());
            }
            _ => None,
        };
        tracing::warn!(error = %err, "post-copy connection lost; waiting for the source");
        self.lost_at = Some(now);
        self.handle.emit(Event::ConnectionLost {
            error: err.to_string(),
        });
        self.state = DstState::Recovering { restored };
        self.reset_link();
        self.publish();
        Ok(())
    }

    /// A fresh numbering both ways for a new connection, nothing queued;
    /// its page batches need no layout (the first connection gave it).
    fn reset_link(&mut self) {
        self.decoder = Decoder::resuming(self.layout.page_size());
        // A new decoder: a preempt thread of the old connection keeps
        // the old one.
        self.preempt_decoder = Arc::new(Mutex::new(Decoder::preempt(self.layout.page_size())));
        self.link += 1;
        self.sequencer = Sequencer::new();
        self.outbox.clear();
    }

    /// Acts on a cancel asked for through the handle and on the peer
    /// timeout; drivers call it while they wait for frames. A cancel fails
    /// with [`MigrationError::Cancelled`] (the guest is not resumed); a
    /// source silent past the peer timeout with a transport timeout, or
    /// [`MigrationError::SourceLost`] once the guest runs here in
    /// post-copy. Either way the engine has failed; send its
    /// [`DestinationEngine::abort_frame`] to the source if the guest was
    /// not resumed.
    pub fn handle_timeout(&mut self) -> Result<(), MigrationError> {
        if matches!(self.state, DstState::Completed | DstState::Failed) {
            return Ok(());
        }
        let now = self.clock.now();
        let heard = *self.heard_at.get_or_insert(now);
        if let DstState::Recovering { restored } = &self.state {
            let (Some(lost), Some(limit)) = (self.lost_at, self.recover_timeout) else {
                return Ok(());
            };
            if now < lost + limit {
                return Ok(());
            }
            let err = if restored.is_some() {
                MigrationError::SourceLost(format!(
                    "the source did not connect again within {limit:?}; the guest runs here without all of its memory and cannot go on"
                ))
            } else {
                TransportError::Timeout(limit).into()
            };
            self.state = DstState::Failed;
            self.ended(&err);
            return Err(err);
        }
        let err = if self.handle.cancel_requested() && self.resumed_at.is_none() {
            MigrationError::Cancelled
        } else {
            match self.peer_timeout {
                Some(limit) if now >= heard + limit => {
                    let e = TransportError::Timeout(limit);
                    if self.recoverable() {
                        return self.connection_lost(e.into());
                    }
                    if matches!(self.state, DstState::PostcopyRunning { .. }) {
                        MigrationError::SourceLost(format!(
                            "{e}; the guest runs here without all of its memory and cannot go on"
                        ))
                    } else {
                        e.into()
                    }
                }
                _ => return Ok(()),
            }
        };
        self.state = DstState::Failed;
        self.ended(&err);
        Err(err)
    }

    /// Publishes the counters into the handle.
    fn publish(&mut self) {
        let phase = match self.state {
            DstState::AwaitHeader | DstState::AwaitLayout => Phase::Setup,
            DstState::Receiving(Some(_)) => Phase::StopAndCopy,
            DstState::Receiving(None) => Phase::Precopy,
            DstState::PostcopyRunning { .. } => Phase::Postcopy,
            DstState::Recovering { .. } => Phase::PostcopyPaused,
            DstState::Completed => Phase::Completed,
            DstState::Failed => return,
        };
        let now = self.clock.now();
        let ps = self.layout.page_size().bytes() as u64;
        let r = &self.report;
        let mut h = self.handle.lock();
        let p = &mut h.progress;
        p.phase = phase;
        p.round = r.rounds + 1;
        p.transferred = r.bytes_received;
        p.normal_pages = r.pages_received - r.zero_pages;
        p.normal_bytes = p.normal_pages * ps;
        p.zero_pages = r.zero_pages;
        p.elapsed = now.saturating_sub(self.started_at.unwrap_or(now));
        p.postcopy_requests = self.faults;
    }

    /// The migration failed or was cancelled here with `err`.
    fn ended(&mut self, err: &MigrationError) {
        let cancelled = matches!(err, MigrationError::Cancelled);
        self.span.record("received", self.report.bytes_received);
        self.span
            .record("outcome", if cancelled { "cancelled" } else { "failed" });
        self.handle.lock().progress.phase = if cancelled {
            Phase::Cancelled
        } else {
            Phase::Failed
        };
        self.handle.emit(if cancelled {
            Event::Cancelled
        } else {
            Event::Failed {
                kind: err.kind(),
                error: err.to_string(),
            }
        });
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
        matches!(self.state, DstState::Completed)
    }

    /// The engine's clock.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Whether the guest runs here in post-copy, with pages still missing
    /// (over a working connection, or waiting for a new one).
    pub fn in_postcopy(&self) -> bool {
        matches!(
            self.state,
            DstState::PostcopyRunning { .. } | DstState::Recovering { restored: Some(_) }
        )
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
        self.record_requests(pages, now, true)
    }

    /// Post-copy: the requests for these pages, faulted at `now` on this
    /// engine's clock, already left on the preempt connection (sent by
    /// the driver's requester thread as [`Record::PreemptRequest`]). The
    /// engine records them as [`DestinationEngine::request_pages_at`] does
    /// (fault latency, duplicates, the pages to ask for again after a
    /// recovery) and sends nothing. Call it before handing over any frame
    /// that could carry those pages.
    pub fn requests_sent_at(
        &mut self,
        pages: &[PageNum],
        now: Duration,
    ) -> Result<(), MigrationError> {
        self.record_requests(pages, now, false)
    }

    fn record_requests(
        &mut self,
        pages: &[PageNum],
        now: Duration,
        queue: bool,
    ) -> Result<(), MigrationError> {
        if !self.in_postcopy() {
            return Err(MigrationError::InvalidUse(
                "pages can be requested only while the guest runs in post-copy",
            ));
        }
        let mut want = Vec::new();
        for &p in pages {
            if !self.layout.contains(p) {
                return Err(MigrationError::PageOutOfRange(p));
            }
            if !queue && self.received.get(p) && !self.requested.contains_key(&p) {
                // Arrived between the fault and its request, which left
                // all the same: its answer will be a duplicate.
                self.faults += 1;
                continue;
            }
            if self.received.get(p) || self.requested.contains_key(&p) {
                continue;
            }
            self.requested.insert(p, now);
            self.faults += 1;
            want.push(p);
            tracing::trace!(
                target: "livemig::fault",
                page = p,
                since_fault_us = self.clock.now().saturating_sub(now).as_micros() as u64,
                "fault: request queued"
            );
        }
        if self.recovering() || !queue {
            // Asked for once the source is back (see `recover`), or
            // asked for already.
            return Ok(());
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
        let span = self.span.clone();
        let _entered = span.enter();
        if self.handle.cancel_requested() && self.resumed_at.is_none() {
            self.state = DstState::Failed;
            self.ended(&MigrationError::Cancelled);
            return Err(MigrationError::Cancelled);
        }
        let now = self.clock.now();
        self.heard_at = Some(now);
        if self.started_at.is_none() {
            self.started_at = Some(now);
            self.round_mark = (now, 0);
        }
        self.report.bytes_received += wire_len(frame) as u64;
        let r = self.handle_inner(frame);
        self.settle(&r);
        self.publish();
        r
    }

    /// What a frame's outcome does to the engine's state.
    fn settle(&mut self, r: &Result<DestStatus, MigrationError>) {
        match r {
            Err(e) if self.recovering() => {
                // A new connection that is not the session's, or broke
                // again: it is dropped, and the wait goes on.
                tracing::warn!(error = %e, "connection refused while recovering");
                self.reset_link();
            }
            Err(MigrationError::Protocol(p))
                if MigrationError::Protocol(p.clone()).is_link_failure() && self.recoverable() =>
            {
                // Recoverable: `connection_lost` cannot fail here.
                let _ = self.connection_lost(MigrationError::Protocol(p.clone()));
            }
            Err(e) => {
                self.state = DstState::Failed;
                self.ended(e);
            }
            Ok(DestStatus::Continue) => {}
            Ok(DestStatus::Resumed) => self.handle.emit(Event::Resumed),
            Ok(DestStatus::Completed) => {
                self.span.record("received", self.report.bytes_received);
                self.span.record("outcome", "completed");
                tracing::info!("migration completed");
                if self.report.postcopy.is_none() {
                    self.handle.emit(Event::Resumed);
                }
                self.handle.emit(Event::Completed);
            }
        }
    }

    /// Marks the migration failed from outside (the stream ended or timed
    /// out). A guest not yet resumed is not resumed.
    pub fn fail(&mut self) {
        if !matches!(self.state, DstState::Completed | DstState::Failed) {
            self.state = DstState::Failed;
            self.ended(&MigrationError::Incomplete(
                "the stream from the source ended".into(),
            ));
        }
    }

    fn place(&mut self, page: PageNum, data: Option<&[u8]>) -> Result<(), MigrationError> {
        let Some(i) = self.layout.dense_index(page) else {
            return Err(MigrationError::PageOutOfRange(page));
        };
        let running = matches!(self.state, DstState::PostcopyRunning { .. });
        if running && self.received.get(page) {
            // Already here and maybe written by the running guest since.
            self.duplicates += 1;
            return Ok(());
        }
        if let Some(placer) = self.placer.as_mut().filter(|_| running) {
            // A preempt thread may have placed it and not told yet: only
            // an absent page is placed. Present, it holds the same bytes
            // (every copy since the switch-over is of the paused source).
            let new = placer
                .place_absent(page, data)
                .map_err(MigrationError::backend("write a guest page"))?;
            let size = self.layout.page_size().get();
            if !new {
                self.duplicates += 1;
            } else if data.is_none() {
                self.report.zero_pages += 1;
            }
            self.hashes[i as usize] = data.map_or_else(|| zero_page_hash(size), page_hash);
            let now = self.clock.now();
            self.arrived_at(page, now);
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
        self.arrived(page);
        Ok(())
    }

    /// Places the pages of a batch. Before post-copy runs, the zero pages
    /// are handed to the sink together ([`PageSink::write_zero_pages`]),
    /// so that it can leave alone those that are zero already; a page
    /// with data that was named as zero earlier in the batch waits for
    /// them, so the batch's last word on a page stands.
    fn place_batch(&mut self, batch: &protocol::PageBatch<'_>) -> Result<(), MigrationError> {
        if matches!(self.state, DstState::PostcopyRunning { .. }) || batch.zero_pages() == 0 {
            return batch
                .iter()
                .try_for_each(|(page, data)| self.place(page, data));
        }
        let mut zeros = std::mem::take(&mut self.zero_batch);
        zeros.clear();
        let r = (|| {
            for (page, data) in batch.iter() {
                if !self.layout.contains(page) {
                    return Err(MigrationError::PageOutOfRange(page));
                }
                if data.is_none() {
                    zeros.push(page);
                    continue;
                }
                // Mostly ascending: a page above the last zero one is
                // not among them.
                if zeros.last().is_some_and(|l| *l >= page) && zeros.contains(&page) {
                    self.place_zeros(&zeros)?;
                    zeros.clear();
                }
                self.place(page, data)?;
            }
            self.place_zeros(&zeros)
        })();
        self.zero_batch = zeros;
        r
    }

    /// Whether a page batch may be placed as its CRC is checked, before
    /// the verdict: only while a frame that fails ends the migration with
    /// the guest not yet running here (pre-copy rounds and a stop-and-copy
    /// switch-over). Not once the source switched to post-copy, where a
    /// broken link may be recovered and the pages placed count as here.
    fn may_place_unchecked(&self) -> bool {
        let receiving = match &self.state {
            DstState::Receiving(None) => true,
            DstState::Receiving(Some(sw)) => !sw.postcopy,
            _ => false,
        };
        receiving && self.model.is_none()
    }

    /// Decodes `frame`, placing a page batch's pages as its CRC is checked
    /// ([`protocol::Decoder::decode_placing`]); `None` when it was a page
    /// batch, the record otherwise. Zero pages go to the sink together, as
    /// in [`Self::place_batch`].
    fn decode_placing<'a>(
        &mut self,
        frame: &'a [u8],
    ) -> Result<Option<Record<'a>>, MigrationError> {
        let mut decoder = std::mem::take(&mut self.decoder);
        let mut zeros = std::mem::take(&mut self.zero_batch);
        zeros.clear();
        let r = decoder.decode_placing(frame, |page, data| {
            if data.is_none() {
                if !self.layout.contains(page) {
                    return Err(MigrationError::PageOutOfRange(page));
                }
                zeros.push(page);
                return Ok(());
            }
            if zeros.last().is_some_and(|l| *l >= page) && zeros.contains(&page) {
                self.place_zeros(&zeros)?;
                zeros.clear();
            }
            self.place(page, data)
        });
        self.decoder = decoder;
        let r = match r {
            Ok(protocol::Placed::Batch { .. }) => self.place_zeros(&zeros).map(|()| None),
            Ok(protocol::Placed::Record(rec)) => Ok(Some(rec)),
            Err(protocol::PlaceError::Protocol(e)) => Err(MigrationError::Protocol(e)),
            Err(protocol::PlaceError::Place(e)) => Err(e),
        };
        self.zero_batch = zeros;
        r
    }

    /// Makes `pages` zero pages, all at once.
    fn place_zeros(&mut self, pages: &[PageNum]) -> Result<(), MigrationError> {
        if pages.is_empty() {
            return Ok(());
        }
        self.memory
            .write_zero_pages(pages)
            .map_err(MigrationError::backend("write guest pages"))?;
        let hash = zero_page_hash(self.layout.page_size().get());
        for &page in pages {
            if let Some(i) = self.layout.dense_index(page) {
                self.hashes[i as usize] = hash;
            }
            self.report.zero_pages += 1;
            self.arrived(page);
        }
        Ok(())
    }

    /// Counts `page` as here, and a fault on it as served.
    fn arrived(&mut self, page: PageNum) {
        let now = self.clock.now();
        self.arrived_at(page, now);
    }

    /// Counts `page` as here since `at`, and a fault on it as served then.
    fn arrived_at(&mut self, page: PageNum, at: Duration) {
        self.received.set(page);
        self.accounted.set(page);
        self.report.pages_received += 1;
        if self.requested.is_empty() {
            return;
        }
        if let Some(t) = self.requested.remove(&page) {
            let lat = at.saturating_sub(t);
            self.latencies.push(lat.as_nanos() as u64);
            tracing::trace!(target: "livemig::fault", page, latency_us = lat.as_micros() as u64, "fault: page placed");
        }
    }

    /// Places a batch of page models (see [`crate::model`]): the tokens
    /// replace what a page held (taken out of the digest first), and in
    /// post-copy a page already here is left alone.
    fn place_models(&mut self, batch: ModelBatch<'_>) -> Result<(), MigrationError> {
        if self.model.is_none() && self.report.pages_received > 0 {
            return Err(MigrationError::Protocol(ProtocolError::Malformed(
                "page models after page bytes",
            )));
        }
        let mut digest = self.model.unwrap_or_default();
        let running = matches!(self.state, DstState::PostcopyRunning { .. });
        self.model_pages.clear();
        self.model_tokens.clear();
        let mut replaced = Vec::new();
        for (page, token) in batch.iter() {
            if !self.layout.contains(page) {
                return Err(MigrationError::PageOutOfRange(page));
            }
            if self.received.get(page) {
                if running {
                    self.duplicates += 1;
                    continue;
                }
                replaced.push(page);
            }
            self.model_pages.push(page);
            self.model_tokens.push(token);
        }
        if !replaced.is_empty() {
            // The guest has not run here yet: what the sink holds is what
            // arrived last.
            let mut old = vec![0u64; replaced.len()];
            self.memory
                .read_tokens(&replaced, &mut old)
                .map_err(MigrationError::backend("read guest page tokens"))?;
            for (p, t) in replaced.iter().zip(&old) {
                digest.remove(*p, *t);
            }
        }
        self.memory
            .write_tokens(&self.model_pages, &self.model_tokens)
            .map_err(MigrationError::backend("write guest page tokens"))?;
        let pages = std::mem::take(&mut self.model_pages);
        let tokens = std::mem::take(&mut self.model_tokens);
        for (p, t) in pages.iter().zip(&tokens) {
            digest.add(*p, *t);
            if *t == 0 {
                self.report.zero_pages += 1;
            }
            self.arrived(*p);
        }
        self.model_pages = pages;
        self.model_tokens = tokens;
        self.model = Some(digest);
        Ok(())
    }

    /// Post-copy: `pages` (ascending) are about to be discarded; with page
    /// models, what they held leaves the digest.
    fn forget_models(&mut self, pages: &[PageNum]) -> Result<(), MigrationError> {
        let Some(mut digest) = self.model else {
            return Ok(());
        };
        let here: Vec<PageNum> = pages
            .iter()
            .copied()
            .filter(|p| self.received.get(*p))
            .collect();
        if here.is_empty() {
            return Ok(());
        }
        let mut old = vec![0u64; here.len()];
        self.memory
            .read_tokens(&here, &mut old)
            .map_err(MigrationError::backend("read guest page tokens"))?;
        for (p, t) in here.iter().zip(&old) {
            digest.remove(*p, *t);
        }
        self.model = Some(digest);
        Ok(())
    }

    /// The digest of what arrived.
    fn arrived_digest(&self) -> MemoryDigest {
        match self.model {
            Some(d) => d.finish(),
            None => digest_table(&self.layout, &self.hashes),
        }
    }

    /// Post-copy: `pages` are stale here (the source dirtied them after
    /// sending them, or never sent them): dropped, so the guest faults on
    /// them, and accounted for as discarded.
    fn discard(&mut self, pages: impl Iterator<Item = PageNum>) -> Result<(), MigrationError> {
        let mut list = Vec::new();
        for page in pages {
            if !self.layout.contains(page) {
                return Err(MigrationError::PageOutOfRange(page));
            }
            list.push(page);
        }
        self.forget_models(&list)?;
        for &page in &list {
            self.received.clear(page);
            self.accounted.set(page);
        }
        self.memory
            .discard_pages(&list)
            .map_err(MigrationError::backend("discard stale pages"))
    }

    /// The source's populated ranges: each must lie in one region of the
    /// layout; the sink may prepare them. The sink's failure to is only
    /// logged: pages are placed all the same.
    fn expect_pages(&mut self, ranges: &[(PageNum, u64)]) -> Result<(), MigrationError> {
        for &(first, count) in ranges {
            let inside = self
                .layout
                .regions()
                .iter()
                .any(|r| first >= r.first_page && count <= r.end().saturating_sub(first));
            if !inside {
                return Err(MigrationError::PageOutOfRange(
                    first + count.saturating_sub(1),
                ));
            }
        }
        if let Err(e) = self.memory.expect_pages(ranges) {
            tracing::warn!(error = %e, "the destination's memory did not take the populated pages");
        }
        Ok(())
    }

    /// Post-copy, the guest running here: what places the
    /// [`Record::RequestedPages`] frames of the current connection on its
    /// preempt reader thread ([`crate::transport::Transport::serve_preempt`]):
    /// each frame checked whole (CRC, its place in the preempt numbering,
    /// every page in the layout), then its pages placed where absent
    /// ([`crate::PagePlacer`]); the engine learns of them afterwards
    /// ([`Self::absorb_placed`]). From the first call the engine places
    /// through a placer of its own too, so that neither copy of a page
    /// overwrites the other. `None` before the resume, with page models,
    /// or where the memory cannot share a placer
    /// ([`PageSink::share_placer`]): the frames then go through
    /// [`Self::handle_frame`] as before. [`crate::driver::run_destination`]
    /// calls it once the guest runs here, on each connection; a driver of
    /// its own hands the result to its transport and calls
    /// [`Self::absorb_placed`] before every frame it hands over.
    pub fn preempt_placing(&mut self) -> Option<PreemptServe> {
        if !matches!(self.state, DstState::PostcopyRunning { .. }) || self.model.is_some() {
            return None;
        }
        let theirs = self.memory.share_placer()?;
        if self.placer.is_none() {
            self.placer = Some(self.memory.share_placer()?);
        }
        let mut placing = PagePlacing {
            decoder: self.preempt_decoder.clone(),
            placer: theirs,
            layout: self.layout.clone(),
            clock: self.clock.clone(),
            link: self.link,
            to_engine: self.placed_tx.clone(),
            failed: false,
        };
        Some(Box::new(move |frame: bytes::Bytes, _| {
            placing.serve(&frame)
        }))
    }

    /// Takes in what the preempt threads placed since the last call
    /// (their pages' hashes for the completion digest, the fault
    /// latencies, the duplicates), and a failure of the current
    /// connection's thread: a bad frame fails the engine as it would have
    /// through [`Self::handle_frame`] (a broken link that a recoverable
    /// post-copy waits out, or the migration's failure).
    pub fn absorb_placed(&mut self) -> Result<(), MigrationError> {
        let mut any = false;
        while let Ok(p) = self.placed_rx.try_recv() {
            if matches!(self.state, DstState::Completed | DstState::Failed) {
                continue;
            }
            any = true;
            match p {
                Placed::Frame { wire, pages, at } => {
                    self.report.bytes_received += wire;
                    self.report.preempt_pages += pages.len() as u64;
                    self.heard_at = Some(self.clock.now());
                    for p in pages {
                        self.took_placed(p, at);
                    }
                }
                Placed::Failed { link, error } if link == self.link => {
                    let r = Err(error);
                    self.settle(&r);
                    self.publish();
                    return r.map(|_| ());
                }
                Placed::Failed { error, .. } => {
                    // A connection given up already.
                    tracing::debug!(error = %error, "a former preempt connection failed");
                }
            }
        }
        if any {
            self.publish();
        }
        Ok(())
    }

    /// One page a preempt thread handled.
    fn took_placed(&mut self, p: PlacedPage, at: Duration) {
        let Some(i) = self.layout.dense_index(p.page) else {
            return;
        };
        if self.received.get(p.page) {
            // Known here already: by the engine's own copy, which found
            // this one placed (counted a duplicate then), or before this
            // one arrived (a duplicate now).
            if !p.new {
                self.duplicates += 1;
            }
            return;
        }
        if !p.new {
            // Placed by another thread (a former connection's) that has
            // not told yet: the same bytes.
            self.duplicates += 1;
        } else if p.zero {
            self.report.zero_pages += 1;
        }
        self.hashes[i as usize] = p.hash;
        self.arrived_at(p.page, at);
    }

    /// Pages a fault asked for, from the preempt connection: placed
    /// unless here already (the first copy after the switch-over wins, see
    /// `docs/protocol.md`, *The preempt connection*).
    fn requested_pages(&mut self, frame: &[u8]) -> Result<DestStatus, MigrationError> {
        let decoded = match self.preempt_decoder.lock() {
            Ok(mut d) => d.decode(frame),
            Err(_) => {
                return Err(MigrationError::InvalidUse(
                    "the preempt decoder was poisoned",
                ))
            }
        };
        let rec = decoded?;
        let Record::RequestedPages(batch) = rec else {
            return Err(MigrationError::UnexpectedRecord {
                got: rec.record_type(),
                state: "reading the preempt connection",
            });
        };
        if !matches!(self.state, DstState::PostcopyRunning { .. }) || self.model.is_some() {
            return Err(MigrationError::UnexpectedRecord {
                got: RecordType::RequestedPages,
                state: "not running in post-copy on page bytes",
            });
        }
        self.report.preempt_pages += batch.len() as u64;
        tracing::trace!(target: "livemig::fault", pages = batch.len(), first = batch.iter().next().map(|(p, _)| p), "fault: requested pages received");
        self.place_batch(&batch)?;
        Ok(DestStatus::Continue)
    }

    fn handle_inner(&mut self, frame: &[u8]) -> Result<DestStatus, MigrationError> {
        if frame.first() == Some(&(RecordType::RequestedPages as u8)) {
            return self.requested_pages(frame);
        }
        let rec = if self.may_place_unchecked() {
            match self.decode_placing(frame)? {
                Some(rec) => rec,
                None => return Ok(DestStatus::Continue),
            }
        } else {
            self.decoder.decode(frame)?
        };
        let unexpected = |rec: &Record<'_>, state| MigrationError::UnexpectedRecord {
            got: rec.record_type(),
            state,
        };
        let receiving = matches!(
            self.state,
            DstState::Receiving(_) | DstState::PostcopyRunning { .. }
        );
        match (&mut self.state, rec) {
            (_, Record::Abort { reason }) if reason == CANCELLED_REASON => {
                Err(MigrationError::Cancelled)
            }
            (_, Record::Abort { reason }) => Err(MigrationError::PeerAborted(reason)),
            (DstState::AwaitHeader, Record::Header { .. }) => {
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Header {
                        version: VERSION,
                    }));
                // The codecs the source may compress batches with.
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Capabilities(
                        Capabilities::ALL,
                    )));
                self.state = DstState::AwaitLayout;
                Ok(DestStatus::Continue)
            }
            (DstState::AwaitLayout, Record::Session { id, resume: false })
                if self.session.is_none() =>
            {
                self.session = Some(id);
                Ok(DestStatus::Continue)
            }
            (DstState::Recovering { .. }, Record::Header { .. }) => {
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Header {
                        version: VERSION,
                    }));
                Ok(DestStatus::Continue)
            }
            (DstState::Recovering { .. }, Record::Session { id, resume: true }) => self.recover(id),
            (DstState::AwaitLayout, Record::Layout(layout)) => {
                if layout != self.layout {
                    return Err(MigrationError::LayoutMismatch {
                        source_pages: layout.total_pages(),
                        dest_pages: self.layout.total_pages(),
                    });
                }
                self.outbox
                    .push_back(protocol::encode_to_vec(&Record::Ready));
                self.state = DstState::Receiving(None);
                Ok(DestStatus::Continue)
            }
            (_, Record::PageBatch(batch)) if receiving => {
                if self.model.is_some() {
                    return Err(MigrationError::Protocol(ProtocolError::Malformed(
                        "page bytes after page models",
                    )));
                }
                self.place_batch(&batch)?;
                Ok(DestStatus::Continue)
            }
            (_, Record::CompressedBatch(packed)) if receiving => {
                if self.model.is_some() {
                    return Err(MigrationError::Protocol(ProtocolError::Malformed(
                        "page bytes after page models",
                    )));
                }
                let mut x = std::mem::take(&mut self.expander);
                let r = x
                    .expand(&packed, self.layout.page_size())
                    .map_err(MigrationError::Protocol)
                    .and_then(|batch| self.place_batch(&batch));
                self.report.compression = x.figures();
                self.expander = x;
                r.map(|()| DestStatus::Continue)
            }
            (_, Record::ModelBatch(batch)) if receiving => {
                self.place_models(batch)?;
                Ok(DestStatus::Continue)
            }
            (_, Record::RoundEnd { round, pages_sent }) if receiving => {
                self.report.rounds += 1;
                let now = self.clock.now();
                let (at, bytes) = self.round_mark;
                self.round_mark = (now, self.report.bytes_received);
                tracing::info!(round, pages = pages_sent, "round received");
                if self.answer_rounds && matches!(self.state, DstState::Receiving(None)) {
                    // Every frame before the marker has been handled: the
                    // source times the round until now.
                    self.outbox
                        .push_back(protocol::encode_to_vec(&Record::RoundReceived { round }));
                }
                self.handle.emit(Event::RoundFinished {
                    round,
                    pages: pages_sent,
                    bytes: self.report.bytes_received - bytes,
                    dirtied: 0,
                    duration: now.saturating_sub(at),
                    throttle_pct: 0,
                });
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving(None), Record::Capabilities(caps)) => {
                self.answer_rounds = caps.contains(Capabilities::ROUND_RECEIVED);
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving(None), Record::Populated(ranges)) => {
                self.expect_pages(&ranges)?;
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving(sw @ None), Record::SwitchOver { postcopy, .. }) => {
                *sw = Some(Switched {
                    postcopy,
                    discard_cursor: 0,
                    device_state: None,
                });
                tracing::info!(postcopy, "switch-over received");
                self.handle.emit(Event::SwitchOver {
                    postcopy,
                    reason: None,
                });
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving(Some(sw)), Record::Discard(ranges)) if sw.postcopy => {
                let mut cursor = sw.discard_cursor;
                for (first, count) in ranges {
                    // Ranges ascend and do not overlap, across the whole
                    // stream: a source cannot make us walk memory twice.
                    if first < cursor {
                        return Err(MigrationError::Protocol(ProtocolError::OutOfRange {
                            what: "discard range start (ranges must ascend)",
                            value: first,
                        }));
                    }
                    let end = first + count;
                    // Walk no further than the end of guest memory.
                    let stop = end.min(self.layout.page_end()).max(first);
                    self.discard(first..stop)?;
                    if end > stop {
                        return Err(MigrationError::PageOutOfRange(stop));
                    }
                    cursor = end;
                }
                self.set_discard_cursor(cursor);
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving(Some(sw)), Record::DiscardBitmap { first_page, words })
                if sw.postcopy =>
            {
                if first_page < sw.discard_cursor {
                    return Err(MigrationError::Protocol(ProtocolError::OutOfRange {
                        what: "discard bitmap start (discards must ascend)",
                        value: first_page,
                    }));
                }
                let n = words.len() as u64 * 64;
                let bits = DirtyBitmap::from_words(words, n);
                self.discard(bits.iter_ones().map(|i| first_page + i))?;
                self.set_discard_cursor(first_page + n);
                Ok(DestStatus::Continue)
            }
            (DstState::Receiving(Some(sw)), Record::DeviceState(s))
                if sw.device_state.is_none() =>
            {
                if sw.postcopy {
                    self.resume_postcopy(s)
                } else {
                    sw.device_state = Some(s);
                    Ok(DestStatus::Continue)
                }
            }
            (
                DstState::Receiving(sw),
                Record::Complete {
                    total_pages,
                    digest,
                },
            ) if !sw.as_ref().is_some_and(|sw| sw.postcopy) => self.complete(total_pages, digest),
            (
                DstState::PostcopyRunning { .. },
                Record::Complete {
                    total_pages,
                    digest,
                },
            ) => self.complete_postcopy(total_pages, digest),
            (DstState::AwaitHeader, rec) => Err(unexpected(&rec, "waiting for the stream header")),
            (DstState::AwaitLayout, rec) => Err(unexpected(&rec, "waiting for the memory layout")),
            (DstState::PostcopyRunning { .. }, rec) => {
                Err(unexpected(&rec, "running in post-copy"))
            }
            (DstState::Recovering { .. }, rec) => Err(unexpected(
                &rec,
                "waiting for the source to resume the session",
            )),
            (_, rec) => Err(unexpected(&rec, "receiving pages")),
        }
    }

    /// A new connection from the source resumes the session `id`: the
    /// resume report again (the first may have been lost), which pages
    /// are here, and every outstanding fault asked for again.
    fn recover(&mut self, id: u128) -> Result<DestStatus, MigrationError> {
        if self.session != Some(id) {
            return Err(MigrationError::SessionMismatch);
        }
        let DstState::Recovering { restored } =
            std::mem::replace(&mut self.state, DstState::Failed)
        else {
            return Err(MigrationError::InvalidUse("not recovering"));
        };
        let Some(restored) = restored else {
            // The device state never arrived: the guest was not resumed
            // here, which the abort the driver sends now (in sequence,
            // with no resume confirmation before it) tells the source.
            return Err(MigrationError::Incomplete(
                "the post-copy device state was lost with the connection; the guest was not resumed here".into(),
            ));
        };
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::Resumed(
                self.report.resume,
            )));
        let words = self.received.as_words();
        let mut held = 0u64;
        for (c, chunk) in words.chunks(MAX_DISCARD_WORDS).enumerate() {
            held += chunk.iter().map(|w| w.count_ones() as u64).sum::<u64>();
            self.outbox
                .push_back(protocol::encode_to_vec(&Record::ReceivedBitmap {
                    first_page: (c * MAX_DISCARD_WORDS) as u64 * 64,
                    words: chunk.to_vec(),
                }));
        }
        self.outbox
            .push_back(protocol::encode_to_vec(&Record::Recovered { held }));
        let mut again: Vec<PageNum> = self.requested.keys().copied().collect();
        again.sort_unstable();
        for chunk in again.chunks(MAX_REQUEST_PAGES) {
            self.outbox
                .push_back(protocol::encode_to_vec(&Record::PageRequest(
                    chunk.to_vec(),
                )));
        }
        let now = self.clock.now();
        tracing::info!(
            outage_ms = self
                .lost_at
                .map_or(0, |t| now.saturating_sub(t).as_millis() as u64),
            held,
            "post-copy resumed over a new connection"
        );
        self.lost_at = None;
        self.report.recoveries += 1;
        self.state = DstState::PostcopyRunning { restored };
        self.handle.emit(Event::Recovered { missing_pages: 0 });
        Ok(DestStatus::Continue)
    }

    /// Post-copy: the next discard may name no page below `cursor`.
    fn set_discard_cursor(&mut self, cursor: PageNum) {
        if let DstState::Receiving(Some(sw)) = &mut self.state {
            sw.discard_cursor = cursor;
        }
    }

    fn check_all_here(&self, total_pages: u64) -> Result<(), MigrationError> {
        let switched = matches!(
            self.state,
            DstState::Receiving(Some(_)) | DstState::PostcopyRunning { .. }
        );
        if !switched {
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
        let device_state = match &mut self.state {
            DstState::Receiving(Some(sw)) => sw.device_state.take(),
            _ => None,
        };
        let Some(state) = device_state else {
            return Err(MigrationError::Incomplete(
                "no device state was sent".into(),
            ));
        };
        // The digest of memory as this side holds it, bound to the device
        // state about to be restored: the guest resumes only on the
        // source's memory and the source's state. Read back from the sink
        // (its pages' bytes, or with page models their tokens), or folded
        // from what was placed, page by page, as it arrived.
        let held = match self.verify {
            DestinationVerify::Received => self.arrived_digest(),
            _ if self.model.is_some() => token_digest_memory(&mut self.memory, &self.layout)
                .map_err(MigrationError::backend("digest guest page tokens"))?,
            _ => digest_memory(&mut self.memory, &self.layout)
                .map_err(MigrationError::backend("digest guest memory"))?,
        };
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
        self.state = DstState::PostcopyRunning { restored: state };
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
        {
            // From here a cancel is refused: the guest is about to run.
            let mut h = self.handle.lock();
            if h.cancel {
                return Err(MigrationError::Cancelled);
            }
            h.committed = true;
        }
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
        let held = self.arrived_digest();
        let DstState::PostcopyRunning { restored } = &self.state else {
            return Err(MigrationError::Incomplete(
                "post-copy completion without a device state".into(),
            ));
        };
        let actual = completion_digest(held, restored);
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

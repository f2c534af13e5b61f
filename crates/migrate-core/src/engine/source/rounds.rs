//! The source engine's rounds: what to send next, in which order, and
//! when to stop pre-copying.

use super::*;

impl<T, S, G, P> SourceEngine<T, S, G, P>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
{
    pub(super) fn decide(&mut self) -> Result<(), MigrationError> {
        let now = self.now();
        let pending_pages = self.pages.pending_count;
        let input = PolicyInput {
            now,
            rounds_done: self.figures.rounds_done,
            guest_pages: self.layout.total_pages(),
            page_size: self.layout.page_size(),
            last_round: self.figures.last_summary.as_ref(),
            pending: &self.pages.pending,
            pending_pages,
            total_pages_sent: self.figures.pages_sent,
            bytes_transferred: self.figures.transferred,
            bandwidth: self.figures.bandwidth,
            dirty_rate: self.figures.dirty_rate,
            rtt: self.figures.rtt,
        };
        let expected = input.expected_downtime();
        let decision = if self.steer.postcopy_requested {
            Decision::PostCopy(SwitchReason::Requested)
        } else {
            self.policy.decide(&input)
        };
        match decision {
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
                let round = self.new_round(order, false, candidates);
                self.state = SrcState::Precopy(round);
            }
            Decision::StopAndCopy(reason) => {
                self.switch_over(reason, expected.unwrap_or_default(), false)?;
                let round = self.new_round(RoundOrder::Ascending { cursor: 0 }, true, 0);
                self.state = SrcState::Final(round);
            }
            Decision::PostCopy(reason) => self.switch_to_postcopy(reason)?,
            Decision::Abort(reason) => return Err(MigrationError::PolicyAborted(reason)),
        }
        Ok(())
    }

    /// Pauses the guest for the switch-over and says so: in the statistics,
    /// on the wire and through the handle.
    fn switch_over(
        &mut self,
        reason: SwitchReason,
        expected: Duration,
        postcopy: bool,
    ) -> Result<(), MigrationError> {
        self.steer.postcopy_requested = false;
        self.figures.switch_reason = Some(reason);
        self.figures.expected_downtime = expected;
        self.pause_and_collect()?;
        tracing::info!(reason = reason.describe(), postcopy, "switch-over");
        self.steer.handle.emit(Event::SwitchOver {
            postcopy,
            reason: Some(reason),
        });
        self.wire
            .outbox
            .push_back(protocol::encode_to_vec(&Record::SwitchOver {
                round: self.figures.rounds_done + 1,
                postcopy,
            }));
        Ok(())
    }

    /// Switches over to post-copy: the device state goes with the pages
    /// the backend needs at resume and the list of pages the destination
    /// must fault on, and the rest follows as the guest runs there.
    fn switch_to_postcopy(&mut self, reason: SwitchReason) -> Result<(), MigrationError> {
        self.switch_over(reason, self.figures.rtt / 2, true)?;
        if self.guest.tracking {
            self.tracker
                .stop()
                .map_err(MigrationError::backend("stop dirty tracking"))?;
            self.guest.tracking = false;
        }
        let t0 = self.now();
        let state = self
            .control
            .save_state()
            .map_err(MigrationError::backend("save device state"))?;
        let t1 = self.now();
        self.figures.parts.device_save = t1 - t0;
        // Pages the backend needs in place before the guest runs leave the
        // pending set, so they are neither discarded nor left to a fault,
        // and go now with the guest paused.
        let mut early = self
            .control
            .resume_pages()
            .map_err(MigrationError::backend("list the pages needed at resume"))?;
        early.sort_unstable();
        early.dedup();
        early.retain(|p| self.layout.contains(*p) && self.pages.take(*p));
        self.queue_discards();
        let round = self.new_round(RoundOrder::Ascending { cursor: 0 }, true, 0);
        self.state = SrcState::Postcopy(Box::new(Postcopy {
            round,
            sent_state: state.clone(),
            urgent: VecDeque::new(),
            resumed: None,
            recorded: false,
        }));
        // The pages needed at resume go before the guest runs there: not
        // post-copy's.
        self.send_now(&early)?;
        self.figures.postcopy = true;
        self.figures.resume_pages_sent = early.len() as u64;
        self.figures.parts.final_copy = self.now() - t1;
        self.wire
            .outbox
            .push_back(protocol::encode_to_vec(&Record::DeviceState(state)));
        self.wire.paused_frames = self.wire.outbox.len();
        // The destination may resume the guest once this record has been
        // handed out (see `poll`).
        self.wire.commit_record = Some(RecordType::DeviceState as u8);
        Ok(())
    }

    pub(super) fn pause_and_collect(&mut self) -> Result<(), MigrationError> {
        // Downtime starts when the pause is asked for: a vCPU that has
        // stopped waits for the others, and a failed pause still resumes
        // the ones that did stop.
        let asked = self.now();
        self.guest.paused_at = Some(asked);
        self.control
            .pause()
            .map_err(MigrationError::backend("pause the guest"))?;
        self.figures.parts.pause = self.now().saturating_sub(asked);
        if self.guest.tracking {
            self.tracker
                .collect_and_clear(&mut self.pages.scratch)
                .map_err(MigrationError::backend("collect the dirty log"))?;
            self.figures.dirty_syncs += 1;
            self.pages.merge_scratch();
        }
        Ok(())
    }

    /// Post-copy: tells the destination which pages it must fault on,
    /// chunk by chunk, as ranges or as a bitmap, whichever is smaller
    /// (a few long runs for a fresh post-copy, a scattered bitmap after
    /// pre-copy rounds). These bytes are sent with the guest paused.
    pub(super) fn queue_discards(&mut self) {
        let outbox = &mut self.wire.outbox;
        let words = self.pages.pending.as_words();
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
                                outbox.push_back(protocol::encode_to_vec(&Record::Discard(full)));
                            }
                            ranges.push((p, 1));
                        }
                    }
                }
                outbox.push_back(protocol::encode_to_vec(&Record::Discard(ranges)));
            } else {
                outbox.push_back(protocol::encode_to_vec(&Record::DiscardBitmap {
                    first_page,
                    words: span.to_vec(),
                }));
            }
        }
    }

    /// A round that starts now, numbered after the last one done, with its
    /// span opened and its start announced.
    fn new_round(&mut self, order: RoundOrder, final_copy: bool, candidates: u64) -> Round {
        let peek_every = self
            .config
            .peek_interval_pages
            .max(candidates / self.config.max_peeks_per_round.max(1))
            .max(1);
        let number = self.figures.rounds_done + 1;
        self.open_round_span(number, final_copy);
        self.steer.handle.emit(Event::RoundStarted {
            round: number,
            final_copy,
        });
        Round {
            number,
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
            throttle: self.guest.throttle,
        }
    }

    /// HCA and friends: a sample of the dirty log, if one is due.
    pub(super) fn maybe_sample(&mut self) -> Result<(), MigrationError> {
        let Some(iv) = self.timers.sample_every else {
            return Ok(());
        };
        let now = self.now();
        if now < self.timers.next_sample_at {
            return Ok(());
        }
        let pages = &mut self.pages;
        self.tracker
            .collect_and_clear(&mut pages.scratch)
            .map_err(MigrationError::backend("sample the dirty log"))?;
        self.figures.dirty_syncs += 1;
        self.policy.on_sample(&pages.scratch, now);
        pages.round_dirty.union_with(&pages.scratch);
        pages.round_dirty_used = true;
        self.timers.next_sample_at = now + iv;
        Ok(())
    }

    /// Picks the pages of the next batch, taking each out of `pending`.
    pub(super) fn select_batch(&mut self) -> Result<(), MigrationError> {
        let pages = &mut self.pages;
        pages.batch.clear();
        let (round, final_copy) = match &mut self.state {
            SrcState::Postcopy(p) => {
                let cap = self.config.postcopy_batch_pages;
                while pages.batch.len() < cap {
                    let Some(page) = p.urgent.pop_front() else {
                        break;
                    };
                    if pages.take(page) {
                        pages.batch.push(page);
                    }
                }
                if pages.batch.len() < cap {
                    pages.push.clear();
                    self.policy
                        .next_push(&pages.pending, cap - pages.batch.len(), &mut pages.push);
                    for i in 0..pages.push.len() {
                        let page = pages.push[i];
                        if pages.batch.len() < cap && pages.take(page) {
                            pages.batch.push(page);
                        }
                    }
                }
                if pages.batch.is_empty() {
                    // A policy that offers nothing still gets every page sent.
                    let take: Vec<PageNum> = pages.pending.iter_ones().take(cap).collect();
                    for page in take {
                        pages.take(page);
                        pages.batch.push(page);
                    }
                }
                return Ok(());
            }
            SrcState::Precopy(r) => (r, false),
            SrcState::Final(r) => (r, true),
            _ => return Ok(()),
        };
        while pages.batch.len() < self.config.batch_pages {
            let page = match &mut round.order {
                RoundOrder::Ascending { cursor } => {
                    match pages.pending.iter_ones_from(*cursor).next() {
                        Some(p) => {
                            *cursor = p + 1;
                            p
                        }
                        None => break,
                    }
                }
                RoundOrder::Ordered { pages: order, next } => match order.get(*next) {
                    Some(p) => {
                        *next += 1;
                        if !pages.pending.get(*p) {
                            continue;
                        }
                        *p
                    }
                    None => break,
                },
            };
            if !final_copy {
                if round.examined_since_peek >= round.peek_every {
                    self.tracker
                        .peek(&mut pages.skip)
                        .map_err(MigrationError::backend("peek at the dirty log"))?;
                    if pages.round_dirty_used {
                        pages.skip.union_with(&pages.round_dirty);
                    }
                    round.examined_since_peek = 0;
                }
                round.examined_since_peek += 1;
                if pages.skip.get(page) {
                    round.skipped += 1;
                    continue;
                }
            }
            pages.take(page);
            pages.batch.push(page);
        }
        Ok(())
    }

    /// Queues `pages` (already out of `pending`) as page-batch frames of
    /// the current round, ahead of anything queued after.
    pub(super) fn send_now(&mut self, pages: &[PageNum]) -> Result<(), MigrationError> {
        for chunk in pages.chunks(self.config.batch_pages) {
            self.pages.batch.clear();
            self.pages.batch.extend_from_slice(chunk);
            if let Some(frame) = self.encode_batch()? {
                self.wire.outbox.push_back(frame);
            }
        }
        self.pages.batch.clear();
        Ok(())
    }

    /// Builds the next page-batch frame of the round, or `None` when the
    /// round has no more pages.
    pub(super) fn next_batch_frame(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if matches!(self.state, SrcState::Precopy(_)) {
            self.maybe_sample()?;
        }
        self.select_batch()?;
        self.encode_batch()
    }

    /// Reads the pages of `batch` and encodes them as one frame of the
    /// current round, keeping the counts and the sent-content hashes.
    pub(super) fn encode_batch(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        let pages = &mut self.pages;
        if pages.batch.is_empty() {
            return Ok(None);
        }
        let postcopy = self.figures.postcopy;
        let Some(round) = round_of(&mut self.state) else {
            return Ok(None);
        };
        let ps = self.layout.page_size();
        let mut frame = Vec::new();
        let summary = if self.config.payload == Payload::Model {
            pages.tokens.resize(pages.batch.len(), 0);
            self.memory
                .read_tokens(&pages.batch, &mut pages.tokens)
                .map_err(MigrationError::backend("read guest page tokens"))?;
            if !pages.sent_hashes.is_empty() {
                for (p, t) in pages.batch.iter().zip(&pages.tokens) {
                    if let Some(i) = self.layout.dense_index(*p) {
                        pages.sent_hashes[i as usize] = *t;
                    }
                }
            }
            encode_model_batch(round.number, ps, &pages.batch, &pages.tokens, &mut frame)
        } else {
            let summary = Self::encode_bytes(
                &mut self.memory,
                &self.layout,
                pages,
                round.number,
                &mut frame,
            )?;
            if let Some(c) = &mut self.wire.compressor {
                c.compress(&mut frame);
            }
            summary
        };
        round.sent += summary.pages as u64;
        round.zero += summary.zero_pages as u64;
        let f = &mut self.figures;
        f.pages_sent += summary.pages as u64;
        f.zero_sent += summary.zero_pages as u64;
        if postcopy {
            f.postcopy_pages += summary.pages as u64;
        }
        if f.first_page_at.is_none() {
            f.first_page_at = Some(self.clock.now());
        }
        Ok(Some(frame))
    }

    /// Post-copy with the preempt connection: the pages the destination
    /// asked for, as a [`Record::RequestedPages`] frame (not compressed:
    /// a vCPU waits for it), or `None` when none is waiting. A requested
    /// page also stays in the push (and one the push sent already goes
    /// again): the completion follows the push in sequence, so it can
    /// never reach the destination ahead of a page only the preempt
    /// connection carried.
    pub(super) fn preempt_frame(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if !self.wire.preempt {
            return Ok(None);
        }
        let pc = match &mut self.state {
            SrcState::Postcopy(p) | SrcState::AwaitVerified(p) => p,
            _ => return Ok(None),
        };
        if pc.urgent.is_empty() {
            return Ok(None);
        }
        let pages = &mut self.pages;
        pages.batch.clear();
        while pages.batch.len() < self.config.postcopy_batch_pages {
            let Some(page) = pc.urgent.pop_front() else {
                break;
            };
            if !pages.batch.contains(&page) {
                pages.batch.push(page);
            }
        }
        let mut frame = Vec::new();
        let summary = Self::encode_bytes(
            &mut self.memory,
            &self.layout,
            pages,
            pc.round.number,
            &mut frame,
        )?;
        pages.batch.clear();
        frame[0] = RecordType::RequestedPages as u8;
        protocol::reseal(&mut frame);
        let f = &mut self.figures;
        f.pages_sent += summary.pages as u64;
        f.zero_sent += summary.zero_pages as u64;
        f.postcopy_pages += summary.pages as u64;
        f.preempt_pages += summary.pages as u64;
        Ok(Some(frame))
    }

    /// [`Payload::Bytes`]: reads the batch straight into its frame
    /// ([`protocol::encode_page_batch_from`]). Pages the source knows to
    /// be zero ([`PageSource::known_zero`]) are neither read nor checked.
    fn encode_bytes(
        memory: &mut S,
        layout: &MemoryLayout,
        pages: &mut Pages,
        round: u32,
        frame: &mut Vec<u8>,
    ) -> Result<protocol::BatchSummary, MigrationError> {
        let ps = layout.page_size();
        let n = pages.batch.len();
        pages.known_zero.clear();
        pages.known_zero.resize(n, false);
        memory
            .known_zero(&pages.batch, &mut pages.known_zero)
            .map_err(MigrationError::backend("ask which guest pages are zero"))?;
        let summary = if memory.small_reads_are_cheap() {
            protocol::encode_page_batch_from(
                round,
                ps,
                &pages.batch,
                &pages.known_zero,
                |p: &[PageNum], buf: &mut [u8]| memory.read_pages(p, buf),
                frame,
            )
        } else {
            // One read of every page not known to be zero; the frame is
            // then filled from the buffer, in the same order.
            pages.to_read.clear();
            let known = pages.known_zero.iter();
            let unknown = pages.batch.iter().zip(known).filter(|(_, z)| !**z);
            pages.to_read.extend(unknown.map(|(p, _)| *p));
            let need = pages.to_read.len() * ps.get();
            if pages.read_buf.len() < need {
                pages.read_buf.resize(need, 0);
            }
            if need > 0 {
                memory
                    .read_pages(&pages.to_read, &mut pages.read_buf[..need])
                    .map_err(MigrationError::backend("read guest pages"))?;
            }
            let mut read = &pages.read_buf[..need];
            protocol::encode_page_batch_from(
                round,
                ps,
                &pages.batch,
                &pages.known_zero,
                |_: &[PageNum], buf: &mut [u8]| {
                    let (now, rest) = read.split_at(buf.len());
                    crate::copy::copy_bytes(buf, now);
                    read = rest;
                    Ok::<(), crate::backend::BackendError>(())
                },
                frame,
            )
        }
        .map_err(MigrationError::backend("read guest pages"))?;
        if !pages.sent_hashes.is_empty() {
            // The hashes of the bytes sent, taken from the frame.
            let batch = protocol::page_batch_of(frame, ps)?;
            for (p, data) in batch.iter() {
                let hash = data.map_or_else(|| zero_page_hash(ps.get()), page_hash);
                if let Some(i) = layout.dense_index(p) {
                    pages.sent_hashes[i as usize] = hash;
                }
            }
        }
        Ok(summary)
    }

    /// The round has no more pages to send (or, pre-copy, was cut short
    /// by a request for post-copy): collects what the guest dirtied,
    /// records the round and moves on.
    pub(super) fn end_round(&mut self) -> Result<(), MigrationError> {
        let now = self.now();
        match std::mem::replace(&mut self.state, SrcState::Decide) {
            SrcState::Precopy(round) if self.wire.round_acks && !self.steer.postcopy_requested => {
                // The round ends when the destination says it has it all
                // (`Record::RoundReceived`): until then its pages may sit
                // in the transport's buffers, and a rate taken now would
                // count them as delivered.
                self.push_round_end(&round);
                self.state = SrcState::AwaitRoundReceived(round);
                Ok(())
            }
            SrcState::Precopy(round) => self.end_precopy_round(round, now, false),
            SrcState::Final(round) => {
                // Anything written while paused (device emulation) goes too.
                self.tracker
                    .collect_and_clear(&mut self.pages.scratch)
                    .map_err(MigrationError::backend("collect the dirty log"))?;
                self.figures.dirty_syncs += 1;
                if !self.pages.scratch.none() {
                    self.pages.merge_scratch();
                    self.state = SrcState::Final(Round {
                        order: RoundOrder::Ascending { cursor: 0 },
                        ..round
                    });
                    return Ok(());
                }
                self.record_round(&round, true, now, 0, false);
                self.send_tail(now)
            }
            SrcState::Postcopy(mut p) => {
                if !p.recorded {
                    self.record_round(&p.round, true, now, 0, false);
                    p.recorded = true;
                }
                self.complete_postcopy(p)
            }
            other => {
                self.state = other;
                Err(MigrationError::InvalidUse("no round to end"))
            }
        }
    }

    /// Closes a pre-copy round that ended at `ended`: collects what the
    /// guest dirtied, records the round and its rates. `marker_sent`: its
    /// [`Record::RoundEnd`] went already (the round waited for the
    /// destination to receive it, and `ended` is when it did).
    pub(super) fn end_precopy_round(
        &mut self,
        round: Round,
        ended: Duration,
        marker_sent: bool,
    ) -> Result<(), MigrationError> {
        let now = self.now();
        let pages = &mut self.pages;
        self.tracker
            .collect_and_clear(&mut pages.scratch)
            .map_err(MigrationError::backend("collect the dirty log"))?;
        self.figures.dirty_syncs += 1;
        if let Some(iv) = self.timers.sample_every {
            self.policy.on_sample(&pages.scratch, now);
            self.timers.next_sample_at = now + iv;
        }
        if pages.round_dirty_used {
            pages.scratch.union_with(&pages.round_dirty);
            pages.round_dirty.clear_all();
            pages.round_dirty_used = false;
        }
        let dirtied = pages.scratch.count_ones();
        pages.merge_scratch();
        let delta = self.record_round(&round, false, ended, dirtied, marker_sent);
        let f = &mut self.figures;
        if !delta.is_zero() {
            let secs = delta.as_secs_f64();
            if round.bytes > 0 {
                f.bandwidth = round.bytes as f64 / secs;
            }
            f.dirty_rate = dirtied as f64 / secs;
        }
        f.rounds_done = round.number;
        f.last_summary = Some(RoundSummary {
            round: round.number,
            sent: round.sent,
            skipped: round.skipped,
            bytes: round.bytes,
            duration: delta,
            dirtied,
        });
        self.converge_step(dirtied, round.bytes)
    }

    /// Queues the round's end marker.
    fn push_round_end(&mut self, round: &Round) {
        self.wire
            .outbox
            .push_back(protocol::encode_to_vec(&Record::RoundEnd {
                round: round.number,
                pages_sent: round.sent,
            }));
    }

    /// Closes a round: its end marker on the wire (unless `marker_sent`),
    /// its line in the statistics, its figures in its span and an event.
    /// Returns its duration.
    fn record_round(
        &mut self,
        round: &Round,
        final_copy: bool,
        now: Duration,
        dirtied: u64,
        marker_sent: bool,
    ) -> Duration {
        let delta = now.saturating_sub(round.started);
        let pct = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !delta.is_zero() => {
                (b.saturating_sub(a).as_secs_f64() / delta.as_secs_f64() * 100.0).min(100.0)
            }
            _ => 0.0,
        };
        let dom0_pct = pct(round.cpu_start, self.clock.thread_cpu_time());
        let target_pct = if final_copy {
            0.0
        } else {
            pct(round.guest_cpu_start, self.control.guest_cpu_time())
        };
        if !marker_sent {
            self.push_round_end(round);
        }
        let stats = RoundStats {
            round: round.number,
            sent: round.sent,
            skipped: round.skipped,
            zero: round.zero,
            bytes: round.bytes,
            delta,
            dom0_pct,
            target_pct,
            dirtied,
            final_copy,
            page_size: self.layout.page_size().bytes(),
            throttle_pct: round.throttle,
        };
        self.close_round_span(&stats);
        self.figures.rounds.push(stats);
        // Watchers read the progress as the round ended.
        self.publish();
        self.steer.handle.emit(Event::RoundFinished {
            round: round.number,
            pages: round.sent,
            bytes: round.bytes,
            dirtied,
            duration: delta,
            throttle_pct: round.throttle,
        });
        delta
    }
}

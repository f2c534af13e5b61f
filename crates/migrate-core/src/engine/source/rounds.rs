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

    pub(super) fn pause_and_collect(&mut self) -> Result<(), MigrationError> {
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
    pub(super) fn queue_discards(&mut self) {
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

    pub(super) fn begin_round(&mut self, order: RoundOrder, final_copy: bool, candidates: u64) {
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
    pub(super) fn maybe_sample(&mut self) -> Result<(), MigrationError> {
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
    pub(super) fn select_batch(&mut self) -> Result<(), MigrationError> {
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
    pub(super) fn send_now(&mut self, pages: &[PageNum]) -> Result<(), MigrationError> {
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
    pub(super) fn next_batch_frame(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if self.state == SrcState::Round {
            self.maybe_sample()?;
        }
        self.select_batch()?;
        self.encode_batch()
    }

    /// Reads the pages of `batch` and encodes them as one frame of the
    /// current round, keeping the counts and the sent-content hashes.
    pub(super) fn encode_batch(&mut self) -> Result<Option<Vec<u8>>, MigrationError> {
        if self.batch.is_empty() {
            return Ok(None);
        }
        let Some(round) = self.round.as_mut() else {
            return Ok(None);
        };
        let ps = self.layout.page_size();
        let mut frame = Vec::new();
        let summary = if self.config.payload == Payload::Model {
            self.tokens.resize(self.batch.len(), 0);
            self.memory
                .read_tokens(&self.batch, &mut self.tokens)
                .map_err(MigrationError::backend("read guest page tokens"))?;
            if !self.sent_hashes.is_empty() {
                for (p, t) in self.batch.iter().zip(&self.tokens) {
                    if let Some(i) = self.layout.dense_index(*p) {
                        self.sent_hashes[i as usize] = *t;
                    }
                }
            }
            encode_model_batch(round.number, ps, &self.batch, &self.tokens, &mut frame)
        } else {
            Self::encode_bytes(
                &mut self.memory,
                &self.layout,
                &self.batch,
                &mut self.read_buf,
                &mut self.sent_hashes,
                round.number,
                &mut frame,
            )?
        };
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

    /// [`Payload::Bytes`]: reads `batch` and encodes it as a page batch.
    pub(super) fn encode_bytes(
        memory: &mut S,
        layout: &MemoryLayout,
        batch: &[PageNum],
        read_buf: &mut Vec<u8>,
        sent_hashes: &mut [u64],
        round: u32,
        frame: &mut Vec<u8>,
    ) -> Result<protocol::BatchSummary, MigrationError> {
        let ps = layout.page_size();
        let need = batch.len() * ps.get();
        if read_buf.len() < need {
            read_buf.resize(need, 0);
        }
        memory
            .read_pages(batch, &mut read_buf[..need])
            .map_err(MigrationError::backend("read guest pages"))?;
        if !sent_hashes.is_empty() {
            let chunks = read_buf[..need].chunks_exact(ps.get());
            for (p, data) in batch.iter().zip(chunks) {
                if let Some(i) = layout.dense_index(*p) {
                    sent_hashes[i as usize] = page_hash(data);
                }
            }
        }
        Ok(encode_page_batch(
            round,
            ps,
            batch,
            &read_buf[..need],
            frame,
        ))
    }

    pub(super) fn end_round(&mut self) -> Result<(), MigrationError> {
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
}

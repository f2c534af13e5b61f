//! The end of a migration on the source: the device state, the
//! completion digest, and the statistics.

use super::*;

impl<T, S, G, P> SourceEngine<T, S, G, P>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
{
    /// The completion digest, as [`EngineConfig::verify`] says.
    pub(super) fn source_digest(&mut self) -> Result<MemoryDigest, MigrationError> {
        if self.config.payload == Payload::Model {
            if self.sent_hashes.is_empty() {
                return token_digest_memory(&mut self.memory, &self.layout)
                    .map_err(MigrationError::backend("digest guest page tokens"));
            }
            return Ok(token_digest_table(&self.layout, &self.sent_hashes));
        }
        if self.sent_hashes.is_empty() {
            return digest_memory(&mut self.memory, &self.layout)
                .map_err(MigrationError::backend("digest guest memory"));
        }
        Ok(digest_table(&self.layout, &self.sent_hashes))
    }

    /// After the final pages: device state, digest, completion.
    pub(super) fn send_tail(&mut self, pages_done: Duration) -> Result<(), MigrationError> {
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
    pub(super) fn complete_postcopy(&mut self) -> Result<(), MigrationError> {
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

    pub(super) fn finish(
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

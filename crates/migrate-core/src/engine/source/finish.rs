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
        let sent_hashes = &self.pages.sent_hashes;
        if self.config.payload == Payload::Model {
            if sent_hashes.is_empty() {
                return token_digest_memory(&mut self.memory, &self.layout)
                    .map_err(MigrationError::backend("digest guest page tokens"));
            }
            return Ok(token_digest_table(&self.layout, sent_hashes));
        }
        if sent_hashes.is_empty() {
            return digest_memory(&mut self.memory, &self.layout)
                .map_err(MigrationError::backend("digest guest memory"));
        }
        Ok(digest_table(&self.layout, sent_hashes))
    }

    /// After the final pages: device state, digest, completion.
    pub(super) fn send_tail(&mut self, pages_done: Duration) -> Result<(), MigrationError> {
        let parts = &mut self.figures.parts;
        let paused = self.guest.paused_at.unwrap_or(pages_done) + parts.pause;
        parts.final_copy = pages_done.saturating_sub(paused);
        let t0 = self.now();
        let state: DeviceState = self
            .control
            .save_state()
            .map_err(MigrationError::backend("save device state"))?;
        let t1 = self.now();
        let digest = completion_digest(self.source_digest()?, &state);
        let t2 = self.now();
        self.figures.parts.device_save = t1 - t0;
        self.figures.parts.source_verify = t2 - t1;
        if self.guest.tracking {
            self.tracker
                .stop()
                .map_err(MigrationError::backend("stop dirty tracking"))?;
            self.guest.tracking = false;
        }
        let outbox = &mut self.wire.outbox;
        outbox.push_back(protocol::encode_to_vec(&Record::DeviceState(state)));
        outbox.push_back(protocol::encode_to_vec(&Record::Complete {
            total_pages: self.layout.total_pages(),
            digest,
        }));
        // The destination may resume the guest once the completion record
        // has been handed out (see `poll`).
        self.wire.commit_record = Some(RecordType::Complete as u8);
        self.state = SrcState::AwaitResumed;
        Ok(())
    }

    /// Post-copy: every page is on its way; the source's memory has been
    /// frozen since the pause, so its digest is taken now, outside downtime.
    pub(super) fn complete_postcopy(&mut self, p: Box<Postcopy>) -> Result<(), MigrationError> {
        let memory = self.source_digest()?;
        let digest = completion_digest(memory, &p.sent_state);
        self.wire
            .outbox
            .push_back(protocol::encode_to_vec(&Record::Complete {
                total_pages: self.layout.total_pages(),
                digest,
            }));
        self.state = SrcState::AwaitVerified(p);
        Ok(())
    }

    /// The destination resumed (and, after post-copy, verified): the
    /// statistics, and the end.
    pub(super) fn finish(
        &mut self,
        resume_ack_at: Duration,
        report: ResumeReport,
        post: Option<PostcopyReport>,
    ) {
        let now = self.now();
        let f = &mut self.figures;
        let paused = self.guest.paused_at.unwrap_or(resume_ack_at);
        let start = f.started_at.unwrap_or_default();
        let dest_part = Duration::from_nanos(report.total_ns);
        let measured = resume_ack_at
            .saturating_sub(paused)
            .saturating_sub(f.rtt / 2);
        let source_part =
            f.parts.pause + f.parts.final_copy + f.parts.device_save + f.parts.source_verify;
        let downtime = measured.max(source_part + dest_part);
        let mut parts = f.parts.clone();
        parts.dest_verify = Duration::from_nanos(report.verify_ns);
        parts.device_restore = Duration::from_nanos(report.restore_ns);
        parts.resume = Duration::from_nanos(report.resume_ns);
        parts.transit = downtime
            .saturating_sub(source_part)
            .saturating_sub(dest_part);
        let total_time = now.saturating_sub(start);
        let ps = self.layout.page_size().bytes() as u64;
        let normal = f.pages_sent - f.zero_sent;
        let resumed_at = paused + downtime;
        let postcopy = post.map(|r| PostcopyStats {
            requests: f.postcopy_requests.max(r.faults),
            duplicates: r.duplicates,
            fault_latency_p50: Duration::from_nanos(r.latency_p50_ns),
            fault_latency_p99: Duration::from_nanos(r.latency_p99_ns),
            fault_latency_max: Duration::from_nanos(r.latency_max_ns),
            vcpu_stall: Duration::from_nanos(r.stall_ns),
            resume_pages: f.resume_pages_sent,
            pages: f.postcopy_pages,
            bytes: f.postcopy_bytes,
            duration: now.saturating_sub(f.rtt / 2).saturating_sub(resumed_at),
            recoveries: f.recoveries,
            recovered_pages: f.recovered_pages,
            recovery_time: f.recovery_time,
            preempt_pages: f.preempt_pages,
            preempt_bytes: f.preempt_bytes,
        });
        let compression = self.config.compression.map(|codec| {
            let mut c = CompressionStats {
                codec: codec.name().to_owned(),
                ..CompressionStats::default()
            };
            if let Some(z) = &self.wire.compressor {
                let fig = z.figures();
                c.negotiated = true;
                c.compressed_batches = fig.compressed_batches;
                c.raw_batches = fig.raw_batches;
                c.bytes_before = fig.bytes_in;
                c.bytes_after = fig.bytes_out;
                c.cpu = fig.cpu;
            }
            c
        });
        let stats = MigrationStats {
            policy: self.policy.name().to_owned(),
            switch_reason: f.switch_reason.unwrap_or(SwitchReason::StopAndCopy),
            guest_pages: self.layout.total_pages(),
            page_size: ps as u32,
            total_time,
            setup_time: f.first_page_at.unwrap_or(now).saturating_sub(start),
            downtime,
            downtime_parts: parts,
            expected_downtime: f.expected_downtime,
            transferred: f.transferred,
            remaining: self.pages.pending_count * ps,
            duplicate: f.zero_sent,
            normal,
            normal_bytes: normal * ps,
            total_pages_sent: f.pages_sent,
            dirty_pages_rate: f.dirty_rate,
            mbps: if total_time.is_zero() {
                0.0
            } else {
                f.transferred as f64 * 8.0 / total_time.as_secs_f64() / 1e6
            },
            dirty_sync_count: f.dirty_syncs,
            precopy_bytes: f.precopy_bytes,
            downtime_bytes: f.downtime_bytes,
            rtt: f.rtt,
            postcopy,
            rounds: std::mem::take(&mut f.rounds),
            memory_verified: true,
            compression,
        };
        self.guest.paused_at = None;
        self.completed(&stats);
        self.state = SrcState::Done(Box::new(stats));
    }
}

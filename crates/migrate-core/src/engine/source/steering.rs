//! The source's steering and timers: the handle's requests, the bandwidth
//! pacing, the peer timeout, auto-converge, the published progress and
//! the tracing spans.
//!
//! Every timer is a deadline on the engine's clock: [`SourceEngine::poll_timeout`]
//! says when the earliest falls due and [`SourceEngine::handle_timeout`]
//! acts on those that did, so a driver on a virtual clock runs them
//! exactly (as quinn-proto's `poll_timeout`/`handle_timeout`).

use super::*;
use crate::backend::BackendErrorKind;
use crate::transport::TransportError;

/// How much lateness of a driver the bandwidth pacing makes up for: at
/// most this much sending time is caught up in a burst.
pub const PACING_SLACK: Duration = Duration::from_millis(10);

impl<T, S, G, P> SourceEngine<T, S, G, P>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
{
    /// The engine's clock.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The earliest deadline of the engine's timers, on its clock: the
    /// peer timeout while it waits for the destination, the next paced
    /// frame under a bandwidth cap, the next dirty-log sample of a
    /// sampling policy. After [`SourceStep::Wait`] a driver waits for a
    /// frame from the peer until then, calls
    /// [`SourceEngine::handle_timeout`] if none came, and polls again.
    /// `None`: nothing is timed, wait for a frame.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if matches!(self.state, SrcState::Done(_) | SrcState::Failed) {
            return None;
        }
        let precopy = matches!(self.state, SrcState::Precopy(_));
        [
            self.peer_deadline(),
            self.recovery_deadline(),
            (self.pacing() && (precopy || !self.wire.outbox.is_empty()))
                .then_some(self.timers.pace_at),
            self.timers
                .sample_every
                .filter(|_| precopy)
                .map(|_| self.timers.next_sample_at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Acts on the timers that fell due and on the handle's requests:
    /// fails with a transport timeout (as [`SourceEngine::fail`]) if the
    /// peer was silent past the peer timeout, with
    /// [`MigrationError::Cancelled`] on a cancel, and takes a dirty-log
    /// sample that is due. A due paced frame goes out at the next
    /// [`SourceEngine::poll`].
    pub fn handle_timeout(&mut self) -> Result<(), MigrationError> {
        if matches!(self.state, SrcState::Done(_) | SrcState::Failed) {
            return Ok(());
        }
        let span = self.current_span();
        let _entered = span.enter();
        let r = self.handle_timeout_inner();
        self.publish();
        r
    }

    fn handle_timeout_inner(&mut self) -> Result<(), MigrationError> {
        if let Err(e) = self.apply_controls() {
            return Err(self.fail(e));
        }
        if let Some(e) = self.recovery_expired() {
            return Err(self.fail(e));
        }
        if self.peer_timed_out() {
            let limit = self.config.peer_timeout.unwrap_or_default();
            let e = TransportError::Timeout(limit).into();
            if self.recoverable() {
                self.lose_connection(e);
                return Ok(());
            }
            return Err(self.fail(e));
        }
        if matches!(self.state, SrcState::Precopy(_)) {
            if let Err(e) = self.maybe_sample() {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    /// Whether the source waited for its peer past the peer timeout.
    pub fn peer_timed_out(&self) -> bool {
        self.peer_deadline().is_some_and(|d| self.now() >= d)
    }

    /// Sets the peer timeout ([`EngineConfig::peer_timeout`]).
    pub fn set_peer_timeout(&mut self, timeout: Option<Duration>) {
        self.config.peer_timeout = timeout;
    }

    fn peer_deadline(&self) -> Option<Duration> {
        match (self.timers.wait_since, self.config.peer_timeout) {
            (Some(since), Some(limit)) if self.waiting_for_peer() => Some(since + limit),
            _ => None,
        }
    }

    pub(super) fn waiting_for_peer(&self) -> bool {
        matches!(
            self.state,
            SrcState::AwaitReady { .. }
                | SrcState::AwaitRoundReceived(_)
                | SrcState::AwaitResumed
                | SrcState::AwaitVerified(_)
        ) || matches!(&self.state, SrcState::Recovering(r) if r.connected)
    }

    /// Whether the bandwidth cap applies now: pre-copy, guest running.
    fn pacing(&self) -> bool {
        self.steer.max_bandwidth.is_some()
            && self.guest.paused_at.is_none()
            && !self.figures.postcopy
    }

    /// Whether the next frame must wait for the bandwidth cap.
    pub(super) fn paced(&self) -> bool {
        self.pacing() && self.now() < self.timers.pace_at
    }

    /// A frame of `bytes` went out: the next may go once it has drained
    /// at the cap.
    pub(super) fn pace(&mut self, bytes: usize) {
        if let (true, Some(cap)) = (self.pacing(), self.steer.max_bandwidth) {
            // A driver that wakes late (a timer's granularity, a busy
            // host) gets up to PACING_SLACK of the lost time back, so the
            // rate over a round is the cap; on a virtual clock it is never
            // late and every frame leaves exactly on time.
            let floor = self.now().saturating_sub(PACING_SLACK);
            self.timers.pace_at =
                self.timers.pace_at.max(floor) + Duration::from_secs_f64(bytes as f64 / cap as f64);
        }
    }

    /// Takes the handle's requests: cancel, bandwidth cap, downtime
    /// target, post-copy.
    pub(super) fn apply_controls(&mut self) -> Result<(), MigrationError> {
        let (cancel, bandwidth, target, postcopy) = {
            let mut h = self.steer.handle.lock();
            (
                h.cancel,
                h.max_bandwidth.take(),
                h.downtime_target.take(),
                std::mem::take(&mut h.postcopy_now),
            )
        };
        if cancel && !self.wire.committed {
            return Err(MigrationError::Cancelled);
        }
        if let Some(cap) = bandwidth {
            tracing::info!(?cap, "bandwidth cap changed");
            if self.steer.max_bandwidth.is_none() {
                // Pacing starts from now, not from a deadline long past.
                self.timers.pace_at = self.now();
            }
            self.steer.max_bandwidth = cap;
        }
        if let Some(target) = target {
            if self.policy.set_downtime_target(target) {
                tracing::info!(?target, "downtime target changed");
            } else {
                tracing::warn!(
                    policy = self.policy.name(),
                    "the policy has no downtime target to change"
                );
            }
        }
        if postcopy
            && matches!(
                self.state,
                SrcState::Init
                    | SrcState::AwaitReady { .. }
                    | SrcState::Decide
                    | SrcState::Precopy(_)
                    | SrcState::AwaitRoundReceived(_)
            )
        {
            tracing::info!("switch to post-copy requested");
            self.steer.postcopy_requested = true;
        }
        Ok(())
    }

    /// Auto-converge after a pre-copy round that sent `sent_bytes` while
    /// the guest dirtied `dirtied` pages.
    pub(super) fn converge_step(
        &mut self,
        dirtied: u64,
        sent_bytes: u64,
    ) -> Result<(), MigrationError> {
        let Some(ac) = self.steer.auto_converge else {
            return Ok(());
        };
        let dirtied_bytes = dirtied.saturating_mul(self.layout.page_size().bytes() as u64);
        if dirtied_bytes as u128 * 100 <= sent_bytes as u128 * ac.trigger_pct as u128 {
            return Ok(());
        }
        self.steer.high_dirty_rounds += 1;
        if self.steer.high_dirty_rounds < 2 {
            return Ok(());
        }
        self.steer.high_dirty_rounds = 0;
        let next = ac.next(self.guest.throttle);
        if next == self.guest.throttle {
            return Ok(());
        }
        match self.control.set_throttle(next) {
            Ok(()) => {
                tracing::info!(pct = next, "auto-converge: vCPU throttle raised");
                self.guest.throttle = next;
                self.steer.handle.emit(Event::Throttled { pct: next });
                Ok(())
            }
            Err(e) if e.kind == BackendErrorKind::Unsupported => {
                tracing::warn!(error = %e, "auto-converge: the backend cannot throttle; going on without");
                self.steer.auto_converge = None;
                Ok(())
            }
            Err(e) => Err(MigrationError::Backend {
                op: "throttle the guest",
                source: e,
            }),
        }
    }

    /// Lets the guest run at full speed again.
    pub(super) fn lift_throttle(&mut self) {
        if self.guest.throttle > 0 {
            if let Err(e) = self.control.set_throttle(0) {
                tracing::error!(error = %e, "could not lift the vCPU throttle");
            }
            self.guest.throttle = 0;
        }
    }

    fn phase(&self) -> Option<Phase> {
        Some(match &self.state {
            SrcState::Init | SrcState::AwaitReady { .. } => Phase::Setup,
            SrcState::Decide | SrcState::Precopy(_) | SrcState::AwaitRoundReceived(_) => {
                Phase::Precopy
            }
            SrcState::Final(_) => Phase::StopAndCopy,
            SrcState::Postcopy(_) if !self.wire.committed => Phase::StopAndCopy,
            SrcState::Postcopy(_) | SrcState::AwaitVerified(_) => Phase::Postcopy,
            SrcState::Recovering(_) => Phase::PostcopyPaused,
            SrcState::AwaitResumed => Phase::Completing,
            SrcState::Done(_) => Phase::Completed,
            SrcState::Failed => return None,
        })
    }

    /// The innermost tracing span: the round's, the phase's or the
    /// migration's.
    pub(super) fn current_span(&self) -> tracing::Span {
        if let Some(r) = &self.spans.round {
            return r.clone();
        }
        match &self.spans.phase {
            Some((_, s)) => s.clone(),
            None => self.spans.migration.clone(),
        }
    }

    /// Opens the span of round `number`; its figures are recorded when it
    /// ends ([`Self::close_round_span`]).
    pub(super) fn open_round_span(&mut self, number: u32, final_copy: bool) {
        if self.spans.migration.is_disabled() {
            return;
        }
        self.sync_phase_span();
        let parent = match &self.spans.phase {
            Some((_, s)) => s.clone(),
            None => self.spans.migration.clone(),
        };
        self.spans.round = Some(tracing::info_span!(
            parent: &parent,
            "round",
            number,
            final_copy,
            throttle_pct = self.guest.throttle,
            pages = tracing::field::Empty,
            skipped = tracing::field::Empty,
            zero = tracing::field::Empty,
            bytes = tracing::field::Empty,
            dirtied = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        ));
    }

    /// Records a round's figures in its span and closes it.
    pub(super) fn close_round_span(&mut self, r: &RoundStats) {
        if let Some(s) = self.spans.round.take() {
            s.record("pages", r.sent);
            s.record("skipped", r.skipped);
            s.record("zero", r.zero);
            s.record("bytes", r.bytes);
            s.record("dirtied", r.dirtied);
            s.record("duration_ms", r.delta.as_secs_f64() * 1000.0);
            tracing::info!(parent: &s, "round finished");
        }
    }

    /// Opens the span of the phase the engine is in, if it changed.
    fn sync_phase_span(&mut self) {
        let Some(ph) = self.phase() else {
            return;
        };
        if self.spans.migration.is_disabled()
            || self.spans.phase.as_ref().map(|(p, _)| *p) == Some(ph)
        {
            return;
        }
        let name = ph.name();
        self.spans.phase = Some((
            ph,
            tracing::info_span!(parent: &self.spans.migration, "phase", name),
        ));
    }

    /// Publishes the figures into the handle.
    pub(super) fn publish(&mut self) {
        self.sync_phase_span();
        let phase = self.phase();
        let now = self.now();
        let ps = self.layout.page_size().bytes() as u64;
        let pending = self.pages.pending_count;
        let f = &self.figures;
        let expected = if f.bandwidth > 0.0 {
            Duration::from_secs_f64(pending as f64 * ps as f64 / f.bandwidth) + f.rtt / 2
        } else {
            Duration::ZERO
        };
        let mut h = self.steer.handle.lock();
        let p = &mut h.progress;
        if let Some(phase) = phase {
            p.phase = phase;
        }
        p.round = round_of(&mut self.state).map_or(f.rounds_done, |r| r.number);
        p.pending_pages = pending;
        p.transferred = f.transferred;
        p.normal_pages = f.pages_sent - f.zero_sent;
        p.normal_bytes = p.normal_pages * ps;
        p.zero_pages = f.zero_sent;
        p.bandwidth = f.bandwidth;
        p.dirty_rate = f.dirty_rate;
        p.expected_downtime = expected;
        p.elapsed = f
            .started_at
            .map_or(Duration::ZERO, |s| now.saturating_sub(s));
        p.throttle_pct = self.guest.throttle;
        p.max_bandwidth = self.steer.max_bandwidth;
        p.postcopy_pages = f.postcopy_pages;
        p.postcopy_bytes = f.postcopy_bytes;
        p.postcopy_requests = f.postcopy_requests;
    }

    /// The migration completed with `stats`: says so in its span and
    /// through the handle.
    pub(super) fn completed(&mut self, stats: &MigrationStats) {
        self.spans.round = None;
        self.spans.phase = None;
        let s = &self.spans.migration;
        s.record("transferred", stats.transferred);
        s.record("downtime_ms", stats.downtime.as_secs_f64() * 1000.0);
        s.record("outcome", "completed");
        tracing::info!(parent: s, "migration completed");
        self.steer.handle.lock().progress.phase = Phase::Completed;
        self.steer.handle.emit(Event::Completed);
    }

    /// The migration failed or was cancelled with `err`: says so in its
    /// span and through the handle.
    pub(super) fn ended(&mut self, err: &MigrationError) {
        let cancelled = matches!(err, MigrationError::Cancelled);
        self.spans.round = None;
        self.spans.phase = None;
        let s = &self.spans.migration;
        s.record("transferred", self.figures.transferred);
        s.record("outcome", if cancelled { "cancelled" } else { "failed" });
        self.steer.handle.lock().progress.phase = if cancelled {
            Phase::Cancelled
        } else {
            Phase::Failed
        };
        if cancelled {
            tracing::info!(parent: s, "migration cancelled; the source guest runs on");
            self.steer.handle.emit(Event::Cancelled);
        } else {
            tracing::warn!(parent: s, error = %err, "migration failed");
            self.steer.handle.emit(Event::Failed {
                kind: err.kind(),
                error: err.to_string(),
            });
        }
    }
}

//! Post-copy recovery on the source: when the connection breaks after
//! the switch-over, the guest's memory stays here (frozen since the
//! pause), the engine waits for a new connection, learns which pages the
//! destination holds, and sends the rest again.

use super::*;
use std::hash::{BuildHasher, Hasher};

/// A post-copy waiting for a new connection, or for the destination's
/// answer on one.
pub(in crate::engine) struct Recovery {
    /// The post-copy stage, as it was when the connection broke.
    pub(super) postcopy: Box<Postcopy>,
    /// When the connection broke (the first time, if a new one broke too).
    lost_at: Duration,
    /// Whether a new connection is up and the resume request queued.
    pub(super) connected: bool,
    /// The pages the destination says it holds, as its bitmaps arrive.
    held: DirtyBitmap,
}

impl Recovery {
    /// Adds one of the destination's bitmaps of the pages it holds.
    pub(super) fn add_held(
        &mut self,
        layout: &MemoryLayout,
        first_page: PageNum,
        words: &[u64],
    ) -> Result<(), MigrationError> {
        let bits = DirtyBitmap::from_words(words.to_vec(), words.len() as u64 * 64);
        for i in bits.iter_ones() {
            let page = first_page + i;
            if !layout.contains(page) {
                return Err(MigrationError::PageOutOfRange(page));
            }
            self.held.set(page);
        }
        Ok(())
    }
}

/// A session id: 128 bits from the standard library's randomly keyed
/// hasher (seeded from the operating system), so two migrations do not
/// share one. It names the session; it is not a secret (over TLS, the
/// connection's certificates authenticate the peer).
pub(super) fn session_id() -> u128 {
    let mut id = 0u128;
    for half in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(half);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        id = (id << 64) | u128::from(h.finish());
    }
    id
}

impl<T, S, G, P> SourceEngine<T, S, G, P>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
{
    /// Whether a broken connection would now be recovered from rather
    /// than end the migration: [`EngineConfig::recover_timeout`] is set
    /// and the post-copy device state was handed out (the guest may run
    /// on the destination).
    pub fn recoverable(&self) -> bool {
        self.config.recover_timeout.is_some()
            && self.wire.committed
            && matches!(
                self.state,
                SrcState::Postcopy(_) | SrcState::AwaitVerified(_) | SrcState::Recovering(_)
            )
    }

    /// Whether the engine waits for a new connection to the destination:
    /// the driver connects again (within the recovery timeout, see
    /// [`SourceEngine::poll_timeout`]) and calls
    /// [`SourceEngine::reconnected`].
    pub fn needs_connection(&self) -> bool {
        matches!(&self.state, SrcState::Recovering(r) if !r.connected)
    }

    /// The connection to the destination broke after the frame last
    /// handed out was sent (`err` says how). After the post-copy switch-over
    /// with recovery on ([`SourceEngine::recoverable`]) the engine keeps
    /// the guest's memory, forgets the connection's frames and waits for
    /// a new connection ([`SourceEngine::needs_connection`]): `Ok`.
    /// Otherwise as [`SourceEngine::fail`], whose error comes back.
    ///
    /// A send that failed is not this: call [`SourceEngine::send_failed`]
    /// when the frame that failed was the point-of-no-return record
    /// ([`SourceEngine::last_was_commit`]), which was then not passed.
    pub fn connection_lost(&mut self, err: MigrationError) -> Result<(), MigrationError> {
        if !self.recoverable() {
            return Err(self.fail(err));
        }
        let span = self.current_span();
        let _entered = span.enter();
        self.lose_connection(err);
        self.publish();
        Ok(())
    }

    /// Whether the frame the last [`SourceEngine::poll`] handed out was
    /// the point-of-no-return record.
    pub fn last_was_commit(&self) -> bool {
        self.wire.last_was_commit
    }

    /// A new connection to the destination is up: the engine opens it
    /// with its header and asks the destination to resume the session;
    /// the destination answers with the pages it holds and the push goes
    /// on. Every frame of the new connection is numbered from 0.
    pub fn reconnected(&mut self) -> Result<(), MigrationError> {
        let SrcState::Recovering(r) = &mut self.state else {
            return Err(MigrationError::InvalidUse(
                "reconnected while not waiting for a connection",
            ));
        };
        r.connected = true;
        r.held.clear_all();
        self.reset_wire();
        let outbox = &mut self.wire.outbox;
        outbox.push_back(protocol::encode_to_vec(&Record::Header {
            version: VERSION,
        }));
        outbox.push_back(protocol::encode_to_vec(&Record::Session {
            id: self.session,
            resume: true,
        }));
        tracing::info!("new connection; asking the destination to resume post-copy");
        Ok(())
    }

    /// Enters (or stays in) recovery: only when [`Self::recoverable`].
    pub(super) fn lose_connection(&mut self, err: MigrationError) {
        let now = self.now();
        let (postcopy, lost_at) = match std::mem::replace(&mut self.state, SrcState::Failed) {
            SrcState::Postcopy(p) | SrcState::AwaitVerified(p) => {
                tracing::warn!(error = %err, "post-copy connection lost; waiting for a new one");
                self.steer.handle.emit(Event::ConnectionLost {
                    error: err.to_string(),
                });
                (p, now)
            }
            SrcState::Recovering(r) => {
                tracing::warn!(error = %err, "new connection lost while resuming post-copy");
                (r.postcopy, r.lost_at)
            }
            other => {
                self.state = other;
                return;
            }
        };
        let mut postcopy = postcopy;
        postcopy.urgent.clear();
        self.reset_wire();
        self.state = SrcState::Recovering(Box::new(Recovery {
            postcopy,
            lost_at,
            connected: false,
            held: DirtyBitmap::new(self.layout.page_end()),
        }));
    }

    /// A fresh numbering both ways and nothing queued.
    fn reset_wire(&mut self) {
        let w = &mut self.wire;
        w.decoder = Decoder::sequenced();
        w.sequencer = Sequencer::new();
        w.preempt_sequencer = Sequencer::new();
        w.preempt_decoder = Decoder::preempt(self.layout.page_size());
        w.outbox.clear();
        w.paused_frames = 0;
        w.abort_in_sequence = false;
        w.last_was_commit = false;
        self.timers.wait_since = None;
    }

    /// When the wait for a new connection ends.
    pub(super) fn recovery_deadline(&self) -> Option<Duration> {
        match &self.state {
            SrcState::Recovering(r) => Some(r.lost_at + self.config.recover_timeout?),
            _ => None,
        }
    }

    /// The error to fail with if the wait for a new connection is over.
    pub(super) fn recovery_expired(&self) -> Option<MigrationError> {
        let deadline = self.recovery_deadline()?;
        (self.now() >= deadline).then(|| {
            MigrationError::OutcomeUnknown(format!(
                "the post-copy connection broke and no new connection resumed it within {:?}",
                self.config.recover_timeout.unwrap_or_default()
            ))
        })
    }

    /// The destination's bitmap is complete: every page it does not
    /// hold goes again, and the push goes on.
    pub(super) fn recovered(&mut self, held: u64, now: Duration) -> Result<(), MigrationError> {
        let SrcState::Recovering(r) = std::mem::replace(&mut self.state, SrcState::Failed) else {
            return Err(MigrationError::InvalidUse("not recovering"));
        };
        if r.held.count_ones() != held {
            return Err(MigrationError::Protocol(ProtocolError::OutOfRange {
                what: "pages held (against the bitmaps sent)",
                value: held,
            }));
        }
        let pages = &mut self.pages;
        pages.pending.clear_all();
        for reg in self.layout.regions() {
            pages.pending.set_range(reg.first_page..reg.end());
        }
        pages.pending.subtract(&r.held);
        pages.pending_count = pages.pending.count_ones();
        let missing = pages.pending_count;
        let f = &mut self.figures;
        f.recoveries += 1;
        f.recovered_pages += missing;
        f.recovery_time += now.saturating_sub(r.lost_at);
        tracing::info!(
            missing,
            outage_ms = now.saturating_sub(r.lost_at).as_millis() as u64,
            "post-copy resumed over a new connection"
        );
        self.steer.handle.emit(Event::Recovered {
            missing_pages: missing,
        });
        // Back to the push; with nothing missing it ends at once and the
        // completion goes again.
        self.state = SrcState::Postcopy(r.postcopy);
        Ok(())
    }
}

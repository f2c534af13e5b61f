//! A handle on a running migration: progress, events, cancel and live
//! parameters, usable from any thread while a driver runs the engine.
//!
//! Each engine owns one [`MigrationHandle`] ([`super::SourceEngine::handle`],
//! [`super::DestinationEngine::handle`]); clones share it. The engine
//! publishes its figures into the handle as it goes and reads the
//! requests (cancel, bandwidth, downtime target, post-copy) at its next
//! step, so a request takes effect within one frame or one timer tick.

use crate::error::ErrorKind;
use crate::stats::SwitchReason;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Phase {
    /// Not started, or waiting for the destination to accept the layout
    /// (QEMU `setup`).
    #[default]
    Setup,
    /// Pre-copy rounds with the guest running on the source (QEMU
    /// `active`).
    Precopy,
    /// The guest is paused on the source for the final copy (QEMU
    /// `device`).
    StopAndCopy,
    /// The guest runs on the destination and the rest of its pages follow
    /// (QEMU `postcopy-active`).
    Postcopy,
    /// Post-copy whose connection broke: the destination's guest runs
    /// (its vCPUs that need a missing page wait), the source keeps the
    /// rest of its memory, and both wait for a new connection (QEMU
    /// `postcopy-paused`).
    PostcopyPaused,
    /// Everything was sent; waiting for the destination's confirmation.
    Completing,
    /// The migration completed (QEMU `completed`).
    Completed,
    /// The migration failed (QEMU `failed`).
    Failed,
    /// The migration was cancelled before the point of no return (QEMU
    /// `cancelled`).
    Cancelled,
}

impl Phase {
    /// The phase's name as it serialises (`setup`, `precopy`,
    /// `stop-and-copy`, `postcopy`, `postcopy-paused`, `completing`,
    /// `completed`, `failed`, `cancelled`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Postcopy => "postcopy",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::Completing => "completing",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// A snapshot of a migration's progress ([`MigrationHandle::progress`]).
///
/// The names follow this library's statistics; each field says which
/// member of the `ram` object of QEMU's `query-migrate` it corresponds to.
/// Sizes are bytes, rates per second, durations milliseconds when
/// serialised.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct Progress {
    /// The phase (QEMU's top-level `status`).
    pub phase: Phase,
    /// The current round, from 1; 0 before the first (QEMU
    /// `dirty-sync-count` counts dirty-log syncs instead).
    pub round: u32,
    /// Source: pages still to send (QEMU `remaining` / page size).
    /// Destination: 0.
    pub pending_pages: u64,
    /// Guest pages in the layout (QEMU `total` / page size).
    pub guest_pages: u64,
    /// Page size in bytes (QEMU `page-size`).
    pub page_size: u32,
    /// Bytes put on the wire, or received on the destination, record
    /// overhead included (QEMU `transferred`).
    pub transferred: u64,
    /// Pages sent (or received) with their contents (QEMU `normal`).
    pub normal_pages: u64,
    /// Bytes of those pages' contents (QEMU `normal-bytes`).
    pub normal_bytes: u64,
    /// Zero pages sent (or received) as a flag (QEMU `duplicate`, once
    /// called zero pages).
    pub zero_pages: u64,
    /// Bandwidth estimate from the last round, bytes per second (QEMU
    /// `mbps` is the same in megabits per second).
    pub bandwidth: f64,
    /// Dirty-rate estimate from the last round, pages per second (QEMU
    /// `dirty-pages-rate`).
    pub dirty_rate: f64,
    /// Expected downtime if the guest were paused now: pending bytes over
    /// the bandwidth estimate plus half a round trip (QEMU
    /// `expected-downtime`).
    #[serde(rename = "expected-downtime-ms", with = "crate::stats::ms")]
    pub expected_downtime: Duration,
    /// Time since the migration started (QEMU `total-time`, while
    /// running).
    #[serde(rename = "elapsed-ms", with = "crate::stats::ms")]
    pub elapsed: Duration,
    /// The vCPU throttle auto-converge applies now, percent (QEMU
    /// `cpu-throttle-percentage`).
    pub throttle_pct: u8,
    /// The bandwidth cap in force, bytes per second (QEMU
    /// `max-bandwidth`); `None`: no cap.
    pub max_bandwidth: Option<u64>,
    /// Post-copy: pages pushed or requested after the switch-over (QEMU
    /// `postcopy-bytes` / page size).
    pub postcopy_pages: u64,
    /// Post-copy: bytes sent after the switch-over (QEMU
    /// `postcopy-bytes`).
    pub postcopy_bytes: u64,
    /// Post-copy: pages the destination asked for (QEMU
    /// `postcopy-requests`).
    pub postcopy_requests: u64,
}

/// Something that happened in a migration ([`MigrationHandle::subscribe`],
/// [`MigrationHandle::on_event`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A round started.
    RoundStarted {
        /// Its number, from 1.
        round: u32,
        /// Whether it is the final copy, with the guest paused.
        final_copy: bool,
    },
    /// A round finished.
    RoundFinished {
        /// Its number.
        round: u32,
        /// Pages sent (on the destination, pages the source said it sent).
        pages: u64,
        /// Bytes on the wire (on the destination, received since the
        /// previous round ended).
        bytes: u64,
        /// Pages the guest dirtied during it (0 on the destination, which
        /// is not told).
        dirtied: u64,
        /// Its duration (on the destination, since the previous round
        /// ended).
        duration: Duration,
        /// The vCPU throttle during it, percent (0 on the destination).
        throttle_pct: u8,
    },
    /// Auto-converge changed the vCPU throttle.
    Throttled {
        /// The new throttle, percent.
        pct: u8,
    },
    /// The source paused the guest and switched over.
    SwitchOver {
        /// Whether the rest goes by post-copy.
        postcopy: bool,
        /// Why (on the source; the destination is not told).
        reason: Option<SwitchReason>,
    },
    /// The guest runs on the destination (post-copy: before every page
    /// arrived).
    Resumed,
    /// Post-copy: the connection broke; the migration waits for a new
    /// one ([`Phase::PostcopyPaused`]).
    ConnectionLost {
        /// Why, as text.
        error: String,
    },
    /// Post-copy: a new connection took over; the pages the destination
    /// did not hold go again.
    Recovered {
        /// Pages the destination did not hold (0 on the destination).
        missing_pages: u64,
    },
    /// The migration completed.
    Completed,
    /// The migration failed.
    Failed {
        /// What the caller can do about it.
        kind: ErrorKind,
        /// The error, as text.
        error: String,
    },
    /// The migration was cancelled; the source guest runs on.
    Cancelled,
}

/// Why the handle refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The point of no return was passed: the guest may already run on
    /// the destination, so the migration can only go on.
    #[error("the point of no return was passed: {0}")]
    PointOfNoReturn(&'static str),
    /// The migration already ended.
    #[error("the migration already ended ({0:?})")]
    Ended(Phase),
    /// This side, or this policy, cannot do what was asked.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// A value outside what makes sense (a zero bandwidth cap).
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// The side a handle belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

pub(crate) struct Shared {
    pub(crate) side: Side,
    pub(crate) progress: Progress,
    /// The point of no return was passed (source) or the guest resumed
    /// (destination): cancel is refused from here on.
    pub(crate) committed: bool,
    pub(crate) cancel: bool,
    /// A change of the bandwidth cap not yet applied: `Some(None)` lifts it.
    pub(crate) max_bandwidth: Option<Option<u64>>,
    pub(crate) downtime_target: Option<Duration>,
    pub(crate) postcopy_now: bool,
    subscribers: Vec<Sender<Event>>,
    callbacks: Vec<Callback>,
}

/// A handle on a running migration, on either side. Clones share it; it is
/// `Send + Sync`, so a VMM can watch and steer from any thread while a
/// driver runs the engine.
#[derive(Clone)]
pub struct MigrationHandle {
    inner: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for MigrationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationHandle")
            .field("progress", &self.progress())
            .finish()
    }
}

impl MigrationHandle {
    pub(crate) fn new(side: Side) -> Self {
        MigrationHandle {
            inner: Arc::new(Mutex::new(Shared {
                side,
                progress: Progress::default(),
                committed: false,
                cancel: false,
                max_bandwidth: None,
                downtime_target: None,
                postcopy_now: false,
                subscribers: Vec::new(),
                callbacks: Vec::new(),
            })),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves plain data behind: use it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the progress.
    pub fn progress(&self) -> Progress {
        self.lock().progress.clone()
    }

    /// A channel that receives every event from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.lock().subscribers.push(tx);
        rx
    }

    /// Calls `f` with every event from now on, on the thread that runs the
    /// engine (so `f` should be quick; it may use this handle).
    pub fn on_event(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.lock().callbacks.push(Arc::new(f));
    }

    /// Asks the migration to stop. Before the point of no return the
    /// engine fails with [`crate::MigrationError::Cancelled`] at its next
    /// step: the source guest runs on with dirty tracking stopped (and
    /// its throttle lifted), the destination discards what it received
    /// and never resumes. After it (the completion record or, in
    /// post-copy, the device state was handed out; on the destination,
    /// the guest resumed) the request is refused with the reason.
    pub fn cancel(&self) -> Result<(), ControlError> {
        let mut s = self.lock();
        if let Some(end) = s.ended() {
            return Err(ControlError::Ended(end));
        }
        if s.committed {
            return Err(ControlError::PointOfNoReturn(match s.side {
                Side::Source => {
                    if matches!(s.progress.phase, Phase::Postcopy | Phase::PostcopyPaused) {
                        "post-copy is under way: the guest runs on the destination"
                    } else {
                        "the completion was sent: the destination may be resuming the guest"
                    }
                }
                Side::Destination => "the guest was resumed here",
            }));
        }
        s.cancel = true;
        Ok(())
    }

    /// Whether a cancel was asked for and not refused.
    pub fn cancel_requested(&self) -> bool {
        self.lock().cancel
    }

    /// Caps the bandwidth of the pre-copy stage at `bytes_per_sec`
    /// (`None` lifts the cap). The source paces the frames it hands out
    /// so that, from one frame to the next, the time between them is the
    /// previous frame's size over the cap; the final copy with the guest
    /// paused and post-copy are not capped (as QEMU's `max-bandwidth`).
    pub fn set_max_bandwidth(&self, bytes_per_sec: Option<u64>) -> Result<(), ControlError> {
        if bytes_per_sec == Some(0) {
            return Err(ControlError::Invalid("a bandwidth cap of zero"));
        }
        let mut s = self.source_running()?;
        s.max_bandwidth = Some(bytes_per_sec);
        Ok(())
    }

    /// A new downtime target for the policy, taken at the next decision.
    /// A policy without a downtime target (stop-and-copy, post-copy)
    /// refuses it there, and the engine reports that as a warning.
    pub fn set_downtime_target(&self, target: Duration) -> Result<(), ControlError> {
        let mut s = self.source_running()?;
        s.downtime_target = Some(target);
        Ok(())
    }

    /// Switches a pre-copy or hybrid migration to post-copy now: the
    /// current round ends at its next frame, the guest pauses and the
    /// rest of its memory follows after it resumes on the destination
    /// (QEMU `migrate-start-postcopy`). The destination's sink must be
    /// able to discard pages.
    pub fn switch_to_postcopy(&self) -> Result<(), ControlError> {
        let mut s = self.source_running()?;
        if s.progress.phase != Phase::Setup && s.progress.phase != Phase::Precopy {
            return Err(ControlError::PointOfNoReturn(
                "the guest was already switched over",
            ));
        }
        s.postcopy_now = true;
        Ok(())
    }

    fn source_running(&self) -> Result<MutexGuard<'_, Shared>, ControlError> {
        let s = self.lock();
        if s.side != Side::Source {
            return Err(ControlError::Unsupported(
                "live parameters are set on the source",
            ));
        }
        if let Some(end) = s.ended() {
            return Err(ControlError::Ended(end));
        }
        Ok(s)
    }

    /// Sends `event` to every subscriber and callback.
    pub(crate) fn emit(&self, event: Event) {
        let callbacks = {
            let mut s = self.lock();
            s.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
            s.callbacks.clone()
        };
        for cb in &callbacks {
            cb(&event);
        }
    }
}

impl Shared {
    fn ended(&self) -> Option<Phase> {
        matches!(
            self.progress.phase,
            Phase::Completed | Phase::Failed | Phase::Cancelled
        )
        .then_some(self.progress.phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_is_send_and_sync() {
        assert_send_sync::<MigrationHandle>();
    }

    #[test]
    fn cancel_is_refused_after_the_point_of_no_return_and_after_the_end() {
        let h = MigrationHandle::new(Side::Source);
        h.lock().committed = true;
        assert!(matches!(h.cancel(), Err(ControlError::PointOfNoReturn(_))));
        assert!(!h.cancel_requested());
        h.lock().progress.phase = Phase::Completed;
        assert_eq!(h.cancel(), Err(ControlError::Ended(Phase::Completed)));
    }

    #[test]
    fn live_changes_are_checked() {
        let h = MigrationHandle::new(Side::Source);
        assert!(matches!(
            h.set_max_bandwidth(Some(0)),
            Err(ControlError::Invalid(_))
        ));
        h.lock().progress.phase = Phase::StopAndCopy;
        assert!(matches!(
            h.switch_to_postcopy(),
            Err(ControlError::PointOfNoReturn(_))
        ));
        let d = MigrationHandle::new(Side::Destination);
        assert!(matches!(
            d.set_downtime_target(Duration::from_millis(1)),
            Err(ControlError::Unsupported(_))
        ));
    }

    #[test]
    fn events_reach_channels_and_callbacks() {
        let h = MigrationHandle::new(Side::Source);
        let rx = h.subscribe();
        let seen = Arc::new(Mutex::new(0));
        let s2 = seen.clone();
        h.on_event(move |_| *s2.lock().unwrap() += 1);
        h.emit(Event::Resumed);
        assert_eq!(rx.try_recv(), Ok(Event::Resumed));
        assert_eq!(*seen.lock().unwrap(), 1);
    }
}

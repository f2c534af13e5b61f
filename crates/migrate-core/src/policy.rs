//! Migration policies: pure decisions, no clock, no sleeping, no I/O.
//!
//! Before every round the engine tells the [`Policy`] what happened
//! ([`PolicyInput`]: the last round, the pages the destination still
//! lacks, the bandwidth and dirty-rate estimates, the time `now`), and the
//! policy answers with a [`Decision`]: run another pre-copy round over
//! some pages, stop and copy, or abort. Time comes in as an argument, so
//! the same policy object runs on the simulator's virtual clock and on a
//! real host.
//!
//! Whatever a policy chooses, the engine never loses a page: pages it
//! leaves out of a round stay pending and go in the final copy.

use crate::bitmap::DirtyBitmap;
use crate::page::{PageNum, PageSize};
use crate::stats::SwitchReason;
use std::time::Duration;

/// What the last pre-copy round did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundSummary {
    /// Round number, from 1.
    pub round: u32,
    /// Pages sent.
    pub sent: u64,
    /// Pages skipped as already dirty again.
    pub skipped: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// How long the round took.
    pub duration: Duration,
    /// Pages the guest dirtied during the round.
    pub dirtied: u64,
}

/// What the engine tells a policy before each round.
#[derive(Clone, Copy, Debug)]
pub struct PolicyInput<'a> {
    /// The time now, on the engine's clock.
    pub now: Duration,
    /// Pre-copy rounds completed so far (0 before the first).
    pub rounds_done: u32,
    /// Guest pages in the layout.
    pub guest_pages: u64,
    /// Page size.
    pub page_size: PageSize,
    /// The round just finished, if any.
    pub last_round: Option<&'a RoundSummary>,
    /// Pages the destination does not have in their current state.
    pub pending: &'a DirtyBitmap,
    /// `pending.count_ones()`.
    pub pending_pages: u64,
    /// Pages sent so far, all rounds.
    pub total_pages_sent: u64,
    /// Bytes on the wire so far.
    pub bytes_transferred: u64,
    /// Bandwidth estimate, bytes per second (0 before the first round).
    pub bandwidth: f64,
    /// Dirtying-rate estimate, pages per second (0 before the first round).
    pub dirty_rate: f64,
    /// Round-trip time measured in the handshake.
    pub rtt: Duration,
}

impl PolicyInput<'_> {
    /// How long sending the pending pages would take at the bandwidth
    /// estimate, plus one one-way trip; `None` without an estimate.
    pub fn expected_downtime(&self) -> Option<Duration> {
        if self.bandwidth <= 0.0 {
            return None;
        }
        let bytes = self.pending_pages as f64 * self.page_size.bytes() as f64;
        Some(Duration::from_secs_f64(bytes / self.bandwidth) + self.rtt / 2)
    }
}

/// Which pages a pre-copy round sends, and in what order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageSelection {
    /// Every pending page, in ascending order.
    AllPending,
    /// These pages, in this order (pages not pending are passed over).
    Ordered(Vec<PageNum>),
}

/// What a policy wants done next.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Run one pre-copy round with the guest running.
    Precopy(PageSelection),
    /// Pause the guest and send everything still pending.
    StopAndCopy(SwitchReason),
    /// Pause the guest, move its vCPU and device state, and resume it on
    /// the destination at once; the pending pages follow, pushed in the
    /// policy's order and fetched on demand when the guest faults.
    PostCopy(SwitchReason),
    /// Give up; the source guest keeps running.
    Abort(String),
}

/// A migration policy.
///
/// Only [`Policy::name`] and [`Policy::decide`] are required; the other
/// methods serve policies that sample the dirty log (HCA) or run
/// post-copy, and their defaults do nothing or the obvious thing.
pub trait Policy: Send {
    /// A short name for statistics (`"precopy"`).
    fn name(&self) -> &str;

    /// Called before each round: what to do next.
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision;

    /// How often the engine should sample the dirty log during pre-copy
    /// rounds (`None`: never). Each sample goes to [`Policy::on_sample`].
    fn sample_interval(&self) -> Option<Duration> {
        None
    }

    /// A sample: the pages dirtied since the previous sample.
    fn on_sample(&mut self, _sample: &DirtyBitmap, _now: Duration) {}

    /// Post-copy: the destination faulted on `page` and asked for it.
    /// The engine sends it next; the policy may re-aim its pre-paging.
    fn on_fault(&mut self, _page: PageNum, _now: Duration) {}

    /// Post-copy: appends up to `max` pages from `pending` to push next,
    /// in order. Pages that are not pending are passed over by the engine;
    /// if a policy appends nothing while pages are pending, the engine
    /// pushes them in ascending order.
    fn next_push(&mut self, pending: &DirtyBitmap, max: usize, out: &mut Vec<PageNum>) {
        out.extend(pending.iter_ones().take(max));
    }
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        (**self).decide(input)
    }
    fn sample_interval(&self) -> Option<Duration> {
        (**self).sample_interval()
    }
    fn on_sample(&mut self, sample: &DirtyBitmap, now: Duration) {
        (**self).on_sample(sample, now)
    }
    fn on_fault(&mut self, page: PageNum, now: Duration) {
        (**self).on_fault(page, now)
    }
    fn next_push(&mut self, pending: &DirtyBitmap, max: usize, out: &mut Vec<PageNum>) {
        (**self).next_push(pending, max, out)
    }
}

/// Pause the guest at once and copy all of memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct StopAndCopy;

impl Policy for StopAndCopy {
    fn name(&self) -> &str {
        "stop-and-copy"
    }
    fn decide(&mut self, _input: &PolicyInput<'_>) -> Decision {
        Decision::StopAndCopy(SwitchReason::StopAndCopy)
    }
}

/// Limits of [`Precopy`].
#[derive(Clone, Debug, PartialEq)]
pub struct PrecopyConfig {
    /// Switch over once the pending pages fit this downtime (300 ms).
    pub downtime_target: Duration,
    /// Most pre-copy rounds before switching over anyway (30).
    pub max_rounds: u32,
    /// Switch over once pages sent plus pending exceed this multiple of
    /// guest memory (3.0).
    pub max_transfer_factor: f64,
    /// A round makes progress if it leaves at most this fraction of the
    /// previous round's pending pages (0.95).
    pub progress_ratio: f64,
    /// Switch over after this many rounds in a row without progress (2).
    pub stall_rounds: u32,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_target: Duration::from_millis(300),
            max_rounds: 30,
            max_transfer_factor: 3.0,
            progress_ratio: 0.95,
            stall_rounds: 2,
        }
    }
}

/// Iterative pre-copy: round 1 sends everything, each later round sends
/// what the guest dirtied during the one before, until what is left fits
/// the downtime target or a limit is reached.
#[derive(Clone, Debug, Default)]
pub struct Precopy {
    config: PrecopyConfig,
    last_pending: Option<u64>,
    stalled: u32,
}

impl Precopy {
    /// Pre-copy with the given limits.
    pub fn new(config: PrecopyConfig) -> Self {
        Precopy {
            config,
            last_pending: None,
            stalled: 0,
        }
    }

    /// The limits.
    pub fn config(&self) -> &PrecopyConfig {
        &self.config
    }

    /// The pre-copy switch-over rule on its own, for policies that build on
    /// it (hybrid): `Some(reason)` when pre-copy should stop now.
    pub fn should_switch(&mut self, input: &PolicyInput<'_>) -> Option<SwitchReason> {
        if input.rounds_done == 0 {
            return None;
        }
        let pending = input.pending_pages;
        if pending == 0 {
            return Some(SwitchReason::Converged);
        }
        if let Some(d) = input.expected_downtime() {
            if d <= self.config.downtime_target {
                return Some(SwitchReason::Converged);
            }
        }
        if input.rounds_done >= self.config.max_rounds {
            return Some(SwitchReason::MaxRounds);
        }
        let projected = (input.total_pages_sent + pending) as f64;
        if projected > self.config.max_transfer_factor * input.guest_pages as f64 {
            return Some(SwitchReason::TransferLimit);
        }
        if let Some(prev) = self.last_pending {
            if pending as f64 > prev as f64 * self.config.progress_ratio {
                self.stalled += 1;
            } else {
                self.stalled = 0;
            }
        }
        self.last_pending = Some(pending);
        if self.stalled >= self.config.stall_rounds {
            return Some(SwitchReason::NoProgress);
        }
        None
    }
}

impl Policy for Precopy {
    fn name(&self) -> &str {
        "precopy"
    }

    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        match self.should_switch(input) {
            Some(reason) => Decision::StopAndCopy(reason),
            None => Decision::Precopy(PageSelection::AllPending),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(
        pending: &'a DirtyBitmap,
        rounds_done: u32,
        total_pages_sent: u64,
        bandwidth: f64,
    ) -> PolicyInput<'a> {
        PolicyInput {
            now: Duration::ZERO,
            rounds_done,
            guest_pages: 1000,
            page_size: PageSize::DEFAULT,
            last_round: None,
            pending,
            pending_pages: pending.count_ones(),
            total_pages_sent,
            bytes_transferred: 0,
            bandwidth,
            dirty_rate: 0.0,
            rtt: Duration::ZERO,
        }
    }

    fn pending(n: u64) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(1000);
        b.set_range(0..n);
        b
    }

    #[test]
    fn first_round_sends_everything() {
        let p = pending(1000);
        assert_eq!(
            Precopy::default().decide(&input(&p, 0, 0, 0.0)),
            Decision::Precopy(PageSelection::AllPending)
        );
    }

    #[test]
    fn converges_when_pending_fits_target() {
        // 100 pages = 409600 B at 10 MB/s = 41 ms < 300 ms.
        let p = pending(100);
        assert_eq!(
            Precopy::default().decide(&input(&p, 1, 1000, 10e6)),
            Decision::StopAndCopy(SwitchReason::Converged)
        );
        // at 1 MB/s it is 410 ms: keep going.
        assert_eq!(
            Precopy::default().decide(&input(&p, 1, 1000, 1e6)),
            Decision::Precopy(PageSelection::AllPending)
        );
    }

    #[test]
    fn limits_stop_a_migration_that_does_not_converge() {
        let p = pending(900);
        let mut pol = Precopy::default();
        assert_eq!(
            pol.decide(&input(&p, 30, 1000, 1.0)),
            Decision::StopAndCopy(SwitchReason::MaxRounds)
        );
        let mut pol = Precopy::default();
        assert_eq!(
            pol.decide(&input(&p, 3, 2500, 1.0)),
            Decision::StopAndCopy(SwitchReason::TransferLimit)
        );
        let mut pol = Precopy::default();
        assert_eq!(
            pol.decide(&input(&p, 1, 1000, 1.0)),
            Decision::Precopy(PageSelection::AllPending)
        );
        assert_eq!(
            pol.decide(&input(&p, 2, 1100, 1.0)),
            Decision::Precopy(PageSelection::AllPending)
        );
        assert_eq!(
            pol.decide(&input(&p, 3, 1200, 1.0)),
            Decision::StopAndCopy(SwitchReason::NoProgress)
        );
    }

    #[test]
    fn stop_and_copy_stops_at_once() {
        let p = pending(1000);
        assert_eq!(
            StopAndCopy.decide(&input(&p, 0, 0, 0.0)),
            Decision::StopAndCopy(SwitchReason::StopAndCopy)
        );
    }
}

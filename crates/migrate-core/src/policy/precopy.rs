//! Iterative pre-copy, the policy Xen and QEMU use by default.

use super::{Decision, PageSelection, Policy, PolicyInput};
use crate::stats::SwitchReason;
use std::time::Duration;

/// Limits of [`Precopy`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
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

    fn set_downtime_target(&mut self, target: Duration) -> bool {
        self.config.downtime_target = target;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DirtyBitmap;
    use crate::page::PageSize;
    use crate::policy::StopAndCopy;

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

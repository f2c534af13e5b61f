//! HCA, the Hierarchical Copy Algorithm.
//!
//! The seed paper (Liu et al., CyberC 2010) is public only as an abstract:
//! per-page modification counts instead of 0/1 dirty bits, measured
//! early; pages sent in tiers from cold to hot; hot pages held back for
//! the final copy. This is our reconstruction of it:
//!
//! - **Measure.** During every pre-copy round (the first one included) the
//!   engine samples the dirty log every `sample_interval` (50 ms) and the
//!   policy adds one to a saturating per-page count for each sample that
//!   saw the page written ([`PageCounts`]). Every `decay_interval` (1 s)
//!   of sampling the counts are halved `decay_shift` times, so old
//!   activity fades and pages move between tiers. Decay follows time, not
//!   rounds: late rounds last milliseconds, and halving per round would
//!   cool a page that is written all the time.
//! - **Tier.** Count 0: cold. Below `hot_threshold`: warm. At or above:
//!   hot.
//! - **Send.** Round 1 sends everything (nothing is measured yet). Each
//!   later round sends the pending cold pages, then the pending warm pages;
//!   pending hot pages are held back, since sending them would only see
//!   them dirtied again. Held-back pages stay pending: the final copy
//!   sends them.
//! - **Tail.** When the rounds have reduced what is pending to (mostly)
//!   hot pages that do not fit the downtime target (or stopped reducing
//!   the rest: then the tail is a single round), the hot tier is
//!   released: from then on each round sends everything pending, cold
//!   first and the hot tier last, from the least to the most written, so
//!   the hottest pages go out just before the pause; the rounds go on under
//!   pre-copy's switch rule (until what is pending fits the target or the
//!   rounds stop shrinking it). The rounds before the tail never resent a
//!   hot page; the tail ends like pre-copy. With `hot_pass: false` the hot
//!   tier is never released and goes in the paused copy alone.
//! - **Switch.** When everything pending fits the downtime target; when
//!   only (mostly) hot pages are pending, or two rounds in a row did not
//!   shrink the cold and warm part by 5 % (pre-copy's progress rule), and
//!   the tail is off, empty or over; and by the round and transfer limits.

use super::{Decision, PageSelection, Policy, PolicyInput, Precopy, PrecopyConfig};
use crate::bitmap::{DirtyBitmap, PageCounts};
use crate::page::PageNum;
use crate::stats::SwitchReason;
use std::time::Duration;

/// Settings of [`Hca`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HcaConfig {
    /// Interval between samples of the dirty log (50 ms).
    pub sample_interval: Duration,
    /// Count at which a page is hot (3 samples).
    pub hot_threshold: u8,
    /// Halve the counts this many times ... (1)
    pub decay_shift: u32,
    /// ... every this much time (1 s).
    pub decay_interval: Duration,
    /// Switch over when the pending pages fit this downtime (300 ms) ...
    pub downtime_target: Duration,
    /// ... and at least this share of them is hot (0.95).
    pub hot_share: f64,
    /// Release the hot tier for a pre-copy-like tail before switching over
    /// (true).
    pub hot_pass: bool,
    /// Most pre-copy rounds (30).
    pub max_rounds: u32,
    /// Most total transfer, as a multiple of guest memory (3.0).
    pub max_transfer_factor: f64,
}

impl Default for HcaConfig {
    fn default() -> Self {
        HcaConfig {
            sample_interval: Duration::from_millis(50),
            hot_threshold: 3,
            decay_shift: 1,
            decay_interval: Duration::from_secs(1),
            downtime_target: Duration::from_millis(300),
            hot_share: 0.95,
            hot_pass: true,
            max_rounds: 30,
            max_transfer_factor: 3.0,
        }
    }
}

/// The Hierarchical Copy Algorithm.
#[derive(Clone, Debug)]
pub struct Hca {
    config: HcaConfig,
    counts: PageCounts,
    samples: u64,
    last_decay: Option<Duration>,
    /// Set once the hot tier is released: the pre-copy rule for the tail.
    tail: Option<Precopy>,
    /// Cold and warm pages pending at the last decision, and how many
    /// rounds in a row failed to shrink them.
    last_not_hot: Option<u64>,
    stalled: u32,
    /// Tail rounds still allowed when the tail began on a stall.
    tail_rounds_left: Option<u32>,
    /// Tier sizes of the last decision: (cold, warm, hot) pending pages.
    last_tiers: (u64, u64, u64),
}

impl Hca {
    /// HCA with these settings.
    pub fn new(config: HcaConfig) -> Self {
        Hca {
            config,
            counts: PageCounts::default(),
            samples: 0,
            last_decay: None,
            tail: None,
            last_not_hot: None,
            stalled: 0,
            tail_rounds_left: None,
            last_tiers: (0, 0, 0),
        }
    }

    /// The settings.
    pub fn config(&self) -> &HcaConfig {
        &self.config
    }

    /// The per-page counts.
    pub fn counts(&self) -> &PageCounts {
        &self.counts
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Pending pages per tier at the last decision: (cold, warm, hot).
    pub fn last_tiers(&self) -> (u64, u64, u64) {
        self.last_tiers
    }

    fn tiers(&self, pending: &DirtyBitmap) -> (Vec<PageNum>, Vec<PageNum>, Vec<PageNum>) {
        let (mut cold, mut warm, mut hot) = (Vec::new(), Vec::new(), Vec::new());
        for p in pending.iter_ones() {
            match self.counts.get(p) {
                0 => cold.push(p),
                c if c < self.config.hot_threshold => warm.push(p),
                _ => hot.push(p),
            }
        }
        (cold, warm, hot)
    }
}

impl Default for Hca {
    fn default() -> Self {
        Self::new(HcaConfig::default())
    }
}

impl Policy for Hca {
    fn name(&self) -> &str {
        "hca"
    }

    fn set_downtime_target(&mut self, target: Duration) -> bool {
        self.config.downtime_target = target;
        true
    }

    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        if input.rounds_done == 0 {
            return Decision::Precopy(PageSelection::AllPending);
        }
        if input.pending_pages == 0 {
            return Decision::StopAndCopy(SwitchReason::Converged);
        }
        let (cold, warm, mut hot) = self.tiers(input.pending);
        self.last_tiers = (cold.len() as u64, warm.len() as u64, hot.len() as u64);
        let not_hot = (cold.len() + warm.len()) as u64;
        let fits = input
            .expected_downtime()
            .is_some_and(|d| d <= self.config.downtime_target);
        let mostly_hot =
            not_hot as f64 <= (1.0 - self.config.hot_share) * input.pending_pages as f64;
        if fits {
            return Decision::StopAndCopy(SwitchReason::Converged);
        }
        if self.tail.is_none() {
            // Pre-copy's progress rule, on the part HCA still sends.
            if let Some(prev) = self.last_not_hot {
                if not_hot as f64 > prev as f64 * 0.95 {
                    self.stalled += 1;
                } else {
                    self.stalled = 0;
                }
            }
            self.last_not_hot = Some(not_hot);
        }
        if (mostly_hot || self.stalled >= 2) && self.tail.is_none() {
            if !self.config.hot_pass || hot.is_empty() {
                // What is left is what the guest keeps writing: more rounds
                // would resend it for nothing, and it does not fit.
                return Decision::StopAndCopy(SwitchReason::NoProgress);
            }
            if !mostly_hot {
                // The rounds stalled with much still pending: one pass
                // over everything, hottest last, then stop.
                self.tail_rounds_left = Some(1);
            }
            self.tail = Some(Precopy::new(PrecopyConfig {
                downtime_target: self.config.downtime_target,
                max_rounds: self.config.max_rounds,
                max_transfer_factor: self.config.max_transfer_factor,
                ..PrecopyConfig::default()
            }));
        }
        if let Some(rule) = self.tail.as_mut() {
            if let Some(reason) = rule.should_switch(input) {
                return Decision::StopAndCopy(reason);
            }
            match self.tail_rounds_left.as_mut() {
                Some(0) => return Decision::StopAndCopy(SwitchReason::NoProgress),
                Some(n) => *n -= 1,
                None => {}
            }
            hot.sort_by_key(|p| self.counts.get(*p));
            let mut order = cold;
            order.extend(warm);
            order.extend(hot);
            return Decision::Precopy(PageSelection::Ordered(order));
        }
        if input.rounds_done >= self.config.max_rounds {
            return Decision::StopAndCopy(SwitchReason::MaxRounds);
        }
        let projected = (input.total_pages_sent + input.pending_pages) as f64;
        if projected > self.config.max_transfer_factor * input.guest_pages as f64 {
            return Decision::StopAndCopy(SwitchReason::TransferLimit);
        }
        let mut order = cold;
        order.extend(warm);
        Decision::Precopy(PageSelection::Ordered(order))
    }

    fn sample_interval(&self) -> Option<Duration> {
        Some(self.config.sample_interval)
    }

    fn on_sample(&mut self, sample: &DirtyBitmap, now: Duration) {
        if self.counts.len() < sample.len() {
            self.counts = PageCounts::new(sample.len());
        }
        let since = *self.last_decay.get_or_insert(now);
        if now.saturating_sub(since) >= self.config.decay_interval {
            self.counts.decay(self.config.decay_shift);
            self.last_decay = Some(now);
        }
        self.counts.add_sample(sample);
        self.samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageSize;

    fn input<'a>(pending: &'a DirtyBitmap, rounds_done: u32, bandwidth: f64) -> PolicyInput<'a> {
        PolicyInput {
            now: Duration::ZERO,
            rounds_done,
            guest_pages: pending.len(),
            page_size: PageSize::DEFAULT,
            last_round: None,
            pending,
            pending_pages: pending.count_ones(),
            total_pages_sent: pending.len(),
            bytes_transferred: 0,
            bandwidth,
            dirty_rate: 0.0,
            rtt: Duration::ZERO,
        }
    }

    #[test]
    fn holds_hot_pages_back_and_sends_cold_before_warm() {
        let mut hca = Hca::default();
        let mut hot = DirtyBitmap::new(100);
        hot.set_range(0..10);
        let mut warm = DirtyBitmap::new(100);
        warm.set(50);
        // Pages 0..10 in every sample, page 50 in one.
        for i in 0..8 {
            hca.on_sample(if i == 0 { &warm } else { &hot }, Duration::ZERO);
        }
        hca.on_sample(&hot, Duration::ZERO);
        let mut pending = DirtyBitmap::new(100);
        pending.set_range(0..10);
        pending.set(50);
        pending.set(70);
        // Slow link: nothing fits, so a round is run.
        match hca.decide(&input(&pending, 1, 1.0)) {
            Decision::Precopy(PageSelection::Ordered(order)) => assert_eq!(order, vec![70, 50]),
            other => panic!("expected an ordered round, got {other:?}"),
        }
        assert_eq!(hca.last_tiers(), (1, 1, 10));
    }

    #[test]
    fn switches_when_what_is_left_is_hot_and_fits() {
        let mut hca = Hca::default();
        let mut hot = DirtyBitmap::new(100);
        hot.set_range(0..10);
        for _ in 0..5 {
            hca.on_sample(&hot, Duration::ZERO);
        }
        assert_eq!(
            hca.decide(&input(&hot, 2, 1e9)),
            Decision::StopAndCopy(SwitchReason::Converged)
        );
        // Too slow for the hot set: the hot tier is released and rounds go
        // on as pre-copy's until they stop shrinking what is pending.
        match hca.decide(&input(&hot, 2, 1.0)) {
            Decision::Precopy(PageSelection::Ordered(order)) => assert_eq!(order.len(), 10),
            other => panic!("expected a tail round, got {other:?}"),
        }
        let _ = hca.decide(&input(&hot, 3, 1.0));
        assert_eq!(
            hca.decide(&input(&hot, 4, 1.0)),
            Decision::StopAndCopy(SwitchReason::NoProgress)
        );
        let mut held = Hca::new(HcaConfig {
            hot_pass: false,
            ..HcaConfig::default()
        });
        for _ in 0..5 {
            held.on_sample(&hot, Duration::ZERO);
        }
        assert_eq!(
            held.decide(&input(&hot, 2, 1.0)),
            Decision::StopAndCopy(SwitchReason::NoProgress)
        );
    }

    #[test]
    fn counts_decay_with_time_not_rounds() {
        let mut hca = Hca::default();
        let mut hot = DirtyBitmap::new(10);
        hot.set(1);
        for i in 0..10 {
            hca.on_sample(&hot, Duration::from_millis(50 * i));
        }
        assert_eq!(hca.counts().get(1), 10);
        // Many short rounds in quick succession do not cool the page.
        let pending = hot.clone();
        for _ in 0..5 {
            let _ = hca.decide(&input(&pending, 3, 1.0));
        }
        assert_eq!(hca.counts().get(1), 10);
        // A second later the count has halved (and this sample added one).
        hca.on_sample(&hot, Duration::from_millis(1500));
        assert_eq!(hca.counts().get(1), 6);
    }

    #[test]
    fn first_round_sends_everything_and_asks_for_samples() {
        let hca_ = Hca::default();
        assert_eq!(hca_.sample_interval(), Some(Duration::from_millis(50)));
        let mut hca = hca_;
        let pending = DirtyBitmap::new(10);
        assert_eq!(
            hca.decide(&input(&pending, 0, 0.0)),
            Decision::Precopy(PageSelection::AllPending)
        );
    }
}

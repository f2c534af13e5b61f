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

pub mod hca;
mod hybrid;
mod kind;
pub mod postcopy;
mod precopy;
pub mod prepaging;
mod stop_and_copy;

pub use hca::{Hca, HcaConfig};
pub use hybrid::{Hybrid, HybridConfig};
pub use kind::{PolicyConfig, PolicyKind, UnknownPolicy};
pub use postcopy::PostCopy;
pub use precopy::{Precopy, PrecopyConfig};
pub use prepaging::{Prepager, Prepaging, UnknownPrepaging};
pub use stop_and_copy::StopAndCopy;

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

    /// A new downtime target while the migration runs (a VMM's live
    /// change through [`crate::MigrationHandle::set_downtime_target`]).
    /// Returns whether the policy took it; the default, for policies
    /// without a downtime target, refuses.
    fn set_downtime_target(&mut self, _target: Duration) -> bool {
        false
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
    fn set_downtime_target(&mut self, target: Duration) -> bool {
        (**self).set_downtime_target(target)
    }
}

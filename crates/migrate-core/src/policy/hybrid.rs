//! The hybrid policy: pre-copy rounds first, switching to post-copy only
//! when pre-copy would not converge in time; if pre-copy converges it
//! finishes as pre-copy.

use super::prepaging::{Prepager, Prepaging};
use super::{Decision, PageSelection, Policy, PolicyInput, Precopy, PrecopyConfig};
use crate::bitmap::DirtyBitmap;
use crate::page::PageNum;
use crate::stats::SwitchReason;
use std::time::Duration;

/// Settings of [`Hybrid`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HybridConfig {
    /// The pre-copy rule that decides when pre-copy will not converge.
    /// Its round limit defaults to 5: past that, post-copy is cheaper.
    pub precopy: PrecopyConfig,
    /// Push order once in post-copy.
    pub prepaging: Prepaging,
}

impl Default for HybridConfig {
    fn default() -> Self {
        HybridConfig {
            precopy: PrecopyConfig {
                max_rounds: 5,
                ..PrecopyConfig::default()
            },
            prepaging: Prepaging::default(),
        }
    }
}

/// Pre-copy first; post-copy if pre-copy would not converge.
#[derive(Clone, Debug)]
pub struct Hybrid {
    precopy: Precopy,
    prepager: Prepager,
}

impl Hybrid {
    /// A hybrid policy with these settings.
    pub fn new(config: HybridConfig) -> Self {
        Hybrid {
            precopy: Precopy::new(config.precopy),
            prepager: Prepager::new(config.prepaging),
        }
    }
}

impl Default for Hybrid {
    fn default() -> Self {
        Self::new(HybridConfig::default())
    }
}

impl Policy for Hybrid {
    fn name(&self) -> &str {
        "hybrid"
    }
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        match self.precopy.should_switch(input) {
            None => Decision::Precopy(PageSelection::AllPending),
            Some(SwitchReason::Converged) => Decision::StopAndCopy(SwitchReason::Converged),
            Some(reason) => Decision::PostCopy(reason),
        }
    }
    fn on_fault(&mut self, page: PageNum, _now: Duration) {
        self.prepager.on_fault(page);
    }
    fn next_push(&mut self, pending: &DirtyBitmap, max: usize, out: &mut Vec<PageNum>) {
        self.prepager.next_pages(pending, max, out);
    }
    fn set_downtime_target(&mut self, target: Duration) -> bool {
        Policy::set_downtime_target(&mut self.precopy, target)
    }
}

//! Post-copy and hybrid policies.
//!
//! **Post-copy** moves the guest at once: the source pauses it, sends its
//! vCPU and device state, and the destination resumes it before any memory
//! has arrived. Every access to a page the destination does not have yet
//! is a network fault: the destination asks for the page, the faulting
//! vCPU waits a round trip plus the page's transfer. Meanwhile the source
//! pushes the remaining pages in a [`Prepaging`] order; a faulted page
//! jumps the queue. Every page crosses the network once.
//!
//! **Hybrid** runs pre-copy rounds first and switches to post-copy only
//! when pre-copy would not converge in time; if pre-copy converges it
//! finishes as pre-copy.

use crate::bitmap::DirtyBitmap;
use crate::page::PageNum;
use crate::policy::{Decision, PageSelection, Policy, PolicyInput, Precopy, PrecopyConfig};
use crate::prepaging::{Prepager, Prepaging};
use crate::stats::SwitchReason;
use std::time::Duration;

/// Post-copy from the start.
#[derive(Clone, Debug)]
pub struct PostCopy {
    prepager: Prepager,
}

impl PostCopy {
    /// Post-copy pushing in `prepaging` order.
    pub fn new(prepaging: Prepaging) -> Self {
        PostCopy {
            prepager: Prepager::new(prepaging),
        }
    }
}

impl Default for PostCopy {
    fn default() -> Self {
        Self::new(Prepaging::default())
    }
}

impl Policy for PostCopy {
    fn name(&self) -> &str {
        "postcopy"
    }
    fn decide(&mut self, _input: &PolicyInput<'_>) -> Decision {
        Decision::PostCopy(SwitchReason::PostCopy)
    }
    fn on_fault(&mut self, page: PageNum, _now: Duration) {
        self.prepager.on_fault(page);
    }
    fn next_push(&mut self, pending: &DirtyBitmap, max: usize, out: &mut Vec<PageNum>) {
        self.prepager.next_pages(pending, max, out);
    }
}

/// Settings of [`Hybrid`].
#[derive(Clone, Debug, PartialEq)]
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
}

//! The post-copy policy.
//!
//! **Post-copy** moves the guest at once: the source pauses it, sends its
//! vCPU and device state, and the destination resumes it before any memory
//! has arrived. Every access to a page the destination does not have yet
//! is a network fault: the destination asks for the page, the faulting
//! vCPU waits a round trip plus the page's transfer. Meanwhile the source
//! pushes the remaining pages in a [`Prepaging`] order; a faulted page
//! jumps the queue. Every page crosses the network once.
//!
//! [`Hybrid`](super::Hybrid) runs pre-copy first and post-copy only when
//! pre-copy would not converge.

use super::prepaging::{Prepager, Prepaging};
use super::{Decision, Policy, PolicyInput};
use crate::bitmap::DirtyBitmap;
use crate::page::PageNum;
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

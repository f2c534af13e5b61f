//! Stop-and-copy: pause the guest, copy everything, resume it on the
//! destination. The baseline every other policy is measured against.

use super::{Decision, Policy, PolicyInput};
use crate::stats::SwitchReason;

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

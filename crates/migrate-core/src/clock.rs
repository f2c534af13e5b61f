//! Clocks: the host's, and a virtual one for simulation.
//!
//! The engine reads time only through [`Clock`]; policies never read it at
//! all (they are handed `now`). A simulated migration therefore runs the
//! same code on a [`VirtualClock`] that jumps from event to event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A monotonic clock measured from an arbitrary epoch.
pub trait Clock: Send + Sync {
    /// Time since the clock's epoch.
    fn now(&self) -> Duration;

    /// CPU time the calling thread has used, where the host can say.
    /// Used for the `dom0 %` column; `None` prints as 0 %.
    fn thread_cpu_time(&self) -> Option<Duration> {
        None
    }
}

/// The host's monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    epoch: Instant,
}

impl SystemClock {
    /// A clock whose epoch is now.
    pub fn new() -> Self {
        SystemClock {
            epoch: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn thread_cpu_time(&self) -> Option<Duration> {
        // Linux: the first field of schedstat is nanoseconds on the CPU.
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(ns))
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct VirtualClock {
    ns: Arc<AtomicU64>,
}

impl VirtualClock {
    /// A virtual clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock to `t`. Time never goes backwards: an earlier `t`
    /// is ignored.
    pub fn set(&self, t: Duration) {
        self.ns
            .fetch_max(t.as_nanos().min(u64::MAX as u128) as u64, Ordering::SeqCst);
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.ns.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_is_shared_and_monotonic() {
        let a = VirtualClock::new();
        let b = a.clone();
        a.set(Duration::from_millis(5));
        assert_eq!(b.now(), Duration::from_millis(5));
        b.set(Duration::from_millis(1));
        assert_eq!(a.now(), Duration::from_millis(5));
        b.advance(Duration::from_millis(2));
        assert_eq!(a.now(), Duration::from_millis(7));
    }

    #[test]
    fn system_clock_moves_forward() {
        let c = SystemClock::new();
        let t0 = c.now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.now() > t0);
    }
}

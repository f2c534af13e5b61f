//! Running a whole migration in virtual time.
//!
//! [`simulate`] builds a source and a destination [`SimGuest`], connects
//! their engines through a modelled [`Link`] and runs the migration as a
//! discrete-event simulation on one [`VirtualClock`]: the clock jumps
//! from one event (a frame leaving, a frame arriving) to the next, so a
//! run is exact, repeatable bit for bit, and takes as long as the work of
//! copying the pages, not as long as the migration it models.
//!
//! The link serialises frames one after another at its bandwidth and
//! delivers each after its latency; the source may not start the next
//! frame until the previous one is on the wire, as a sender whose socket
//! buffer is full.

use crate::guest::SimGuest;
use crate::memory::MemoryMode;
use crate::workload::{WorkloadError, WorkloadSpec};
use migrate_core::protocol::abort_frame;
use migrate_core::{Clock, GuestControl, MigrationError, MigrationStats, Policy, VirtualClock};
use migrate_core::{
    DestStatus, DestinationEngine, DestinationReport, EngineConfig, SourceEngine, SourceStep,
};
use migrate_core::{MemoryLayout, PageNum};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

/// A network link: bandwidth and one-way latency, the same both ways.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bits per second.
    pub bandwidth_bps: f64,
    /// One-way latency.
    pub latency: Duration,
}

impl Link {
    /// A link of `bandwidth_bps` bits per second and `latency` one way.
    pub fn new(bandwidth_bps: f64, latency: Duration) -> Self {
        Link {
            bandwidth_bps,
            latency,
        }
    }

    /// Time to put `bytes` on the wire.
    pub fn serialisation(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.bandwidth_bps)
    }
}

/// Everything a simulated migration needs.
pub struct SimConfig {
    /// Guest memory layout.
    pub layout: MemoryLayout,
    /// How simulated memory is stored.
    pub mode: MemoryMode,
    /// What the guest does.
    pub workload: WorkloadSpec,
    /// The link between source and destination.
    pub link: Link,
    /// The policy.
    pub policy: Box<dyn Policy>,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Stop the simulation if virtual time passes this (a safety net).
    pub time_limit: Duration,
    /// Pages the simulated hypervisor maps as the guest resumes (see
    /// [`SimGuest::set_resume_pages`]); usually empty.
    pub resume_pages: Vec<PageNum>,
}

/// Why a simulation could not run or finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The workload description is invalid.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The link description is invalid.
    #[error("invalid link: {0}")]
    Link(String),
    /// The migration failed.
    #[error("migration failed: {0}")]
    Migration(#[from] MigrationError),
    /// Neither side had anything to do: a bug in an engine or policy.
    #[error("simulation stalled at {0:?}: no side can make progress")]
    Stalled(Duration),
    /// Virtual time passed the configured limit.
    #[error("simulation passed its time limit of {0:?}")]
    TimeLimit(Duration),
}

/// The outcome of a simulated migration.
#[derive(Debug)]
#[non_exhaustive]
pub struct SimReport {
    /// The source's statistics.
    pub stats: MigrationStats,
    /// The destination's counters.
    pub dest: DestinationReport,
    /// Pause to resume on the shared virtual clock: the true downtime, to
    /// check the engine's measurement against.
    pub true_downtime: Duration,
    /// The source's guest progress counter at pause.
    pub counter_at_pause: u64,
    /// The destination's guest progress counter at the instant of resume.
    pub counter_at_resume: u64,
    /// Whether the destination's memory equals the source's, byte for
    /// byte: at the instant of resume after pre-copy; after post-copy, once
    /// the source replayed the accesses the destination guest made since.
    pub memory_equal: bool,
    /// Post-copy: time the destination's vCPU spent waiting for pages, as
    /// the simulated guest saw it.
    pub true_stall: Duration,
    /// Post-copy: faults the simulated guest took.
    pub true_faults: u64,
    /// The source guest, paused, after the migration.
    pub source: SimGuest,
    /// The destination guest, after the migration (paused by the harness
    /// after post-copy, so the comparison above holds still).
    pub destination: SimGuest,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    ToDest,
    ToSource,
}

/// A frame in flight: (arrival time, sequence number for ties, direction, frame).
type Delivery = (Duration, u64, Dir, Vec<u8>);

/// The backward link: replies leave in order after serialisation.
struct Wire {
    link: Link,
    free: Duration,
}

impl Wire {
    fn send(&mut self, at: Duration, bytes: usize) -> Duration {
        let depart = at.max(self.free) + self.link.serialisation(bytes);
        self.free = depart;
        depart + self.link.latency
    }
}

/// Runs one migration in virtual time.
pub fn simulate(config: SimConfig) -> Result<SimReport, SimError> {
    let SimConfig {
        layout,
        mode,
        workload,
        link,
        policy,
        engine,
        time_limit,
        resume_pages,
    } = config;
    if !(link.bandwidth_bps.is_finite() && link.bandwidth_bps > 0.0) {
        return Err(SimError::Link("bandwidth must be positive".into()));
    }
    let clock = VirtualClock::new();
    let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let src = SimGuest::source(layout.clone(), mode, workload.clone(), dyn_clock.clone())?;
    let dst = SimGuest::destination(layout, mode, workload, dyn_clock.clone())?;
    src.set_resume_pages(resume_pages.clone());
    dst.set_resume_pages(resume_pages);
    let mut source = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        dyn_clock.clone(),
        engine,
    );
    let mut dest = DestinationEngine::new(dst.pages(), dst.control(), dyn_clock);

    let mut events: BinaryHeap<Reverse<Delivery>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut fwd = Wire {
        link,
        free: Duration::ZERO,
    };
    let mut back = Wire {
        link,
        free: Duration::ZERO,
    };
    let mut src_ready = Duration::ZERO;
    let mut src_waiting = false;
    let mut dest_done = false;
    let mut at_resume: Option<(bool, u64)> = None;

    let stats = loop {
        let next_delivery = events.peek().map(|Reverse((t, ..))| *t);
        let next_access = if dest.in_postcopy() {
            dst.next_fault_check()
        } else {
            None
        };
        let src_at = (!src_waiting).then_some(src_ready);
        let earliest = [next_delivery, next_access, src_at]
            .into_iter()
            .flatten()
            .min();
        let Some(now) = earliest else {
            return Err(SimError::Stalled(clock.now()));
        };
        if now > time_limit {
            return Err(SimError::TimeLimit(time_limit));
        }
        clock.set(now);
        if next_delivery == Some(now) {
            let Some(Reverse((t, _, dir, frame))) = events.pop() else {
                continue;
            };
            match dir {
                Dir::ToDest => {
                    if dest_done {
                        continue;
                    }
                    let status = match dest.handle_frame(&frame) {
                        Ok(s) => s,
                        Err(e) => {
                            // Tell the source, as a real destination would.
                            let _ = source.handle_frame(&abort_frame(&e.to_string()));
                            return Err(e.into());
                        }
                    };
                    if status != DestStatus::Continue && at_resume.is_none() {
                        // Compare at the resume instant, before the
                        // destination guest runs on and writes.
                        let equal = status == DestStatus::Completed && src.same_memory(&dst);
                        at_resume = Some((equal, dst.progress_counter()));
                    }
                    dest_done = status == DestStatus::Completed;
                    while let Some(reply) = dest.poll_transmit() {
                        seq += 1;
                        let arrive = back.send(t, reply.len());
                        events.push(Reverse((arrive, seq, Dir::ToSource, reply)));
                    }
                }
                Dir::ToSource => {
                    source.handle_frame(&frame)?;
                    src_waiting = false;
                    src_ready = src_ready.max(t);
                }
            }
        } else if next_access == Some(now) {
            // The destination guest's next access is due: run it; if it
            // touches a missing page, ask for the page now.
            let faults = dst.take_faults();
            if !faults.is_empty() {
                let pages: Vec<_> = faults.iter().map(|(p, _)| *p).collect();
                dest.request_pages(&pages)?;
                while let Some(req) = dest.poll_transmit() {
                    seq += 1;
                    let arrive = back.send(now, req.len());
                    events.push(Reverse((arrive, seq, Dir::ToSource, req)));
                }
            }
        } else {
            match source.poll()? {
                SourceStep::Send(frame) => {
                    let arrive = fwd.send(src_ready, frame.len());
                    src_ready = fwd.free;
                    seq += 1;
                    events.push(Reverse((arrive, seq, Dir::ToDest, frame)));
                }
                SourceStep::Wait => src_waiting = true,
                SourceStep::Done => match source.stats() {
                    Some(s) => break s.clone(),
                    None => return Err(SimError::Stalled(src_ready)),
                },
            }
        }
    };

    let paused = src.paused_at().unwrap_or_default();
    let resumed = dst.resumed_at().unwrap_or_default();
    let (mut memory_equal, counter_at_resume) = at_resume.unwrap_or((false, 0));
    let (true_stall, true_faults) = dst.stall_stats();
    let counter_at_pause = src.progress_counter();
    if stats.postcopy.is_some() {
        // The destination guest has run on since resume. Freeze it, let the
        // source make the same accesses, and compare.
        dst.control()
            .pause()
            .map_err(|source| MigrationError::Backend {
                op: "pause the destination guest",
                source,
            })?;
        src.replay_to(dst.progress_counter());
        memory_equal = dest.completed() && src.same_memory(&dst);
    }
    Ok(SimReport {
        true_downtime: resumed.saturating_sub(paused),
        counter_at_pause,
        counter_at_resume,
        memory_equal,
        true_stall,
        true_faults,
        dest: dest.report().clone(),
        stats,
        source: src,
        destination: dst,
    })
}

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

use crate::guest::{SimControl, SimGuest, SimPages, SimTracker};
use crate::memory::MemoryMode;
use crate::workload::{WorkloadError, WorkloadSpec};
use migrate_core::protocol::{abort_frame, wire_len};
use migrate_core::{
    Clock, GuestControl, MigrationError, MigrationHandle, MigrationStats, Payload, Policy,
    VirtualClock,
};
use migrate_core::{
    DestStatus, DestinationEngine, DestinationReport, EngineConfig, SourceEngine, SourceStep,
};
use migrate_core::{DestinationVerify, MemoryLayout, PageNum};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

/// A network link: bandwidth and one-way latency, the same both ways.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Link {
    /// Bits per second.
    pub bandwidth_bps: f64,
    /// One-way latency.
    pub latency: Duration,
    /// Bytes the source's transport takes ahead of the wire, as a socket's
    /// send buffer does (0, the default: a send returns once its frame is
    /// on the wire). With a buffer, a send returns as soon as its frame
    /// fits in it, so the source runs ahead of what the destination has
    /// received by up to this many bytes. [`simulate`] only.
    pub send_buffer: usize,
}

impl Link {
    /// A link of `bandwidth_bps` bits per second and `latency` one way.
    pub fn new(bandwidth_bps: f64, latency: Duration) -> Self {
        Link {
            bandwidth_bps,
            latency,
            send_buffer: 0,
        }
    }

    /// This link with a send buffer of `bytes` on the source's side (see
    /// [`Link::send_buffer`]).
    pub fn with_send_buffer(mut self, bytes: usize) -> Self {
        self.send_buffer = bytes;
        self
    }

    /// Time to put `bytes` on the wire.
    pub fn serialisation(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.bandwidth_bps)
    }
}

/// Everything a simulated migration needs: build it with
/// [`SimConfig::new`] and set the fields to change.
#[non_exhaustive]
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
    /// What the destination checks the completion digest against.
    pub dest_verify: DestinationVerify,
    /// Stop the simulation if virtual time passes this (a safety net).
    pub time_limit: Duration,
    /// Pages the simulated hypervisor maps as the guest resumes (see
    /// [`SimGuest::set_resume_pages`]); usually empty.
    pub resume_pages: Vec<PageNum>,
}

impl SimConfig {
    /// A migration of a guest of `layout` doing `workload`, over `link`,
    /// run by `policy`: every byte of memory stored
    /// ([`MemoryMode::Bytes`]), the default engine settings and
    /// destination check, at most an hour of virtual time, no pages
    /// mapped at resume.
    pub fn new(
        layout: MemoryLayout,
        workload: WorkloadSpec,
        link: Link,
        policy: Box<dyn Policy>,
    ) -> Self {
        SimConfig {
            layout,
            mode: MemoryMode::Bytes,
            workload,
            link,
            policy,
            engine: EngineConfig::default(),
            dest_verify: DestinationVerify::default(),
            time_limit: Duration::from_secs(3600),
            resume_pages: Vec::new(),
        }
    }
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
pub(crate) enum Dir {
    ToDest,
    ToSource,
}

/// A frame in flight: (arrival time, sequence number for ties, direction, frame).
type Delivery = (Duration, u64, Dir, Vec<u8>);

/// A link direction: frames leave in order after serialisation.
pub(crate) struct Wire {
    pub(crate) link: Link,
    pub(crate) free: Duration,
}

impl Wire {
    /// A wire that is free from time zero.
    pub(crate) fn new(link: Link) -> Self {
        Wire {
            link,
            free: Duration::ZERO,
        }
    }

    /// Puts `bytes` on the wire no earlier than `at`; returns when they
    /// arrive at the far end (the wire is busy until `self.free`).
    pub(crate) fn send(&mut self, at: Duration, bytes: usize) -> Duration {
        let depart = at.max(self.free) + self.link.serialisation(bytes);
        self.free = depart;
        depart + self.link.latency
    }
}

/// The source engine of a simulated migration.
pub(crate) type SimSource = SourceEngine<SimTracker, SimPages, SimControl, Box<dyn Policy>>;

/// One migration between two simulated guests: both engines and guests,
/// driven by an event loop that owns the links and the clock
/// ([`simulate`] for one guest, [`crate::evacuate`] for many).
pub(crate) struct Run {
    src: SimGuest,
    dst: SimGuest,
    source: SimSource,
    dest: DestinationEngine<SimPages, SimControl>,
    dest_done: bool,
    at_resume: Option<(bool, u64)>,
}

impl Run {
    /// Builds both guests (now on `clock`) and both engines.
    pub(crate) fn new(
        layout: MemoryLayout,
        mode: MemoryMode,
        workload: WorkloadSpec,
        policy: Box<dyn Policy>,
        engine: EngineConfig,
        clock: &VirtualClock,
        resume_pages: Vec<PageNum>,
    ) -> Result<Self, SimError> {
        // Model memory moves page models, never bytes (see `MemoryMode::Model`).
        let mut engine = engine;
        if mode == MemoryMode::Model {
            engine.payload = Payload::Model;
        }
        let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let src = SimGuest::source(layout.clone(), mode, workload.clone(), dyn_clock.clone())?;
        let dst = SimGuest::destination(layout, mode, workload, dyn_clock.clone())?;
        src.set_resume_pages(resume_pages.clone());
        dst.set_resume_pages(resume_pages);
        let source = SourceEngine::new(
            src.tracker(),
            src.pages(),
            src.control(),
            policy,
            dyn_clock.clone(),
            engine,
        );
        let dest = DestinationEngine::new(dst.pages(), dst.control(), dyn_clock);
        Ok(Run {
            src,
            dst,
            source,
            dest,
            dest_done: false,
            at_resume: None,
        })
    }

    /// A frame reached the destination: hands it over and appends the
    /// destination's replies to `replies`.
    pub(crate) fn deliver_to_dest(
        &mut self,
        frame: &[u8],
        replies: &mut Vec<Vec<u8>>,
    ) -> Result<(), SimError> {
        if self.dest_done {
            return Ok(());
        }
        let status = match self.dest.handle_frame(frame) {
            Ok(s) => s,
            Err(e) => {
                // Tell the source, as a real destination would.
                let _ = self.source.handle_frame(&abort_frame(&e.to_string()));
                return Err(e.into());
            }
        };
        if status != DestStatus::Continue && self.at_resume.is_none() {
            // Compare at the resume instant, before the destination guest
            // runs on and writes.
            let equal = status == DestStatus::Completed && self.src.same_memory(&self.dst);
            self.at_resume = Some((equal, self.dst.progress_counter()));
        }
        self.dest_done = status == DestStatus::Completed;
        while let Some(reply) = self.dest.poll_transmit() {
            replies.push(reply);
        }
        Ok(())
    }

    /// A frame reached the source.
    pub(crate) fn deliver_to_source(&mut self, frame: &[u8]) -> Result<(), SimError> {
        self.source.handle_frame(frame)?;
        Ok(())
    }

    /// Post-copy: when the destination guest's next access is due.
    pub(crate) fn next_access(&self) -> Option<Duration> {
        if self.dest.in_postcopy() {
            self.dst.next_fault_check()
        } else {
            None
        }
    }

    /// Runs the destination guest's due access; if it touches a missing
    /// page, appends the request for it to `requests`.
    pub(crate) fn run_access(&mut self, requests: &mut Vec<Vec<u8>>) -> Result<(), SimError> {
        let faults = self.dst.take_faults();
        if !faults.is_empty() {
            let pages: Vec<_> = faults.iter().map(|(p, _)| *p).collect();
            self.dest.request_pages(&pages)?;
            while let Some(req) = self.dest.poll_transmit() {
                requests.push(req);
            }
        }
        Ok(())
    }

    /// Polls the source engine. A source that fails (a cancel among
    /// other causes) tells the destination, as the blocking driver does.
    pub(crate) fn poll(&mut self) -> Result<SourceStep, SimError> {
        match self.source.poll() {
            Ok(step) => Ok(step),
            Err(e) => Err(self.source_failed(e)),
        }
    }

    /// The source's timers that fell due (a waiting source wakes at
    /// [`Run::source_deadline`]).
    pub(crate) fn source_timeout(&mut self) -> Result<(), SimError> {
        match self.source.handle_timeout() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.source_failed(e)),
        }
    }

    /// When a waiting source's next timer falls due.
    pub(crate) fn source_deadline(&self) -> Option<Duration> {
        self.source.poll_timeout()
    }

    /// The destination's timers and its handle's cancel; a destination
    /// that fails tells the source.
    pub(crate) fn dest_timeout(&mut self) -> Result<(), SimError> {
        if self.dest_done {
            return Ok(());
        }
        if let Err(e) = self.dest.handle_timeout() {
            if !self.dest.resumed() {
                let abort = self.dest.abort_frame(&e.to_string());
                let _ = self.source.handle_frame(&abort);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Sends the source's abort to the destination (it arrives at once:
    /// the run ends here) and returns the error.
    fn source_failed(&mut self, e: MigrationError) -> SimError {
        if !self.dest_done {
            let abort = self.source.abort_frame(&e.to_string());
            let _ = self.dest.handle_frame(&abort);
        }
        e.into()
    }

    /// The two engines' handles: the source's, the destination's.
    pub(crate) fn handles(&self) -> (MigrationHandle, MigrationHandle) {
        (self.source.handle(), self.dest.handle())
    }

    /// The two guests: the source, the destination.
    pub(crate) fn guests(&self) -> (&SimGuest, &SimGuest) {
        (&self.src, &self.dst)
    }

    /// The source's statistics, once it is done.
    pub(crate) fn stats(&self) -> Option<&MigrationStats> {
        self.source.stats()
    }

    /// Checks the outcome against both guests and reports.
    pub(crate) fn finish(self, stats: MigrationStats) -> Result<SimReport, SimError> {
        let Run {
            src,
            dst,
            dest,
            at_resume,
            ..
        } = self;
        let paused = src.paused_at().unwrap_or_default();
        let resumed = dst.resumed_at().unwrap_or_default();
        let (mut memory_equal, counter_at_resume) = at_resume.unwrap_or((false, 0));
        let (true_stall, true_faults) = dst.stall_stats();
        let counter_at_pause = src.progress_counter();
        if stats.postcopy.is_some() {
            // The destination guest has run on since resume. Freeze it, let
            // the source make the same accesses, and compare.
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
}

/// What a steering hook of [`simulate_steered`] sees before each event.
#[non_exhaustive]
pub struct Steer<'a> {
    /// Virtual time.
    pub now: Duration,
    /// The source engine's handle.
    pub source: &'a MigrationHandle,
    /// The destination engine's handle.
    pub destination: &'a MigrationHandle,
    /// The source guest.
    pub source_guest: &'a SimGuest,
    /// The destination guest.
    pub destination_guest: &'a SimGuest,
}

/// Runs one migration in virtual time.
pub fn simulate(config: SimConfig) -> Result<SimReport, SimError> {
    simulate_steered(config, &mut |_| {})
}

/// As [`simulate`], calling `steer` before each event, where a test (or a
/// model of a VMM) reads progress and cancels or changes parameters
/// through the handles. A side that fails (a cancel among other causes)
/// sends its abort to the other, as the blocking drivers do.
pub fn simulate_steered(
    config: SimConfig,
    steer: &mut dyn FnMut(&Steer<'_>),
) -> Result<SimReport, SimError> {
    let SimConfig {
        layout,
        mode,
        workload,
        link,
        policy,
        engine,
        dest_verify,
        time_limit,
        resume_pages,
    } = config;
    if !(link.bandwidth_bps.is_finite() && link.bandwidth_bps > 0.0) {
        return Err(SimError::Link("bandwidth must be positive".into()));
    }
    let clock = VirtualClock::new();
    let mut run = Run::new(layout, mode, workload, policy, engine, &clock, resume_pages)?;
    run.dest.set_verify(dest_verify);

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
    let mut replies = Vec::new();
    let (source_handle, dest_handle) = run.handles();

    let stats = loop {
        {
            let (source_guest, destination_guest) = run.guests();
            steer(&Steer {
                now: clock.now(),
                source: &source_handle,
                destination: &dest_handle,
                source_guest,
                destination_guest,
            });
        }
        run.dest_timeout()?;
        let next_delivery = events.peek().map(|Reverse((t, ..))| *t);
        let next_access = run.next_access();
        // A waiting source is woken by a frame or by its next timer.
        let src_at = if src_waiting {
            run.source_deadline().map(|t| t.max(clock.now()))
        } else {
            Some(src_ready)
        };
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
                    run.deliver_to_dest(&frame, &mut replies)?;
                    for reply in replies.drain(..) {
                        seq += 1;
                        let arrive = back.send(t, wire_len(&reply));
                        events.push(Reverse((arrive, seq, Dir::ToSource, reply)));
                    }
                }
                Dir::ToSource => {
                    run.deliver_to_source(&frame)?;
                    src_waiting = false;
                    src_ready = src_ready.max(t);
                }
            }
        } else if next_access == Some(now) {
            // The destination guest's next access is due: run it; if it
            // touches a missing page, ask for the page now.
            run.run_access(&mut replies)?;
            for req in replies.drain(..) {
                seq += 1;
                let arrive = back.send(now, wire_len(&req));
                events.push(Reverse((arrive, seq, Dir::ToSource, req)));
            }
        } else {
            if src_waiting {
                run.source_timeout()?;
                src_waiting = false;
                src_ready = src_ready.max(now);
            }
            match run.poll()? {
                SourceStep::Send(frame) => {
                    let arrive = fwd.send(src_ready, wire_len(&frame));
                    // The send returns once what waits for the wire fits
                    // in the send buffer.
                    let buffered = fwd.link.serialisation(fwd.link.send_buffer);
                    src_ready = src_ready.max(fwd.free.saturating_sub(buffered));
                    seq += 1;
                    events.push(Reverse((arrive, seq, Dir::ToDest, frame)));
                }
                SourceStep::Wait => src_waiting = true,
                SourceStep::Done => match run.stats() {
                    Some(s) => break s.clone(),
                    None => return Err(SimError::Stalled(src_ready)),
                },
            }
        }
    };
    run.finish(stats)
}

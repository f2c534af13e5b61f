//! Evacuating a host: many guests leave one host over a shared link.
//!
//! [`evacuate`] migrates every guest of a fleet off one source host, each
//! with its own [`SourceEngine`](migrate_core::SourceEngine) and
//! [`DestinationEngine`](migrate_core::DestinationEngine) and a policy
//! from the same factory, all on one [`VirtualClock`]. At most
//! [`EvacConfig::concurrency`] migrations run at once; a [`Strategy`]
//! chooses which guest starts when a slot is free.
//!
//! ```text
//!  source host                 switch                destinations
//!  guest 1 ─ engine ─┐                          ┌─▶ downlink 0 ─▶ host 0
//!  guest 2 ─ engine ─┼─▶ uplink (shared FIFO) ──┤
//!  guest N ─ engine ─┘                          └─▶ downlink 1 ─▶ host 1
//! ```
//!
//! The uplink serialises frames one after another in the order the
//! sources offer them, so migrations running together share its bandwidth
//! frame by frame. A frame then crosses its destination's downlink (a
//! second FIFO, shared by the migrations to that host) and arrives after
//! the uplink's latency. A source offers its next frame once its previous
//! one has left the uplink and started on the downlink: a sender whose
//! window is about one frame, so a slow downlink slows its senders rather
//! than filling a queue. Replies travel on a wire of their own per
//! migration, at the downlink's bandwidth.
//!
//! Every migration is verified as [`simulate`](crate::simulate) verifies
//! one: the destination's memory against the source's at resume (after
//! post-copy, once the source replayed the destination guest's accesses).

use crate::harness::{Dir, Link, Run, SimError, Wire};
use crate::memory::MemoryMode;
use crate::workload::{WorkloadKind, WorkloadSpec};
use migrate_core::protocol::wire_len;
use migrate_core::{Clock, MigrationStats, Policy, VirtualClock};
use migrate_core::{EngineConfig, MemoryLayout, PageSize, SourceStep};
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use rand_pcg::Pcg64Mcg;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// One guest to move off the host.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EvacGuest {
    /// Guest memory in bytes (a multiple of the page size).
    pub memory: u64,
    /// What the guest does while it waits and while it moves.
    pub workload: WorkloadSpec,
}

impl EvacGuest {
    /// A guest of `memory` bytes doing `workload`.
    pub fn new(memory: u64, workload: WorkloadSpec) -> Self {
        EvacGuest { memory, workload }
    }

    /// The rate at which the guest writes pages, in bytes per second.
    pub fn dirty_rate(&self) -> f64 {
        self.workload.writes_per_sec * PageSize::DEFAULT.get() as f64
    }
}

/// The distribution a fleet is drawn from.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FleetShape {
    /// Guest memory sizes in GiB to choose from, uniformly.
    pub memory_gib: Vec<u64>,
    /// Working set as a share of memory, uniform in this range.
    pub wss_share: (f64, f64),
    /// Median dirty rate, bytes per second (log-normal).
    pub dirty_median: f64,
    /// Spread of the dirty rate: sigma of its logarithm.
    pub dirty_sigma: f64,
}

impl FleetShape {
    /// A fleet that fits its link easily: 1 to 8 GiB guests, median
    /// dirty rate 20 MB/s (50 such guests dirty about 11 Gbit/s in all).
    pub fn light() -> Self {
        FleetShape {
            memory_gib: vec![1, 2, 4, 8],
            wss_share: (0.05, 0.3),
            dirty_median: 20e6,
            dirty_sigma: 0.8,
        }
    }

    /// A fleet that does not fit: the same sizes, median dirty rate
    /// 150 MB/s, a few guests over 1 GB/s (50 such guests dirty about
    /// 100 Gbit/s in all, more than a 40 Gbit/s uplink carries).
    pub fn heavy() -> Self {
        FleetShape {
            memory_gib: vec![1, 2, 4, 8],
            wss_share: (0.1, 0.5),
            dirty_median: 150e6,
            dirty_sigma: 1.0,
        }
    }
}

/// Draws `n` guests from `shape` with `seed`: the same seed, the same
/// fleet. Workloads alternate Zipf and hot/cold, each with its own seed.
pub fn fleet(n: usize, shape: &FleetShape, seed: u64) -> Vec<EvacGuest> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed ^ 0x666c_6565_7400);
    let dirty = LogNormal::new(shape.dirty_median.max(1.0).ln(), shape.dirty_sigma.max(0.0))
        .unwrap_or_else(|_| LogNormal::new(0.0, 0.0).expect("a log-normal of sigma 0"));
    let ps = PageSize::DEFAULT.get() as u64;
    (0..n)
        .map(|i| {
            let gib = if shape.memory_gib.is_empty() {
                1
            } else {
                shape.memory_gib[rng.random_range(0..shape.memory_gib.len())]
            };
            let memory = gib << 30;
            let (lo, hi) = shape.wss_share;
            let share = if hi > lo {
                rng.random_range(lo..hi)
            } else {
                lo
            };
            let wss_pages = ((memory as f64 * share) as u64 / ps).max(1);
            let rate: f64 = dirty.sample(&mut rng);
            let kind = if i.is_multiple_of(2) {
                WorkloadKind::Zipf { exponent: 1.0 }
            } else {
                WorkloadKind::HotCold {
                    hot_fraction: 0.1,
                    hot_prob: 0.9,
                }
            };
            let mut workload = WorkloadSpec::new(
                kind,
                wss_pages,
                rate / ps as f64,
                seed.wrapping_add(i as u64),
            );
            workload.zero_fraction = 0.05;
            EvacGuest { memory, workload }
        })
        .collect()
}

/// Which guest starts when a migration slot is free.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Strategy {
    /// One migration at a time, in fleet order (the concurrency limit is
    /// ignored).
    OneAtATime,
    /// Every guest at once (the concurrency limit is ignored).
    AllAtOnce,
    /// Smallest memory first, up to the concurrency limit.
    SmallestFirst,
    /// Lowest dirty rate first, up to the concurrency limit.
    LowestDirtyFirst,
    /// Ours: shortest expected transfer first, and a new migration only
    /// where it adds throughput: on a destination with none running,
    /// while the downlinks in use carry less than the uplink; a running
    /// migration may lose bandwidth to it only while keeping a share of
    /// its bottleneck of at least `margin` times its guest's dirty rate,
    /// and the new one must keep that much or get what it would alone.
    /// With nothing running, the next guest starts whatever its rate.
    ///
    /// Why: pre-copy converges when a migration is sent faster than its
    /// guest dirties, and its downtime is its last dirty set over its
    /// share of the link. Time to empty the host is bounded below by the
    /// bytes over the bottleneck's bandwidth, and a second migration on a
    /// busy path adds no bandwidth, it only halves the first one's share:
    /// longer rounds, more pages dirtied and resent, longer downtimes, and
    /// past some dirty rate no convergence at all. One at a time never
    /// splits a path but leaves every other destination's downlink idle
    /// when the uplink is wider than one downlink. Filling each idle path
    /// with one migration keeps the bottleneck busy with the fewest
    /// migrations that can; the margin keeps a hot guest from sharing; and
    /// shortest expected transfer first (memory over one minus the share of
    /// the link its dirtying takes) lets guests leave as early as they can
    /// on average, the rule that minimises mean completion time.
    Fit {
        /// Share of the bottleneck over dirty rate that a running
        /// migration must keep (2.0: the link sends twice what the guest
        /// dirties).
        margin: f64,
    },
}

impl Strategy {
    /// Every strategy, ours with a margin of 2.
    pub fn all() -> [Strategy; 5] {
        [
            Strategy::OneAtATime,
            Strategy::AllAtOnce,
            Strategy::SmallestFirst,
            Strategy::LowestDirtyFirst,
            Strategy::Fit { margin: 2.0 },
        ]
    }

    /// The name used on command lines.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::OneAtATime => "one-at-a-time",
            Strategy::AllAtOnce => "all-at-once",
            Strategy::SmallestFirst => "smallest-first",
            Strategy::LowestDirtyFirst => "lowest-dirty-first",
            Strategy::Fit { .. } => "fit",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strategy name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?} (expected one-at-a-time, all-at-once, smallest-first, lowest-dirty-first, fit or fit:MARGIN)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "one-at-a-time" | "sequential" => Strategy::OneAtATime,
            "all-at-once" | "all" => Strategy::AllAtOnce,
            "smallest-first" => Strategy::SmallestFirst,
            "lowest-dirty-first" => Strategy::LowestDirtyFirst,
            "fit" => Strategy::Fit { margin: 2.0 },
            other => match other.strip_prefix("fit:").map(str::parse::<f64>) {
                Some(Ok(margin)) if margin.is_finite() && margin > 0.0 => Strategy::Fit { margin },
                _ => return Err(UnknownStrategy(other.to_owned())),
            },
        })
    }
}

/// Makes the policy of each guest's migration.
pub type PolicyFactory = Arc<dyn Fn() -> Box<dyn Policy> + Send + Sync>;

/// Everything an evacuation needs: build it with [`EvacConfig::new`]
/// and set the fields to change.
#[non_exhaustive]
pub struct EvacConfig {
    /// The guests, in fleet order.
    pub guests: Vec<EvacGuest>,
    /// The source host's link: bandwidth shared by every migration, and
    /// the one-way latency to any destination.
    pub uplink: Link,
    /// Each destination's downlink bandwidth, bits per second (at least
    /// one).
    pub destinations: Vec<f64>,
    /// Most migrations at once.
    pub concurrency: usize,
    /// Which guest goes next.
    pub strategy: Strategy,
    /// The policy of every migration.
    pub policy: PolicyFactory,
    /// Engine settings of every migration.
    pub engine: EngineConfig,
    /// How guest memory is simulated.
    pub mode: MemoryMode,
    /// Stop if virtual time passes this.
    pub time_limit: Duration,
}

impl EvacConfig {
    /// Evacuating `guests` over `uplink` to `destinations` (their
    /// downlinks, bits per second) with `strategy`, `concurrency`
    /// migrations at most, each run by a policy from `policy`: the
    /// default engine settings, page models ([`MemoryMode::Model`]), at
    /// most a week of virtual time.
    pub fn new(
        guests: Vec<EvacGuest>,
        uplink: Link,
        destinations: Vec<f64>,
        strategy: Strategy,
        concurrency: usize,
        policy: PolicyFactory,
    ) -> Self {
        EvacConfig {
            guests,
            uplink,
            destinations,
            concurrency,
            strategy,
            policy,
            engine: EngineConfig::default(),
            mode: MemoryMode::Model,
            time_limit: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// How one guest's migration went.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GuestOutcome {
    /// Its index in the fleet.
    pub guest: usize,
    /// Its memory, bytes.
    pub memory: u64,
    /// Its dirty rate, bytes per second.
    pub dirty_rate: f64,
    /// The destination it went to.
    pub destination: usize,
    /// When its migration started.
    pub started: Duration,
    /// When its source engine finished.
    pub finished: Duration,
    /// The source's statistics, or why the migration failed.
    pub result: Result<MigrationStats, String>,
    /// Pause to resume on the shared clock.
    pub true_downtime: Duration,
    /// Whether the destination's memory equalled the source's and the
    /// guest's counter carried over.
    pub verified: bool,
}

impl GuestOutcome {
    /// Whether pre-copy converged (a failed migration did not).
    pub fn converged(&self) -> bool {
        self.result
            .as_ref()
            .is_ok_and(|s| s.switch_reason.converged())
    }
}

/// What an evacuation did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EvacReport {
    /// The strategy.
    pub strategy: Strategy,
    /// Start until the last guest left.
    pub time_to_empty: Duration,
    /// Every guest, in fleet order.
    pub guests: Vec<GuestOutcome>,
}

impl EvacReport {
    /// Bytes put on the wire by every migration.
    pub fn bytes_sent(&self) -> u64 {
        self.guests
            .iter()
            .filter_map(|g| g.result.as_ref().ok())
            .map(|s| s.transferred)
            .sum()
    }

    /// Guests whose pre-copy did not converge (or whose migration failed).
    pub fn not_converged(&self) -> usize {
        self.guests.iter().filter(|g| !g.converged()).count()
    }

    /// Guests whose migration failed.
    pub fn failed(&self) -> usize {
        self.guests.iter().filter(|g| g.result.is_err()).count()
    }

    /// Guests whose memory did not verify.
    pub fn unverified(&self) -> usize {
        self.guests.iter().filter(|g| !g.verified).count()
    }

    /// The `q` quantile (0..=1, nearest rank) of the measured downtimes.
    pub fn downtime_quantile(&self, q: f64) -> Duration {
        let mut d: Vec<Duration> = self
            .guests
            .iter()
            .filter_map(|g| g.result.as_ref().ok())
            .map(|s| s.downtime)
            .collect();
        if d.is_empty() {
            return Duration::ZERO;
        }
        d.sort_unstable();
        let rank = ((d.len() as f64 * q.clamp(0.0, 1.0)).ceil() as usize).clamp(1, d.len());
        d[rank - 1]
    }

    /// Mean time from the start until a guest left.
    pub fn mean_completion(&self) -> Duration {
        let n = self.guests.len().max(1) as u32;
        self.guests.iter().map(|g| g.finished).sum::<Duration>() / n
    }
}

/// A migration in progress.
struct Slot {
    run: Run,
    destination: usize,
    started: Duration,
    ready: Duration,
    waiting: bool,
    back: Wire,
}

/// A frame in flight: (arrival, tie-break, direction, guest, frame).
type Delivery = (Duration, u64, Dir, usize, Vec<u8>);

/// What happens next.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Next {
    Delivery,
    Access(usize),
    Source(usize),
}

/// Moves every guest of `config` off the host; see the module docs.
pub fn evacuate(config: EvacConfig) -> Result<EvacReport, SimError> {
    let EvacConfig {
        guests,
        uplink,
        destinations,
        concurrency,
        strategy,
        policy,
        engine,
        mode,
        time_limit,
    } = config;
    let positive = |b: f64| b.is_finite() && b > 0.0;
    if !positive(uplink.bandwidth_bps) || destinations.is_empty() {
        return Err(SimError::Link(
            "an evacuation needs a positive uplink bandwidth and a destination".into(),
        ));
    }
    if !destinations.iter().all(|b| positive(*b)) {
        return Err(SimError::Link("downlink bandwidth must be positive".into()));
    }
    let n = guests.len();
    let limit = match strategy {
        Strategy::OneAtATime => 1,
        Strategy::AllAtOnce => n.max(1),
        _ => concurrency.max(1),
    };
    let mut queue: Vec<usize> = (0..n).collect();
    match strategy {
        Strategy::SmallestFirst => queue.sort_by_key(|&i| guests[i].memory),
        Strategy::LowestDirtyFirst => {
            queue.sort_by(|&a, &b| guests[a].dirty_rate().total_cmp(&guests[b].dirty_rate()))
        }
        Strategy::Fit { .. } => {
            let solo = destinations
                .iter()
                .fold(0.0f64, |m, b| m.max(*b))
                .min(uplink.bandwidth_bps);
            queue.sort_by(|&a, &b| {
                expected_transfer(&guests[a], solo).total_cmp(&expected_transfer(&guests[b], solo))
            })
        }
        _ => {}
    }
    let clock = VirtualClock::new();
    let mut slots: Vec<Option<Slot>> = (0..n).map(|_| None).collect();
    let mut outcomes: Vec<Option<GuestOutcome>> = vec![None; n];
    let mut up = Wire::new(uplink);
    let mut downs: Vec<Wire> = destinations
        .iter()
        .map(|b| Wire::new(Link::new(*b, Duration::ZERO)))
        .collect();
    let mut events: BinaryHeap<Reverse<Delivery>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut replies = Vec::new();
    let mut running: Vec<usize> = Vec::new();

    loop {
        // Start what the strategy lets start now.
        while running.len() < limit && !queue.is_empty() {
            let Some(pos) = pick(
                strategy,
                &queue,
                &running,
                &slots,
                &guests,
                &uplink,
                &destinations,
            ) else {
                break;
            };
            let g = queue.remove(pos);
            let destination = least_loaded(&running, &slots, destinations.len());
            let guest = &guests[g];
            let layout = MemoryLayout::flat(PageSize::DEFAULT, guest.memory)
                .map_err(|e| SimError::Link(format!("guest {g}: invalid memory size: {e}")))?;
            let run = Run::new(
                layout,
                mode,
                guest.workload.clone(),
                policy(),
                engine.clone(),
                &clock,
                Vec::new(),
            )?;
            let now = clock.now();
            slots[g] = Some(Slot {
                run,
                destination,
                started: now,
                ready: now,
                waiting: false,
                back: Wire {
                    link: Link::new(destinations[destination], uplink.latency),
                    free: now,
                },
            });
            running.push(g);
        }
        if running.is_empty() {
            break;
        }

        // The earliest event: deliveries first, then guest accesses, then
        // sources, lowest guest first on ties.
        let mut best: Option<(Duration, Next)> =
            events.peek().map(|Reverse((t, ..))| (*t, Next::Delivery));
        for &g in &running {
            let Some(s) = slots[g].as_ref() else { continue };
            if let Some(t) = s.run.next_access() {
                best = best.min_by_next((t, Next::Access(g)));
            }
            if !s.waiting {
                best = best.min_by_next((s.ready, Next::Source(g)));
            }
        }
        let Some((now, next)) = best else {
            return Err(SimError::Stalled(clock.now()));
        };
        if now > time_limit {
            return Err(SimError::TimeLimit(time_limit));
        }
        clock.set(now);
        let mut failed: Option<(usize, SimError)> = None;
        match next {
            Next::Delivery => {
                let Some(Reverse((t, _, dir, g, frame))) = events.pop() else {
                    continue;
                };
                let Some(s) = slots[g].as_mut() else {
                    continue; // the migration failed; its frames are dropped
                };
                match dir {
                    Dir::ToDest => match s.run.deliver_to_dest(&frame, &mut replies) {
                        Ok(()) => {
                            for reply in replies.drain(..) {
                                seq += 1;
                                let arrive = s.back.send(t, wire_len(&reply));
                                events.push(Reverse((arrive, seq, Dir::ToSource, g, reply)));
                            }
                        }
                        Err(e) => failed = Some((g, e)),
                    },
                    Dir::ToSource => match s.run.deliver_to_source(&frame) {
                        Ok(()) => {
                            s.waiting = false;
                            s.ready = s.ready.max(t);
                        }
                        Err(e) => failed = Some((g, e)),
                    },
                }
            }
            Next::Access(g) => {
                if let Some(s) = slots[g].as_mut() {
                    match s.run.run_access(&mut replies) {
                        Ok(()) => {
                            for req in replies.drain(..) {
                                seq += 1;
                                let arrive = s.back.send(now, wire_len(&req));
                                events.push(Reverse((arrive, seq, Dir::ToSource, g, req)));
                            }
                        }
                        Err(e) => failed = Some((g, e)),
                    }
                }
            }
            Next::Source(g) => {
                let Some(s) = slots[g].as_mut() else { continue };
                match s.run.poll() {
                    Ok(SourceStep::Send(frame)) => {
                        let bytes = wire_len(&frame);
                        up.send(s.ready, bytes);
                        let left_up = up.free;
                        let down = &mut downs[s.destination];
                        down.send(left_up, bytes);
                        let down_start = down.free.saturating_sub(down.link.serialisation(bytes));
                        let arrive = down.free + uplink.latency;
                        s.ready = left_up.max(down_start);
                        seq += 1;
                        events.push(Reverse((arrive, seq, Dir::ToDest, g, frame)));
                    }
                    Ok(SourceStep::Wait) => s.waiting = true,
                    Ok(SourceStep::Done) => {
                        let Some(slot) = slots[g].take() else {
                            continue;
                        };
                        running.retain(|r| *r != g);
                        outcomes[g] = Some(outcome(g, &guests[g], slot, now));
                    }
                    Err(e) => failed = Some((g, e)),
                }
            }
        }
        if let Some((g, e)) = failed {
            if let Some(slot) = slots[g].take() {
                running.retain(|r| *r != g);
                outcomes[g] = Some(GuestOutcome {
                    guest: g,
                    memory: guests[g].memory,
                    dirty_rate: guests[g].dirty_rate(),
                    destination: slot.destination,
                    started: slot.started,
                    finished: now,
                    result: Err(e.to_string()),
                    true_downtime: Duration::ZERO,
                    verified: false,
                });
            }
        }
    }
    let guests: Vec<GuestOutcome> = outcomes.into_iter().flatten().collect();
    let time_to_empty = guests.iter().map(|g| g.finished).max().unwrap_or_default();
    Ok(EvacReport {
        strategy,
        time_to_empty,
        guests,
    })
}

trait MinByNext {
    fn min_by_next(self, other: (Duration, Next)) -> Self;
}

impl MinByNext for Option<(Duration, Next)> {
    fn min_by_next(self, other: (Duration, Next)) -> Self {
        Some(match self {
            Some(a) if a <= other => a,
            _ => other,
        })
    }
}

/// Bytes a guest's pre-copy is expected to send with the whole link: its
/// memory over one minus the share of the link its dirtying takes.
fn expected_transfer(g: &EvacGuest, link_bps: f64) -> f64 {
    let r = (g.dirty_rate() * 8.0 / link_bps).min(0.9);
    g.memory as f64 / (1.0 - r)
}

/// The destination with the fewest running migrations (lowest first).
fn least_loaded(running: &[usize], slots: &[Option<Slot>], destinations: usize) -> usize {
    let mut load = vec![0usize; destinations];
    for &g in running {
        if let Some(s) = &slots[g] {
            load[s.destination] += 1;
        }
    }
    (0..destinations).min_by_key(|d| load[*d]).unwrap_or(0)
}

/// The position in `queue` of the guest to start now, if any.
fn pick(
    strategy: Strategy,
    queue: &[usize],
    running: &[usize],
    slots: &[Option<Slot>],
    guests: &[EvacGuest],
    uplink: &Link,
    destinations: &[f64],
) -> Option<usize> {
    let Strategy::Fit { margin } = strategy else {
        return (!queue.is_empty()).then_some(0);
    };
    if running.is_empty() {
        return (!queue.is_empty()).then_some(0);
    }
    let mut per_dest = vec![0usize; destinations.len()];
    for &g in running {
        if let Some(s) = &slots[g] {
            per_dest[s.destination] += 1;
        }
    }
    // Only an idle destination adds a path, and only while the uplink has
    // room beyond the downlinks already in use.
    let idle = per_dest.iter().position(|n| *n == 0)?;
    let busy: f64 = (0..destinations.len())
        .filter(|d| per_dest[*d] > 0)
        .map(|d| destinations[d])
        .sum();
    if busy >= uplink.bandwidth_bps {
        return None;
    }
    // Bytes per second a migration to `dest` gets with `total` running and
    // `on_dest` of them to `dest`: its share of the uplink or of the
    // downlink, whichever is smaller.
    let share = |dest: usize, total: usize, on_dest: usize| {
        (uplink.bandwidth_bps / total as f64).min(destinations[dest] / on_dest as f64) / 8.0
    };
    let total = running.len() + 1;
    // A running migration may lose bandwidth to the new one only while it
    // keeps `margin` times its guest's dirty rate.
    let running_fit = running.iter().all(|&g| {
        slots[g].as_ref().is_none_or(|s| {
            let d = s.destination;
            let before = share(d, total - 1, per_dest[d]);
            let after = share(d, total, per_dest[d] + usize::from(d == idle));
            after >= before || guests[g].dirty_rate() * margin <= after
        })
    });
    if !running_fit {
        return None;
    }
    // The new one goes if it keeps `margin` times its dirty rate, or gets
    // as much as it would alone.
    let now = share(idle, total, 1);
    let alone = share(idle, 1, 1);
    queue
        .iter()
        .position(|&g| now >= alone || guests[g].dirty_rate() * margin <= now)
}

fn outcome(g: usize, guest: &EvacGuest, slot: Slot, now: Duration) -> GuestOutcome {
    let Slot {
        run,
        destination,
        started,
        ..
    } = slot;
    let base = GuestOutcome {
        guest: g,
        memory: guest.memory,
        dirty_rate: guest.dirty_rate(),
        destination,
        started,
        finished: now,
        result: Err("the source finished without statistics".into()),
        true_downtime: Duration::ZERO,
        verified: false,
    };
    let Some(stats) = run.stats().cloned() else {
        return base;
    };
    match run.finish(stats) {
        Ok(r) => GuestOutcome {
            verified: r.memory_equal
                && r.stats.memory_verified
                && r.counter_at_pause == r.counter_at_resume,
            true_downtime: r.true_downtime,
            result: Ok(r.stats),
            ..base
        },
        Err(e) => GuestOutcome {
            result: Err(e.to_string()),
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_by_name() {
        for s in Strategy::all() {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
        }
        assert_eq!("fit:3".parse(), Ok(Strategy::Fit { margin: 3.0 }));
        assert!("fit:0".parse::<Strategy>().is_err());
        assert!("fastest".parse::<Strategy>().is_err());
    }

    #[test]
    fn a_fleet_is_a_function_of_its_seed() {
        let a = fleet(20, &FleetShape::light(), 3);
        assert_eq!(a, fleet(20, &FleetShape::light(), 3));
        assert_ne!(a, fleet(20, &FleetShape::light(), 4));
        assert!(a
            .iter()
            .all(|g| g.memory >= 1 << 30 && g.dirty_rate() > 0.0));
        let heavy: f64 = fleet(20, &FleetShape::heavy(), 3)
            .iter()
            .map(EvacGuest::dirty_rate)
            .sum();
        let light: f64 = a.iter().map(EvacGuest::dirty_rate).sum();
        assert!(heavy > 3.0 * light, "heavy {heavy} light {light}");
    }
}

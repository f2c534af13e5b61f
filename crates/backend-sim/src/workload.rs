//! Seeded, deterministic guest workloads.
//!
//! A workload is a sequence of page writes at a constant rate in guest
//! time: write `k` happens at `k / rate` seconds of guest running time,
//! and which page it hits is drawn from a seeded generator. The same seed
//! gives the same writes, however often the simulator asks.

use rand::RngExt;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};
use rand_pcg::Pcg64Mcg;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The shape of a workload's writes.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WorkloadKind {
    /// No writes at all.
    Idle,
    /// Writes spread uniformly over the working set.
    Uniform,
    /// A fraction `hot_prob` of writes hit the first `hot_fraction` of the
    /// working set; the rest hit the remainder uniformly.
    HotCold {
        /// Share of the working set that is hot (0..1).
        hot_fraction: f64,
        /// Share of writes that go to the hot part (0..1).
        hot_prob: f64,
    },
    /// Page popularity follows Zipf's law with this exponent; ranks are
    /// scattered over the working set.
    Zipf {
        /// The Zipf exponent (> 0; 1.0 is classic Zipf).
        exponent: f64,
    },
    /// A sweep through the working set, page after page, wrapping.
    Sequential,
    /// Uniform writes over a window of the working-set size that moves to
    /// a new place in memory every `phase` of guest time.
    Phased {
        /// Length of each phase.
        phase: Duration,
    },
}

impl WorkloadKind {
    /// The name used on command lines.
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadKind::Idle => "idle",
            WorkloadKind::Uniform => "uniform",
            WorkloadKind::HotCold { .. } => "hotcold",
            WorkloadKind::Zipf { .. } => "zipf",
            WorkloadKind::Sequential => "sequential",
            WorkloadKind::Phased { .. } => "phased",
        }
    }
}

/// A workload name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown workload {0:?} (expected idle, uniform, hotcold, zipf, sequential or phased)")]
pub struct UnknownWorkload(pub String);

impl FromStr for WorkloadKind {
    type Err = UnknownWorkload;
    /// Parses a workload name with default parameters: `hotcold` is 10 %
    /// hot receiving 90 % of writes, `zipf` has exponent 1.0, `phased`
    /// changes every second.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "idle" => WorkloadKind::Idle,
            "uniform" => WorkloadKind::Uniform,
            "hotcold" | "hot-cold" => WorkloadKind::HotCold {
                hot_fraction: 0.1,
                hot_prob: 0.9,
            },
            "zipf" => WorkloadKind::Zipf { exponent: 1.0 },
            "sequential" | "seq" => WorkloadKind::Sequential,
            "phased" => WorkloadKind::Phased {
                phase: Duration::from_secs(1),
            },
            other => return Err(UnknownWorkload(other.to_owned())),
        })
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A complete workload description.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct WorkloadSpec {
    /// The shape.
    pub kind: WorkloadKind,
    /// Working-set size in pages (clamped to guest memory).
    pub wss_pages: u64,
    /// Page writes per second of guest time.
    pub writes_per_sec: f64,
    /// Fraction of guest pages that start out all zeros (0..1).
    pub zero_fraction: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Reads per write (0 = writes only). Reads change nothing, but on a
    /// post-copy destination a read of a missing page faults like a write.
    pub reads_per_write: f64,
    /// Dense page index where the working set starts (it wraps around the
    /// end of memory).
    pub wss_offset: u64,
}

impl WorkloadSpec {
    /// An idle guest.
    pub fn idle(seed: u64) -> Self {
        WorkloadSpec {
            kind: WorkloadKind::Idle,
            wss_pages: 0,
            writes_per_sec: 0.0,
            zero_fraction: 0.0,
            seed,
            reads_per_write: 0.0,
            wss_offset: 0,
        }
    }

    /// A workload of `kind` writing `writes_per_sec` pages a second over
    /// `wss_pages` pages, with no zero pages, no reads and the working set
    /// at the start of memory.
    pub fn new(kind: WorkloadKind, wss_pages: u64, writes_per_sec: f64, seed: u64) -> Self {
        WorkloadSpec {
            kind,
            wss_pages,
            writes_per_sec,
            zero_fraction: 0.0,
            seed,
            reads_per_write: 0.0,
            wss_offset: 0,
        }
    }

    /// Guest memory accesses (reads and writes) per second.
    pub fn accesses_per_sec(&self) -> f64 {
        self.writes_per_sec * (1.0 + self.reads_per_write)
    }
}

/// One guest memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Its index in the access sequence.
    pub index: u64,
    /// The dense page index it touches.
    pub page: u64,
    /// Whether it writes (else it reads).
    pub write: bool,
    /// The 8-byte slot written.
    pub slot: usize,
    /// The value written.
    pub value: u64,
}

/// Why a workload description is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid workload: {0}")]
pub struct WorkloadError(pub String);

/// Generates the writes of a [`WorkloadSpec`] over `total_pages` pages.
#[derive(Clone, Debug)]
pub struct WorkloadGen {
    spec: WorkloadSpec,
    total_pages: u64,
    wss: u64,
    rng: Pcg64Mcg,
    zipf: Option<Zipf<f64>>,
    next_index: u64,
}

/// A large prime, for scattering Zipf ranks over the working set.
const SCATTER: u128 = (1u128 << 61) - 1;

impl WorkloadGen {
    /// A generator for `spec` over a guest of `total_pages` pages.
    pub fn new(spec: WorkloadSpec, total_pages: u64) -> Result<Self, WorkloadError> {
        if !(spec.writes_per_sec.is_finite() && spec.writes_per_sec >= 0.0) {
            return Err(WorkloadError(
                "write rate must be a non-negative number".into(),
            ));
        }
        if !(spec.reads_per_write.is_finite() && spec.reads_per_write >= 0.0) {
            return Err(WorkloadError(
                "reads per write must be a non-negative number".into(),
            ));
        }
        if !(0.0..=1.0).contains(&spec.zero_fraction) {
            return Err(WorkloadError(
                "zero fraction must be between 0 and 1".into(),
            ));
        }
        let wss = spec.wss_pages.min(total_pages);
        let active = !matches!(spec.kind, WorkloadKind::Idle) && spec.writes_per_sec > 0.0;
        if active && wss == 0 {
            return Err(WorkloadError(
                "a writing workload needs a working set of at least one page".into(),
            ));
        }
        let zipf = match &spec.kind {
            WorkloadKind::HotCold {
                hot_fraction,
                hot_prob,
            } => {
                if !(0.0..=1.0).contains(hot_fraction) || !(0.0..=1.0).contains(hot_prob) {
                    return Err(WorkloadError(
                        "hot fraction and probability must be between 0 and 1".into(),
                    ));
                }
                None
            }
            WorkloadKind::Zipf { exponent } if active => Some(
                Zipf::new(wss as f64, *exponent)
                    .map_err(|e| WorkloadError(format!("zipf: {e}")))?,
            ),
            WorkloadKind::Phased { phase } if phase.is_zero() => {
                return Err(WorkloadError("phase length must be positive".into()))
            }
            _ => None,
        };
        Ok(WorkloadGen {
            rng: Pcg64Mcg::seed_from_u64(spec.seed),
            spec,
            total_pages,
            wss,
            zipf,
            next_index: 0,
        })
    }

    /// The description.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// Whether the workload writes at all.
    pub fn writes(&self) -> bool {
        !matches!(self.spec.kind, WorkloadKind::Idle) && self.spec.writes_per_sec > 0.0
    }

    /// Index of the next access.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Guest time of access `k`.
    pub fn time_of(&self, k: u64) -> Duration {
        if !self.writes() {
            return Duration::MAX;
        }
        Duration::from_secs_f64(k as f64 / self.spec.accesses_per_sec())
    }

    /// Guest time of the next access (`Duration::MAX` for an idle guest).
    pub fn next_time(&self) -> Duration {
        self.time_of(self.next_index)
    }

    /// Whether page at dense index `i` starts out all zeros.
    pub fn starts_zero(&self, i: u64) -> bool {
        if self.spec.zero_fraction <= 0.0 {
            return false;
        }
        let h = splitmix(self.spec.seed ^ splitmix(i));
        ((h >> 11) as f64 / (1u64 << 53) as f64) < self.spec.zero_fraction
    }

    /// The next access.
    pub fn next_access(&mut self) -> Access {
        let k = self.next_index;
        self.next_index += 1;
        let write = self.spec.reads_per_write <= 0.0
            || !self
                .rng
                .random_bool(self.spec.reads_per_write / (1.0 + self.spec.reads_per_write));
        let wss = self.wss.max(1);
        let page = match &self.spec.kind {
            WorkloadKind::Idle => 0,
            WorkloadKind::Uniform => self.rng.random_range(0..wss),
            WorkloadKind::HotCold {
                hot_fraction,
                hot_prob,
            } => {
                let hot = ((wss as f64 * hot_fraction) as u64).clamp(1, wss);
                if hot == wss || self.rng.random_bool(*hot_prob) {
                    self.rng.random_range(0..hot)
                } else {
                    self.rng.random_range(hot..wss)
                }
            }
            WorkloadKind::Zipf { .. } => {
                let rank = self.zipf.as_ref().map_or(1.0, |z| z.sample(&mut self.rng)) as u64;
                ((rank.saturating_sub(1) as u128 * SCATTER) % wss as u128) as u64
            }
            WorkloadKind::Sequential => k % wss,
            WorkloadKind::Phased { phase } => {
                let t = self.time_of(k);
                let n = (t.as_nanos() / phase.as_nanos().max(1)) as u64;
                let base = (n.wrapping_mul(wss)) % self.total_pages.max(1);
                (base + self.rng.random_range(0..wss)) % self.total_pages.max(1)
            }
        };
        let slot = self.rng.random_range(0..512usize);
        let page = match self.spec.kind {
            WorkloadKind::Phased { .. } => page,
            _ => (page + self.spec.wss_offset) % self.total_pages.max(1),
        };
        Access {
            index: k,
            page,
            write,
            slot,
            value: splitmix(self.spec.seed ^ k) | 1,
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: WorkloadKind, seed: u64) -> WorkloadSpec {
        WorkloadSpec::new(kind, 1000, 1000.0, seed)
    }

    fn pages(kind: WorkloadKind, seed: u64, n: usize) -> Vec<u64> {
        let mut g = WorkloadGen::new(spec(kind, seed), 4000).unwrap();
        (0..n).map(|_| g.next_access().page).collect()
    }

    #[test]
    fn same_seed_same_writes_other_seed_other_writes() {
        assert_eq!(
            pages(WorkloadKind::Uniform, 1, 100),
            pages(WorkloadKind::Uniform, 1, 100)
        );
        assert_ne!(
            pages(WorkloadKind::Uniform, 1, 100),
            pages(WorkloadKind::Uniform, 2, 100)
        );
    }

    #[test]
    fn writes_stay_in_the_working_set() {
        for kind in ["uniform", "hotcold", "zipf", "sequential"] {
            let k: WorkloadKind = kind.parse().unwrap();
            assert!(pages(k, 3, 5000).iter().all(|p| *p < 1000), "{kind}");
        }
        assert!(pages("phased".parse().unwrap(), 3, 5000)
            .iter()
            .all(|p| *p < 4000));
    }

    #[test]
    fn hotcold_concentrates_writes() {
        let p = pages("hotcold".parse().unwrap(), 5, 10000);
        let hot = p.iter().filter(|x| **x < 100).count();
        assert!((8500..9500).contains(&hot), "hot writes {hot}");
    }

    #[test]
    fn zipf_is_skewed() {
        let p = pages("zipf".parse().unwrap(), 5, 10000);
        let top = p.iter().filter(|x| **x == 0).count();
        assert!(top > 800, "most popular page got {top} of 10000");
    }

    #[test]
    fn phased_moves_its_window() {
        let mut g = WorkloadGen::new(
            spec(
                WorkloadKind::Phased {
                    phase: Duration::from_millis(500),
                },
                1,
            ),
            4000,
        )
        .unwrap();
        let first: Vec<u64> = (0..500).map(|_| g.next_access().page).collect();
        let second: Vec<u64> = (0..500).map(|_| g.next_access().page).collect();
        assert!(first.iter().all(|p| *p < 1000));
        assert!(second.iter().all(|p| (1000..2000).contains(p)));
    }

    #[test]
    fn times_follow_the_rate() {
        let g = WorkloadGen::new(spec(WorkloadKind::Uniform, 1), 4000).unwrap();
        assert_eq!(g.time_of(1000), Duration::from_secs(1));
        let idle = WorkloadGen::new(WorkloadSpec::idle(1), 10).unwrap();
        assert_eq!(idle.next_time(), Duration::MAX);
    }

    #[test]
    fn reads_mix_in_and_the_working_set_can_move() {
        let mut s = spec(WorkloadKind::Uniform, 1);
        s.reads_per_write = 3.0;
        s.wss_offset = 3500;
        let mut g = WorkloadGen::new(s, 4000).unwrap();
        let acc: Vec<Access> = (0..4000).map(|_| g.next_access()).collect();
        let writes = acc.iter().filter(|a| a.write).count();
        assert!((800..1200).contains(&writes), "writes {writes} of 4000");
        assert!(acc.iter().all(|a| a.page >= 3500 || a.page < 500));
        assert_eq!(g.time_of(4000), Duration::from_secs(1));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec(WorkloadKind::Uniform, 1);
        s.wss_pages = 0;
        assert!(WorkloadGen::new(s, 10).is_err());
        let mut s = spec(WorkloadKind::Uniform, 1);
        s.zero_fraction = 2.0;
        assert!(WorkloadGen::new(s, 10).is_err());
        let mut s = spec(WorkloadKind::Uniform, 1);
        s.writes_per_sec = f64::NAN;
        assert!(WorkloadGen::new(s, 10).is_err());
        assert!("bogus".parse::<WorkloadKind>().is_err());
    }
}

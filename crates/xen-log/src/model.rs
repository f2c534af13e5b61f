//! What a log says: one migration's rounds, closing line, suspend,
//! progress and error lines, and what follows from them.

use migrate_core::RoundStats;
use std::fmt;
use std::time::Duration;

/// Xen's page size on x86 in bytes: the unit of every page count in the log.
pub const XEN_PAGE_SIZE: u32 = 4096;

/// What each field of a round line means, in the order the line gives
/// them: `(field, meaning)`. The `xen-log` program prints it above its
/// table of rounds.
pub const ROUND_FIELDS: &[(&str, &str)] = &[
    (
        "round",
        "round number. Round 1 goes over all of the guest's memory; each later round over the pages dirtied during the round before.",
    ),
    ("sent", "pages sent in the round."),
    (
        "skipped",
        "pages due in the round that the guest dirtied again while it ran; sending them now would be wasted, so they wait for a later round.",
    ),
    (
        "delta",
        "wall-clock length of the round in ms: from the end of the previous round's statistics to the end of this one's (sending the pages and reading the dirty log; for the round that says \"Start last iteration\", also suspending the guest).",
    ),
    (
        "dom0",
        "CPU time of dom0's first vCPU over the round, as % of delta (the saving process runs in dom0, alongside whatever else dom0 does).",
    ),
    (
        "target",
        "CPU time of the migrating guest's first vCPU over the round, as % of delta; 0 once the guest is suspended.",
    ),
    (
        "sent Mb/s",
        "sent · 4096 bytes · 8 bits / delta, in megabits (10^6 bits) per second: pages · 4096 / (delta_ms · 125). Xen truncates it to an integer.",
    ),
    ("dirtied Mb/s", "the same formula over the dirtied pages."),
    (
        "dirtied",
        "pages the guest wrote during the round, read from the dirty log at its end: exactly what the next round goes over (its sent + skipped). In the final round Xen prints the previous round's count again; the dirty log is not read while the guest is suspended.",
    ),
];

/// Longest piece of a line kept in errors and notes.
pub(crate) const TEXT_CAP: usize = 200;

/// Mb/s as the save code computes it: `pages · 4096 / (delta_ms · 125)`,
/// megabits (10⁶ bits) per second, before Xen truncates it to an integer.
/// A `delta` of 0 counts as 1 ms, as in Xen.
pub fn xen_mbps(pages: u64, delta_ms: u64) -> f64 {
    let ms = delta_ms.max(1) as f64;
    pages as f64 * f64::from(XEN_PAGE_SIZE) / (ms * 125.0)
}

/// Where a round's `sent` and `skipped` counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CountsFrom {
    /// The round's own `N: sent S, skipped K` line.
    RoundLine,
    /// The next round's progress line (`Saving memory: iter N (last sent S
    /// skipped K)`, Xen 4.1–4.5).
    ProgressLine,
    /// The `Total` line less the other rounds (the final round of a Xen
    /// 4.1–4.5 log, which never prints its counts; it skips nothing).
    Total,
    /// Not in the log; `sent` and `skipped` hold 0.
    Missing,
}

impl CountsFrom {
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            CountsFrom::RoundLine => "round-line",
            CountsFrom::ProgressLine => "progress-line",
            CountsFrom::Total => "total",
            CountsFrom::Missing => "missing",
        }
    }
}

/// One round as the log reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct XenRound {
    /// Round number, from 1.
    pub round: u32,
    /// Pages sent in the round.
    pub sent: u64,
    /// Pages due in the round but dirtied again while it ran, so left for
    /// a later round.
    pub skipped: u64,
    /// Where `sent` and `skipped` came from.
    pub counts_from: CountsFrom,
    /// Wall-clock length of the round, ms.
    pub delta_ms: u64,
    /// CPU use of dom0's first vCPU over the round, percent (negative when
    /// Xen could not read it).
    pub dom0_pct: i64,
    /// CPU use of the guest's first vCPU over the round, percent.
    pub target_pct: i64,
    /// The sent rate Xen printed, Mb/s.
    pub sent_mbps: u64,
    /// The dirtying rate Xen printed, Mb/s.
    pub dirtied_mbps: u64,
    /// Pages the guest dirtied during the round. In the final round Xen
    /// repeats the previous round's count.
    pub dirtied_pages: u64,
    /// The round said `Start last iteration`: the guest was suspended at
    /// its end, and its `delta` includes the suspend.
    pub last_iteration: bool,
    /// The round ran with the guest suspended: the final copy (the round
    /// after the one marked `last_iteration`).
    pub final_copy: bool,
    /// Line (from 1) of the round's `N: sent` line, or of its figures when
    /// the log has no such line.
    pub line: usize,
    /// Line of the round's `delta ...` figures; differs from `line` when the
    /// round was split across lines and joined.
    pub delta_line: usize,
}

impl XenRound {
    /// Pages the round looked at: `sent + skipped`.
    pub fn considered(&self) -> u64 {
        self.sent.saturating_add(self.skipped)
    }

    /// Whether the round's figures were on a later line than its start.
    pub fn joined(&self) -> bool {
        self.line != self.delta_line
    }

    /// The sent rate the formula gives for this round's counts, Mb/s.
    pub fn expected_sent_mbps(&self) -> f64 {
        xen_mbps(self.sent, self.delta_ms)
    }

    /// The dirtying rate the formula gives for this round's counts, Mb/s.
    pub fn expected_dirtied_mbps(&self) -> f64 {
        xen_mbps(self.dirtied_pages, self.delta_ms)
    }

    /// The round in the core's vocabulary. The log gives page data only:
    /// `bytes` is `sent · 4096` (no stream overhead) and `zero` is 0.
    pub fn to_round_stats(&self) -> RoundStats {
        {
            let mut v = RoundStats::default();
            v.round = self.round;
            v.sent = self.sent;
            v.skipped = self.skipped;
            v.zero = 0;
            v.bytes = self.sent.saturating_mul(u64::from(XEN_PAGE_SIZE));
            v.delta = Duration::from_millis(self.delta_ms);
            v.dom0_pct = self.dom0_pct as f64;
            v.target_pct = self.target_pct as f64;
            v.dirtied = self.dirtied_pages;
            v.final_copy = self.final_copy;
            v.page_size = XEN_PAGE_SIZE;
            v
        }
    }
}

impl fmt::Display for XenRound {
    /// The round as one line in Xen's format, with the rates as printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: sent {}, skipped {}, delta {}ms, dom0 {}%, target {}%, sent {}Mb/s, dirtied {}Mb/s {} pages",
            self.round,
            self.sent,
            self.skipped,
            self.delta_ms,
            self.dom0_pct,
            self.target_pct,
            self.sent_mbps,
            self.dirtied_mbps,
            self.dirtied_pages
        )
    }
}

/// The closing line, `Total pages sent= T (R x)`.
#[derive(Clone, Debug, PartialEq)]
pub struct TotalLine {
    /// Line number.
    pub line: usize,
    /// `T`: pages sent over all rounds.
    pub pages: u64,
    /// `R`: `T / p2m_size` as printed.
    pub ratio: f64,
    /// Digits after the decimal point in `R` (Xen prints 2).
    pub ratio_decimals: u32,
}

impl TotalLine {
    /// The interval the true ratio lies in, given the printed rounding.
    pub fn ratio_bounds(&self) -> (f64, f64) {
        let half = 0.5 * 10f64.powi(-(self.ratio_decimals.min(15) as i32));
        ((self.ratio - half).max(0.0), self.ratio + half)
    }
}

/// The guest was suspended here (`SUSPEND shinfo ...`, or migration v2's
/// `Domain now suspended`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspend {
    /// Line number.
    pub line: usize,
    /// The frame of the guest's shared-info page, if printed.
    pub shared_info_frame: Option<u64>,
}

/// Migration v2's opening line, `Saving domain D, type T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavingDomain {
    /// Line number.
    pub line: usize,
    /// Domain id on the source.
    pub domid: u32,
    /// Guest type as printed, e.g. `x86 HVM`.
    pub guest_type: String,
}

/// A progress line, `label: done/total  P%`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Line number.
    pub line: usize,
    /// What is in progress, e.g. `Frames iteration 2 of 5`.
    pub label: String,
    /// The iteration named in the label (`iteration N` or `iter N`).
    pub iteration: Option<u32>,
    /// The iteration limit named in the label (`of M`).
    pub iterations: Option<u32>,
    /// Xen 4.1–4.5: the previous round's sent pages (`last sent S`).
    pub last_sent: Option<u64>,
    /// Xen 4.1–4.5: the previous round's skipped pages (`skipped K`).
    pub last_skipped: Option<u64>,
    /// Units done.
    pub done: u64,
    /// Units in all. In Xen 4.1–4.5 save progress, and in migration v2's
    /// iteration 0, this is `p2m_size`; in later v2 iterations it is the
    /// number of dirty pages the iteration sends.
    pub total: u64,
    /// Percent done as printed.
    pub percent: u32,
    /// Whether the guest had already been suspended.
    pub after_suspend: bool,
}

impl Progress {
    pub(crate) fn is_legacy_save(&self) -> bool {
        self.label.contains("Saving memory") && self.iteration.is_some()
    }

    fn is_first_frames_pass(&self) -> bool {
        self.label.starts_with("Frames iteration") && self.iteration == Some(0)
    }
}

/// A line the save code reported as an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogNote {
    /// Line number.
    pub line: usize,
    /// The message, prefixes removed.
    pub text: String,
}

/// Where the log stops in the middle of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incomplete {
    /// Line number of the unfinished line or round.
    pub line: usize,
    /// The round it belongs to, if known.
    pub round: Option<u32>,
    /// The unfinished text.
    pub text: String,
}

/// One migration as its log tells it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct XenLog {
    /// First line (from 1) of the input that belongs to this migration. A
    /// migration runs up to the line before the one that starts the next
    /// (its first round, its iteration-0 progress or its `Saving domain`
    /// line), so lines between two migrations count with the first.
    pub first_line: usize,
    /// Last line that belongs to it.
    pub last_line: usize,
    /// The rounds, in order.
    pub rounds: Vec<XenRound>,
    /// The closing `Total pages sent=` line.
    pub total: Option<TotalLine>,
    /// `(of which N were fixups)`: pages added to the final round because
    /// they were not mapped earlier.
    pub fixups: Option<u64>,
    /// Where the guest was suspended.
    pub suspend: Option<Suspend>,
    /// Migration v2's `Saving domain` line.
    pub saving: Option<SavingDomain>,
    /// Progress lines.
    pub progress: Vec<Progress>,
    /// Lines reported as errors.
    pub errors: Vec<LogNote>,
    /// Set when the log stops inside a round or mid-line.
    pub incomplete: Option<Incomplete>,
    /// Non-blank lines that were not understood.
    pub ignored_lines: usize,
}

/// What the closing ratio says, with what the log lets one derive.
#[derive(Clone, Debug, PartialEq)]
pub struct ClosingRatio {
    /// `T`, pages sent in all.
    pub total_pages: u64,
    /// `R` as printed.
    pub ratio: f64,
    /// `T / R`: the guest's `p2m_size` (frame numbers up to the highest,
    /// holes included).
    pub p2m_estimate: f64,
    /// Smallest `p2m_size` consistent with the printed rounding of `R`.
    pub p2m_min: f64,
    /// Largest, if bounded.
    pub p2m_max: Option<f64>,
    /// `p2m_size` exactly, when progress lines give it.
    pub p2m_from_progress: Option<u64>,
    /// Pages round 1 looked at (`sent + skipped`): the pages of RAM the
    /// first pass went over.
    pub first_round_pages: Option<u64>,
    /// `T` over `first_round_pages`: how many times, on average, each of
    /// those pages was sent.
    pub sent_per_first_round_page: Option<f64>,
}

/// What the log says about downtime: a lower bound only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DowntimeBound {
    /// The final-copy round.
    pub final_round: u32,
    /// Its `delta`: the time to send its pages with the guest suspended.
    /// Downtime is at least this.
    pub final_delta_ms: u64,
    /// Pages it sent.
    pub final_pages: u64,
    /// The round marked `Start last iteration`, whose `delta` includes the
    /// suspend (in unknown part).
    pub suspend_round: Option<u32>,
    /// That round's `delta`.
    pub suspend_round_delta_ms: Option<u64>,
}

impl XenLog {
    /// Pages sent over all rounds (as the rounds give them).
    pub fn sum_sent(&self) -> u64 {
        self.rounds
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.sent))
    }

    /// Whether the log shows the guest being suspended.
    pub fn suspend_seen(&self) -> bool {
        self.suspend.is_some()
    }

    /// The round marked `Start last iteration`.
    pub fn last_iteration_round(&self) -> Option<&XenRound> {
        self.rounds.iter().rev().find(|r| r.last_iteration)
    }

    /// The final-copy round, sent with the guest suspended.
    pub fn final_round(&self) -> Option<&XenRound> {
        self.rounds.iter().rev().find(|r| r.final_copy)
    }

    /// `p2m_size` derived from the closing line: `T / R`.
    pub fn p2m_size_estimate(&self) -> Option<f64> {
        let t = self.total.as_ref()?;
        (t.ratio > 0.0).then(|| t.pages as f64 / t.ratio)
    }

    /// The `p2m_size` interval the printed rounding of `R` allows:
    /// `(min, max)`, `max` unbounded (`None`) if `R` could be 0.
    pub fn p2m_size_range(&self) -> Option<(f64, Option<f64>)> {
        let t = self.total.as_ref()?;
        let (lo, hi) = t.ratio_bounds();
        if hi <= 0.0 {
            return None;
        }
        let min = t.pages as f64 / hi;
        let max = (lo > 0.0).then(|| t.pages as f64 / lo);
        Some((min, max))
    }

    /// `p2m_size` exactly, when progress lines give it (Xen 4.1–4.5 save
    /// progress, or migration v2's iteration 0).
    pub fn p2m_size_from_progress(&self) -> Option<u64> {
        self.progress
            .iter()
            .find(|p| (p.is_legacy_save() || p.is_first_frames_pass()) && p.total > 0)
            .map(|p| p.total)
    }

    /// The closing ratio and what follows from it; `None` without a
    /// `Total` line.
    pub fn closing_ratio(&self) -> Option<ClosingRatio> {
        let t = self.total.as_ref()?;
        let (p2m_min, p2m_max) = self.p2m_size_range()?;
        let first_round_pages = self
            .rounds
            .first()
            .filter(|r| r.round == 1 && r.counts_from != CountsFrom::Missing)
            .map(XenRound::considered);
        Some(ClosingRatio {
            total_pages: t.pages,
            ratio: t.ratio,
            p2m_estimate: self.p2m_size_estimate()?,
            p2m_min,
            p2m_max,
            p2m_from_progress: self.p2m_size_from_progress(),
            first_round_pages,
            sent_per_first_round_page: first_round_pages
                .filter(|&p| p > 0)
                .map(|p| t.pages as f64 / p as f64),
        })
    }

    /// The lower bound on downtime the log supports: the final round's
    /// `delta`. `None` if the log has no final-copy round.
    pub fn downtime_bound(&self) -> Option<DowntimeBound> {
        let last = self.final_round()?;
        let marked = self
            .rounds
            .iter()
            .rev()
            .find(|r| r.last_iteration && r.round < last.round);
        Some(DowntimeBound {
            final_round: last.round,
            final_delta_ms: last.delta_ms,
            final_pages: last.sent,
            suspend_round: marked.map(|r| r.round),
            suspend_round_delta_ms: marked.map(|r| r.delta_ms),
        })
    }

    /// The rounds in the core's vocabulary (see
    /// [`XenRound::to_round_stats`]).
    pub fn to_round_stats(&self) -> Vec<RoundStats> {
        self.rounds.iter().map(XenRound::to_round_stats).collect()
    }
}

//! Reading the migration logs Xen itself writes.
//!
//! Xen's save code (`xc_domain_save` in libxc) reports each pre-copy
//! round in one line:
//!
//! ```text
//! 1: sent 28847, skipped 3921, delta 1702ms, dom0 62%, target 32%, sent 555Mb/s, dirtied 116Mb/s 6036 pages
//! ```
//!
//! and closes with `Total pages sent= T (R x)`. This module reads those
//! lines, wherever they were captured, into [`XenRound`]s, checks the
//! log's own arithmetic ([`XenLog::check`]), and converts the rounds into
//! the core's [`RoundStats`].
//!
//! # What a round line says
//!
//! | field | meaning |
//! |---|---|
//! | `N:` | round number, from 1 |
//! | `sent` | pages sent in the round |
//! | `skipped` | pages due in the round but dirtied again while it ran; left for a later round |
//! | `delta` | wall-clock length of the round in ms, from the end of the previous round's statistics to the end of this one's |
//! | `dom0` | CPU time of dom0's first vCPU over the round, % of `delta` |
//! | `target` | CPU time of the guest's first vCPU over the round, % of `delta` |
//! | `sent ..Mb/s` | `sent · 4096 / (delta · 125)`, truncated to an integer |
//! | `dirtied ..Mb/s` | the same formula over the dirtied pages |
//! | `.. pages` | pages the guest dirtied during the round: what the next round must look at (its `sent + skipped`) |
//!
//! The round that decides to stop says `Start last iteration`; the save
//! code then suspends the guest, prints `SUSPEND shinfo ...`, and only then
//! prints that round's `delta ...` figures, so in a log the round is split
//! across lines (and its `delta` includes the suspend). The next round is
//! the final copy, sent with the guest suspended; its `dirtied` figures
//! repeat the previous round's count, because the dirty log is not read
//! again. `R` in the closing line is `T / p2m_size`, where `p2m_size` is
//! the number of guest frame numbers up to the highest one, holes included,
//! not the guest's RAM.
//!
//! # Where the lines come from
//!
//! The reader takes any text and picks out what it knows:
//!
//! - xend's log (Xen 3.x), each line prefixed by xend, e.g.
//!   `[2009-05-01 12:00:00 2345] INFO (XendCheckpoint:358) 1: sent 28847, ...`;
//! - libxc's own logging as `xl -vvv` prints it (`xc: detail: ...`,
//!   `xc: info: ...`, `xc: error: ...`, or bare `xc: ...`), where each
//!   message is a line of its own, so every round arrives in two lines;
//! - libxc of Xen 4.1–4.5, which reports a round's counts in its progress
//!   line (`Saving memory: iter N (last sent S skipped K): done/total  P%`)
//!   and its figures in a separate `delta ...` line; the counts of the
//!   final round then follow only from the `Total` line;
//! - migration v2 (Xen 4.6 and later), which prints no round lines: the
//!   reader keeps its `Saving domain D, type T` line and its progress lines
//!   (`Frames iteration N: done/total  P%`) in [`XenLog::saving`] and
//!   [`XenLog::progress`].
//!
//! Lines it does not know are counted in [`XenLog::ignored_lines`]. A
//! migration line with a missing or malformed field is a [`LogError`] with
//! its line number, except on the last non-blank line of the input, where
//! it is taken as the place the log was cut ([`XenLog::incomplete`]).
//! Nothing here panics on any input.
//!
//! # What a log cannot tell
//!
//! Downtime. The final round's `delta` covers sending the last pages with
//! the guest suspended; the suspend itself falls inside the previous
//! round's `delta`, and what comes after the final round (vCPU and device
//! state, the destination loading them and resuming the guest) is not in
//! the source's log at all. [`XenLog::downtime_bound`] gives the final
//! round's `delta` as a lower bound, which is all the log supports.
//!
//! ```
//! use backend_xen::log;
//!
//! let text = "\
//! 1: sent 100, skipped 0, delta 10ms, dom0 50%, target 20%, sent 327Mb/s, dirtied 13Mb/s 4 pages
//! 2: sent 4, skipped 0, Start last iteration
//! SUSPEND shinfo 00000bdc
//! delta 3ms, dom0 60%, target 0%, sent 43Mb/s, dirtied 21Mb/s 2 pages
//! 3: sent 2, skipped 0, delta 1ms, dom0 100%, target 0%, sent 65Mb/s, dirtied 65Mb/s 2 pages
//! Total pages sent= 106 (1.04x)
//! ";
//! let xen = log::parse(text)?;
//! assert_eq!(xen.rounds.len(), 3);
//! assert!(xen.rounds[1].last_iteration && xen.rounds[2].final_copy);
//! assert!(xen.check().is_empty());
//! assert_eq!(xen.downtime_bound().map(|d| d.final_delta_ms), Some(1));
//! # Ok::<(), log::LogError>(())
//! ```

use migrate_core::RoundStats;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Xen's page size on x86 in bytes: the unit of every page count in the log.
pub const XEN_PAGE_SIZE: u32 = 4096;

/// Longest piece of a line kept in errors and notes.
const TEXT_CAP: usize = 200;

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
        RoundStats {
            round: self.round,
            sent: self.sent,
            skipped: self.skipped,
            zero: 0,
            bytes: self.sent.saturating_mul(u64::from(XEN_PAGE_SIZE)),
            delta: Duration::from_millis(self.delta_ms),
            dom0_pct: self.dom0_pct as f64,
            target_pct: self.target_pct as f64,
            dirtied: self.dirtied_pages,
            final_copy: self.final_copy,
            page_size: XEN_PAGE_SIZE,
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
    fn is_legacy_save(&self) -> bool {
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

/// Something in the log that does not add up, or that stops a check.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// Line the finding is about.
    pub line: usize,
    /// Round it is about, if any.
    pub round: Option<u32>,
    /// What was found.
    pub kind: FindingKind,
}

/// The kinds of [`Finding`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum FindingKind {
    /// `sent + skipped` differs from the previous round's dirtied pages.
    PagesMismatch {
        /// The previous round.
        previous_round: u32,
        /// Pages it dirtied.
        previous_dirtied: u64,
        /// This round's sent pages.
        sent: u64,
        /// This round's skipped pages.
        skipped: u64,
    },
    /// The printed sent rate is more than 1 Mb/s from the formula's.
    SentRateMismatch {
        /// As printed.
        reported: u64,
        /// From `sent · 4096 / (delta · 125)`.
        expected: f64,
    },
    /// The printed dirtying rate is more than 1 Mb/s from the formula's.
    DirtiedRateMismatch {
        /// As printed.
        reported: u64,
        /// From `dirtied · 4096 / (delta · 125)`.
        expected: f64,
    },
    /// `T` differs from the sum of the rounds' `sent`.
    TotalMismatch {
        /// `T` as printed.
        reported: u64,
        /// Sum over the rounds.
        sum_of_rounds: u64,
    },
    /// `R` is not `T / p2m_size` for the `p2m_size` the progress lines give.
    RatioMismatch {
        /// `R` as printed.
        reported: f64,
        /// `p2m_size` from the progress lines.
        p2m_size: u64,
        /// `T / p2m_size`.
        expected: f64,
    },
    /// Round numbers skip or do not start at 1.
    RoundGap {
        /// The number due.
        expected: u32,
        /// The number found.
        found: u32,
    },
    /// The round's counts are not in the log.
    CountsMissing,
    /// The log ends before the `Total` line.
    NoTotal,
    /// The log stops inside a round or mid-line.
    Cut {
        /// The unfinished text.
        text: String,
    },
}

impl FindingKind {
    /// A short name for machine-readable output.
    pub fn code(&self) -> &'static str {
        match self {
            FindingKind::PagesMismatch { .. } => "pages-mismatch",
            FindingKind::SentRateMismatch { .. } => "sent-rate-mismatch",
            FindingKind::DirtiedRateMismatch { .. } => "dirtied-rate-mismatch",
            FindingKind::TotalMismatch { .. } => "total-mismatch",
            FindingKind::RatioMismatch { .. } => "ratio-mismatch",
            FindingKind::RoundGap { .. } => "round-gap",
            FindingKind::CountsMissing => "counts-missing",
            FindingKind::NoTotal => "no-total",
            FindingKind::Cut { .. } => "cut",
        }
    }

    /// Whether this is a figure contradicting another (rather than
    /// something missing from the log).
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            FindingKind::PagesMismatch { .. }
                | FindingKind::SentRateMismatch { .. }
                | FindingKind::DirtiedRateMismatch { .. }
                | FindingKind::TotalMismatch { .. }
                | FindingKind::RatioMismatch { .. }
        )
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(r) = self.round {
            write!(f, ", round {r}")?;
        }
        f.write_str(": ")?;
        match &self.kind {
            FindingKind::PagesMismatch {
                previous_round,
                previous_dirtied,
                sent,
                skipped,
            } => {
                let got = sent.saturating_add(*skipped);
                write!(
                    f,
                    "sent + skipped = {sent} + {skipped} = {got}, but round {previous_round} dirtied {previous_dirtied} pages (off by {:+})",
                    i128::from(got) - i128::from(*previous_dirtied)
                )
            }
            FindingKind::SentRateMismatch { reported, expected } => write!(
                f,
                "sent {reported}Mb/s printed, but sent·4096/(delta·125) = {expected:.2}Mb/s"
            ),
            FindingKind::DirtiedRateMismatch { reported, expected } => write!(
                f,
                "dirtied {reported}Mb/s printed, but dirtied·4096/(delta·125) = {expected:.2}Mb/s"
            ),
            FindingKind::TotalMismatch {
                reported,
                sum_of_rounds,
            } => write!(
                f,
                "Total pages sent= {reported}, but the rounds sent {sum_of_rounds} (off by {:+})",
                i128::from(*reported) - i128::from(*sum_of_rounds)
            ),
            FindingKind::RatioMismatch {
                reported,
                p2m_size,
                expected,
            } => write!(
                f,
                "ratio {reported} printed, but T / p2m_size = T / {p2m_size} = {expected:.4}"
            ),
            FindingKind::RoundGap { expected, found } => {
                write!(f, "round {expected} expected, round {found} found")
            }
            FindingKind::CountsMissing => {
                f.write_str("the round's sent and skipped counts are not in the log")
            }
            FindingKind::NoTotal => f.write_str(
                "the log ends before the `Total pages sent=` line (migration unfinished, or log cut)",
            ),
            FindingKind::Cut { text } if self.round.is_some() => {
                write!(f, "the log stops mid-round: {text:?}")
            }
            FindingKind::Cut { text } => write!(f, "the log stops mid-line: {text:?}"),
        }
    }
}

/// Why a log could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A migration line lacks a field.
    #[error("line {line}: no `{field}` in {text:?}")]
    MissingField {
        /// Line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// The line's message.
        text: String,
    },
    /// A field's value is not a number.
    #[error("line {line}: `{field}` is not a number: {value:?}")]
    BadNumber {
        /// Line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// What stood there.
        value: String,
    },
    /// A round line goes on with something other than `Start last
    /// iteration` or its `delta` figures.
    #[error("line {line}: round {round}: unexpected {found:?} after the skipped count")]
    UnexpectedText {
        /// Line number.
        line: usize,
        /// The round.
        round: u32,
        /// The unexpected text.
        found: String,
    },
    /// A round began, or the log closed, before an earlier round got its
    /// `delta` figures.
    #[error(
        "line {line}: round {pending_round} (line {pending_line}) never got its `delta` figures"
    )]
    MissingDelta {
        /// Line number where it showed.
        line: usize,
        /// The round left without figures.
        pending_round: u32,
        /// Where that round began.
        pending_line: usize,
    },
    /// No line of the input is a Xen migration line.
    #[error("no Xen migration lines in {lines} lines of input")]
    NoMigration {
        /// Lines read.
        lines: usize,
    },
    /// [`parse`] was given a log of several migrations.
    #[error(
        "the log holds {count} migrations (starting at lines {starts:?}); read it with parse_all"
    )]
    SeveralMigrations {
        /// How many.
        count: usize,
        /// Their first lines.
        starts: Vec<usize>,
    },
}

impl LogError {
    /// The line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            LogError::MissingField { line, .. }
            | LogError::BadNumber { line, .. }
            | LogError::UnexpectedText { line, .. }
            | LogError::MissingDelta { line, .. } => Some(*line),
            LogError::NoMigration { .. } | LogError::SeveralMigrations { .. } => None,
        }
    }
}

/// Reads a log of one migration.
///
/// Fails with [`LogError::SeveralMigrations`] if the text holds more than
/// one (read those with [`parse_all`]), and with [`LogError::NoMigration`]
/// if it holds none.
pub fn parse(text: &str) -> Result<XenLog, LogError> {
    let mut all = parse_all(text)?;
    if all.len() == 1 {
        Ok(all.remove(0))
    } else {
        Err(LogError::SeveralMigrations {
            count: all.len(),
            starts: all.iter().map(|m| m.first_line).collect(),
        })
    }
}

/// Reads a log that may hold several migrations (a long-running xend log
/// does), in order. A migration starts where round numbers go back, after
/// a `Total` line, or at a `Saving domain` line.
pub fn parse_all(text: &str) -> Result<Vec<XenLog>, LogError> {
    let lines: Vec<&str> = text.split('\n').collect();
    let n_lines = if text.is_empty() {
        0
    } else if text.ends_with('\n') {
        lines.len() - 1
    } else {
        lines.len()
    };
    let last_nonblank = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map(|i| i + 1);
    let ends_mid_line = !text.is_empty() && !text.ends_with('\n');

    let mut p = Parser::default();
    for (i, raw) in lines.iter().take(n_lines).enumerate() {
        let n = i + 1;
        p.cur.touch(n);
        let item = match classify(n, raw) {
            Ok(item) => item,
            Err(_) if Some(n) == last_nonblank => {
                p.cur.cut_at(n, raw, round_hint(raw));
                continue;
            }
            Err(e) => return Err(e),
        };
        // A line not understood that ends the input without a newline, in a
        // migration not yet closed: the log was cut inside it.
        if matches!(item, Item::Other)
            && Some(n) == last_nonblank
            && ends_mid_line
            && p.cur.has_content()
            && p.cur.log.total.is_none()
        {
            p.cur.cut_at(n, raw, None);
            continue;
        }
        p.apply(n, item)?;
    }
    let cur = std::mem::take(&mut p.cur);
    if cur.has_content() {
        p.done.push(cur.finish());
    } else if let Some(last) = p.done.last_mut() {
        last.ignored_lines += cur.log.ignored_lines;
        last.last_line = last.last_line.max(cur.log.last_line);
    }
    if p.done.is_empty() {
        return Err(LogError::NoMigration { lines: n_lines });
    }
    Ok(p.done)
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

    /// Checks the log's own arithmetic: each round's `sent + skipped`
    /// against the previous round's dirtied pages (the final round may
    /// exceed it by the fixups), both rates against
    /// `pages · 4096 / (delta · 125)` within 1 Mb/s (Xen truncates), `T`
    /// against the rounds' sum, and `R` against `p2m_size` when progress
    /// lines give it. Also reports gaps, missing counts, a missing `Total`
    /// line and a cut. Empty when all is consistent.
    pub fn check(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut consecutive = true;
        if let Some(first) = self.rounds.first() {
            if first.round != 1 {
                consecutive = false;
                out.push(Finding {
                    line: first.line,
                    round: Some(first.round),
                    kind: FindingKind::RoundGap {
                        expected: 1,
                        found: first.round,
                    },
                });
            }
        }
        for (i, r) in self.rounds.iter().enumerate() {
            let known = r.counts_from != CountsFrom::Missing;
            if i > 0 {
                let p = &self.rounds[i - 1];
                if r.round != p.round.saturating_add(1) {
                    consecutive = false;
                    out.push(Finding {
                        line: r.line,
                        round: Some(r.round),
                        kind: FindingKind::RoundGap {
                            expected: p.round.saturating_add(1),
                            found: r.round,
                        },
                    });
                } else if known {
                    let got = r.considered();
                    let want = p.dirtied_pages;
                    let slack = if r.final_copy {
                        self.fixups.unwrap_or(0)
                    } else {
                        0
                    };
                    if got < want || got - want > slack {
                        out.push(Finding {
                            line: r.line,
                            round: Some(r.round),
                            kind: FindingKind::PagesMismatch {
                                previous_round: p.round,
                                previous_dirtied: want,
                                sent: r.sent,
                                skipped: r.skipped,
                            },
                        });
                    }
                }
            }
            if known {
                let expected = r.expected_sent_mbps();
                if !rate_matches(r.sent_mbps, expected) {
                    out.push(Finding {
                        line: r.delta_line,
                        round: Some(r.round),
                        kind: FindingKind::SentRateMismatch {
                            reported: r.sent_mbps,
                            expected,
                        },
                    });
                }
            } else {
                out.push(Finding {
                    line: r.delta_line,
                    round: Some(r.round),
                    kind: FindingKind::CountsMissing,
                });
            }
            let expected = r.expected_dirtied_mbps();
            if !rate_matches(r.dirtied_mbps, expected) {
                out.push(Finding {
                    line: r.delta_line,
                    round: Some(r.round),
                    kind: FindingKind::DirtiedRateMismatch {
                        reported: r.dirtied_mbps,
                        expected,
                    },
                });
            }
        }
        if let Some(t) = &self.total {
            let all_printed = self.rounds.iter().all(|r| {
                matches!(
                    r.counts_from,
                    CountsFrom::RoundLine | CountsFrom::ProgressLine
                )
            });
            if consecutive && !self.rounds.is_empty() && all_printed {
                let sum = self.sum_sent();
                if sum != t.pages {
                    out.push(Finding {
                        line: t.line,
                        round: None,
                        kind: FindingKind::TotalMismatch {
                            reported: t.pages,
                            sum_of_rounds: sum,
                        },
                    });
                }
            }
            if let Some(p2m) = self.p2m_size_from_progress() {
                let expected = t.pages as f64 / p2m as f64;
                let (lo, hi) = t.ratio_bounds();
                // Xen divides in single precision; allow for it.
                let eps = 1e-6 * expected.max(1.0);
                if expected < lo - eps || expected > hi + eps {
                    out.push(Finding {
                        line: t.line,
                        round: None,
                        kind: FindingKind::RatioMismatch {
                            reported: t.ratio,
                            p2m_size: p2m,
                            expected,
                        },
                    });
                }
            }
        }
        if let Some(c) = &self.incomplete {
            out.push(Finding {
                line: c.line,
                round: c.round,
                kind: FindingKind::Cut {
                    text: c.text.clone(),
                },
            });
        }
        if self.total.is_none() && !self.rounds.is_empty() {
            out.push(Finding {
                line: self.last_line,
                round: None,
                kind: FindingKind::NoTotal,
            });
        }
        out.sort_by_key(|f| f.line);
        out
    }
}

fn rate_matches(reported: u64, expected: f64) -> bool {
    (reported as f64 - expected).abs() <= 1.0 + 1e-9
}

// ---------------------------------------------------------------------------
// Lines

/// A round's figures: everything from `delta` on.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Figures {
    delta_ms: u64,
    dom0_pct: i64,
    target_pct: i64,
    sent_mbps: u64,
    dirtied_mbps: u64,
    dirtied_pages: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct RoundLine {
    round: u32,
    sent: u64,
    skipped: u64,
    last_iteration: bool,
    figures: Option<Figures>,
    text: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Item {
    Blank,
    Round(RoundLine),
    Figures(Figures),
    StartLast,
    Suspend(Option<u64>),
    Total {
        pages: u64,
        ratio: f64,
        decimals: u32,
    },
    Fixups(u64),
    Saving {
        domid: u32,
        guest_type: String,
    },
    Progress(Progress),
    Error(String),
    Other,
}

const XEND_LEVELS: &[&str] = &["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"];
const XTL_LEVELS: &[&str] = &[
    "debug", "verbose", "detail", "progress", "info", "notice", "warning", "error", "critical",
];

/// A line with its known prefixes taken off.
struct Message<'a> {
    text: &'a str,
    xend_level: Option<&'a str>,
    xend_module: Option<&'a str>,
    xc_level: Option<&'a str>,
}

fn cap(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(TEXT_CAP) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Takes off xend's `[date pid] LEVEL (Module:line) `, `xl`'s optional
/// date and `[pid] `, keeps the last carriage-return segment (progress
/// output overwrites itself with `\r`), and takes off `xc: level: `.
fn message(raw: &str) -> Message<'_> {
    let mut s = raw.trim_start();
    let mut xend_level = None;
    let mut xend_module = None;
    if s.starts_with('[') {
        if let Some(end) = s.find(']') {
            let inner = &s[1..end];
            let after = s[end + 1..].trim_start();
            let word = after.split_whitespace().next().unwrap_or("");
            if XEND_LEVELS.contains(&word) {
                xend_level = Some(word);
                s = after[word.len()..].trim_start();
                if s.starts_with('(') {
                    if let Some(close) = s.find(')') {
                        let module = &s[1..close];
                        if !module.contains(' ') {
                            xend_module = Some(module.split(':').next().unwrap_or(module));
                            s = &s[close + 1..];
                        }
                    }
                }
            } else if !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_digit()) {
                s = after;
            }
        }
    }
    s = strip_date(s);
    let seg = s
        .split('\r')
        .rev()
        .find(|seg| !seg.trim().is_empty())
        .unwrap_or("");
    let seg = strip_date(seg.trim_start());
    let (xc_level, text) = strip_xc(seg);
    Message {
        text: text.trim(),
        xend_level,
        xend_module,
        xc_level,
    }
}

/// Takes off `YYYY-MM-DD HH:MM:SS ZONE ` and `[pid] `.
fn strip_date(s: &str) -> &str {
    const SHAPE: &[u8; 20] = b"dddd-dd-dd dd:dd:dd ";
    let b = s.as_bytes();
    let mut s = s;
    let dated = b.len() > SHAPE.len()
        && SHAPE.iter().zip(b).all(|(&want, &got)| {
            if want == b'd' {
                got.is_ascii_digit()
            } else {
                got == want
            }
        });
    if dated {
        let rest = s[SHAPE.len()..].trim_start();
        // The zone word, unless the next word is already the message.
        let zone = rest.split_whitespace().next().unwrap_or("");
        let is_zone = !zone.is_empty()
            && zone.len() <= 6
            && zone
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'+' || c == b'-');
        s = if is_zone {
            rest[zone.len()..].trim_start()
        } else {
            rest
        };
    }
    if s.starts_with('[') {
        if let Some(end) = s.find(']') {
            if end > 1 && s[1..end].bytes().all(|c| c.is_ascii_digit()) {
                s = s[end + 1..].trim_start();
            }
        }
    }
    s
}

fn strip_xc(s: &str) -> (Option<&str>, &str) {
    let Some(rest) = s.strip_prefix("xc: ") else {
        return (None, s);
    };
    if let Some((word, after)) = rest.split_once(": ") {
        if XTL_LEVELS.contains(&word) {
            return (Some(word), after);
        }
    }
    (None, rest)
}

fn is_word_start(s: &str, at: usize) -> bool {
    at == 0 || !s.as_bytes()[at - 1].is_ascii_alphanumeric()
}

/// Where `N: sent ` starts in `s`.
fn find_round_header(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(pos) = s[from..].find(": sent ") {
        let at = from + pos;
        let mut start = at;
        while start > 0 && b[start - 1].is_ascii_digit() {
            start -= 1;
        }
        if start < at && is_word_start(s, start) {
            return Some(start);
        }
        from = at + 1;
    }
    None
}

/// Where `delta Nms` starts in `s`.
fn find_delta(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = s[from..].find("delta ") {
        let at = from + pos;
        let rest = &s[at + 6..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest[digits..].trim_start().starts_with("ms") && is_word_start(s, at) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The round number of a line that looks like a round line.
fn round_hint(raw: &str) -> Option<u32> {
    let m = message(raw);
    let at = find_round_header(m.text)?;
    let digits: String = m.text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn tokens(s: &str) -> Vec<&str> {
    s.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .collect()
}

struct Cursor<'a> {
    toks: Vec<&'a str>,
    i: usize,
    line: usize,
    text: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str, line: usize) -> Self {
        Cursor {
            toks: tokens(text),
            i: 0,
            line,
            text,
        }
    }

    fn peek(&self) -> Option<&'a str> {
        self.toks.get(self.i).copied()
    }

    fn missing(&self, field: &'static str) -> LogError {
        LogError::MissingField {
            line: self.line,
            field,
            text: cap(self.text),
        }
    }

    fn bad(&self, field: &'static str, value: &str) -> LogError {
        LogError::BadNumber {
            line: self.line,
            field,
            value: cap(value),
        }
    }

    fn keyword(&mut self, kw: &'static str) -> Result<(), LogError> {
        if self.peek() == Some(kw) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.missing(kw))
        }
    }

    /// The next token if it looks like a number (a digit, or a sign and a
    /// digit); otherwise the field is missing.
    fn numeric(&mut self, field: &'static str) -> Result<&'a str, LogError> {
        let t = self.peek().ok_or_else(|| self.missing(field))?;
        let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
        if !digits.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.missing(field));
        }
        self.i += 1;
        Ok(t)
    }

    fn number<T: FromStr>(&mut self, field: &'static str) -> Result<T, LogError> {
        let t = self.numeric(field)?;
        t.parse().map_err(|_| self.bad(field, t))
    }

    /// A number with its unit, as `1702ms` or `1702 ms`.
    fn number_unit<T: FromStr>(&mut self, field: &'static str, unit: &str) -> Result<T, LogError> {
        let t = self.numeric(field)?;
        if let Some(num) = t.strip_suffix(unit).filter(|n| !n.is_empty()) {
            return num.parse().map_err(|_| self.bad(field, t));
        }
        if self.peek() == Some(unit) {
            self.i += 1;
            return t.parse().map_err(|_| self.bad(field, t));
        }
        Err(self.bad(field, t))
    }

    fn starts_with_words(&self, words: &[&str]) -> bool {
        words
            .iter()
            .enumerate()
            .all(|(k, w)| self.toks.get(self.i + k) == Some(w))
    }

    /// `delta Nms, dom0 N%, target N%, sent NMb/s, dirtied NMb/s N pages`.
    fn figures(&mut self) -> Result<Figures, LogError> {
        self.keyword("delta")?;
        let delta_ms = self.number_unit("delta", "ms")?;
        self.keyword("dom0")?;
        let dom0_pct = self.number_unit("dom0", "%")?;
        self.keyword("target")?;
        let target_pct = self.number_unit("target", "%")?;
        self.keyword("sent")?;
        let sent_mbps = self.number_unit("sent Mb/s", "Mb/s")?;
        self.keyword("dirtied")?;
        let dirtied_mbps = self.number_unit("dirtied Mb/s", "Mb/s")?;
        let dirtied_pages = self.number("dirtied pages")?;
        self.keyword("pages")?;
        Ok(Figures {
            delta_ms,
            dom0_pct,
            target_pct,
            sent_mbps,
            dirtied_mbps,
            dirtied_pages,
        })
    }
}

fn parse_round_line(text: &str, line: usize) -> Result<RoundLine, LogError> {
    let mut c = Cursor::new(text, line);
    let head = c.peek().ok_or_else(|| c.missing("round"))?;
    c.i += 1;
    let num = head.strip_suffix(':').unwrap_or(head);
    let round: u32 = num.parse().map_err(|_| c.bad("round", head))?;
    c.keyword("sent")?;
    let sent = c.number("sent")?;
    c.keyword("skipped")?;
    let skipped = c.number("skipped")?;
    let mut last_iteration = false;
    if c.starts_with_words(&["Start", "last", "iteration"]) {
        last_iteration = true;
        c.i += 3;
    }
    let figures = match c.peek() {
        None => None,
        Some("delta") => Some(c.figures()?),
        Some(_) => {
            return Err(LogError::UnexpectedText {
                line,
                round,
                found: cap(&c.toks[c.i..].join(" ")),
            })
        }
    };
    Ok(RoundLine {
        round,
        sent,
        skipped,
        last_iteration,
        figures,
        text: cap(text),
    })
}

fn parse_total(rest: &str, line: usize) -> Result<Item, LogError> {
    let mut c = Cursor::new(rest, line);
    let pages = c.number("Total pages sent")?;
    let ratio_text: String = c.toks[c.i..].concat();
    let r = ratio_text
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim_end_matches('x')
        .trim();
    if r.is_empty() {
        return Err(c.missing("ratio"));
    }
    let ratio: f64 = r.parse().map_err(|_| c.bad("ratio", &ratio_text))?;
    if !ratio.is_finite() || ratio < 0.0 || !ratio_text.ends_with(')') {
        return Err(c.bad("ratio", &ratio_text));
    }
    let decimals = r.split_once('.').map_or(0, |(_, d)| d.len() as u32);
    Ok(Item::Total {
        pages,
        ratio,
        decimals,
    })
}

/// `label: done/total  P%`.
fn parse_progress(text: &str, line: usize) -> Option<Progress> {
    let s = text.trim_end().strip_suffix('%')?;
    let pct_len = s.bytes().rev().take_while(u8::is_ascii_digit).count();
    if pct_len == 0 {
        return None;
    }
    let (head, pct) = s.split_at(s.len() - pct_len);
    if !head.ends_with(char::is_whitespace) {
        return None;
    }
    let head = head.trim_end();
    let (before, frac) = head.rsplit_once(char::is_whitespace)?;
    let (done, total) = frac.split_once('/')?;
    let label = before.trim_end().strip_suffix(':')?.trim();
    if label.is_empty() {
        return None;
    }
    let number_after = |key: &str| -> Option<u64> {
        let at = label.find(key)?;
        let digits: String = label[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let iteration = number_after("iteration ")
        .or_else(|| number_after("iter "))
        .and_then(|n| u32::try_from(n).ok());
    Some(Progress {
        line,
        label: cap(label),
        iteration,
        iterations: number_after(" of ").and_then(|n| u32::try_from(n).ok()),
        last_sent: number_after("last sent "),
        last_skipped: number_after("skipped "),
        done: done.parse().ok()?,
        total: total.parse().ok()?,
        percent: pct.parse().ok()?,
        after_suspend: false,
    })
}

fn classify(line: usize, raw: &str) -> Result<Item, LogError> {
    let m = message(raw);
    let text = m.text;
    if text.is_empty() {
        return Ok(Item::Blank);
    }
    if let Some(at) = find_round_header(text) {
        return parse_round_line(&text[at..], line).map(Item::Round);
    }
    if let Some(at) = text.find("Total pages sent=") {
        return parse_total(&text[at + "Total pages sent=".len()..], line);
    }
    if let Some(at) = find_delta(text) {
        return Cursor::new(&text[at..], line).figures().map(Item::Figures);
    }
    if text.contains("Start last iteration") {
        return Ok(Item::StartLast);
    }
    if let Some(at) = text.find("SUSPEND shinfo") {
        let frame = text[at + "SUSPEND shinfo".len()..]
            .split_whitespace()
            .next()
            .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok());
        return Ok(Item::Suspend(frame));
    }
    if text.contains("Domain now suspended") {
        return Ok(Item::Suspend(None));
    }
    if let Some(at) = text.find("(of which ") {
        let rest = &text[at + "(of which ".len()..];
        if let Some((n, _)) = rest.split_once(" were fixups") {
            if let Ok(n) = n.trim().parse() {
                return Ok(Item::Fixups(n));
            }
        }
    }
    if let Some(at) = text.find("Saving domain ") {
        let rest = &text[at + "Saving domain ".len()..];
        if let Some((id, tail)) = rest.split_once(',') {
            if let (Ok(domid), Some(ty)) = (id.trim().parse(), tail.trim().strip_prefix("type")) {
                return Ok(Item::Saving {
                    domid,
                    guest_type: cap(ty),
                });
            }
        }
    }
    if let Some(p) = parse_progress(text, line) {
        return Ok(Item::Progress(p));
    }
    let xend_error = m.xend_level == Some("ERROR")
        && m.xend_module
            .is_some_and(|module| module.starts_with("XendCheckpoint"));
    let xc_error = matches!(m.xc_level, Some("error" | "critical"));
    let libxc_error = text.starts_with("ERROR ") || text.starts_with("ERROR:");
    if xend_error || xc_error || libxc_error {
        return Ok(Item::Error(cap(text)));
    }
    Ok(Item::Other)
}

// ---------------------------------------------------------------------------
// Assembling rounds

/// A round whose `N: sent` line has come but whose figures have not.
#[derive(Clone, Debug)]
struct Open {
    round: u32,
    line: usize,
    sent: u64,
    skipped: u64,
    last_iteration: bool,
    text: String,
}

#[derive(Default)]
struct Builder {
    log: XenLog,
    open: Option<Open>,
    /// Xen 4.1–4.5: the iteration the latest `Saving memory: iter N`
    /// progress line named; round `N + 1` is under way.
    legacy_iter: Option<u32>,
    /// Xen 4.1–4.5: the round a bare `Start last iteration` line marked.
    legacy_last: Option<u32>,
}

impl Builder {
    fn touch(&mut self, line: usize) {
        if self.log.first_line == 0 {
            self.log.first_line = line;
        }
        self.log.last_line = line;
    }

    fn has_content(&self) -> bool {
        let l = &self.log;
        !l.rounds.is_empty()
            || self.open.is_some()
            || l.total.is_some()
            || l.saving.is_some()
            || !l.progress.is_empty()
            || l.suspend.is_some()
            || l.incomplete.is_some()
    }

    fn last_round(&self) -> Option<u32> {
        self.log.rounds.last().map(|r| r.round)
    }

    fn cut_at(&mut self, line: usize, raw: &str, round: Option<u32>) {
        if self.log.incomplete.is_none() {
            self.log.incomplete = Some(Incomplete {
                line,
                round: round.or(self.open.as_ref().map(|o| o.round)),
                text: cap(raw),
            });
        }
    }

    fn push(&mut self, open: Open, f: Figures, delta_line: usize, counts_from: CountsFrom) {
        self.log.rounds.push(XenRound {
            round: open.round,
            sent: open.sent,
            skipped: open.skipped,
            counts_from,
            delta_ms: f.delta_ms,
            dom0_pct: f.dom0_pct,
            target_pct: f.target_pct,
            sent_mbps: f.sent_mbps,
            dirtied_mbps: f.dirtied_mbps,
            dirtied_pages: f.dirtied_pages,
            last_iteration: open.last_iteration,
            final_copy: false,
            line: open.line,
            delta_line,
        });
    }

    fn finish(mut self) -> XenLog {
        if let Some(o) = self.open.take() {
            if self.log.incomplete.is_none() {
                self.log.incomplete = Some(Incomplete {
                    line: o.line,
                    round: Some(o.round),
                    text: o.text,
                });
            }
        } else if let (Some(iter), None) = (self.legacy_iter, &self.log.total) {
            // A 4.1–4.5 log whose rounds stop before the one under way.
            let due = iter.saturating_add(1);
            if self.last_round().is_some_and(|r| r < due) && self.log.incomplete.is_none() {
                let p = self.log.progress.iter().rev().find(|p| p.is_legacy_save());
                self.log.incomplete = p.map(|p| Incomplete {
                    line: p.line,
                    round: Some(due),
                    text: p.label.clone(),
                });
            }
        }
        let log = &mut self.log;
        for i in 1..log.rounds.len() {
            let (prev, cur) = (&log.rounds[i - 1], &log.rounds[i]);
            if prev.last_iteration && cur.round == prev.round.saturating_add(1) {
                log.rounds[i].final_copy = true;
            }
        }
        // The final round of a 4.1–4.5 log: its counts follow from `Total`.
        if let Some(t) = &log.total {
            let missing: Vec<usize> = (0..log.rounds.len())
                .filter(|&i| log.rounds[i].counts_from == CountsFrom::Missing)
                .collect();
            if let [only] = missing[..] {
                let last = log.rounds.len() - 1;
                let sum = log.sum_sent();
                if only == last && (log.rounds[last].final_copy || last == 0) && sum <= t.pages {
                    let r = &mut log.rounds[last];
                    r.sent = t.pages - sum;
                    r.skipped = 0;
                    r.counts_from = CountsFrom::Total;
                }
            }
        }
        self.log
    }
}

#[derive(Default)]
struct Parser {
    done: Vec<XenLog>,
    cur: Builder,
}

impl Parser {
    /// Closes the current migration; `line` begins the next.
    fn boundary(&mut self, line: usize) {
        let old = std::mem::take(&mut self.cur);
        self.cur.touch(line);
        if old.has_content() {
            let mut log = old.finish();
            log.last_line = log
                .last_line
                .min(line.saturating_sub(1))
                .max(log.first_line);
            self.done.push(log);
        } else {
            self.cur.log.first_line = old.log.first_line.max(1).min(line);
            self.cur.log.ignored_lines = old.log.ignored_lines;
        }
    }

    fn apply(&mut self, n: usize, item: Item) -> Result<(), LogError> {
        match item {
            Item::Blank => {}
            Item::Other => self.cur.log.ignored_lines += 1,
            Item::Round(r) => {
                let c = &self.cur;
                let restart = c.log.total.is_some()
                    || c.last_round().is_some_and(|l| r.round <= l)
                    || c.open.as_ref().is_some_and(|o| r.round <= o.round);
                if restart {
                    self.boundary(n);
                }
                if let Some(o) = &self.cur.open {
                    return Err(LogError::MissingDelta {
                        line: n,
                        pending_round: o.round,
                        pending_line: o.line,
                    });
                }
                let open = Open {
                    round: r.round,
                    line: n,
                    sent: r.sent,
                    skipped: r.skipped,
                    last_iteration: r.last_iteration,
                    text: r.text,
                };
                match r.figures {
                    Some(f) => self.cur.push(open, f, n, CountsFrom::RoundLine),
                    None => self.cur.open = Some(open),
                }
            }
            Item::Figures(f) => {
                let c = &mut self.cur;
                if let Some(o) = c.open.take() {
                    c.push(o, f, n, CountsFrom::RoundLine);
                    return Ok(());
                }
                let due = match (c.legacy_iter, c.last_round()) {
                    (Some(i), _) => Some(i.saturating_add(1)),
                    (None, Some(l)) => Some(l.saturating_add(1)),
                    (None, None) => None,
                };
                // Figures with no round to go with: the log starts
                // mid-round, the round was reported already, or the save
                // went on after `Total` (checkpointing).
                match due {
                    Some(due)
                        if c.log.total.is_none() && c.last_round().is_none_or(|l| l < due) =>
                    {
                        let open = Open {
                            round: due,
                            line: n,
                            sent: 0,
                            skipped: 0,
                            last_iteration: c.legacy_last == Some(due),
                            text: String::new(),
                        };
                        c.push(open, f, n, CountsFrom::Missing);
                    }
                    _ => c.log.ignored_lines += 1,
                }
            }
            Item::StartLast => {
                let c = &mut self.cur;
                if let Some(o) = c.open.as_mut() {
                    o.last_iteration = true;
                } else if let Some(i) = c.legacy_iter {
                    c.legacy_last = Some(i.saturating_add(1));
                } else {
                    c.log.ignored_lines += 1;
                }
            }
            Item::Suspend(frame) => {
                let log = &mut self.cur.log;
                if log.suspend.is_none() {
                    log.suspend = Some(Suspend {
                        line: n,
                        shared_info_frame: frame,
                    });
                }
            }
            Item::Total {
                pages,
                ratio,
                decimals,
            } => {
                let c = &mut self.cur;
                if c.log.total.is_some() {
                    c.log.ignored_lines += 1;
                    return Ok(());
                }
                if let Some(o) = &c.open {
                    return Err(LogError::MissingDelta {
                        line: n,
                        pending_round: o.round,
                        pending_line: o.line,
                    });
                }
                c.log.total = Some(TotalLine {
                    line: n,
                    pages,
                    ratio,
                    ratio_decimals: decimals,
                });
            }
            Item::Fixups(k) => self.cur.log.fixups = Some(k),
            Item::Saving { domid, guest_type } => {
                if self.cur.has_content() {
                    self.boundary(n);
                }
                self.cur.log.saving = Some(SavingDomain {
                    line: n,
                    domid,
                    guest_type,
                });
            }
            Item::Progress(mut p) => {
                if p.is_legacy_save() {
                    let iter = p.iteration.unwrap_or(0);
                    let c = &self.cur;
                    let restart = c.log.total.is_some()
                        || c.legacy_iter.is_some_and(|i| iter < i)
                        || (iter == 0 && c.last_round().is_some());
                    if restart {
                        self.boundary(n);
                    }
                    let c = &mut self.cur;
                    if let (Some(s), Some(k)) = (p.last_sent, p.last_skipped) {
                        if let Some(r) = c.log.rounds.iter_mut().rev().find(|r| r.round == iter) {
                            if r.counts_from == CountsFrom::Missing {
                                r.sent = s;
                                r.skipped = k;
                                r.counts_from = CountsFrom::ProgressLine;
                            }
                        }
                    }
                    c.legacy_iter = Some(iter);
                }
                p.after_suspend = self.cur.log.suspend.is_some();
                self.cur.log.progress.push(p);
            }
            Item::Error(text) => self.cur.log.errors.push(LogNote { line: n, text }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_come_off() {
        let m =
            message("[2009-05-01 12:00:00 2345] INFO (XendCheckpoint:358) 1: sent 5, skipped 0, ");
        assert_eq!(m.text, "1: sent 5, skipped 0,");
        assert_eq!(m.xend_level, Some("INFO"));
        assert_eq!(m.xend_module, Some("XendCheckpoint"));
        let m = message("xc: detail: delta 5ms, dom0 1%");
        assert_eq!((m.xc_level, m.text), (Some("detail"), "delta 5ms, dom0 1%"));
        let m = message("2024-03-01 10:00:00 CET [812] xc: info: Saving domain 5, type x86 HVM");
        assert_eq!(
            (m.xc_level, m.text),
            (Some("info"), "Saving domain 5, type x86 HVM")
        );
        let m = message(
            "xc: Saving memory: iter 1: 0/10    0%\rxc: Saving memory: iter 1: 10/10  100%\r",
        );
        assert_eq!(m.text, "Saving memory: iter 1: 10/10  100%");
    }

    #[test]
    fn progress_lines() {
        let p = parse_progress("Frames iteration 2 of 5: 1536/1536  100%", 7).unwrap();
        assert_eq!(
            (p.iteration, p.iterations, p.done, p.total, p.percent),
            (Some(2), Some(5), 1536, 1536, 100)
        );
        let p = parse_progress(
            "Saving memory: iter 3 (last sent 40 skipped 2): 800/16384    4%",
            1,
        )
        .unwrap();
        assert_eq!(
            (p.iteration, p.last_sent, p.last_skipped),
            (Some(3), Some(40), Some(2))
        );
        assert!(p.is_legacy_save());
        assert!(parse_progress("dom0 100%", 1).is_none());
        assert!(parse_progress("100%", 1).is_none());
    }

    #[test]
    fn round_header_is_found_after_unknown_prefixes() {
        let s = "May  1 12:00:01 host xend[2345]: 12: sent 5, skipped 0,";
        assert_eq!(find_round_header(s).map(|i| &s[i..i + 3]), Some("12:"));
        assert_eq!(find_round_header("iter 1 (last sent 4 skipped 0)"), None);
        assert_eq!(find_round_header("x1: sent 4"), None);
    }
}

//! Checking a log's own arithmetic: [`XenLog::check`] and its
//! [`Finding`]s.

use crate::model::{CountsFrom, XenLog};
use std::fmt;

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

impl XenLog {
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

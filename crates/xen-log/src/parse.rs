//! Reading a log into [`XenLog`]s: the entry points, and the assembling of
//! classified lines into migrations and rounds.

use crate::line::{cap, classify, round_hint, Figures, Item};
use crate::model::{
    CountsFrom, Incomplete, LogNote, SavingDomain, Suspend, TotalLine, XenLog, XenRound,
};

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

//! # xen-log
//!
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
//! the core's [`RoundStats`](migrate_core::RoundStats).
//!
//! # What a round line says
//!
//! [`ROUND_FIELDS`] says what each field means: the round number,
//! `sent`, `skipped`, `delta` (the round's wall-clock length in ms),
//! `dom0` and `target` (CPU time of dom0's and the guest's first vCPU as %
//! of `delta`), the two rates (`pages · 4096 / (delta_ms · 125)`, truncated)
//! and the dirtied pages, which are what the next round goes over.
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
//! use xen_log as log;
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

#![warn(unreachable_pub)]

mod check;
mod line;
mod model;
mod parse;

pub use check::{Finding, FindingKind};
pub use model::{
    xen_mbps, ClosingRatio, CountsFrom, DowntimeBound, Incomplete, LogNote, Progress, SavingDomain,
    Suspend, TotalLine, XenLog, XenRound, ROUND_FIELDS, XEN_PAGE_SIZE,
};
pub use parse::{parse, parse_all, LogError};

//! The Xen migration-log reader against sample logs.
//!
//! The logs in `tests/data` are constructed, not captured from a Xen host:
//!
//! - `xend-128mib.log`: xend's log of a live migration of a 128 MiB guest
//!   (Xen 3.x), built around the round lines quoted in the issue; rounds
//!   2–12 are chosen so that every round's `sent + skipped` equals the
//!   previous round's dirtied pages, every rate is
//!   `⌊pages · 4096 / (delta · 125)⌋`, and the rounds' sent pages add up
//!   to the `Total` line's 52369;
//! - `synthetic-xc-detail.log`: a 64 MiB PV guest with libxc's messages
//!   printed one per line behind `xc: detail: ` or `xc: `;
//! - `synthetic-xl-4x-progress.log`: the same migration as libxc of Xen
//!   4.1–4.5 reports it, counts in the progress lines;
//! - `synthetic-xl-v2.log`: a migration-v2 (Xen 4.6+) save, which has no
//!   round lines.

use std::time::Duration;
use xen_log::{self as log, CountsFrom, FindingKind, LogError, XenLog, XEN_PAGE_SIZE};

const XEND: &str = include_str!("data/xend-128mib.log");
const XC_DETAIL: &str = include_str!("data/synthetic-xc-detail.log");
const XL_4X: &str = include_str!("data/synthetic-xl-4x-progress.log");
const XL_V2: &str = include_str!("data/synthetic-xl-v2.log");

/// The line of `text` (from 1) that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

/// `text` with the first `from` replaced by `to`, which must occur.
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from}");
    text.replacen(from, to, 1)
}

#[test]
fn xend_log_rounds() {
    let xen = log::parse(XEND).unwrap();
    assert_eq!(xen.rounds.len(), 14);
    let numbers: Vec<u32> = xen.rounds.iter().map(|r| r.round).collect();
    assert_eq!(numbers, (1..=14).collect::<Vec<_>>());
    assert!(xen
        .rounds
        .iter()
        .all(|r| r.counts_from == CountsFrom::RoundLine));

    let first = &xen.rounds[0];
    assert_eq!(
        first.to_string(),
        "1: sent 28847, skipped 3921, delta 1702ms, dom0 62%, target 32%, sent 555Mb/s, dirtied 116Mb/s 6036 pages"
    );
    assert_eq!(first.considered(), 32768);

    let total = xen.total.as_ref().unwrap();
    assert_eq!(
        (total.pages, total.ratio, total.ratio_decimals),
        (52369, 0.77, 2)
    );
    assert_eq!(xen.sum_sent(), 52369);
    assert_eq!(xen.fixups, Some(0));
    assert_eq!(xen.first_line, 1);
    assert_eq!(xen.last_line, XEND.lines().count());
    assert!(xen.incomplete.is_none());
    assert!(xen.errors.is_empty());
    // xend's own lines: three before round 1, five around the suspend and
    // three after the fixups line.
    assert_eq!(xen.ignored_lines, 11);
}

#[test]
fn last_iteration_round_is_joined_across_the_suspend() {
    let xen = log::parse(XEND).unwrap();
    let r13 = &xen.rounds[12];
    assert_eq!((r13.round, r13.sent, r13.skipped), (13, 42, 0));
    assert!(r13.last_iteration && !r13.final_copy);
    assert!(r13.joined());
    assert_eq!(r13.line, line_of(XEND, "13: sent 42"));
    assert_eq!(r13.delta_line, line_of(XEND, "delta 11ms"));
    assert_eq!(
        (
            r13.delta_ms,
            r13.dom0_pct,
            r13.target_pct,
            r13.sent_mbps,
            r13.dirtied_mbps,
            r13.dirtied_pages
        ),
        (11, 81, 0, 125, 199, 67)
    );

    assert!(xen.suspend_seen());
    let suspend = xen.suspend.as_ref().unwrap();
    assert_eq!(suspend.line, line_of(XEND, "SUSPEND shinfo"));
    assert_eq!(suspend.shared_info_frame, Some(0xbdc));
    assert!(r13.line < suspend.line && suspend.line < r13.delta_line);

    let r14 = &xen.rounds[13];
    assert!(r14.final_copy && !r14.last_iteration && !r14.joined());
    assert_eq!(xen.final_round().map(|r| r.round), Some(14));
    assert_eq!(xen.last_iteration_round().map(|r| r.round), Some(13));
    assert_eq!(xen.rounds.iter().filter(|r| r.final_copy).count(), 1);
}

#[test]
fn consistent_log_passes_every_check() {
    let xen = log::parse(XEND).unwrap();
    let findings = xen.check();
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn injected_skip_count_is_the_only_finding() {
    // Round 2 looks at round 1's 6036 dirtied pages; claim 10 more skipped.
    let bad = mutate(
        XEND,
        "2: sent 5648, skipped 388,",
        "2: sent 5648, skipped 398,",
    );
    let findings = log::parse(&bad).unwrap().check();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!((f.line, f.round), (line_of(&bad, "2: sent 5648"), Some(2)));
    assert_eq!(
        f.kind,
        FindingKind::PagesMismatch {
            previous_round: 1,
            previous_dirtied: 6036,
            sent: 5648,
            skipped: 398
        }
    );
    assert!(f.kind.is_mismatch());
    assert!(f.to_string().contains("off by +10"), "{f}");
}

#[test]
fn injected_rate_is_the_only_finding() {
    // 2377 pages in 145 ms are 537.2 Mb/s; 540 is off by more than rounding.
    let bad = mutate(
        XEND,
        "dirtied 537Mb/s 2377 pages",
        "dirtied 540Mb/s 2377 pages",
    );
    let findings = log::parse(&bad).unwrap().check();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0].round, Some(4));
    match findings[0].kind {
        FindingKind::DirtiedRateMismatch { reported, expected } => {
            assert_eq!(reported, 540);
            assert!((expected - 537.2).abs() < 0.1, "{expected}");
        }
        ref other => panic!("{other:?}"),
    }

    // Rounding up instead of truncating is within tolerance: 199.59 -> 200.
    let rounded = mutate(XEND, "dirtied 199Mb/s 67 pages", "dirtied 200Mb/s 67 pages");
    assert!(log::parse(&rounded).unwrap().check().is_empty());
}

#[test]
fn injected_sent_count_breaks_three_sums() {
    let bad = mutate(
        XEND,
        "7: sent 2024, skipped 81,",
        "7: sent 2054, skipped 81,",
    );
    let codes: Vec<&str> = log::parse(&bad)
        .unwrap()
        .check()
        .iter()
        .map(|f| f.kind.code())
        .collect();
    assert_eq!(
        codes,
        ["pages-mismatch", "sent-rate-mismatch", "total-mismatch"]
    );
}

#[test]
fn closing_ratio_and_p2m_size() {
    let xen = log::parse(XEND).unwrap();
    let p2m = xen.p2m_size_estimate().unwrap();
    assert!((p2m - 68_000.0).abs() < 500.0, "{p2m}");
    let ratio = xen.closing_ratio().unwrap();
    assert_eq!(ratio.total_pages, 52369);
    assert!(ratio.p2m_min < 68_000.0 && ratio.p2m_max.unwrap() > 68_000.0);
    assert!((ratio.p2m_min - 67_573.0).abs() < 1.0, "{}", ratio.p2m_min);
    assert!((ratio.p2m_max.unwrap() - 68_456.2).abs() < 1.0);
    assert_eq!(ratio.first_round_pages, Some(32768));
    // Each page of RAM was sent 1.6 times on average, yet R < 1.
    let per_page = ratio.sent_per_first_round_page.unwrap();
    assert!(per_page > 1.5 && ratio.ratio < 1.0, "{per_page}");
    assert_eq!(ratio.p2m_from_progress, None);
}

#[test]
fn downtime_is_only_bounded_below() {
    let xen = log::parse(XEND).unwrap();
    let d = xen.downtime_bound().unwrap();
    assert_eq!(
        (d.final_round, d.final_delta_ms, d.final_pages),
        (14, 5, 67)
    );
    assert_eq!(
        (d.suspend_round, d.suspend_round_delta_ms),
        (Some(13), Some(11))
    );
}

#[test]
fn converts_to_round_stats() {
    let xen = log::parse(XEND).unwrap();
    let stats = xen.to_round_stats();
    assert_eq!(stats.len(), 14);
    assert!(stats[13].final_copy);
    assert!(stats[..13].iter().all(|r| !r.final_copy));
    let r1 = &stats[0];
    assert_eq!(
        (r1.round, r1.sent, r1.skipped, r1.dirtied),
        (1, 28847, 3921, 6036)
    );
    assert_eq!(r1.delta, Duration::from_millis(1702));
    assert_eq!((r1.page_size, r1.bytes), (XEN_PAGE_SIZE, 28847 * 4096));
    assert_eq!((r1.dom0_pct, r1.target_pct), (62.0, 32.0));
    // The core prints the same line back (its rates round, Xen's truncate;
    // they agree on round 1).
    assert_eq!(r1.to_string(), xen.rounds[0].to_string());
    assert!((stats[12].dirtied_mbps() - 199.59).abs() < 0.01);
}

#[test]
fn log_cut_mid_line_gives_a_partial_result() {
    let cut_at = XEND
        .find("9: sent 1819, skipped 54, delta 112ms, dom0")
        .unwrap()
        + 40;
    let cut = &XEND[..cut_at];
    let xen = log::parse(cut).unwrap();
    assert_eq!(xen.rounds.len(), 8);
    let inc = xen.incomplete.as_ref().unwrap();
    assert_eq!(
        (inc.line, inc.round),
        (line_of(XEND, "9: sent 1819"), Some(9))
    );
    assert!(inc.text.contains("9: sent 1819, skipped 54, delta 112ms"));
    let codes: Vec<&str> = xen.check().iter().map(|f| f.kind.code()).collect();
    assert_eq!(codes, ["cut", "no-total"]);
    assert!(xen.downtime_bound().is_none());
    assert!(xen.closing_ratio().is_none());
}

#[test]
fn log_cut_after_the_suspend_leaves_round_13_open() {
    let cut_at = XEND
        .find("[2009-05-01 12:00:02 2345] DEBUG (XendCheckpoint:328) suspend")
        .unwrap();
    let xen = log::parse(&XEND[..cut_at]).unwrap();
    assert_eq!(xen.rounds.len(), 12);
    let inc = xen.incomplete.as_ref().unwrap();
    assert_eq!(inc.round, Some(13));
    assert!(xen.final_round().is_none());
}

#[test]
fn every_prefix_parses_without_panicking() {
    for (cut, _) in XEND.char_indices().chain([(XEND.len(), ' ')]) {
        let prefix = &XEND[..cut];
        match log::parse(prefix) {
            Ok(xen) => {
                // Whatever came through is consistent with the full log.
                assert!(
                    xen.check().iter().all(|f| !f.kind.is_mismatch()),
                    "cut at {cut}"
                );
            }
            Err(LogError::NoMigration { .. }) => {}
            Err(e) => panic!("cut at {cut}: {e}"),
        }
    }
    for text in [XC_DETAIL, XL_4X, XL_V2] {
        for (cut, _) in text.char_indices() {
            let _ = log::parse_all(&text[..cut]);
        }
    }
}

#[test]
fn random_edits_never_panic() {
    // A small deterministic generator; the edits are what a damaged log
    // might hold: digits changed, characters dropped or doubled, huge
    // numbers, lines repeated or swapped.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    for text in [XEND, XC_DETAIL, XL_4X, XL_V2] {
        for _ in 0..400 {
            let mut chars: Vec<char> = text.chars().collect();
            for _ in 0..1 + next(4) {
                let at = next(chars.len());
                match next(6) {
                    0 => chars[at] = char::from(b'0' + next(10) as u8),
                    1 => {
                        chars.remove(at);
                    }
                    2 => chars.insert(at, chars[at]),
                    3 => chars
                        .splice(at..at, "99999999999999999999".chars())
                        .for_each(drop),
                    4 => chars.insert(at, '\r'),
                    _ => chars[at] = '-',
                }
            }
            let mut edited: String = chars.into_iter().collect();
            if next(3) == 0 {
                let mut lines: Vec<&str> = edited.lines().collect();
                let (a, b) = (next(lines.len()), next(lines.len()));
                lines.swap(a, b);
                let dup = lines[next(lines.len())];
                lines.insert(next(lines.len()), dup);
                edited = lines.join("\n");
            }
            if let Ok(all) = log::parse_all(&edited) {
                for xen in &all {
                    let _ = xen.check().iter().map(ToString::to_string).count();
                    let _ = (
                        xen.closing_ratio(),
                        xen.downtime_bound(),
                        xen.to_round_stats(),
                    );
                    let _ = xen.rounds.iter().map(ToString::to_string).count();
                }
            }
        }
    }
}

#[test]
fn garbage_lines_are_counted_not_fatal() {
    let noisy = format!(
        "random text\n\u{0}\u{7f}binary\u{fffd}\n[] INFO () \n{}\nmore noise: 1/2 of it\n",
        XEND.trim_end()
    );
    let xen = log::parse(&noisy).unwrap();
    assert_eq!(xen.rounds.len(), 14);
    // "[] INFO () " is a prefix with no message: blank, not counted.
    assert_eq!(xen.ignored_lines, 11 + 3);
    assert!(xen.check().is_empty());
    assert_eq!(
        log::parse("nothing\nto see\n"),
        Err(LogError::NoMigration { lines: 2 })
    );
    assert_eq!(log::parse(""), Err(LogError::NoMigration { lines: 0 }));
}

#[test]
fn missing_fields_are_typed_errors() {
    let no_skipped = mutate(XEND, "5: sent 2282, skipped 95,", "5: sent 2282,");
    let line = line_of(XEND, "5: sent 2282");
    match log::parse(&no_skipped) {
        Err(LogError::MissingField { line: l, field, .. }) => {
            assert_eq!((l, field), (line, "skipped"))
        }
        other => panic!("{other:?}"),
    }

    let no_dirtied = mutate(XEND, ", dirtied 199Mb/s 67 pages", "");
    let line = line_of(XEND, "delta 11ms");
    let err = log::parse(&no_dirtied).unwrap_err();
    assert_eq!(err.line(), Some(line));
    assert!(
        matches!(
            err,
            LogError::MissingField {
                field: "dirtied",
                ..
            }
        ),
        "{err}"
    );

    let bad_number = mutate(XEND, "delta 336ms", "delta 3x6ms");
    assert!(matches!(
        log::parse(&bad_number),
        Err(LogError::BadNumber { field: "delta", .. })
    ));

    let trailing = mutate(
        XEND,
        "13: sent 42, skipped 0, Start last iteration",
        "13: sent 42, skipped 0, Stop",
    );
    assert!(matches!(
        log::parse(&trailing),
        Err(LogError::UnexpectedText { round: 13, .. })
    ));

    let no_ratio = mutate(
        XEND,
        "Total pages sent= 52369 (0.77x)",
        "Total pages sent= 52369",
    );
    assert!(matches!(
        log::parse(&no_ratio),
        Err(LogError::MissingField { field: "ratio", .. })
    ));

    // Round 13's figures never come before round 14 starts.
    let lost = XEND
        .lines()
        .filter(|l| !l.contains("delta 11ms"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(matches!(
        log::parse(&lost),
        Err(LogError::MissingDelta {
            pending_round: 13,
            ..
        })
    ));
}

#[test]
fn several_migrations() {
    let two = format!("{XEND}{XEND}");
    assert!(matches!(
        log::parse(&two),
        Err(LogError::SeveralMigrations { count: 2, .. })
    ));
    let all = log::parse_all(&two).unwrap();
    assert_eq!(all.len(), 2);
    // The second migration begins at its round 1; xend's three lines
    // before it close the first.
    let n = XEND.lines().count();
    assert_eq!((all[0].first_line, all[0].last_line), (1, n + 3));
    assert_eq!((all[1].first_line, all[1].last_line), (n + 4, 2 * n));
    assert_eq!((all[0].ignored_lines, all[1].ignored_lines), (14, 8));
    for xen in &all {
        assert_eq!(xen.rounds.len(), 14);
        assert!(xen.check().is_empty());
    }

    // A migration that broke off in round 5, then a whole one.
    let broken_at = XEND
        .find("[2009-05-01 12:00:01 2345] INFO (XendCheckpoint:358) 5: sent")
        .unwrap();
    let text = format!(
        "{}[2009-05-01 12:00:01 2345] INFO (XendCheckpoint:358) 5: sent 2282, skipped 95, \n{XEND}",
        &XEND[..broken_at]
    );
    let all = log::parse_all(&text).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].rounds.len(), 4);
    assert_eq!(all[0].incomplete.as_ref().and_then(|i| i.round), Some(5));
    assert_eq!(all[1].rounds.len(), 14);
}

fn pv_rounds(xen: &XenLog) -> Vec<(u32, u64, u64, u64, u64, bool, bool)> {
    xen.rounds
        .iter()
        .map(|r| {
            (
                r.round,
                r.sent,
                r.skipped,
                r.delta_ms,
                r.dirtied_pages,
                r.last_iteration,
                r.final_copy,
            )
        })
        .collect()
}

const PV_ROUNDS: [(u32, u64, u64, u64, u64, bool, bool); 4] = [
    (1, 16000, 384, 900, 640, false, false),
    (2, 620, 20, 40, 45, false, false),
    (3, 45, 0, 20, 12, true, false),
    (4, 12, 0, 2, 12, false, true),
];

#[test]
fn libxc_lines_behind_xc_prefixes() {
    let xen = log::parse(XC_DETAIL).unwrap();
    assert_eq!(pv_rounds(&xen), PV_ROUNDS);
    assert!(xen.rounds.iter().all(|r| r.joined()));
    assert_eq!(xen.suspend.as_ref().unwrap().shared_info_frame, Some(0x7f1));
    assert!(xen.check().is_empty(), "{:#?}", xen.check());
    // A PV guest's p2m is its RAM: R is above 1.
    let ratio = xen.closing_ratio().unwrap();
    assert_eq!(ratio.first_round_pages, Some(16384));
    assert!((ratio.p2m_estimate - 16_350.0).abs() < 200.0);
    // Three libxl lines, "Saving to ...", "Had 0 ...", "All memory ...", "Save exit ...".
    assert_eq!(xen.ignored_lines, 7);
}

#[test]
fn xen_4x_progress_lines_carry_the_counts() {
    let xen = log::parse(XL_4X).unwrap();
    assert_eq!(pv_rounds(&xen), PV_ROUNDS);
    let from: Vec<CountsFrom> = xen.rounds.iter().map(|r| r.counts_from).collect();
    assert_eq!(
        from,
        [
            CountsFrom::ProgressLine,
            CountsFrom::ProgressLine,
            CountsFrom::ProgressLine,
            CountsFrom::Total
        ]
    );
    assert_eq!(xen.p2m_size_from_progress(), Some(16384));
    assert_eq!(xen.closing_ratio().unwrap().p2m_from_progress, Some(16384));
    assert!(xen.check().is_empty(), "{:#?}", xen.check());
    assert_eq!(xen.progress.len(), 10);

    // A ratio that does not fit p2m_size is caught.
    let bad = mutate(XL_4X, "(1.02x)", "(1.05x)");
    let codes: Vec<&str> = log::parse(&bad)
        .unwrap()
        .check()
        .iter()
        .map(|f| f.kind.code())
        .collect();
    assert_eq!(codes, ["ratio-mismatch"]);
}

#[test]
fn terminal_progress_with_carriage_returns() {
    let text = "xc: Saving memory: iter 0 (last sent 0 skipped 0): 0/100    0%\rxc: Saving memory: iter 0 (last sent 0 skipped 0): 100/100  100%\n\
                xc: detail: delta 10ms, dom0 10%, target 10%, sent 3Mb/s, dirtied 3Mb/s 1 pages\n\
                xc: Saving memory: iter 1 (last sent 1 skipped 0): 100/100  100%\r          \r\n";
    let xen = log::parse(text).unwrap();
    assert_eq!(xen.progress.len(), 2);
    assert_eq!(xen.rounds.len(), 1);
    assert_eq!(
        (xen.rounds[0].sent, xen.rounds[0].counts_from),
        (1, CountsFrom::ProgressLine)
    );
    // Round 2 was under way when the log ends.
    assert_eq!(xen.incomplete.as_ref().and_then(|i| i.round), Some(2));
}

#[test]
fn migration_v2_lines_are_kept_apart() {
    let xen = log::parse(XL_V2).unwrap();
    assert!(xen.rounds.is_empty() && xen.total.is_none());
    let saving = xen.saving.as_ref().unwrap();
    assert_eq!((saving.domid, saving.guest_type.as_str()), (5, "x86 HVM"));
    type Pass = (Option<u32>, Option<u32>, u64, u64, bool);
    let frames: Vec<Pass> = xen
        .progress
        .iter()
        .filter(|p| p.label.starts_with("Frames"))
        .map(|p| (p.iteration, p.iterations, p.done, p.total, p.after_suspend))
        .collect();
    assert_eq!(frames.len(), 6);
    assert_eq!(frames[4], (Some(2), Some(5), 1536, 1536, false));
    assert_eq!(frames[5], (Some(3), Some(5), 64, 64, true));
    assert_eq!(xen.p2m_size_from_progress(), Some(1_048_576));
    assert!(xen.suspend.is_some());
    assert!(xen.check().is_empty());
    assert!(xen.downtime_bound().is_none());
    // "migration target/sender" lines, "Saving to ...", one libxl line.
    assert_eq!(xen.ignored_lines, 7);

    // Without the "of M" of older v2, and two saves in one log.
    let newer = XL_V2.replace(" of 5", "");
    let two = format!("{newer}{newer}");
    let all = log::parse_all(&two).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].progress[4].iteration, Some(2));
    assert_eq!(all[1].progress[4].iterations, None);
}

#[test]
fn error_lines_are_collected() {
    let text = format!(
        "{}xc: error: Failed to write page data to stream (32 = Broken pipe): Internal error\n\
         [2009-05-01 12:00:03 2345] INFO (XendCheckpoint:358) ERROR Internal error: Error when writing to state file (4c) (errno 104)\n",
        XC_DETAIL
    );
    let xen = log::parse(&text).unwrap();
    assert_eq!(xen.errors.len(), 2);
    assert!(xen.errors[0].text.starts_with("Failed to write"));
    assert!(xen.errors[1].text.starts_with("ERROR Internal error"));
}

/// `xl -vvv migrate` of a PVH domU on the Xen 4.17 rig (captured on
/// 2026-11-22 by `scripts/xen-rig-test.sh`; also in docs/xen-rig/).
const XL_417_RIG: &str = include_str!("data/xl-4.17-rig-pvh.log");

#[test]
fn a_real_xen_4_17_log_reads_without_rounds() {
    // Migration v2 with -vvv prints no round lines: the reader finds the
    // save, says there are no rounds, and does not fail on the rest
    // (libxl debug lines, the receiver's lines).
    let all = log::parse_all(XL_417_RIG).unwrap();
    assert!(!all.is_empty());
    let xen = &all[0];
    assert!(xen.rounds.is_empty());
    let saving = xen.saving.as_ref().expect("the 'Saving domain' line");
    assert_eq!(saving.guest_type, "x86 HVM");
    assert!(xen.check().is_empty());
    assert!(xen.downtime_bound().is_none());
}

//! Read a Xen migration log and say what its numbers mean.
//!
//! ```text
//! cargo run --release -p xen-log -- crates/xen-log/tests/data/xend-128mib.log
//! xl -vvv migrate guest host 2>&1 | cargo run --release -p xen-log
//! ```
//!
//! The input is xend's log (its `XendCheckpoint` lines) or libxc's `xc:`
//! lines as `xl -vvv` prints them, from a file or, with `-` or no
//! argument, from standard input. The program prints what each field of a
//! round line means, the rounds as a table, whether the log's own
//! arithmetic holds (each round's `sent + skipped` against the previous
//! round's dirtied pages, each rate against `pages · 4096 / (delta · 125)`,
//! the total against the rounds), what the closing ratio `R` is and the
//! `p2m_size` it implies, and what the log can and cannot say about the
//! downtime. `--json` prints the same as one JSON object.
//!
//! Exit status: 0 when the log was read (whatever the checks found), 2
//! when the input could not be read or a line could not be parsed.

use clap::Parser;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::ExitCode;
use xen_log::{self as log, CountsFrom, XenLog, XenRound, ROUND_FIELDS, XEN_PAGE_SIZE};

/// Appends a line to the report.
macro_rules! say {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($arg:tt)*) => {{
        $o.push_str(&format!($($arg)*));
        $o.push('\n');
    }};
}

#[derive(Parser, Debug)]
#[command(
    about = "Read a Xen migration log (xend or libxc `xc:` lines) and explain its numbers",
    after_help = "Exit codes: 0 explained; 2 the log could not be read or parsed, or --migration names none it holds."
)]
struct Args {
    /// The log; `-` or nothing reads standard input.
    #[arg(value_name = "FILE")]
    file: Option<String>,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
    /// Which migration to show when the log holds several, from 1
    /// (default: the last).
    #[arg(long, value_name = "N")]
    migration: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (name, bytes) = match read_input(args.file.as_deref()) {
        Ok(input) => input,
        Err(msg) => {
            eprintln!("xen-log: {msg}");
            return ExitCode::from(2);
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let all = match log::parse_all(&text) {
        Ok(all) => all,
        Err(e) => {
            eprintln!("xen-log: {name}: {e}");
            return ExitCode::from(2);
        }
    };
    let count = all.len();
    let index = match args.migration {
        None => count - 1,
        Some(k) if (1..=count).contains(&k) => k - 1,
        Some(k) => {
            eprintln!(
                "xen-log: {name}: --migration {k}: the log holds {count} migration{}",
                plural(count)
            );
            return ExitCode::from(2);
        }
    };
    let xen = &all[index];
    let mut out = String::new();
    let o = &mut out;
    if args.json {
        say!(o, "{:#}", to_json(&name, xen, index + 1, count));
    } else {
        report(o, &name, xen, index + 1, count);
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

fn read_input(file: Option<&str>) -> Result<(String, Vec<u8>), String> {
    match file {
        None | Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            Ok(("<stdin>".to_string(), bytes))
        }
        Some(path) => std::fs::read(path)
            .map(|bytes| (path.to_string(), bytes))
            .map_err(|e| format!("cannot read {path}: {e}")),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn mib(pages: u64) -> f64 {
    pages as f64 * f64::from(XEN_PAGE_SIZE) / (1024.0 * 1024.0)
}

/// Word-wraps `text` at `width`, each line after the first indented by `indent`.
fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut len = 0;
    for word in text.split_whitespace() {
        if len > 0 && len + 1 + word.len() > width {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            len = 0;
        } else if len > 0 {
            out.push(' ');
            len += 1;
        }
        out.push_str(word);
        len += word.chars().count();
    }
    out
}

fn para(o: &mut String, text: &str) {
    say!(o, "  {}", wrap(text, 76, 2));
}

fn report(o: &mut String, name: &str, xen: &XenLog, which: usize, count: usize) {
    say!(o, "{name}: migration {which} of {count} (lines {}-{}): {} round{}, {} line{} not understood and skipped",
        xen.first_line,
        xen.last_line,
        xen.rounds.len(),
        plural(xen.rounds.len()),
        xen.ignored_lines,
        plural(xen.ignored_lines)
    );
    if count > 1 {
        say!(
            o,
            "  (the log holds {count} migrations; pick one with --migration N)"
        );
    }
    for e in &xen.errors {
        say!(o, "  error reported on line {}: {}", e.line, e.text);
    }
    say!(o);

    if !xen.rounds.is_empty() {
        say!(o, "What the fields of a round line mean");
        for (field, meaning) in ROUND_FIELDS {
            say!(o, "  {field:<14}{}", wrap(meaning, 62, 16));
        }
        say!(o);
        rounds_table(o, xen);
        say!(o);
        checks(o, xen);
        say!(o);
    }
    closing_ratio(o, xen);
    downtime(o, xen);
    progress(o, xen);
}

fn round_note(xen: &XenLog, r: &XenRound) -> String {
    let mut notes = Vec::new();
    if r.last_iteration {
        let mut s = "Start last iteration (guest suspended at its end)".to_string();
        if r.joined() {
            s.push_str(&format!("; lines {} and {} joined", r.line, r.delta_line));
        }
        notes.push(s);
    } else if r.joined() && !xen.rounds.iter().all(XenRound::joined) {
        notes.push(format!("figures on line {}", r.delta_line));
    }
    if r.final_copy {
        notes.push("final copy, guest suspended".to_string());
    }
    match r.counts_from {
        CountsFrom::RoundLine => {}
        CountsFrom::ProgressLine => notes.push("counts from the next progress line".to_string()),
        CountsFrom::Total => notes.push("sent = Total - other rounds".to_string()),
        CountsFrom::Missing => notes.push("sent/skipped not in the log".to_string()),
        _ => {}
    }
    notes.join("; ")
}

fn rounds_table(o: &mut String, xen: &XenLog) {
    say!(o, "Rounds");
    say!(
        o,
        "  {:>5} {:>7} {:>7} {:>8} {:>5} {:>6} {:>9} {:>9} {:>7}  note",
        "round",
        "sent",
        "skipped",
        "delta ms",
        "dom0%",
        "target%",
        "sent Mb/s",
        "dirt Mb/s",
        "dirtied"
    );
    for r in &xen.rounds {
        let missing = r.counts_from == CountsFrom::Missing;
        let (sent, skipped) = if missing {
            ("?".to_string(), "?".to_string())
        } else {
            (r.sent.to_string(), r.skipped.to_string())
        };
        let row = format!(
            "  {:>5} {:>7} {:>7} {:>8} {:>5} {:>6} {:>9} {:>9} {:>7}  {}",
            r.round,
            sent,
            skipped,
            r.delta_ms,
            r.dom0_pct,
            r.target_pct,
            r.sent_mbps,
            r.dirtied_mbps,
            r.dirtied_pages,
            round_note(xen, r)
        );
        say!(o, "{}", row.trim_end());
    }
    let time = xen
        .rounds
        .iter()
        .fold(0u64, |a, r| a.saturating_add(r.delta_ms));
    let skipped = xen
        .rounds
        .iter()
        .fold(0u64, |a, r| a.saturating_add(r.skipped));
    say!(
        o,
        "  {:>5} {:>7} {:>7} {:>8}",
        "all",
        xen.sum_sent(),
        skipped,
        time
    );
    if xen.rounds.iter().all(XenRound::joined) && xen.rounds.len() > 1 {
        say!(
            o,
            "  (every round's figures were on the line after its counts; joined)"
        );
    }
    if let Some(c) = &xen.incomplete {
        say!(
            o,
            "  the log stops {} on line {}: {:?}",
            c.round
                .map_or("mid-line".to_string(), |r| format!("inside round {r}")),
            c.line,
            c.text
        );
    }
}

fn checks(o: &mut String, xen: &XenLog) {
    let findings = xen.check();
    say!(o, "Arithmetic checks");
    let count = |code: &str| findings.iter().filter(|f| f.kind.code() == code).count();
    let rounds = &xen.rounds;
    let pairs = rounds
        .windows(2)
        .filter(|w| {
            w[1].round == w[0].round.saturating_add(1) && w[1].counts_from != CountsFrom::Missing
        })
        .count();
    let with_counts = rounds
        .iter()
        .filter(|r| r.counts_from != CountsFrom::Missing)
        .count();
    agree(
        o,
        "sent + skipped = previous round's dirtied pages",
        pairs,
        count("pages-mismatch"),
    );
    agree(
        o,
        "sent Mb/s = sent·4096/(delta·125), within 1",
        with_counts,
        count("sent-rate-mismatch"),
    );
    agree(
        o,
        "dirtied Mb/s = dirtied·4096/(delta·125), within 1",
        rounds.len(),
        count("dirtied-rate-mismatch"),
    );
    if let Some(t) = &xen.total {
        let bad = count("total-mismatch");
        if rounds
            .iter()
            .any(|r| matches!(r.counts_from, CountsFrom::Total | CountsFrom::Missing))
        {
            say!(o, "  -        Total pages sent= {}: not checkable, a round's count is derived from it or missing",
                t.pages
            );
        } else if count("round-gap") > 0 {
            say!(
                o,
                "  -        Total pages sent= {}: not checkable, rounds are missing",
                t.pages
            );
        } else {
            let verdict = if bad == 0 { "OK" } else { "MISMATCH" };
            say!(
                o,
                "  {verdict:<8} Total pages sent= {} against the rounds' sum {}",
                t.pages,
                xen.sum_sent()
            );
        }
    }
    if findings.is_empty() {
        say!(o, "  The log is consistent with itself.");
    } else {
        say!(o, "  Findings:");
        for f in &findings {
            say!(o, "    {}", wrap(&f.to_string(), 72, 6));
        }
    }
}

fn agree(o: &mut String, what: &str, total: usize, bad: usize) {
    let verdict = if bad == 0 { "OK" } else { "MISMATCH" };
    say!(
        o,
        "  {verdict:<8} {what}: {} of {total} agree",
        total.saturating_sub(bad)
    );
}

fn closing_ratio(o: &mut String, xen: &XenLog) {
    let Some(c) = xen.closing_ratio() else {
        if !xen.rounds.is_empty() {
            say!(o, "Closing ratio");
            para(
                o,
                "The log has no `Total pages sent= T (R x)` line, so there is no ratio to explain.",
            );
            say!(o);
        }
        return;
    };
    let decimals = xen.total.as_ref().map_or(2, |t| t.ratio_decimals) as usize;
    say!(
        o,
        "Closing ratio: Total pages sent= {} ({:.*}x)",
        c.total_pages,
        decimals,
        c.ratio
    );
    para(o, &format!(
        "T = {} pages ({:.1} MiB) were sent over all rounds. R is not T over the guest's RAM: it is T / p2m_size, where p2m_size is the length of the guest's physical-to-machine map, one entry for every guest frame number up to the highest, holes (frame numbers with no RAM behind them) included.",
        c.total_pages,
        mib(c.total_pages)
    ));
    let range = match c.p2m_max {
        Some(max) => format!(
            "R is printed to {decimals} decimals, so p2m_size is between {:.0} and {:.0}",
            c.p2m_min.ceil(),
            max.floor()
        ),
        None => "R is printed as 0, so p2m_size is not bounded".to_string(),
    };
    let mut s = format!(
        "From the log, p2m_size ≈ T / R = {} / {:.*} ≈ {:.0} ({range}).",
        c.total_pages, decimals, c.ratio, c.p2m_estimate
    );
    if let Some(p) = c.p2m_from_progress {
        s.push_str(&format!(" The progress lines give it exactly: {p}."));
    }
    para(o, &s);
    if let (Some(ram), Some(per_page)) = (c.first_round_pages, c.sent_per_first_round_page) {
        let p2m = c.p2m_from_progress.map_or(c.p2m_estimate, |p| p as f64);
        let mut s = format!(
            "Round 1 went over {ram} pages (its sent + skipped), {:.1} MiB: the guest's memory. ",
            mib(ram)
        );
        if p2m > ram as f64 * 1.05 {
            s.push_str(&format!(
                "So about {:.0} of the p2m's frame numbers are holes that are never sent, and R = {:.*} < {:.2} = T / {ram}: measured against its memory, the guest's pages were sent {per_page:.2} times on average, some of them more than once, yet R can be below 1.",
                p2m - ram as f64,
                decimals,
                c.ratio,
                per_page
            ));
        } else {
            s.push_str(&format!(
                "That is about p2m_size, so here R is close to the average number of times each page was sent: {per_page:.2}."
            ));
        }
        para(o, &s);
    }
    say!(o);
}

fn downtime(o: &mut String, xen: &XenLog) {
    if xen.rounds.is_empty() {
        if xen.saving.is_some() || !xen.progress.is_empty() {
            say!(o, "Downtime");
            let after: u64 = xen
                .progress
                .iter()
                .filter(|p| p.after_suspend && p.label.starts_with("Frames"))
                .map(|p| p.total)
                .max()
                .unwrap_or(0);
            let mut s = "This log has no timings at all, so it says nothing about the downtime, not even a lower bound.".to_string();
            if xen.suspend.is_some() && after > 0 {
                s.push_str(&format!(
                    " It does say that the pass after the suspend sent {after} pages with the guest stopped; how long that, the state sent after it and the resume on the destination took is not in it."
                ));
            }
            para(o, &s);
            say!(o);
        }
        return;
    }
    say!(o, "Downtime");
    let Some(d) = xen.downtime_bound() else {
        para(
            o,
            "The log holds no final-copy round (no round follows one marked \"Start last iteration\"), so it says nothing about the downtime: the migration did not get that far, the log was cut, or this was not a live save.",
        );
        say!(o);
        return;
    };
    para(
        o,
        "The log does not contain the downtime. What it does say:",
    );
    if let (Some(r), Some(ms)) = (d.suspend_round, d.suspend_round_delta_ms) {
        let suspend_line = xen.suspend.as_ref().map_or(String::new(), |s| {
            format!(" (the SUSPEND line, line {})", s.line)
        });
        say!(o, "  - {}",
            wrap(
                &format!(
                    "Round {r} said \"Start last iteration\". After sending its pages the save code asked the guest to suspend and waited until it had{suspend_line}, then printed the round's figures: its delta of {ms} ms includes the suspend, and the log does not say for how much of those {ms} ms the guest was already stopped."
                ),
                74,
                4
            )
        );
    }
    say!(o, "  - {}",
        wrap(
            &format!(
                "Round {} is the final copy: {} pages sent in {} ms with the guest suspended. Its delta covers only sending those pages, not the suspend before it nor anything after it.",
                d.final_round, d.final_pages, d.final_delta_ms
            ),
            74,
            4
        )
    );
    say!(o, "  - {}",
        wrap(
            "Not in this log: the suspend itself (inside the previous round's delta), what goes out after the last page (vCPU context and device state), the destination loading all of it, and the guest being resumed there.",
            74,
            4
        )
    );
    para(o, &format!(
        "So the downtime is at least {} ms, round {}'s delta, and the log cannot say how much more; the last delta is a lower bound, not the downtime. To measure it, watch the guest from outside during the migration, e.g. a ping every 10 ms, and take the longest gap.",
        d.final_delta_ms, d.final_round
    ));
    say!(o);
}

fn progress(o: &mut String, xen: &XenLog) {
    let legacy = xen
        .progress
        .iter()
        .filter(|p| p.label.contains("Saving memory"))
        .count();
    let other: Vec<&log::Progress> = xen
        .progress
        .iter()
        .filter(|p| !p.label.contains("Saving memory"))
        .collect();
    if legacy > 0 {
        say!(o, "Progress: {legacy} line{} of libxc's 4.1-4.5 form (\"Saving memory: iter N (last sent S skipped K)\"); their counts are in the table above.",
            plural(legacy)
        );
    }
    if xen.saving.is_none() && other.is_empty() {
        return;
    }
    say!(o, "Migration v2 progress");
    if let Some(s) = &xen.saving {
        para(o, &format!(
            "Line {}: saving domain {} ({}). Migration v2 (Xen 4.6 and later) prints no per-round statistics: no sent, skipped or delta, and no Total line; only how far each pass got.",
            s.line, s.domid, s.guest_type
        ));
    }
    // The last line of each run of one label.
    let mut shown_suspend = false;
    for (i, p) in other.iter().enumerate() {
        if other.get(i + 1).is_some_and(|q| q.label == p.label) {
            continue;
        }
        if p.after_suspend && !shown_suspend {
            if let Some(s) = &xen.suspend {
                say!(o, "    -- guest suspended (line {}) --", s.line);
            }
            shown_suspend = true;
        }
        say!(
            o,
            "    {}: {}/{} ({}%){}",
            p.label,
            p.done,
            p.total,
            p.percent,
            if p.after_suspend && p.label.starts_with("Frames") {
                "  sent with the guest suspended"
            } else {
                ""
            }
        );
    }
    if let Some(p2m) = xen.p2m_size_from_progress() {
        para(o, &format!(
            "The first pass goes over the whole p2m: p2m_size = {p2m} ({:.1} MiB of guest frame numbers, holes included).",
            mib(p2m)
        ));
    }
    say!(o);
}

fn to_json(name: &str, xen: &XenLog, which: usize, count: usize) -> Value {
    let rounds: Vec<Value> = xen
        .rounds
        .iter()
        .map(|r| {
            json!({
                "round": r.round,
                "sent": r.sent,
                "skipped": r.skipped,
                "counts_from": r.counts_from.name(),
                "delta_ms": r.delta_ms,
                "dom0_pct": r.dom0_pct,
                "target_pct": r.target_pct,
                "sent_mbps": r.sent_mbps,
                "dirtied_mbps": r.dirtied_mbps,
                "dirtied_pages": r.dirtied_pages,
                "expected_sent_mbps": r.expected_sent_mbps(),
                "expected_dirtied_mbps": r.expected_dirtied_mbps(),
                "last_iteration": r.last_iteration,
                "final_copy": r.final_copy,
                "line": r.line,
                "delta_line": r.delta_line,
            })
        })
        .collect();
    let findings: Vec<Value> = xen
        .check()
        .iter()
        .map(|f| {
            json!({
                "line": f.line,
                "round": f.round,
                "code": f.kind.code(),
                "mismatch": f.kind.is_mismatch(),
                "message": f.to_string(),
            })
        })
        .collect();
    let mismatches = findings
        .iter()
        .filter(|f| f["mismatch"] == Value::Bool(true))
        .count();
    let ratio = xen.closing_ratio().map(|c| {
        json!({
            "total_pages": c.total_pages,
            "ratio": c.ratio,
            "p2m_size_estimate": c.p2m_estimate,
            "p2m_size_min": c.p2m_min,
            "p2m_size_max": c.p2m_max,
            "p2m_size_from_progress": c.p2m_from_progress,
            "first_round_pages": c.first_round_pages,
            "sent_per_first_round_page": c.sent_per_first_round_page,
            "explanation": "R = T / p2m_size; p2m_size counts every guest frame number up to the highest, holes included, not the guest's RAM",
        })
    });
    let downtime = match xen.downtime_bound() {
        Some(d) => json!({
            "known": false,
            "lower_bound_ms": d.final_delta_ms,
            "final_round": d.final_round,
            "final_round_pages": d.final_pages,
            "suspend_round": d.suspend_round,
            "suspend_round_delta_ms": d.suspend_round_delta_ms,
            "explanation": "the final round's delta covers only sending its pages with the guest suspended; the suspend (inside the previous round's delta), the state sent afterwards and the resume on the destination are not in the log",
        }),
        None => json!({
            "known": false,
            "lower_bound_ms": null,
            "explanation": "the log holds no final-copy round",
        }),
    };
    let progress: Vec<Value> = xen
        .progress
        .iter()
        .map(|p| {
            json!({
                "line": p.line,
                "label": p.label,
                "iteration": p.iteration,
                "iterations": p.iterations,
                "done": p.done,
                "total": p.total,
                "percent": p.percent,
                "after_suspend": p.after_suspend,
            })
        })
        .collect();
    json!({
        "source": name,
        "migration": which,
        "migrations_in_log": count,
        "first_line": xen.first_line,
        "last_line": xen.last_line,
        "ignored_lines": xen.ignored_lines,
        "page_size": XEN_PAGE_SIZE,
        "rounds": rounds,
        "total": xen.total.as_ref().map(|t| json!({
            "line": t.line,
            "pages": t.pages,
            "ratio": t.ratio,
        })),
        "fixups": xen.fixups,
        "suspend": xen.suspend.as_ref().map(|s| json!({
            "line": s.line,
            "shared_info_frame": s.shared_info_frame,
        })),
        "saving": xen.saving.as_ref().map(|s| json!({
            "line": s.line,
            "domid": s.domid,
            "guest_type": s.guest_type,
        })),
        "checks": {
            "ok": findings.is_empty(),
            "mismatches": mismatches,
            "findings": findings,
        },
        "closing_ratio": ratio,
        "downtime": downtime,
        "progress": progress,
        "errors": xen.errors.iter().map(|e| json!({"line": e.line, "text": e.text})).collect::<Vec<_>>(),
        "incomplete": xen.incomplete.as_ref().map(|c| json!({
            "line": c.line,
            "round": c.round,
            "text": c.text,
        })),
    })
}

//! Reading one line: taking off the prefixes xend, `xl` and libxc put
//! before a message, and classifying what is left.

use crate::model::{Progress, TEXT_CAP};
use crate::parse::LogError;
use std::str::FromStr;

/// A round's figures: everything from `delta` on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Figures {
    pub(crate) delta_ms: u64,
    pub(crate) dom0_pct: i64,
    pub(crate) target_pct: i64,
    pub(crate) sent_mbps: u64,
    pub(crate) dirtied_mbps: u64,
    pub(crate) dirtied_pages: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RoundLine {
    pub(crate) round: u32,
    pub(crate) sent: u64,
    pub(crate) skipped: u64,
    pub(crate) last_iteration: bool,
    pub(crate) figures: Option<Figures>,
    pub(crate) text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Item {
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

pub(crate) fn cap(s: &str) -> String {
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
pub(crate) fn round_hint(raw: &str) -> Option<u32> {
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

pub(crate) fn classify(line: usize, raw: &str) -> Result<Item, LogError> {
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

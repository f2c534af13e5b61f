//! Parsing sizes, rates and bandwidths as people write them on a command
//! line: `4GiB`, `512M`, `200MB/s`, `1Gbit`, `10Gbit/s`, `300ms`. For the
//! programs (the examples and benches); the library takes numbers.
//!
//! Written here rather than taken from `bytesize` and `humantime`: those
//! parse sizes and durations, but not the rates (`200MB/s`) and link
//! bandwidths in bits (`1Gbit`) the programs take, and one small parser
//! for all four keeps their spelling the same.

use std::time::Duration;

/// A quantity that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse {what} {input:?}: {why}")]
pub struct ParseError {
    /// What kind of quantity was expected.
    pub what: &'static str,
    /// The text given.
    pub input: String,
    /// What was wrong.
    pub why: &'static str,
}

fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map_or(s.len(), |(i, _)| i);
    let n: f64 = s[..end].parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some((n, s[end..].trim()))
}

/// A size in bytes: `4096`, `64KiB`, `1GiB`, `2G` (binary), `1GB` (decimal).
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let err = |why| ParseError {
        what: "size",
        input: s.to_owned(),
        why,
    };
    let (n, unit) = split_number(s).ok_or_else(|| err("expected a number"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(err(
                "unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
            ))
        }
    };
    let v = n * mult;
    if v > u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(v.round() as u64)
}

/// A data rate in bytes per second: `200MB/s`, `1GiB/s`, `0`.
pub fn parse_rate(s: &str) -> Result<f64, ParseError> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    parse_size(t).map(|b| b as f64).map_err(|e| ParseError {
        what: "rate",
        input: s.to_owned(),
        why: e.why,
    })
}

/// A link bandwidth in bits per second: `1Gbit`, `10Gbit/s`, `100Mbit`,
/// `1.5Gbps`, `125MB/s` (bytes, converted).
pub fn parse_bandwidth(s: &str) -> Result<f64, ParseError> {
    let err = |why| ParseError {
        what: "bandwidth",
        input: s.to_owned(),
        why,
    };
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let (n, unit) = split_number(t).ok_or_else(|| err("expected a number"))?;
    let bits = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" | "bps" => 1.0,
        "kbit" | "kbps" | "k" => 1e3,
        "mbit" | "mbps" | "m" => 1e6,
        "gbit" | "gbps" | "g" => 1e9,
        "tbit" | "tbps" | "t" => 1e12,
        "kb" => 8e3,
        "mb" => 8e6,
        "gb" => 8e9,
        _ => {
            return Err(err(
                "unknown unit (use bit, Mbit, Gbit, or MB/GB for bytes)",
            ))
        }
    };
    let v = n * bits;
    if v <= 0.0 {
        return Err(err("bandwidth must be positive"));
    }
    Ok(v)
}

/// A duration: `300ms`, `1.5s`, `250us`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let err = |why| ParseError {
        what: "duration",
        input: s.to_owned(),
        why,
    };
    let (n, unit) = split_number(s).ok_or_else(|| err("expected a number"))?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(err("unknown unit (use ns, us, ms, s, min)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn rates_and_bandwidths() {
        assert_eq!(parse_rate("200MB/s").unwrap(), 200e6);
        assert_eq!(parse_rate("0").unwrap(), 0.0);
        assert_eq!(parse_bandwidth("1Gbit").unwrap(), 1e9);
        assert_eq!(parse_bandwidth("10Gbit/s").unwrap(), 10e9);
        assert_eq!(parse_bandwidth("125MB/s").unwrap(), 1e9);
        assert!(parse_bandwidth("0Gbit").is_err());
        assert!(parse_bandwidth("fast").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("3 fortnights").is_err());
    }
}

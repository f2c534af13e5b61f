//! Statistics, in the two dialects migration users already read.
//!
//! Per round, the line `xc_domain_save` prints on Xen:
//!
//! ```text
//! 1: sent 28847, skipped 3921, delta 1702ms, dom0 62%, target 32%, sent 555Mb/s, dirtied 116Mb/s 6036 pages
//! ```
//!
//! where Mb/s = pages × page size / (delta ms × 125), and the closing
//! `Total pages sent= T (R x)`. As totals, the names of QEMU's
//! `query-migrate` (total-time, downtime, transferred, duplicate, ...).
//! Downtime is measured from the source's pause to the destination's
//! resume and broken into its parts; it is never inferred from a round.
//!
//! # The schema
//!
//! Every statistics type serialises with serde, both ways, in one naming:
//! keys are kebab-case, and every duration is a number of milliseconds (a
//! float) whose key ends in `-ms` (`total-time-ms`, `downtime-ms`,
//! `delta-ms`, `fault-latency-p99-ms`...). Sizes are bytes, counts are
//! pages, rates are per second unless the key says otherwise (`mbps`).
//! [`MigrationStats`] also writes a few figures derived from its fields
//! (`status`, `converged`, `transfer-ratio`, `postcopy-requests`,
//! `postcopy-bytes`), which reading it back ignores.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Why the source stopped pre-copying and paused the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SwitchReason {
    /// The policy copies everything with the guest paused.
    StopAndCopy,
    /// What remained fitted the downtime target.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// Total transfer passed its limit (a multiple of guest memory).
    TransferLimit,
    /// Rounds stopped shrinking the dirty set.
    NoProgress,
    /// Post-copy from the start: the guest moves at once.
    PostCopy,
    /// The VMM asked for post-copy while pre-copy ran
    /// ([`crate::MigrationHandle::switch_to_postcopy`]).
    Requested,
}

impl SwitchReason {
    /// Whether pre-copy converged (or was not attempted).
    pub fn converged(self) -> bool {
        matches!(
            self,
            SwitchReason::Converged
                | SwitchReason::StopAndCopy
                | SwitchReason::PostCopy
                | SwitchReason::Requested
        )
    }

    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            SwitchReason::StopAndCopy => "stop-and-copy",
            SwitchReason::Converged => "converged",
            SwitchReason::MaxRounds => "did not converge: round limit reached",
            SwitchReason::TransferLimit => "did not converge: transfer limit reached",
            SwitchReason::NoProgress => "did not converge: rounds stopped making progress",
            SwitchReason::PostCopy => "post-copy",
            SwitchReason::Requested => "post-copy on request",
        }
    }
}

/// One round, as Xen reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct RoundStats {
    /// Round number, from 1. The final (stop-and-copy) round is the last.
    pub round: u32,
    /// Pages sent.
    pub sent: u64,
    /// Pages skipped because the guest had dirtied them again (they go in a later round).
    pub skipped: u64,
    /// Of the pages sent, how many were zero pages (sent as a flag).
    pub zero: u64,
    /// Bytes put on the wire in this round, record overhead included.
    pub bytes: u64,
    /// Duration of the round. A pre-copy round to a destination that
    /// acknowledges rounds (`Capabilities::ROUND_RECEIVED`) lasts until
    /// the destination had every frame of it, less half a round trip;
    /// otherwise, and for the final copy, until its last frame was handed
    /// to the transport.
    #[serde(with = "ms", rename = "delta-ms")]
    pub delta: Duration,
    /// Migration thread CPU use over the round, percent.
    pub dom0_pct: f64,
    /// Guest CPU use over the round, percent (0 while paused).
    pub target_pct: f64,
    /// Pages the guest dirtied during the round.
    pub dirtied: u64,
    /// Whether this was the final copy, with the guest paused.
    pub final_copy: bool,
    /// Page size in bytes, for the Mb/s columns.
    pub page_size: u32,
    /// The vCPU throttle auto-converge applied during the round, percent
    /// (0: none).
    pub throttle_pct: u8,
}

impl RoundStats {
    fn mbps(&self, pages: u64) -> f64 {
        let ms = self.delta.as_secs_f64() * 1000.0;
        if ms <= 0.0 {
            0.0
        } else {
            pages as f64 * self.page_size as f64 / (ms * 125.0)
        }
    }

    /// Sent rate in Mb/s as Xen computes it.
    pub fn sent_mbps(&self) -> f64 {
        self.mbps(self.sent)
    }

    /// Dirtying rate in Mb/s as Xen computes it.
    pub fn dirtied_mbps(&self) -> f64 {
        self.mbps(self.dirtied)
    }
}

impl fmt::Display for RoundStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: sent {}, skipped {}, delta {}ms, dom0 {:.0}%, target {:.0}%, sent {:.0}Mb/s, dirtied {:.0}Mb/s {} pages",
            self.round,
            self.sent,
            self.skipped,
            self.delta.as_millis(),
            self.dom0_pct,
            self.target_pct,
            self.sent_mbps(),
            self.dirtied_mbps(),
            self.dirtied
        )?;
        if self.throttle_pct > 0 {
            write!(f, ", throttle {}%", self.throttle_pct)?;
        }
        Ok(())
    }
}

/// The parts downtime is made of. Each part is measured on one host's
/// clock; `transit` is what remains of the measured total.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct DowntimeParts {
    /// Source: asking the guest to pause until every vCPU had stopped.
    #[serde(with = "ms", rename = "pause-ms")]
    pub pause: Duration,
    /// Source: every vCPU stopped until the last page was handed to the
    /// transport.
    #[serde(with = "ms", rename = "final-copy-ms")]
    pub final_copy: Duration,
    /// Source: saving vCPU and device state.
    #[serde(with = "ms", rename = "device-save-ms")]
    pub device_save: Duration,
    /// Source: digesting memory for the completion record.
    #[serde(with = "ms", rename = "source-verify-ms")]
    pub source_verify: Duration,
    /// Network: the final data draining to and arriving at the destination.
    #[serde(with = "ms", rename = "transit-ms")]
    pub transit: Duration,
    /// Destination: digesting its memory and comparing.
    #[serde(with = "ms", rename = "dest-verify-ms")]
    pub dest_verify: Duration,
    /// Destination: restoring vCPU and device state.
    #[serde(with = "ms", rename = "device-restore-ms")]
    pub device_restore: Duration,
    /// Destination: the backend's resume.
    #[serde(with = "ms", rename = "resume-ms")]
    pub resume: Duration,
}

/// Serde for a [`Duration`] as milliseconds, a float (`12.5` is 12.5 ms),
/// the unit of every duration in this schema.
pub(crate) mod ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes `d` as milliseconds.
    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    /// Reads milliseconds; a negative, infinite or not-a-number value is
    /// an error.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v / 1000.0)
            .map_err(|_| serde::de::Error::custom(format!("{v} is not a duration in milliseconds")))
    }
}

/// What post-copy cost, once the guest ran on the destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct PostcopyStats {
    /// Network faults: pages the destination asked for because the guest
    /// touched them before they arrived (QEMU's `postcopy-requests`).
    pub requests: u64,
    /// Pages that arrived twice (a request crossing a push); not placed again.
    pub duplicates: u64,
    /// Median fault latency: request to page placed.
    #[serde(with = "ms", rename = "fault-latency-p50-ms")]
    pub fault_latency_p50: Duration,
    /// 99th-percentile fault latency.
    #[serde(with = "ms", rename = "fault-latency-p99-ms")]
    pub fault_latency_p99: Duration,
    /// Longest fault latency.
    #[serde(with = "ms", rename = "fault-latency-max-ms")]
    pub fault_latency_max: Duration,
    /// Time vCPUs spent waiting for pages after resume (not downtime).
    #[serde(with = "ms", rename = "vcpu-stall-ms")]
    pub vcpu_stall: Duration,
    /// Pages the backend needed in place before the resume
    /// ([`crate::GuestControl::resume_pages`]), sent with the guest paused.
    pub resume_pages: u64,
    /// Pages sent after the destination resumed.
    pub pages: u64,
    /// Bytes sent after the destination resumed (QEMU's `postcopy-bytes`).
    pub bytes: u64,
    /// Resume on the destination until the last page arrived.
    #[serde(with = "ms", rename = "postcopy-time-ms")]
    pub duration: Duration,
    /// Times the connection broke after the switch-over and the
    /// migration went on over a new one.
    #[serde(default)]
    pub recoveries: u32,
    /// Pages the destination did not hold when a new connection took
    /// over, summed over recoveries: sent after it (those sent before the
    /// break were lost with the link).
    #[serde(default)]
    pub recovered_pages: u64,
    /// Time from each break of the connection to the destination's
    /// answer on the new one (the push resumes then), summed.
    #[serde(default, with = "ms", rename = "recovery-time-ms")]
    pub recovery_time: Duration,
    /// Requested pages sent on the preempt connection, ahead of the push
    /// ([`crate::EngineConfig::postcopy_preempt`]); included in `pages`.
    #[serde(default)]
    pub preempt_pages: u64,
    /// Their bytes on the wire; included in `bytes`.
    #[serde(default)]
    pub preempt_bytes: u64,
}

/// Totals of one migration, with its rounds.
///
/// It serializes as one object in QEMU's names, in the schema the module
/// documents, with a few derived figures (see its `Serialize`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct MigrationStats {
    /// The policy's name.
    pub policy: String,
    /// Why the source switched over.
    pub switch_reason: SwitchReason,
    /// Guest pages in the layout.
    pub guest_pages: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// Start to destination resume confirmed.
    #[serde(with = "ms", rename = "total-time-ms")]
    pub total_time: Duration,
    /// Start until the first page went out (handshake, tracker start).
    #[serde(with = "ms", rename = "setup-time-ms")]
    pub setup_time: Duration,
    /// Source pause to destination resume, measured.
    #[serde(with = "ms", rename = "downtime-ms")]
    pub downtime: Duration,
    /// What the downtime was made of.
    pub downtime_parts: DowntimeParts,
    /// What the engine expected the downtime to be when it switched over
    /// (remaining bytes at the bandwidth estimate).
    #[serde(with = "ms", rename = "expected-downtime-ms")]
    pub expected_downtime: Duration,
    /// Bytes put on the wire, record overhead included.
    pub transferred: u64,
    /// Bytes still to send at the end (0 once complete).
    pub remaining: u64,
    /// Zero pages sent (as a flag, no data).
    pub duplicate: u64,
    /// Pages sent with their data.
    pub normal: u64,
    /// Bytes of page data sent.
    pub normal_bytes: u64,
    /// Pages sent in all (normal + duplicate).
    pub total_pages_sent: u64,
    /// Last estimate of the guest's dirtying rate, pages per second.
    pub dirty_pages_rate: f64,
    /// Average throughput, megabits per second.
    pub mbps: f64,
    /// Times the dirty log was collected.
    pub dirty_sync_count: u64,
    /// Bytes sent while the guest ran on the source.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// Round-trip time measured in the handshake.
    #[serde(with = "ms", rename = "rtt-ms")]
    pub rtt: Duration,
    /// Post-copy figures, if the migration ended in post-copy.
    pub postcopy: Option<PostcopyStats>,
    /// Every round, the final copy last.
    pub rounds: Vec<RoundStats>,
    /// Whether the destination confirmed resume after matching the digest.
    pub memory_verified: bool,
    /// Page-batch compression, if the configuration asked for it.
    #[serde(default)]
    pub compression: Option<CompressionStats>,
}

/// Page-batch compression on the source: bytes before and after, and the
/// time it took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct CompressionStats {
    /// The codec asked for (`lz4` or `zstd`).
    pub codec: String,
    /// Whether the destination announced the codec; if not, every batch
    /// went uncompressed.
    pub negotiated: bool,
    /// Batches sent compressed.
    pub compressed_batches: u64,
    /// Batches sent as they were, compression not paying for them.
    pub raw_batches: u64,
    /// Page-batch bytes (record bodies) given to the compressor.
    pub bytes_before: u64,
    /// What those bytes became on the wire.
    pub bytes_after: u64,
    /// Time spent compressing, on the source engine's thread.
    #[serde(with = "ms", rename = "cpu-ms")]
    pub cpu: Duration,
}

impl MigrationStats {
    /// Pages sent over guest pages: the "x" in `Total pages sent= T (R x)`.
    pub fn transfer_ratio(&self) -> f64 {
        if self.guest_pages == 0 {
            0.0
        } else {
            self.total_pages_sent as f64 / self.guest_pages as f64
        }
    }

    /// Number of pre-copy rounds (the final copy excluded).
    pub fn precopy_rounds(&self) -> usize {
        self.rounds.iter().filter(|r| !r.final_copy).count()
    }

    /// Xen's closing line.
    pub fn total_line(&self) -> String {
        format!(
            "Total pages sent= {} ({:.2}x)",
            self.total_pages_sent,
            self.transfer_ratio()
        )
    }
}

/// The totals as QEMU's `query-migrate` names them, plus the rounds, as one
/// object in the module's schema (durations in milliseconds under `-ms`
/// keys), with the derived `status`, `converged`, `transfer-ratio`,
/// `postcopy-requests` and `postcopy-bytes`. Every field is written under
/// the key its `Deserialize` reads.
impl Serialize for MigrationStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut m = s.serialize_map(Some(32))?;
        m.serialize_entry("policy", &self.policy)?;
        m.serialize_entry(
            "status",
            if self.memory_verified {
                "completed"
            } else {
                "failed"
            },
        )?;
        m.serialize_entry("converged", &self.switch_reason.converged())?;
        m.serialize_entry("switch-reason", &self.switch_reason)?;
        m.serialize_entry("guest-pages", &self.guest_pages)?;
        m.serialize_entry("page-size", &self.page_size)?;
        m.serialize_entry("total-time-ms", &ms(self.total_time))?;
        m.serialize_entry("setup-time-ms", &ms(self.setup_time))?;
        m.serialize_entry("downtime-ms", &ms(self.downtime))?;
        m.serialize_entry("downtime-parts", &self.downtime_parts)?;
        m.serialize_entry("expected-downtime-ms", &ms(self.expected_downtime))?;
        m.serialize_entry("transferred", &self.transferred)?;
        m.serialize_entry("remaining", &self.remaining)?;
        m.serialize_entry("duplicate", &self.duplicate)?;
        m.serialize_entry("normal", &self.normal)?;
        m.serialize_entry("normal-bytes", &self.normal_bytes)?;
        m.serialize_entry("total-pages-sent", &self.total_pages_sent)?;
        m.serialize_entry("transfer-ratio", &self.transfer_ratio())?;
        m.serialize_entry("dirty-pages-rate", &self.dirty_pages_rate)?;
        m.serialize_entry("mbps", &self.mbps)?;
        m.serialize_entry("dirty-sync-count", &self.dirty_sync_count)?;
        m.serialize_entry("precopy-bytes", &self.precopy_bytes)?;
        m.serialize_entry("downtime-bytes", &self.downtime_bytes)?;
        m.serialize_entry("rtt-ms", &ms(self.rtt))?;
        let pc = self.postcopy.as_ref();
        m.serialize_entry("postcopy-requests", &pc.map_or(0, |p| p.requests))?;
        m.serialize_entry("postcopy-bytes", &pc.map_or(0, |p| p.bytes))?;
        m.serialize_entry("postcopy", &self.postcopy)?;
        m.serialize_entry("memory-verified", &self.memory_verified)?;
        m.serialize_entry("rounds", &self.rounds)?;
        m.serialize_entry("compression", &self.compression)?;
        m.end()
    }
}

impl fmt::Display for MigrationStats {
    /// The round lines, Xen's total line, then QEMU's names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for r in &self.rounds {
            if r.final_copy && self.postcopy.is_some() {
                writeln!(f, "{}: (post-copy: guest running on the destination, pages pushed and fetched on demand)", r.round)?;
            } else if r.final_copy {
                writeln!(f, "{}: (guest paused, final copy)", r.round)?;
            }
            writeln!(f, "{r}")?;
        }
        writeln!(f, "{}", self.total_line())?;
        writeln!(
            f,
            "policy: {} ({})",
            self.policy,
            self.switch_reason.describe()
        )?;
        writeln!(f, "total-time: {:.1} ms", ms(self.total_time))?;
        writeln!(f, "setup-time: {:.1} ms", ms(self.setup_time))?;
        let p = &self.downtime_parts;
        writeln!(
            f,
            "downtime: {:.3} ms (pause {:.3}, final copy {:.3}, device save {:.3}, source verify {:.3}, transit {:.3}, destination verify {:.3}, device restore {:.3}, resume {:.3})",
            ms(self.downtime),
            ms(p.pause),
            ms(p.final_copy),
            ms(p.device_save),
            ms(p.source_verify),
            ms(p.transit),
            ms(p.dest_verify),
            ms(p.device_restore),
            ms(p.resume)
        )?;
        writeln!(f, "expected-downtime: {:.3} ms", ms(self.expected_downtime))?;
        writeln!(f, "transferred: {} bytes", self.transferred)?;
        writeln!(f, "remaining: {} bytes", self.remaining)?;
        writeln!(f, "duplicate: {} pages", self.duplicate)?;
        writeln!(
            f,
            "normal: {} pages ({} bytes)",
            self.normal, self.normal_bytes
        )?;
        writeln!(f, "dirty-pages-rate: {:.0} pages/s", self.dirty_pages_rate)?;
        writeln!(f, "mbps: {:.1}", self.mbps)?;
        writeln!(f, "dirty-sync-count: {}", self.dirty_sync_count)?;
        writeln!(f, "precopy-bytes: {}", self.precopy_bytes)?;
        writeln!(f, "downtime-bytes: {}", self.downtime_bytes)?;
        if let Some(c) = &self.compression {
            if c.negotiated {
                writeln!(
                    f,
                    "compression: {}, {} of {} batches, {} bytes to {} ({:.2}x), {:.1} ms",
                    c.codec,
                    c.compressed_batches,
                    c.compressed_batches + c.raw_batches,
                    c.bytes_before,
                    c.bytes_after,
                    c.bytes_before as f64 / c.bytes_after.max(1) as f64,
                    ms(c.cpu)
                )?;
            } else {
                writeln!(
                    f,
                    "compression: {} not announced by the destination; none used",
                    c.codec
                )?;
            }
        }
        if let Some(p) = &self.postcopy {
            writeln!(
                f,
                "postcopy-requests: {} (network faults; {} duplicate pages)",
                p.requests, p.duplicates
            )?;
            writeln!(f, "postcopy-bytes: {} ({} pages)", p.bytes, p.pages)?;
            if p.preempt_pages > 0 {
                writeln!(
                    f,
                    "preempt: {} requested pages, {} bytes on the preempt connection",
                    p.preempt_pages, p.preempt_bytes
                )?;
            }
            if p.resume_pages > 0 {
                writeln!(
                    f,
                    "resume-pages: {} (sent before the resume because the backend needs them in place)",
                    p.resume_pages
                )?;
            }
            writeln!(
                f,
                "fault latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                ms(p.fault_latency_p50),
                ms(p.fault_latency_p99),
                ms(p.fault_latency_max)
            )?;
            writeln!(
                f,
                "vcpu stall after resume: {:.3} ms over {:.1} ms of post-copy (not part of downtime)",
                ms(p.vcpu_stall),
                ms(p.duration)
            )?;
            if p.recoveries > 0 {
                writeln!(
                    f,
                    "recovered: {} broken connection{}, {:.3} ms from the break to the push resuming, {} pages missing then",
                    p.recoveries,
                    if p.recoveries == 1 { "" } else { "s" },
                    ms(p.recovery_time),
                    p.recovered_pages
                )?;
            }
        }
        write!(
            f,
            "memory verified: {}",
            if self.memory_verified { "yes" } else { "NO" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_round_trip_in_one_naming_with_milliseconds() {
        use serde_json::Value;
        let round = RoundStats {
            round: 1,
            sent: 10,
            delta: Duration::from_micros(1500),
            throttle_pct: 20,
            page_size: 4096,
            ..RoundStats::default()
        };
        let stats = MigrationStats {
            policy: "precopy".into(),
            switch_reason: SwitchReason::Converged,
            guest_pages: 10,
            page_size: 4096,
            total_time: Duration::from_millis(250),
            setup_time: Duration::from_millis(2),
            downtime: Duration::from_micros(12_500),
            downtime_parts: DowntimeParts {
                final_copy: Duration::from_millis(10),
                ..DowntimeParts::default()
            },
            expected_downtime: Duration::from_millis(11),
            transferred: 41_000,
            remaining: 0,
            duplicate: 0,
            normal: 10,
            normal_bytes: 40_960,
            total_pages_sent: 10,
            dirty_pages_rate: 3.5,
            mbps: 1.25,
            dirty_sync_count: 2,
            precopy_bytes: 41_000,
            downtime_bytes: 0,
            rtt: Duration::from_micros(200),
            postcopy: Some(PostcopyStats {
                requests: 3,
                fault_latency_p99: Duration::from_micros(750),
                ..PostcopyStats::default()
            }),
            rounds: vec![round],
            memory_verified: true,
            compression: None,
        };
        let j = serde_json::to_value(&stats).unwrap();
        assert_eq!(j["total-time-ms"], 250.0);
        assert_eq!(j["downtime-ms"], 12.5);
        assert_eq!(j["rtt-ms"], 0.2);
        assert_eq!(j["downtime-parts"]["final-copy-ms"], 10.0);
        assert_eq!(j["postcopy"]["fault-latency-p99-ms"], 0.75);
        assert_eq!(j["rounds"][0]["delta-ms"], 1.5);
        assert_eq!(j["rounds"][0]["throttle-pct"], 20);
        assert_eq!(j["switch-reason"], "converged");
        assert_eq!(j["status"], "completed");
        assert_eq!(j["postcopy-requests"], 3);
        // Every key, at every depth, is kebab-case.
        fn keys(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        keys(&j, &mut all);
        assert!(all.iter().all(|k| !k.contains('_')), "{all:?}");
        let mut bad = j["rounds"][0].clone();
        bad["delta-ms"] = serde_json::json!(-1.0);
        assert!(serde_json::from_value::<RoundStats>(bad).is_err());
        let back: MigrationStats = serde_json::from_value(j).unwrap();
        assert_eq!(back, stats);
    }

    #[test]
    fn round_line_matches_xen_arithmetic() {
        let r = RoundStats {
            round: 1,
            sent: 28847,
            skipped: 3921,
            zero: 0,
            bytes: 0,
            delta: Duration::from_millis(1702),
            dom0_pct: 62.0,
            target_pct: 32.0,
            dirtied: 6036,
            final_copy: false,
            page_size: 4096,
            throttle_pct: 0,
        };
        assert_eq!(
            r.to_string(),
            "1: sent 28847, skipped 3921, delta 1702ms, dom0 62%, target 32%, sent 555Mb/s, dirtied 116Mb/s 6036 pages"
        );
    }
}

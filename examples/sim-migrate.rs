//! Migrate a simulated guest in virtual time and print what happened.
//!
//! ```text
//! cargo run --release --example sim-migrate -- --policy precopy --workload uniform \
//!     --mem 4GiB --wss 1GiB --dirty-rate 200MB/s --bandwidth 1Gbit --latency 1ms --seed 7
//! ```
//!
//! Prints Xen-style round lines, the totals in QEMU's names, the downtime
//! observed by the guest on the virtual clock, the guest's progress
//! counter before and after, and whether memory verified. `--json` prints
//! the same as one JSON object. `--max-bandwidth` caps the pre-copy stage,
//! `--auto-converge` throttles a guest that outruns the link; progress
//! goes to stderr (a bar on a terminal), Ctrl-C cancels, `RUST_LOG=info`
//! prints the migration's tracing spans (see `--help` for the exit
//! statuses).

#[path = "common/steer.rs"]
mod steer;

use clap::{Parser, ValueEnum};
use livemig::core::{
    EngineConfig, HcaConfig, MemoryLayout, PageSize, PolicyConfig, PolicyKind, PrecopyConfig,
    Prepaging,
};
use livemig::sim::{
    simulate_steered, Link, MemoryMode, SimConfig, SimError, WorkloadKind, WorkloadSpec,
};
use livemig::units::{parse_bandwidth, parse_duration, parse_rate, parse_size};
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;
use steer::Failure;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WorkloadArg {
    Idle,
    Uniform,
    Hotcold,
    Zipf,
    Sequential,
    Phased,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MemoryArg {
    /// Bytes up to 4 GiB, model above.
    Auto,
    /// Every byte stored, pages move as bytes through the wire protocol.
    Bytes,
    /// A 32-bit version per page, pages move as bytes generated from it.
    Compact,
    /// A 16-bit version per page, pages move as tokens, not bytes (the
    /// fast path; the same statistics as bytes on the same seed).
    Model,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LayoutArg {
    /// One region from address 0.
    Flat,
    /// Up to 3 GiB below 4 GiB, the rest above (a hole between).
    Pc,
}

/// Migrate a simulated guest in virtual time.
#[derive(Parser, Debug)]
#[command(version, about, after_help = steer::EXIT_CODES)]
struct Args {
    /// Migration policy: precopy, stop-and-copy, postcopy[:PREPAGING],
    /// hybrid[:PREPAGING] or hca.
    #[arg(long, default_value = "precopy")]
    policy: PolicyKind,
    /// What the guest does.
    #[arg(long, value_enum, default_value = "uniform")]
    workload: WorkloadArg,
    /// Guest memory size (e.g. 4GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    mem: u64,
    /// Working-set size the workload writes over (default: a quarter of memory).
    #[arg(long, value_parser = parse_size)]
    wss: Option<u64>,
    /// Rate at which the guest dirties memory (e.g. 200MB/s).
    #[arg(long, default_value = "100MB/s", value_parser = parse_rate)]
    dirty_rate: f64,
    /// Link bandwidth (e.g. 1Gbit, 10Gbit).
    #[arg(long, default_value = "1Gbit", value_parser = parse_bandwidth)]
    bandwidth: f64,
    /// One-way link latency (e.g. 1ms).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    latency: Duration,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Page size in bytes.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    page_size: u64,
    /// Memory layout.
    #[arg(long, value_enum, default_value = "flat")]
    layout: LayoutArg,
    /// How the simulator stores guest memory.
    #[arg(long, value_enum, default_value = "auto")]
    memory: MemoryArg,
    /// Fraction of pages that start out as zeros.
    #[arg(long, default_value_t = 0.0)]
    zero_fraction: f64,
    /// hotcold: share of the working set that is hot.
    #[arg(long, default_value_t = 0.1)]
    hot_fraction: f64,
    /// hotcold: share of writes that hit the hot part.
    #[arg(long, default_value_t = 0.9)]
    hot_prob: f64,
    /// zipf: the exponent.
    #[arg(long, default_value_t = 1.0)]
    zipf_exponent: f64,
    /// phased: length of a phase.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    phase: Duration,
    /// pre-copy: switch over when the rest fits this downtime.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_target: Duration,
    /// pre-copy: most rounds.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// pre-copy: most total transfer, as a multiple of guest memory.
    #[arg(long, default_value_t = 3.0)]
    max_factor: f64,
    /// hybrid: pre-copy rounds before switching to post-copy.
    #[arg(long, default_value_t = 5)]
    hybrid_rounds: u32,
    /// post-copy and hybrid: push order (sequential, bubble,
    /// bubble-forward, multi-pivot, multi-pivot:K); overrides the one
    /// named in --policy.
    #[arg(long)]
    prepaging: Option<Prepaging>,
    /// hca: interval between samples of the dirty log.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    hca_interval: Duration,
    /// hca: count at which a page is hot.
    #[arg(long, default_value_t = 3)]
    hca_threshold: u8,
    /// hca: halve counts this many times before each round.
    #[arg(long, default_value_t = 1)]
    hca_decay: u32,
    /// Reads per write (reads fault on a post-copy destination too).
    #[arg(long, default_value_t = 0.0)]
    reads_per_write: f64,
    /// Where the working set starts, as an offset into memory (e.g. 3GiB).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    wss_offset: u64,
    /// Bandwidth cap and auto-converge.
    #[command(flatten)]
    steer: steer::SteerArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    steer::init_tracing();
    let ctrlc = match steer::CtrlC::install() {
        Ok(c) => c,
        Err(e) => return ExitCode::from(Failure::Other(e).report("sim-migrate")),
    };
    match run(&args, &ctrlc) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(f) => ExitCode::from(f.report("sim-migrate")),
    }
}

fn run(a: &Args, ctrlc: &steer::CtrlC) -> Result<bool, Failure> {
    let page_size = u32::try_from(a.page_size)
        .ok()
        .and_then(|p| PageSize::new(p).ok())
        .ok_or_else(|| {
            format!(
                "invalid --page-size {}: a power of two from 512 B to 2 MiB",
                a.page_size
            )
        })?;
    let layout = match a.layout {
        LayoutArg::Flat => MemoryLayout::flat(page_size, a.mem),
        LayoutArg::Pc => MemoryLayout::pc(page_size, a.mem),
    }
    .map_err(|e| format!("invalid --mem: {e}"))?;
    if a.mem == 0 {
        return Err("invalid --mem: must be positive".into());
    }
    let wss = a.wss.unwrap_or(a.mem / 4);
    if wss > a.mem {
        return Err(format!("invalid --wss: {wss} bytes is more than --mem {}", a.mem).into());
    }
    let ps = page_size.bytes() as u64;
    let kind = match a.workload {
        WorkloadArg::Idle => WorkloadKind::Idle,
        WorkloadArg::Uniform => WorkloadKind::Uniform,
        WorkloadArg::Hotcold => WorkloadKind::HotCold {
            hot_fraction: a.hot_fraction,
            hot_prob: a.hot_prob,
        },
        WorkloadArg::Zipf => WorkloadKind::Zipf {
            exponent: a.zipf_exponent,
        },
        WorkloadArg::Sequential => WorkloadKind::Sequential,
        WorkloadArg::Phased => WorkloadKind::Phased { phase: a.phase },
    };
    let mode = match a.memory {
        MemoryArg::Bytes => MemoryMode::Bytes,
        MemoryArg::Compact => MemoryMode::Compact,
        MemoryArg::Auto if a.mem <= 4 << 30 => MemoryMode::Bytes,
        MemoryArg::Model => MemoryMode::Model,
        MemoryArg::Auto => MemoryMode::Model,
    };
    let workload = {
        let mut c = WorkloadSpec::new(kind, (wss / ps).max(1), a.dirty_rate / ps as f64, a.seed);
        c.zero_fraction = a.zero_fraction;
        c.reads_per_write = a.reads_per_write;
        c.wss_offset = a.wss_offset / ps;
        c
    };
    let precopy = {
        let mut v = PrecopyConfig::default();
        v.downtime_target = a.downtime_target;
        v.max_rounds = a.max_rounds;
        v.max_transfer_factor = a.max_factor;
        v
    };
    let mut config = PolicyConfig::default();
    config.hybrid_precopy = {
        let mut v = precopy.clone();
        v.max_rounds = a.hybrid_rounds;
        v
    };
    config.precopy = precopy;
    config.hca = {
        let mut v = HcaConfig::default();
        v.sample_interval = a.hca_interval;
        v.hot_threshold = a.hca_threshold;
        v.decay_shift = a.hca_decay;
        v.downtime_target = a.downtime_target;
        v.max_rounds = a.max_rounds;
        v.max_transfer_factor = a.max_factor;
        v
    };
    let kind = match a.prepaging {
        Some(p) => a.policy.with_prepaging(p),
        None => a.policy,
    };
    let policy = kind.build(&config);
    let mut engine = EngineConfig::default();
    a.steer.apply(&mut engine)?;
    let mut watching = false;
    let report = simulate_steered(
        {
            let mut c = SimConfig::new(layout, workload, Link::new(a.bandwidth, a.latency), policy);
            c.mode = mode;
            c.engine = engine;
            c.time_limit = Duration::from_secs(24 * 3600);
            c
        },
        &mut |s| {
            if !watching {
                watching = true;
                ctrlc.watch(s.source);
                steer::show_progress(s.source, true);
            }
        },
    )
    .map_err(|e| match e {
        SimError::Workload(w) => Failure::Other(format!("invalid workload flags: {w}")),
        SimError::Link(l) => Failure::Other(format!("invalid link flags: {l}")),
        SimError::Migration(m) => Failure::Migration(m),
        other => Failure::Other(other.to_string()),
    })?;
    let verified = report.memory_equal && report.stats.memory_verified;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if a.json {
        let mut v = serde_json::to_value(&report.stats).expect("statistics as JSON");
        v["simulation"] = json!({
            "workload": a.workload.to_possible_value().map(|p| p.get_name().to_owned()),
            "memory-bytes": a.mem,
            "wss-bytes": wss,
            "dirty-rate-bytes-per-sec": a.dirty_rate,
            "bandwidth-bits-per-sec": a.bandwidth,
            "latency-ms": ms(a.latency),
            "seed": a.seed,
            "memory-mode": mode.name(),
            "pages-moved-as": if mode == MemoryMode::Model { "tokens" } else { "bytes" },
            "guest-observed-downtime-ms": ms(report.true_downtime),
            "counter-at-pause": report.counter_at_pause,
            "counter-at-resume": report.counter_at_resume,
            "prepaging": kind.prepaging().unwrap_or_default().to_string(),
            "guest-observed-vcpu-stall-ms": ms(report.true_stall),
            "guest-observed-faults": report.true_faults,
            "memory-equal": report.memory_equal,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Failure::Other(e.to_string()))?
        );
    } else {
        println!(
            "simulated {} guest ({} pages, {} memory: pages moved as {}), workload {}, wss {} MiB, dirty rate {:.0} MB/s, link {:.2} Gbit/s, latency {:.3} ms, seed {}",
            human(a.mem),
            report.stats.guest_pages,
            mode.name(),
            if mode == MemoryMode::Model {
                "version tokens, not bytes"
            } else {
                "bytes through the wire protocol"
            },
            a.workload.to_possible_value().map(|p| p.get_name().to_owned()).unwrap_or_default(),
            wss >> 20,
            a.dirty_rate / 1e6,
            a.bandwidth / 1e9,
            ms(a.latency),
            a.seed
        );
        println!("{}", report.stats);
        println!(
            "guest-observed downtime: {:.3} ms (source pause to destination resume on the virtual clock)",
            ms(report.true_downtime)
        );
        println!(
            "guest counter: {} at pause on the source, {} at resume on the destination ({})",
            report.counter_at_pause,
            report.counter_at_resume,
            if report.counter_at_pause == report.counter_at_resume {
                "continues exactly"
            } else {
                "MISMATCH"
            }
        );
        if report.stats.postcopy.is_some() {
            println!(
                "guest-observed post-copy: {} faults, vCPU stalled {:.3} ms (pre-paging {})",
                report.true_faults,
                ms(report.true_stall),
                kind.prepaging().unwrap_or_default()
            );
        }
        println!(
            "memory: {}",
            if !verified {
                "NOT VERIFIED"
            } else if mode == MemoryMode::Model {
                "verified as page models (digest of (page, version) pairs matched; every page's version equal on both sides)"
            } else if report.stats.postcopy.is_some() {
                "verified (digest of every page as it arrived matched the source's; byte compare equal after the source replayed the destination guest's accesses)"
            } else {
                "verified (digest matched, byte compare equal)"
            }
        );
    }
    Ok(verified && report.counter_at_pause == report.counter_at_resume)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

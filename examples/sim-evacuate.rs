//! Evacuate a simulated host: N guests leave over one shared link, under
//! each scheduling strategy, and print how long the host took to empty
//! and what the guests lived through.
//!
//! ```text
//! cargo run --release --example sim-evacuate -- --guests 50 --fleet heavy \
//!     --uplink 40Gbit --destinations 4 --downlink 10Gbit --concurrency 8 --seed 1
//! ```
//!
//! Every guest's migration is the same engine and policy, all on one
//! virtual clock, sharing the uplink (and each destination's downlink)
//! frame by frame. Prints one table row per strategy: time to empty the
//! host, downtime p50/p99/max over the guests, bytes sent, guests that did
//! not converge; `--svg` draws guests left on the host against time, one
//! line per strategy; `--json` prints every guest's outcome.

use clap::{Parser, ValueEnum};
use livemig::core::{Policy, PolicyConfig, PolicyKind};
use livemig::sim::{
    evacuate, fleet, EvacConfig, EvacReport, FleetShape, Link, MemoryMode, PolicyFactory, Strategy,
};
use livemig::units::{parse_bandwidth, parse_duration};
use plotters::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FleetArg {
    /// 1-8 GiB guests, median dirty rate 20 MB/s: fits the link easily.
    Light,
    /// 1-8 GiB guests, median dirty rate 150 MB/s: does not fit.
    Heavy,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MemoryArg {
    /// Page models (a version per page, moved as tokens).
    Model,
    /// Every byte (small fleets only).
    Bytes,
}

/// Evacuate a simulated host.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Exit codes: 0 every guest moved and verified; 1 a migration failed or did not verify, or the plot could not be written; 2 invalid arguments."
)]
struct Args {
    /// Guests on the host.
    #[arg(long, default_value_t = 50)]
    guests: usize,
    /// The distribution guests are drawn from.
    #[arg(long, value_enum, default_value = "light")]
    fleet: FleetArg,
    /// Seed of the fleet (sizes, working sets, dirty rates, workloads).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The source host's link (e.g. 40Gbit).
    #[arg(long, default_value = "40Gbit", value_parser = parse_bandwidth)]
    uplink: f64,
    /// One-way latency to the destinations.
    #[arg(long, default_value = "0.5ms", value_parser = parse_duration)]
    latency: Duration,
    /// Number of destination hosts.
    #[arg(long, default_value_t = 4)]
    destinations: usize,
    /// Each destination's downlink.
    #[arg(long, default_value = "10Gbit", value_parser = parse_bandwidth)]
    downlink: f64,
    /// Most migrations at once (one-at-a-time and all-at-once ignore it).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Strategies to compare, comma-separated (one-at-a-time, all-at-once,
    /// smallest-first, lowest-dirty-first, fit, fit:MARGIN); default all.
    #[arg(long, value_delimiter = ',')]
    strategy: Vec<Strategy>,
    /// The policy of every migration: precopy, stop-and-copy,
    /// postcopy[:PREPAGING], hybrid[:PREPAGING] or hca.
    #[arg(long, default_value = "precopy")]
    policy: PolicyKind,
    /// Policies with a downtime target (pre-copy, hybrid, HCA): switch
    /// over when the rest fits this downtime.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_target: Duration,
    /// How guest memory is simulated.
    #[arg(long, value_enum, default_value = "model")]
    memory: MemoryArg,
    /// Draw guests left on the host against time into this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print every guest's outcome as JSON.
    #[arg(long)]
    json: bool,
}

fn factory(a: &Args) -> PolicyFactory {
    let kind = a.policy;
    let config = PolicyConfig::default().with_downtime_target(a.downtime_target);
    Arc::new(move || -> Box<dyn Policy> { kind.build(&config) })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.destinations == 0 || a.guests == 0 {
        eprintln!("sim-evacuate: invalid --destinations or --guests: must be positive");
        return ExitCode::from(2);
    }
    let shape = match a.fleet {
        FleetArg::Light => FleetShape::light(),
        FleetArg::Heavy => FleetShape::heavy(),
    };
    let guests = fleet(a.guests, &shape, a.seed);
    let total_mem: u64 = guests.iter().map(|g| g.memory).sum();
    let total_dirty: f64 = guests.iter().map(|g| g.dirty_rate()).sum();
    let strategies = if a.strategy.is_empty() {
        Strategy::all().to_vec()
    } else {
        a.strategy.clone()
    };
    println!(
        "evacuating {} guests ({} GiB, dirtying {:.0} MB/s in all, {:.1} Gbit/s) from one host over a {:.0} Gbit/s uplink ({:.2} ms) to {} destination(s) of {:.0} Gbit/s; policy {}, concurrency {}, fleet {:?} seed {}, {} memory",
        a.guests,
        total_mem >> 30,
        total_dirty / 1e6,
        total_dirty * 8.0 / 1e9,
        a.uplink / 1e9,
        ms(a.latency),
        a.destinations,
        a.downlink / 1e9,
        a.policy,
        a.concurrency,
        a.fleet,
        a.seed,
        match a.memory {
            MemoryArg::Model => "model (pages moved as version tokens, not bytes)",
            MemoryArg::Bytes => "byte-accurate",
        }
    );
    println!();
    println!("| strategy | time to empty s | mean time to leave s | downtime p50 ms | p99 ms | max ms | bytes sent GiB | not converged | failed | unverified | wall s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut reports = Vec::new();
    let mut ok = true;
    for s in strategies {
        let wall = Instant::now();
        let r = evacuate({
            let mut c = EvacConfig::new(
                guests.clone(),
                Link::new(a.uplink, a.latency),
                vec![a.downlink; a.destinations],
                s,
                a.concurrency,
                factory(&a),
            );
            c.mode = match a.memory {
                MemoryArg::Model => MemoryMode::Model,
                MemoryArg::Bytes => MemoryMode::Bytes,
            };
            c.time_limit = Duration::from_secs(7 * 24 * 3600);
            c
        });
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sim-evacuate: {s}: {e}");
                return ExitCode::from(1);
            }
        };
        ok &= r.failed() == 0 && r.unverified() == 0;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.1} |",
            s,
            r.time_to_empty.as_secs_f64(),
            r.mean_completion().as_secs_f64(),
            ms(r.downtime_quantile(0.5)),
            ms(r.downtime_quantile(0.99)),
            ms(r.downtime_quantile(1.0)),
            r.bytes_sent() as f64 / (1u64 << 30) as f64,
            r.not_converged(),
            r.failed(),
            r.unverified(),
            wall.elapsed().as_secs_f64()
        );
        reports.push(r);
    }
    if a.json {
        let v: Vec<_> = reports.iter().map(report_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|e| e.to_string())
        );
    }
    if let Some(path) = &a.svg {
        let title = format!(
            "Guests left on the host ({} guests, {:?} fleet, {:.0} Gbit/s uplink)",
            a.guests,
            a.fleet,
            a.uplink / 1e9
        );
        if let Err(e) = plot_remaining(path, &title, &reports) {
            eprintln!("sim-evacuate: plot: {e}");
            return ExitCode::from(1);
        }
        println!("\nwrote {}", path.display());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("sim-evacuate: a migration failed or did not verify");
        ExitCode::from(1)
    }
}

fn report_json(r: &EvacReport) -> serde_json::Value {
    json!({
        "strategy": r.strategy.to_string(),
        "time-to-empty-s": r.time_to_empty.as_secs_f64(),
        "bytes-sent": r.bytes_sent(),
        "not-converged": r.not_converged(),
        "guests": r.guests.iter().map(|g| json!({
            "guest": g.guest,
            "memory-bytes": g.memory,
            "dirty-rate-bytes-per-sec": g.dirty_rate,
            "destination": g.destination,
            "started-s": g.started.as_secs_f64(),
            "finished-s": g.finished.as_secs_f64(),
            "downtime-ms": g.result.as_ref().map(|s| ms(s.downtime)).ok(),
            "switch-reason": g.result.as_ref().map(|s| s.switch_reason.describe()).ok(),
            "transferred": g.result.as_ref().map(|s| s.transferred).ok(),
            "error": g.result.as_ref().err(),
            "verified": g.verified,
        })).collect::<Vec<_>>(),
    })
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Guests left on the host against time: a step line per strategy.
fn plot_remaining(
    path: &std::path::Path,
    title: &str,
    reports: &[EvacReport],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = reports.first().map_or(0, |r| r.guests.len()) as f64;
    let x1 = reports
        .iter()
        .map(|r| r.time_to_empty.as_secs_f64())
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x1, 0.0..n * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("virtual time, s")
        .y_desc("guests still on the host")
        .draw()?;
    for (i, r) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut done: Vec<f64> = r.guests.iter().map(|g| g.finished.as_secs_f64()).collect();
        done.sort_by(f64::total_cmp);
        let mut pts = vec![(0.0, n)];
        for (k, t) in done.iter().enumerate() {
            pts.push((*t, n - k as f64));
            pts.push((*t, n - k as f64 - 1.0));
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(r.strategy.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

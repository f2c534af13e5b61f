//! `cargo bench --bench compare`: every policy over a matrix of simulated
//! workloads, guest sizes and links, in virtual time, each cell over
//! several seeds, so every figure is exact and repeatable and a difference
//! between two policies can be told from seed noise.
//!
//! Prints a table per size, workload and link with the mean over the
//! seeds and a 95 % confidence interval (Student's t), writes every run
//! and the summary as CSV and JSON and draws three SVG plots (downtime
//! against dirty rate, pages sent per round, a post-copy fault timeline)
//! into `target/compare/`; then evacuates a host of a light and a heavy
//! fleet under every scheduling strategy (a table and a plot of guests
//! left on the host, each); then sets the simulator beside published
//! figures (Clark et al. NSDI 2005, a Xen `xc_domain_save` log, Hines &
//! Gopalan VEE 2009).
//!
//! What runs is chosen without editing this file, by arguments after
//! `--` or a file of the same settings, one `name = value` a line:
//!
//! ```text
//! cargo bench --bench compare -- --policies precopy,hca --workloads zipf,hotcold \
//!     --sizes 1GiB,4GiB --seeds 1,2,3,4,5,6,7,8
//! cargo bench --bench compare -- --config benches/compare.conf
//! ```

use clap::Parser;
use livemig::core::{
    MemoryLayout, MigrationStats, PageSize, Policy, PolicyConfig, PolicyKind, Prepaging,
};
use livemig::sim::{
    evacuate, fleet, simulate, EvacConfig, EvacReport, FaultRecord, FleetShape, Link, MemoryMode,
    PolicyFactory, SimConfig, Strategy, WorkloadKind, WorkloadSpec,
};
use livemig::units::{parse_bandwidth, parse_duration, parse_size};
use plotters::prelude::*;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod evacuation;
mod plots;
mod published;

use evacuation::*;
use plots::*;
use published::*;

const MIB: u64 = 1 << 20;
/// The seed of the reproductions and of the sweeps and plots.
const SEED: u64 = 7;

/// What to compare.
#[derive(Parser, Debug)]
#[command(about = "Compare migration policies on the simulator, over several seeds")]
struct Args {
    /// Policies by name, as `--policy` takes them (precopy, stop-and-copy,
    /// postcopy[:PREPAGING], hybrid[:PREPAGING], hca); default every one
    /// compared (`PolicyKind::COMPARED`).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<PolicyKind>,
    /// Workloads (idle, uniform-low, uniform-high, hotcold, zipf,
    /// sequential, phased); default all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Guest sizes.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "1GiB")]
    sizes: Vec<u64>,
    /// Links, as BANDWIDTH@LATENCY.
    #[arg(long, value_delimiter = ',', value_parser = parse_link, default_value = "1Gbit@1ms,10Gbit@0.2ms")]
    links: Vec<(String, Link)>,
    /// Seeds of each cell (at least 2 for an interval).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    seeds: Vec<u64>,
    /// How guest memory is simulated: model (pages move as version
    /// tokens; the same statistics as bytes, faster), compact or bytes.
    #[arg(long, default_value = "model")]
    memory: String,
    /// Skip the dirty-rate sweep and the plots.
    #[arg(long)]
    no_plots: bool,
    /// Guests per fleet in the evacuation section (0: skip it).
    #[arg(long, default_value_t = 50)]
    evac_guests: usize,
    /// Skip the reproductions of published figures.
    #[arg(long)]
    no_reproductions: bool,
    /// Read settings from this file: one `name = value` a line (names as
    /// the flags without `--`), `#` comments; flags given too win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_link(s: &str) -> Result<(String, Link), String> {
    let (b, l) = s
        .split_once('@')
        .ok_or_else(|| format!("link {s:?}: expected BANDWIDTH@LATENCY, e.g. 10Gbit@0.2ms"))?;
    let bw = parse_bandwidth(b).map_err(|e| e.to_string())?;
    let lat = parse_duration(l).map_err(|e| e.to_string())?;
    Ok((format!("{b}/s {l}"), Link::new(bw, lat)))
}

/// The command line, with a config file's settings before it.
fn args() -> Args {
    let cli: Vec<String> = std::env::args().collect();
    let mut path = None;
    for (i, a) in cli.iter().enumerate() {
        if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_owned());
        } else if a == "--config" {
            path = cli.get(i + 1).cloned();
        }
    }
    let mut all = vec![cli[0].clone()];
    if let Some(p) = path {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
            eprintln!("compare: cannot read {p}: {e}");
            std::process::exit(2)
        });
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            match line.split_once('=') {
                Some((k, v)) => {
                    all.push(format!("--{}", k.trim()));
                    all.push(v.trim().to_owned());
                }
                None => all.push(format!("--{line}")),
            }
        }
    }
    all.extend(cli.into_iter().skip(1));
    Args::parse_from(all)
}

/// Mean and half-width of a 95 % confidence interval (Student's t).
fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // t(0.975, n - 1) for 1..=30 degrees of freedom, then the normal's.
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

/// `mean ± half-width`, with `digits` decimals.
fn ci(xs: &[f64], digits: usize) -> String {
    let (m, h) = mean_ci(xs);
    if h.is_nan() {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ± {h:.digits$}")
    }
}

/// The policies compared, labelled by their names.
fn policies() -> impl Iterator<Item = (String, PolicyKind)> {
    PolicyKind::COMPARED.into_iter().map(|k| (k.to_string(), k))
}

/// A policy of `kind` with the default settings.
fn build(kind: PolicyKind) -> Box<dyn Policy> {
    kind.build(&PolicyConfig::default())
}

fn spec(kind: WorkloadKind, wss: u64, rate: f64, seed: u64) -> WorkloadSpec {
    let mut w = WorkloadSpec::new(kind, wss / 4096, rate / 4096.0, seed);
    w.reads_per_write = 1.0;
    w.zero_fraction = 0.05;
    w
}

fn workloads(mem: u64, seed: u64) -> Vec<(&'static str, WorkloadSpec)> {
    let hot = WorkloadKind::HotCold {
        hot_fraction: 0.1,
        hot_prob: 0.9,
    };
    let mut hotcold = spec(hot, mem / 2, 150e6, seed);
    hotcold.wss_offset = mem / 4 / 4096;
    vec![
        ("idle", WorkloadSpec::idle(seed)),
        (
            "uniform-low",
            spec(WorkloadKind::Uniform, mem / 2, 20e6, seed),
        ),
        (
            "uniform-high",
            spec(WorkloadKind::Uniform, mem / 2, 200e6, seed),
        ),
        ("hotcold", hotcold),
        (
            "zipf",
            spec(WorkloadKind::Zipf { exponent: 1.0 }, mem / 2, 150e6, seed),
        ),
        (
            "sequential",
            spec(WorkloadKind::Sequential, mem / 2, 100e6, seed),
        ),
        (
            "phased",
            spec(
                WorkloadKind::Phased {
                    phase: Duration::from_secs(2),
                },
                mem / 4,
                100e6,
                seed,
            ),
        ),
    ]
}

struct Run {
    size: u64,
    seed: u64,
    workload: String,
    link: String,
    policy: String,
    stats: MigrationStats,
    faults: Vec<FaultRecord>,
    resumed_at: Duration,
}

fn run(
    mem: u64,
    workload: &WorkloadSpec,
    link: Link,
    policy: Box<dyn Policy>,
) -> (MigrationStats, Vec<FaultRecord>, Duration) {
    run_in(MemoryMode::Model, mem, workload, link, policy)
}

fn run_in(
    mode: MemoryMode,
    mem: u64,
    workload: &WorkloadSpec,
    link: Link,
    policy: Box<dyn Policy>,
) -> (MigrationStats, Vec<FaultRecord>, Duration) {
    let r = simulate({
        let mut c = SimConfig::new(
            MemoryLayout::flat(PageSize::DEFAULT, mem).expect("layout"),
            workload.clone(),
            link,
            policy,
        );
        c.mode = mode;
        c.time_limit = Duration::from_secs(24 * 3600);
        c
    })
    .expect("simulated migration");
    assert!(
        r.stats.memory_verified && r.memory_equal,
        "memory did not verify"
    );
    let resumed = r.destination.resumed_at().unwrap_or_default();
    (r.stats, r.destination.fault_log(), resumed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p99(stats: &MigrationStats) -> f64 {
    stats
        .postcopy
        .as_ref()
        .map_or(0.0, |p| ms(p.fault_latency_p99))
}

fn faults(stats: &MigrationStats) -> u64 {
    stats.postcopy.as_ref().map_or(0, |p| p.requests)
}

/// One row per policy: the mean over the seeds ± a 95 % interval.
fn table(runs: &[&Run], policies: &[&str]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| policy | seeds | total time s | downtime ms | pages sent | ratio | rounds | network faults | fault p99 ms | converged |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for p in policies {
        let these: Vec<&MigrationStats> = runs
            .iter()
            .filter(|r| r.policy == *p)
            .map(|r| &r.stats)
            .collect();
        if these.is_empty() {
            continue;
        }
        let col =
            |f: &dyn Fn(&MigrationStats) -> f64| these.iter().map(|x| f(x)).collect::<Vec<f64>>();
        let precopy_like = these.iter().all(|st| {
            !matches!(
                st.switch_reason,
                livemig::core::SwitchReason::StopAndCopy | livemig::core::SwitchReason::PostCopy
            )
        });
        let converged = if precopy_like {
            format!(
                "{}/{}",
                these
                    .iter()
                    .filter(|st| st.switch_reason.converged())
                    .count(),
                these.len()
            )
        } else {
            "—".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {}x | {} | {} | {} | {} |",
            p,
            these.len(),
            ci(&col(&|st| st.total_time.as_secs_f64()), 2),
            ci(&col(&|st| ms(st.downtime)), 1),
            ci(&col(&|st| st.total_pages_sent as f64), 0),
            ci(&col(&|st| st.transfer_ratio()), 2),
            ci(&col(&|st| st.rounds.len() as f64), 1),
            ci(&col(&|st| faults(st) as f64), 0),
            ci(&col(&p99), 2),
            converged
        );
    }
    s
}

fn main() {
    let args = args();
    let started = Instant::now();
    let out = out_dir();
    let mode = match args.memory.as_str() {
        "model" => MemoryMode::Model,
        "compact" => MemoryMode::Compact,
        "bytes" => MemoryMode::Bytes,
        other => {
            eprintln!("compare: unknown --memory {other:?} (model, compact or bytes)");
            std::process::exit(2)
        }
    };
    let chosen_policies: Vec<(String, PolicyKind)> = if args.policies.is_empty() {
        policies().collect()
    } else {
        args.policies.iter().map(|k| (k.to_string(), *k)).collect()
    };
    let known_workloads: Vec<&str> = workloads(MIB, 0).iter().map(|w| w.0).collect();
    for w in &args.workloads {
        if !known_workloads.contains(&w.as_str()) {
            eprintln!(
                "compare: unknown workload {w:?} (known: {})",
                known_workloads.join(", ")
            );
            std::process::exit(2)
        }
    }
    let names: Vec<&str> = chosen_policies.iter().map(|p| p.0.as_str()).collect();
    let links: Vec<(String, Link)> = args.links.clone();
    println!(
        "livemig algorithm comparison: simulated guests of {}, seeds {:?}, {} memory, virtual time (exact, repeatable); each cell is the mean over the seeds ± a 95 % confidence interval (Student's t)\n",
        args.sizes
            .iter()
            .map(|b| human(*b))
            .collect::<Vec<_>>()
            .join(", "),
        args.seeds,
        args.memory
    );

    // 1. The matrix, every cell over every seed.
    let mut runs = Vec::new();
    for &mem in &args.sizes {
        for wname in workloads(mem, 0).iter().map(|w| w.0) {
            if !args.workloads.is_empty() && !args.workloads.iter().any(|w| w == wname) {
                continue;
            }
            for (lname, link) in &links {
                for (pname, kind) in &chosen_policies {
                    for &seed in &args.seeds {
                        let w = workloads(mem, seed)
                            .into_iter()
                            .find(|w| w.0 == wname)
                            .map(|w| w.1)
                            .expect("workload");
                        let (stats, faults, resumed_at) =
                            run_in(mode, mem, &w, *link, build(*kind));
                        runs.push(Run {
                            size: mem,
                            seed,
                            workload: wname.into(),
                            link: lname.clone(),
                            policy: pname.clone(),
                            stats,
                            faults,
                            resumed_at,
                        });
                    }
                }
                let these: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.size == mem && r.workload == wname && &r.link == lname)
                    .collect();
                println!(
                    "### {}, {wname}, {lname}\n\n{}",
                    human(mem),
                    table(&these, &names)
                );
            }
        }
    }
    let mut csv = String::from("size_bytes,seed,workload,link,policy,total_time_s,downtime_ms,pages_sent,transfer_ratio,rounds,network_faults,fault_p99_ms,vcpu_stall_ms,converged,switch_reason\n");
    let mut js = Vec::new();
    for r in &runs {
        let st = &r.stats;
        let stall = st.postcopy.as_ref().map_or(0.0, |p| ms(p.vcpu_stall));
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{:.6},{:.6},{},{:.6},{},{},{:.6},{:.6},{},{}",
            r.size,
            r.seed,
            r.workload,
            r.link,
            r.policy,
            st.total_time.as_secs_f64(),
            ms(st.downtime),
            st.total_pages_sent,
            st.transfer_ratio(),
            st.rounds.len(),
            faults(st),
            p99(st),
            stall,
            st.switch_reason.converged(),
            st.switch_reason.describe()
        );
        js.push(json!({"size-bytes": r.size, "seed": r.seed, "workload": r.workload, "link": r.link, "policy": r.policy, "stats": serde_json::to_value(st).expect("statistics as JSON")}));
    }
    std::fs::write(out.join("compare.csv"), csv).expect("write csv");
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&js).expect("json"),
    )
    .expect("write json");

    if !args.no_plots {
        plots(&out, &runs, &links);
    }
    if args.evac_guests > 0 {
        evacuations(&out, args.evac_guests);
    }
    if !args.no_reproductions {
        reproductions();
    }
    println!(
        "\nwrote {}/{{compare.csv,compare.json{}{}}} in {:.0} s",
        out.display(),
        if args.no_plots {
            ""
        } else {
            ",downtime-vs-dirty-rate.csv,downtime-vs-dirty-rate.svg,pages-per-round.svg,postcopy-fault-timeline.svg"
        },
        if args.evac_guests > 0 {
            ",evacuate-light.svg,evacuate-heavy.svg,evacuate.csv"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
}

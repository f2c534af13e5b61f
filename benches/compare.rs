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
    EngineConfig, MemoryLayout, MigrationStats, PageSize, Policy, PolicyConfig, PolicyKind,
    Prepaging,
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
    let r = simulate(SimConfig {
        layout: MemoryLayout::flat(PageSize::DEFAULT, mem).expect("layout"),
        mode,
        workload: workload.clone(),
        link,
        policy,
        engine: EngineConfig::default(),
        time_limit: Duration::from_secs(24 * 3600),
        resume_pages: Vec::new(),
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

fn out_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let d = target.join("compare");
    std::fs::create_dir_all(&d).expect("create output directory");
    d
}

const COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

type Series = (String, Vec<(f64, f64)>);

fn line_plot(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series], log_y: bool) {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).expect("plot");
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let ys = || series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let y1 = ys().fold(0.0f64, f64::max) * 1.3;
    let mut builder = ChartBuilder::on(&root);
    let chart = builder
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70);
    let colors = COLORS;
    macro_rules! draw {
        ($c:expr) => {{
            let mut c = $c;
            c.configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()
                .expect("plot");
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .expect("plot")
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                if pts.len() <= 60 {
                    c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                        .expect("plot");
                }
            }
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .expect("plot");
        }};
    }
    if log_y {
        let y0 = ys().filter(|y| *y > 0.0).fold(f64::MAX, f64::min) / 2.0;
        draw!(chart
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .expect("plot"));
    } else {
        draw!(chart.build_cartesian_2d(x0..x1, 0.0..y1).expect("plot"));
    }
    root.present().expect("plot");
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

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// The dirty-rate sweep and the plots, on the first seed of `SEED`.
fn plots(out: &Path, runs: &[Run], links: &[(String, Link)]) {
    let mem = 1 << 30;
    let link0 = links
        .first()
        .map_or(Link::new(1e9, Duration::from_millis(1)), |l| l.1);
    let link0_name = links.first().map_or("", |l| l.0.as_str());
    // 2. Downtime against dirty rate, uniform writes over half of memory.
    let rates = [10.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0];
    let swept = ["precopy", "stop-and-copy", "postcopy", "hybrid", "hca"];
    let mut downtime_series: Vec<Series> = Vec::new();
    let mut sweep_csv = String::from("policy,dirty_rate_mb_s,downtime_ms,pages_sent\n");
    for (pname, kind) in policies().filter(|(n, _)| swept.contains(&n.as_str())) {
        let mut pts = Vec::new();
        for rate in rates {
            let w = spec(WorkloadKind::Uniform, mem / 2, rate * 1e6, SEED);
            let (st, _, _) = run(mem, &w, link0, build(kind));
            pts.push((rate, ms(st.downtime)));
            let _ = writeln!(
                sweep_csv,
                "{pname},{rate},{:.6},{}",
                ms(st.downtime),
                st.total_pages_sent
            );
        }
        downtime_series.push((pname, pts));
    }
    std::fs::write(out.join("downtime-vs-dirty-rate.csv"), sweep_csv).expect("write csv");
    line_plot(
        &out.join("downtime-vs-dirty-rate.svg"),
        "Downtime against dirty rate (1 GiB guest, uniform over 512 MiB, 1 Gbit/s)",
        "dirty rate, MB/s",
        "downtime, ms (log)",
        &downtime_series,
        true,
    );

    // 3. Pages sent per round, hot/cold at 150 MB/s, on the first link and
    // seed of the matrix.
    let first_seed = runs.first().map_or(0, |r| r.seed);
    let per_round: Vec<Series> = runs
        .iter()
        .filter(|r| {
            r.workload == "hotcold"
                && r.size == mem
                && r.seed == first_seed
                && r.link == link0_name
                && ["precopy", "hybrid", "hca"].contains(&r.policy.as_str())
        })
        .map(|r| {
            let pts = r
                .stats
                .rounds
                .iter()
                .map(|x| (x.round as f64, x.sent as f64))
                .collect();
            (r.policy.clone(), pts)
        })
        .collect();
    line_plot(
        &out.join("pages-per-round.svg"),
        "Pages sent per round (hot/cold, 150 MB/s, 1 Gbit/s)",
        "round (the last is the final copy or post-copy push)",
        "pages sent (log)",
        &per_round,
        true,
    );

    // 4. Post-copy fault timeline: cumulative faults after resume.
    let timeline: Vec<Series> = runs
        .iter()
        .filter(|r| {
            r.workload == "hotcold"
                && r.size == mem
                && r.seed == first_seed
                && r.link == link0_name
                && r.policy.starts_with("postcopy")
        })
        .map(|r| {
            let pts = r
                .faults
                .iter()
                .enumerate()
                .map(|(i, f)| (ms(f.at.saturating_sub(r.resumed_at)), (i + 1) as f64))
                .collect();
            (r.policy.clone(), pts)
        })
        .collect();
    line_plot(
        &out.join("postcopy-fault-timeline.svg"),
        "Post-copy network faults after resume (hot/cold, 150 MB/s, 1 Gbit/s)",
        "time since resume, ms",
        "faults so far",
        &timeline,
        false,
    );
}

/// Evacuating a host: a light and a heavy fleet of `n` guests, every
/// strategy, pre-copy; a table and a plot of guests left on the host each.
fn evacuations(out: &Path, n: usize) {
    let uplink = Link::new(40e9, Duration::from_micros(500));
    let downlinks = vec![10e9; 4];
    println!(
        "\n## Evacuating a host: {n} guests, 40 Gbit/s uplink (0.5 ms), 4 destinations of 10 Gbit/s, concurrency limit 8, pre-copy, fleet seed 1\n"
    );
    let mut csv = String::from("fleet,strategy,time_to_empty_s,mean_time_to_leave_s,downtime_p50_ms,downtime_p99_ms,downtime_max_ms,bytes_sent,not_converged,failed,unverified\n");
    for (fname, shape) in [
        ("light", FleetShape::light()),
        ("heavy", FleetShape::heavy()),
    ] {
        let guests = fleet(n, &shape, 1);
        let mem: u64 = guests.iter().map(|g| g.memory).sum();
        let dirty: f64 = guests.iter().map(|g| g.dirty_rate()).sum();
        println!(
            "### {fname} fleet: {} GiB in all, dirtying {:.1} Gbit/s in all\n",
            mem >> 30,
            dirty * 8.0 / 1e9
        );
        println!("| strategy | time to empty s | mean time to leave s | downtime p50 ms | p99 ms | max ms | GiB sent | not converged | failed | unverified |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut reports: Vec<EvacReport> = Vec::new();
        for strategy in Strategy::all() {
            let policy: PolicyFactory =
                Arc::new(|| -> Box<dyn Policy> { build(PolicyKind::Precopy) });
            let r = evacuate(EvacConfig {
                guests: guests.clone(),
                uplink,
                destinations: downlinks.clone(),
                concurrency: 8,
                strategy,
                policy,
                engine: EngineConfig::default(),
                mode: MemoryMode::Model,
                time_limit: Duration::from_secs(7 * 24 * 3600),
            })
            .expect("evacuation");
            assert_eq!(r.unverified(), 0, "a migration did not verify");
            let row = (
                r.time_to_empty.as_secs_f64(),
                r.mean_completion().as_secs_f64(),
                ms(r.downtime_quantile(0.5)),
                ms(r.downtime_quantile(0.99)),
                ms(r.downtime_quantile(1.0)),
            );
            println!(
                "| {strategy} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                row.0,
                row.1,
                row.2,
                row.3,
                row.4,
                r.bytes_sent() as f64 / (1u64 << 30) as f64,
                r.not_converged(),
                r.failed(),
                r.unverified()
            );
            let _ = writeln!(
                csv,
                "{fname},{strategy},{:.6},{:.6},{:.6},{:.6},{:.6},{},{},{},{}",
                row.0,
                row.1,
                row.2,
                row.3,
                row.4,
                r.bytes_sent(),
                r.not_converged(),
                r.failed(),
                r.unverified()
            );
            reports.push(r);
        }
        let series: Vec<Series> = reports
            .iter()
            .map(|r| {
                let mut done: Vec<f64> =
                    r.guests.iter().map(|g| g.finished.as_secs_f64()).collect();
                done.sort_by(f64::total_cmp);
                let total = done.len() as f64;
                let mut pts = vec![(0.0, total)];
                for (k, t) in done.iter().enumerate() {
                    pts.push((*t, total - k as f64));
                    pts.push((*t, total - k as f64 - 1.0));
                }
                (r.strategy.to_string(), pts)
            })
            .collect();
        line_plot(
            &out.join(format!("evacuate-{fname}.svg")),
            &format!("Guests left on the host ({n} guests, {fname} fleet, 40 Gbit/s uplink, 4 x 10 Gbit/s)"),
            "virtual time, s",
            "guests still on the host",
            &series,
            false,
        );
        println!();
    }
    std::fs::write(out.join("evacuate.csv"), csv).expect("write csv");
}

/// The simulator beside published figures.
fn reproductions() {
    println!("\n## Reproductions: published figures beside the simulator\n");
    let gbit = Link::new(1e9, Duration::from_micros(100));

    // Clark et al., NSDI 2005: Quake 3 server, 64 MB VM, 60 ms downtime.
    println!("Clark et al. NSDI 2005, Quake 3 server (64 MiB guest, small very hot working set, 1 Gbit/s): published downtime 60 ms");
    for wss_mib in [2u64, 4, 8] {
        let w = WorkloadSpec::new(
            WorkloadKind::Uniform,
            wss_mib * MIB / 4096,
            50e6 / 4096.0,
            SEED,
        );
        let (st, _, _) = run(64 * MIB, &w, gbit, build(PolicyKind::Precopy));
        println!(
            "  hot working set {wss_mib} MiB written at 50 MB/s: downtime {:.1} ms, {} rounds, {}",
            ms(st.downtime),
            st.rounds.len(),
            st.total_line()
        );
    }

    // Clark et al.: MMuncher, 512 MB VM, 256 MB hot region, no convergence, 3.5 s.
    let w = WorkloadSpec::new(
        WorkloadKind::Uniform,
        256 * MIB / 4096,
        500e6 / 4096.0,
        SEED,
    );
    let (st, _, _) = run(512 * MIB, &w, gbit, build(PolicyKind::Precopy));
    println!(
        "Clark et al. NSDI 2005, MMuncher (512 MiB guest, 256 MiB written at 500 MB/s, 1 Gbit/s): published 3.5 s downtime, no convergence\n  simulator: downtime {:.0} ms, {} ({}), final copy {} pages",
        ms(st.downtime),
        st.switch_reason.describe(),
        st.total_line(),
        st.rounds.last().map_or(0, |r| r.sent)
    );

    // A Xen log: 128 MiB guest, round 1 "sent 28847, skipped 3921, delta 1702ms ... sent 555Mb/s".
    let mut w = WorkloadSpec::new(WorkloadKind::Uniform, 8192, 6400.0, SEED);
    w.reads_per_write = 0.0;
    let xen_link = Link::new(557e6, Duration::from_micros(100));
    let (st, _, _) = run(128 * MIB, &w, xen_link, build(PolicyKind::Precopy));
    println!("Xen xc_domain_save log, 128 MiB guest: published round 1 `sent 28847, skipped 3921, delta 1702ms, sent 555Mb/s, dirtied 116Mb/s 6036 pages`");
    println!(
        "  simulator (557 Mbit/s link, 6400 writes/s over 32 MiB): `{}`",
        st.rounds[0]
    );

    // Hines & Gopalan, VEE 2009: network faults with and without pre-paging.
    println!("Hines & Gopalan VEE 2009: network faults are 2-4 % of pages with pre-paging, 9-15 % with push only");
    for (name, p) in [
        ("push only (sequential)", Prepaging::Sequential),
        ("bubbling", Prepaging::Bubble { both_ways: true }),
        ("multi-pivot bubbling", Prepaging::MultiPivot { k: 7 }),
    ] {
        let mut w = WorkloadSpec::new(
            WorkloadKind::HotCold {
                hot_fraction: 0.2,
                hot_prob: 0.8,
            },
            512 * MIB / 4096,
            100e6 / 4096.0,
            SEED,
        );
        w.reads_per_write = 8.0;
        w.wss_offset = 256 * MIB / 4096;
        let (st, _, _) = run(
            1 << 30,
            &w,
            Link::new(1e9, Duration::from_micros(100)),
            build(PolicyKind::PostCopy(p)),
        );
        let f = faults(&st);
        println!(
            "  {name}: {f} network faults = {:.2} % of {} pages",
            f as f64 * 100.0 / st.guest_pages as f64,
            st.guest_pages
        );
    }
}

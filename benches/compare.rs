//! `cargo bench --bench compare`: every policy over a matrix of simulated
//! workloads and links, in virtual time with fixed seeds, so every figure
//! is exact and repeatable.
//!
//! Prints a table per workload and link, writes the results as CSV and
//! JSON and draws three SVG plots (downtime against dirty rate, pages sent
//! per round, a post-copy fault timeline) into `target/compare/`, then
//! sets the simulator beside published figures (Clark et al. NSDI 2005,
//! a Xen `xc_domain_save` log, Hines & Gopalan VEE 2009).

use livemig::core::{
    EngineConfig, MemoryLayout, MigrationStats, PageSize, Policy, PolicyConfig, PolicyKind,
    Precopy, Prepaging,
};
use livemig::sim::{
    simulate, FaultRecord, Link, MemoryMode, SimConfig, WorkloadKind, WorkloadSpec,
};
use plotters::prelude::*;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SEED: u64 = 7;

/// The policies compared, labelled by their names.
fn policies() -> impl Iterator<Item = (String, PolicyKind)> {
    PolicyKind::COMPARED.into_iter().map(|k| (k.to_string(), k))
}

fn spec(kind: WorkloadKind, wss: u64, rate: f64) -> WorkloadSpec {
    let mut w = WorkloadSpec::new(kind, wss / 4096, rate / 4096.0, SEED);
    w.reads_per_write = 1.0;
    w.zero_fraction = 0.05;
    w
}

fn workloads(mem: u64) -> Vec<(&'static str, WorkloadSpec)> {
    let hot = WorkloadKind::HotCold {
        hot_fraction: 0.1,
        hot_prob: 0.9,
    };
    let mut hotcold = spec(hot, mem / 2, 150e6);
    hotcold.wss_offset = mem / 4 / 4096;
    vec![
        ("idle", WorkloadSpec::idle(SEED)),
        ("uniform-low", spec(WorkloadKind::Uniform, mem / 2, 20e6)),
        ("uniform-high", spec(WorkloadKind::Uniform, mem / 2, 200e6)),
        ("hotcold", hotcold),
        (
            "zipf",
            spec(WorkloadKind::Zipf { exponent: 1.0 }, mem / 2, 150e6),
        ),
        ("sequential", spec(WorkloadKind::Sequential, mem / 2, 100e6)),
        (
            "phased",
            spec(
                WorkloadKind::Phased {
                    phase: Duration::from_secs(2),
                },
                mem / 4,
                100e6,
            ),
        ),
    ]
}

struct Run {
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
    let r = simulate(SimConfig {
        layout: MemoryLayout::flat(PageSize::DEFAULT, mem).expect("layout"),
        mode: MemoryMode::Compact,
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

fn table(runs: &[&Run]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| policy | total time s | downtime ms | pages sent | ratio | rounds | network faults | fault p99 ms | converged |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in runs {
        let st = &r.stats;
        let converged = match st.switch_reason {
            livemig::core::SwitchReason::StopAndCopy | livemig::core::SwitchReason::PostCopy => "—",
            x if x.converged() => "yes",
            _ => "no",
        };
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.1} | {} | {:.2}x | {} | {} | {:.2} | {} |",
            r.policy,
            st.total_time.as_secs_f64(),
            ms(st.downtime),
            st.total_pages_sent,
            st.transfer_ratio(),
            st.rounds.len(),
            faults(st),
            p99(st),
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
    let started = Instant::now();
    let out = out_dir();
    let mem = 1 << 30;
    let links = [
        ("1Gbit/s 1ms", Link::new(1e9, Duration::from_millis(1))),
        (
            "10Gbit/s 0.2ms",
            Link::new(10e9, Duration::from_micros(200)),
        ),
    ];
    println!("livemig algorithm comparison: simulated 1 GiB guest, seed {SEED}, virtual time (exact, repeatable)\n");

    // 1. The matrix.
    let mut runs = Vec::new();
    for (wname, w) in workloads(mem) {
        for (lname, link) in links {
            for (pname, kind) in policies() {
                let policy = kind.build(&PolicyConfig::default());
                let (stats, faults, resumed_at) = run(mem, &w, link, policy);
                runs.push(Run {
                    workload: wname.into(),
                    link: lname.into(),
                    policy: pname.clone(),
                    stats,
                    faults,
                    resumed_at,
                });
            }
            let these: Vec<&Run> = runs
                .iter()
                .filter(|r| r.workload == wname && r.link == lname)
                .collect();
            println!("### {wname}, {lname}\n\n{}", table(&these));
        }
    }
    let mut csv = String::from("workload,link,policy,total_time_s,downtime_ms,pages_sent,transfer_ratio,rounds,network_faults,fault_p99_ms,vcpu_stall_ms,converged,switch_reason\n");
    let mut js = Vec::new();
    for r in &runs {
        let st = &r.stats;
        let stall = st.postcopy.as_ref().map_or(0.0, |p| ms(p.vcpu_stall));
        let _ = writeln!(
            csv,
            "{},{},{},{:.6},{:.6},{},{:.6},{},{},{:.6},{:.6},{},{}",
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
        js.push(json!({"workload": r.workload, "link": r.link, "policy": r.policy, "stats": serde_json::to_value(st).expect("statistics as JSON")}));
    }
    std::fs::write(out.join("compare.csv"), csv).expect("write csv");
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&js).expect("json"),
    )
    .expect("write json");

    // 2. Downtime against dirty rate, uniform writes over half of memory.
    let rates = [10.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0];
    let swept = ["precopy", "stop-and-copy", "postcopy", "hybrid", "hca"];
    let mut downtime_series: Vec<Series> = Vec::new();
    let mut sweep_csv = String::from("policy,dirty_rate_mb_s,downtime_ms,pages_sent\n");
    for (pname, kind) in policies().filter(|(n, _)| swept.contains(&n.as_str())) {
        let mut pts = Vec::new();
        for rate in rates {
            let w = spec(WorkloadKind::Uniform, mem / 2, rate * 1e6);
            let (st, _, _) = run(mem, &w, links[0].1, kind.build(&PolicyConfig::default()));
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

    // 3. Pages sent per round, hot/cold at 150 MB/s, 1 Gbit/s.
    let per_round: Vec<Series> = runs
        .iter()
        .filter(|r| {
            r.workload == "hotcold"
                && r.link == links[0].0
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
            r.workload == "hotcold" && r.link == links[0].0 && r.policy.starts_with("postcopy")
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

    reproductions();
    println!(
        "\nwrote {}/{{compare.csv,compare.json,downtime-vs-dirty-rate.csv,downtime-vs-dirty-rate.svg,pages-per-round.svg,postcopy-fault-timeline.svg}} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
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
        let (st, _, _) = run(64 * MIB, &w, gbit, Box::new(Precopy::default()));
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
    let (st, _, _) = run(512 * MIB, &w, gbit, Box::new(Precopy::default()));
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
    let (st, _, _) = run(128 * MIB, &w, xen_link, Box::new(Precopy::default()));
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
            PolicyKind::PostCopy(p).build(&PolicyConfig::default()),
        );
        let f = faults(&st);
        println!(
            "  {name}: {f} network faults = {:.2} % of {} pages",
            f as f64 * 100.0 / st.guest_pages as f64,
            st.guest_pages
        );
    }
}

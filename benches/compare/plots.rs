//! The SVG plots and where they go.

use super::*;

pub(crate) fn out_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let d = target.join("compare");
    std::fs::create_dir_all(&d).expect("create output directory");
    d
}

pub(crate) const COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

pub(crate) type Series = (String, Vec<(f64, f64)>);

pub(crate) fn line_plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
) {
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

pub(crate) fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// The dirty-rate sweep and the plots, on the first seed of `SEED`.
pub(crate) fn plots(out: &Path, runs: &[Run], links: &[(String, Link)]) {
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

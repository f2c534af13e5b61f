//! Host evacuation: a light and a heavy fleet under every strategy.

use super::*;

/// Evacuating a host: a light and a heavy fleet of `n` guests, every
/// strategy, pre-copy; a table and a plot of guests left on the host each.
pub(crate) fn evacuations(out: &Path, n: usize) {
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
            let r = evacuate({
                let mut c = EvacConfig::new(
                    guests.clone(),
                    uplink,
                    downlinks.clone(),
                    strategy,
                    8,
                    policy,
                );
                c.mode = MemoryMode::Model;
                c.time_limit = Duration::from_secs(7 * 24 * 3600);
                c
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

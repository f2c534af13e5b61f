//! The simulator beside published figures.

use super::*;

/// The simulator beside published figures.
pub(crate) fn reproductions() {
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

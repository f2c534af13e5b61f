//! What one collection of the dirty log costs on a large, mostly idle KVM
//! guest: the bitmap (`KVM_GET_DIRTY_LOG`) against the dirty ring.
//!
//! ```text
//! cargo run --release --example kvm-dirty-log -- --sizes 1GiB,8GiB,32GiB
//! ```
//!
//! For each guest size and each log, the test guest dirties a small
//! working set (1 MiB by default) at a low rate while the tracker collects
//! every `--interval`; the table gives the time of a collection (median
//! and mean over `--collections`), the pages each found, and the ratio of
//! the bitmap's median to the ring's at each size. The guest's memory is
//! reserved, not touched: only the working set and the payload are ever
//! written, as in a large guest that idles.
//!
//! The `(clear a page bitmap)` row is the floor under any tracker: the
//! engine's bitmap has a bit per page of the guest, and each collection
//! replaces its contents. The `+ VMM bitmap` rows add what every collection also reads by
//! default: vm-memory's bitmap of the VMM's own writes to guest memory,
//! a bit per page whichever KVM log is in use.

use clap::Parser;
use livemig::core::{DirtyBitmap, DirtyTracker, PageSource};
use livemig::kvm::{DirtyLog, Pacing, TestVm};
use livemig::units::{parse_duration, parse_size};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Time one dirty-log collection on large idle guests, bitmap against ring.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Exit codes: 0 measured; 1 a guest or a collection failed; 2 invalid arguments."
)]
struct Args {
    /// Guest sizes, comma separated (2 MiB multiples, up to 64 GiB).
    #[arg(long, default_value = "1GiB,8GiB,32GiB", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<u64>,
    /// The working set the guest dirties.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    wss: u64,
    /// Pages the guest dirties a second.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Collections to time per guest and log.
    #[arg(long, default_value_t = 40)]
    collections: usize,
    /// Time between collections (e.g. 10ms).
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    interval: Duration,
    /// Entries of each vCPU's dirty ring.
    #[arg(long, default_value_t = 4096)]
    ring_entries: u32,
}

struct Row {
    median: Duration,
    mean: Duration,
    pages: f64,
}

fn measure(a: &Args, mem: u64, log: DirtyLog, vmm_writes: bool) -> Result<Row, String> {
    let vm = TestVm::source_logged(mem, 1, a.wss / 4096, 64, Pacing::Vmm(a.rate), log)
        .map_err(|e| e.to_string())?;
    vm.memory().track_vmm_writes(vmm_writes);
    let mut t = vm.tracker();
    t.start().map_err(|e| e.to_string())?;
    let mut dirty = DirtyBitmap::new(vm.pages().layout().page_end());
    let mut times = Vec::new();
    let mut pages = 0u64;
    for _ in 0..a.collections {
        std::thread::sleep(a.interval);
        let t0 = Instant::now();
        t.collect_and_clear(&mut dirty).map_err(|e| e.to_string())?;
        times.push(t0.elapsed());
        pages += dirty.count_ones();
    }
    t.stop().map_err(|e| e.to_string())?;
    if let Some(f) = vm.fault() {
        return Err(format!("the guest stopped: {f}"));
    }
    times.sort();
    let n = times.len().max(1);
    Ok(Row {
        median: times[times.len() / 2],
        mean: times.iter().sum::<Duration>() / n as u32,
        pages: pages as f64 / n as f64,
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.collections == 0 || a.wss < 4096 || a.wss > 256 << 20 {
        eprintln!(
            "kvm-dirty-log: invalid arguments: --collections above 0, --wss from 4 KiB to 256 MiB"
        );
        return ExitCode::from(2);
    }
    println!(
        "one dirty-log collection every {:.1} ms while the guest dirties {} KiB at {} pages/s; {} collections each",
        a.interval.as_secs_f64() * 1e3,
        a.wss >> 10,
        a.rate,
        a.collections
    );
    println!(
        "{:>8}  {:<22} {:>12} {:>12} {:>10}  {:>13}",
        "guest", "log", "median us", "mean us", "pages", "bitmap/ring"
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for &mem in &a.sizes {
        // The floor under any tracker: the engine's bitmap has a bit per
        // page, and a collection replaces its contents.
        let mut floor = DirtyBitmap::new(mem >> 12);
        let mut clears: Vec<Duration> = (0..a.collections)
            .map(|_| {
                let t0 = Instant::now();
                floor.clear_all();
                std::hint::black_box(&floor);
                t0.elapsed()
            })
            .collect();
        clears.sort();
        println!(
            "{:>6}Mi  {:<22} {:>12.1}",
            mem >> 20,
            "(clear a page bitmap)",
            us(clears[clears.len() / 2])
        );
        for vmm in [false, true] {
            let mut medians = Vec::new();
            for (name, log) in [
                ("bitmap", DirtyLog::Bitmap),
                ("ring", DirtyLog::Ring(a.ring_entries)),
            ] {
                let label = if vmm {
                    format!("{name} + VMM bitmap")
                } else {
                    name.to_string()
                };
                match measure(&a, mem, log, vmm) {
                    Ok(r) => {
                        medians.push(r.median);
                        let ratio = if medians.len() == 2 {
                            format!("{:.1}x", us(medians[0]) / us(medians[1]).max(1e-3))
                        } else {
                            String::new()
                        };
                        println!(
                            "{:>6}Mi  {:<22} {:>12.1} {:>12.1} {:>10.1}  {:>13}",
                            mem >> 20,
                            label,
                            us(r.median),
                            us(r.mean),
                            r.pages,
                            ratio
                        );
                    }
                    Err(e) => {
                        eprintln!("kvm-dirty-log: {} MiB, {label}: {e}", mem >> 20);
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    ExitCode::SUCCESS
}

//! How long it takes to pause a KVM guest that never leaves the guest on
//! its own.
//!
//! ```text
//! cargo run --release --example kvm-pause-latency -- --pauses 100
//! ```
//!
//! The guest runs the test VMM's compute-only payload (`inc rcx; jmp`
//! back): no port I/O, no MMIO, no exit of its own. Each pause kicks the
//! vCPU thread out of `KVM_RUN` (`immediate_exit` and a signal) and waits
//! until it is out; the program pauses and resumes the guest `--pauses`
//! times, checks that the guest made progress in between, and prints the
//! median, 99th percentile and longest pause.
//!
//! Exit codes: 0 measured; 1 the guest could not be paused or did not
//! run; 2 bad arguments.

use clap::Parser;
use livemig::core::GuestControl;
use livemig::kvm::TestVm;
use livemig::units::parse_duration;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Pause a compute-only KVM guest again and again; print the latency.
#[derive(Parser, Debug)]
#[command(
    after_help = "Exit codes: 0 measured; 1 the guest could not be paused or did not run; 2 invalid arguments."
)]
struct Args {
    /// How many pauses to measure.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pauses: u32,
    /// How long the guest runs between two pauses (e.g. 2ms).
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    run: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvm-pause-latency: {e}");
            ExitCode::from(1)
        }
    }
}

fn counter(vm: &TestVm) -> u64 {
    vm.runners()[0].with_vcpu(|fd| fd.get_regs().map(|r| r.rcx).unwrap_or(0))
}

fn run(args: &Args) -> Result<(), String> {
    let vm = TestVm::compute(64 << 20).map_err(|e| format!("starting the guest: {e}"))?;
    let mut control = vm.control();
    let mut took = Vec::with_capacity(args.pauses as usize);
    let mut last = 0;
    for i in 0..args.pauses {
        std::thread::sleep(args.run);
        let t = Instant::now();
        control
            .pause()
            .map_err(|e| format!("pause {}: {e}", i + 1))?;
        took.push(t.elapsed());
        let now = counter(&vm);
        if now <= last && i > 0 {
            // Not a failure of the pause: the host gave the vCPU no time.
            eprintln!("pause {}: the guest made no progress since the last", i + 1);
        }
        last = now;
        control.resume().map_err(|e| format!("resume: {e}"))?;
    }
    control.pause().map_err(|e| format!("pause: {e}"))?;
    if counter(&vm) == 0 {
        return Err("the guest never ran".into());
    }
    if !vm.reports().is_empty() {
        return Err("the compute guest left the guest on its own".into());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "pauses: {}  p50: {:.1} us  p99: {:.1} us  max: {:.1} us  (guest counter {})",
        took.len(),
        us(at(0.5)),
        us(at(0.99)),
        us(took[took.len() - 1]),
        last
    );
    Ok(())
}

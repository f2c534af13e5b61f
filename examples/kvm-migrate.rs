//! Live-migrate a running KVM guest from one process to another over
//! loopback TCP.
//!
//! ```text
//! cargo run --release --example kvm-migrate -- --mem 1GiB --wss 256MiB --dirty-rate 200MB/s --policy precopy
//! ```
//!
//! This process is the source: it starts the test VMM's guest (a payload
//! that dirties pages of its working set at the given rate and reports its
//! progress counter through port I/O), starts a second copy of itself as
//! the destination, and migrates the guest to it. It prints the rounds,
//! the totals, the downtime the guest saw (the gap between its last
//! progress report on the source and its first on the destination, on the
//! host's clock), the counter before and after, and whether memory
//! verified; `--json` prints all of it as one object.
//!
//! `--max-bandwidth` caps the pre-copy stage, `--auto-converge` throttles
//! the guest's vCPUs while pre-copy does not converge; progress goes to
//! stderr (a bar on a terminal), Ctrl-C cancels with the source guest
//! running, `RUST_LOG=info` prints the migration's tracing spans (see
//! `--help` for the exit statuses).
//!
//! With `--recover-timeout 30s` a post-copy or hybrid migration whose
//! connection breaks after the switch-over goes on over a new one: the
//! destination dials the source again, says which pages it holds, and
//! the rest follows. `--test-cut-after-batches N` (for tests) cuts the
//! connection at the N-th page batch of the push to show it:
//!
//! ```text
//! cargo run --release --example kvm-migrate -- --policy postcopy --recover-timeout 30s --test-cut-after-batches 2000
//! ```
//!
//! With `--postcopy-preempt` the pages a fault on the destination asks
//! for travel on a connection of their own, ahead of the push;
//! `RUST_LOG=livemig::fault=trace` logs each one on its way (see
//! `docs/postcopy.md`).

#[path = "common/steer.rs"]
mod steer;

use clap::{Parser, ValueEnum};
use livemig::core::driver::{
    run_destination, run_destination_recoverable, run_source, run_source_recoverable,
};
use livemig::core::multistream::MAX_DATA_CONNECTIONS;
use livemig::core::protocol::RecordType;
use livemig::core::tls::{self, TlsConfig, TlsSession};
use livemig::core::transport::{accept_within, TransportError};
use livemig::core::{
    Clock, DestinationEngine, DestinationVerify, EngineConfig, GuestControl, MultiTransport,
    PageSource, PolicyConfig, PolicyKind, Prepaging, SourceEngine, SourceVerify, StreamTransport,
    SystemClock, Transport,
};
use livemig::kvm::{DirtyLog, KvmFaults, Pacing, TestVm};
use livemig::sim::{Fault, FaultAt, FaultPlan, FaultyTransport};
use livemig::units::{parse_duration, parse_rate, parse_size};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use steer::Failure;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum TrackerArg {
    /// `KVM_GET_DIRTY_LOG`: a bitmap of the whole guest per collection.
    Bitmap,
    /// KVM's dirty ring: the pages each vCPU dirtied, in order.
    Ring,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum PacingArg {
    /// The VMM holds the vCPU at each progress report (it sleeps).
    Vmm,
    /// The guest waits on its TSC between reports, as it does under QEMU
    /// (`scripts/qemu-migrate.py`); the vCPU spins while it waits.
    Guest,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Role {
    /// Start the guest and migrate it (the default).
    Source,
    /// Receive a guest (started by the source process).
    Destination,
}

/// Live-migrate a running KVM guest between two processes.
#[derive(Parser, Debug)]
#[command(version, about, after_help = steer::EXIT_CODES)]
struct Args {
    /// Guest memory (2 MiB multiple, up to 1 GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    mem: u64,
    /// vCPUs, each dirtying its own slice of the working set.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Working set the guest dirties.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    wss: u64,
    /// Rate at which the guest dirties pages (0: as fast as it can).
    #[arg(long, default_value = "100MB/s", value_parser = parse_rate)]
    dirty_rate: f64,
    /// Who holds the guest to --dirty-rate.
    #[arg(long, value_enum, default_value = "vmm")]
    pacing: PacingArg,
    /// Migration policy: precopy, stop-and-copy, hca, postcopy or hybrid
    /// (post-copy moves the guest at once and runs it on the destination
    /// while its pages follow, through userfaultfd).
    #[arg(long, default_value = "precopy")]
    policy: PolicyKind,
    /// Post-copy push order (post-copy and hybrid): sequential, bubbling
    /// or multi-pivot.
    #[arg(long, default_value = "multi-pivot")]
    prepaging: Prepaging,
    /// Pre-copy and hybrid: the downtime the final copy may take; pre-copy
    /// goes on while what is left would take longer (hybrid switches to
    /// post-copy after its rounds run out).
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_target: Duration,
    /// Bandwidth cap and auto-converge.
    #[command(flatten)]
    steer: steer::SteerArgs,
    /// The source's dirty log.
    #[arg(long, value_enum, default_value = "bitmap")]
    tracker: TrackerArg,
    /// How long the guest runs before the migration starts, and after it
    /// on the destination.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    settle: Duration,
    /// What the completion digest covers, on both sides: `full` reads all
    /// of memory again after the pause on the source (catches a dirty log
    /// that missed a write) and back from guest memory on the destination
    /// before it resumes (proves it stored every byte); `sent` digests
    /// pages as they were sent and as they were received (milliseconds
    /// instead).
    #[arg(long, default_value = "full")]
    verify: SourceVerify,
    /// The destination's check alone, overriding what --verify chose for
    /// it: `read-back` digests guest memory read back before the resume,
    /// `received` the hashes of the pages as they were placed.
    #[arg(long)]
    dest_verify: Option<DestinationVerify>,
    /// Back guest memory with transparent huge pages on both sides
    /// (`madvise(MADV_HUGEPAGE)`, as QEMU does for guest RAM).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    huge_pages: String,
    /// Destination: populate the pages the source holds ahead of their
    /// data, on a thread of its own (`MADV_POPULATE_WRITE`), rather than
    /// where each is first written.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    prefault: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Mutual TLS: this process's certificate (PEM; both processes use
    /// it). With `--tls-key` and `--tls-ca`; without them, plain TCP.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: the certificate's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA the peer's certificate must chain to (PEM).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: the name the destination verifies the source's
    /// certificate against (default: the address it dials, 127.0.0.1).
    #[arg(long)]
    tls_name: Option<String>,
    /// Post-copy recovery (post-copy and hybrid; both processes): when
    /// the connection breaks after the switch-over, wait this long for a
    /// new one (`30s`) instead of failing; the destination dials again.
    #[arg(long, value_parser = parse_duration)]
    recover_timeout: Option<Duration>,
    /// For tests: cut the connection instead of sending the N-th page
    /// batch of the post-copy push (with --recover-timeout, the migration
    /// recovers; without, it fails with the outcome to settle).
    #[arg(long)]
    test_cut_after_batches: Option<usize>,
    /// Post-copy and hybrid: pages a fault on the destination asks for
    /// travel on a connection of their own (a preempt connection, besides
    /// a control and a data connection), ahead of the push data already
    /// queued; without it they go first in the push. Plain TCP only.
    #[arg(long)]
    postcopy_preempt: bool,
    /// Page batches spread over this many data connections, besides a
    /// control connection (from 1 to 64; with 1 and no preempt
    /// connection, one plain stream carries everything). Plain TCP only.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Internal: which side this process is.
    #[arg(long, value_enum, default_value = "source", hide = true)]
    role: Role,
    /// Internal: the source's address, for the destination.
    #[arg(long, hide = true)]
    connect: Option<String>,
}

/// Iterations between progress reports.
const REPORT_EVERY: u64 = 256;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Entries of each vCPU's dirty ring (`--tracker ring`): 64 Ki, 1 MiB.
const RING_ENTRIES: u32 = 1 << 16;

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The rate the VMM holds the guest to, if it does.
fn rate(a: &Args) -> Option<f64> {
    (a.dirty_rate > 0.0 && a.pacing == PacingArg::Vmm).then_some(a.dirty_rate / 4096.0)
}

fn pacing(a: &Args) -> Pacing {
    match (a.dirty_rate > 0.0, a.pacing) {
        (false, _) => Pacing::Unlimited,
        (true, PacingArg::Vmm) => Pacing::Vmm(a.dirty_rate / 4096.0),
        (true, PacingArg::Guest) => Pacing::GuestTsc(a.dirty_rate / 4096.0),
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    TestVm::use_huge_pages(a.huge_pages == "on");
    steer::init_tracing();
    let ctrlc = match steer::CtrlC::install() {
        Ok(c) => c,
        Err(e) => return ExitCode::from(Failure::Other(e).report("kvm-migrate")),
    };
    let r = match a.role {
        Role::Source => source(&a, &ctrlc),
        Role::Destination => destination(&a, &ctrlc),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(f) => ExitCode::from(f.report("kvm-migrate")),
    }
}

/// The TLS configuration the arguments name, if any.
fn tls_config(a: &Args) -> Result<Option<TlsConfig>, String> {
    TlsConfig::from_optional_paths(
        a.tls_cert.as_deref(),
        a.tls_key.as_deref(),
        a.tls_ca.as_deref(),
    )
    .map_err(|e| format!("invalid: {e}"))
}

/// The destination's check: --dest-verify, or what --verify implies.
fn dest_verify(a: &Args) -> DestinationVerify {
    a.dest_verify.unwrap_or_else(|| a.verify.into())
}

fn destination(a: &Args, ctrlc: &steer::CtrlC) -> Result<bool, Failure> {
    let addr = a
        .connect
        .as_deref()
        .ok_or("invalid: the destination needs --connect")?;
    let vm = TestVm::destination_smp(a.mem, a.vcpus, REPORT_EVERY, rate(a))
        .map_err(|e| e.to_string())?;
    if a.policy.may_postcopy() {
        vm.memory().enable_postcopy().map_err(|e| e.to_string())?;
    }
    vm.memory().set_prefault(a.prefault == "on");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let tls = tls_config(a)?;
    // This side dials: over TLS it begins the session, and a new
    // connection after a break joins it.
    let mut session = match &tls {
        Some(cfg) => Some(TlsSession::initiator(cfg).map_err(|e| e.to_string())?),
        None => None,
    };
    let name = a
        .tls_name
        .as_deref()
        .unwrap_or(tls::host_of(addr))
        .to_owned();
    let preempt = a.postcopy_preempt;
    let data = a.connections;
    let mut dial = || -> Result<Box<dyn Transport>, String> {
        if preempt || data > 1 {
            // A control connection, `data` data connections and, with
            // preempt, the preempt connection.
            let open = || {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(s)
            };
            let t = if preempt {
                MultiTransport::connect_preempt(data, open)
            } else {
                MultiTransport::connect(data, open)
            }
            .map_err(|e| format!("connect {addr}: {e}"))?;
            return Ok(Box::new(t));
        }
        let sock = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(match (&tls, session.as_mut()) {
            (Some(cfg), Some(s)) => {
                Box::new(tls::connect(cfg, sock, &name, s).map_err(|e| format!("TLS: {e}"))?)
            }
            _ => Box::new(StreamTransport::new(sock).map_err(|e| e.to_string())?),
        })
    };
    let mut t = dial()?;
    let mut e = DestinationEngine::new(vm.pages(), vm.control(), clock.clone());
    e.set_verify(dest_verify(a));
    ctrlc.watch(&e.handle());
    let mut faults =
        KvmFaults::start(&vm.memory(), &vm.control(), clock).map_err(|e| e.to_string())?;
    let report = match a.recover_timeout {
        Some(limit) => {
            e.set_recover_timeout(Some(limit));
            let mut again =
                |_left: Duration| dial().map_err(|e| TransportError::Io(std::io::Error::other(e)));
            run_destination_recoverable(&mut e, &mut t, Some(&mut faults), &mut again, TIMEOUT)
        }
        None => run_destination(&mut e, &mut t, Some(&mut faults), TIMEOUT),
    }
    .map_err(Failure::Migration)?;
    std::thread::sleep(a.settle);
    let reports = vm.reports();
    let first = reports.first();
    let p = vm.memory().prefault_report();
    let prefault = json!({
        "requested-pages": p.requested_pages, "populated-pages": p.populated_pages,
        "busy-ms": p.busy.as_secs_f64() * 1e3,
        "unavailable": p.unavailable.map(|u| u.to_string()),
    });
    let out = json!({
        "digest": report.digest.map(|d| d.to_string()),
        "first-report-us": first.map(|r| micros(r.wall)),
        "first-counter": first.map(|r| r.value),
        "reports": reports.len(),
        "last-counter": reports.last().map(|r| r.value),
        "fault": vm.fault(),
        "recoveries": report.recoveries,
        "prefault": prefault,
        "postcopy": report.postcopy.map(|p| json!({
            "faults": p.faults, "duplicates": p.duplicates,
            "latency-p50-us": p.latency_p50_ns as f64 / 1e3,
            "latency-p99-us": p.latency_p99_ns as f64 / 1e3,
            "latency-max-us": p.latency_max_ns as f64 / 1e3,
        })),
        "preempt-pages": report.preempt_pages,
    });
    println!("{out}");
    Ok(vm.fault().is_none() && first.is_some())
}

fn source(a: &Args, ctrlc: &steer::CtrlC) -> Result<bool, Failure> {
    if a.wss > a.mem.saturating_sub(1 << 20) || a.wss < 4096 {
        return Err(format!(
            "invalid --wss: from 4 KiB to --mem less 1 MiB ({} bytes)",
            a.mem - (1 << 20)
        )
        .into());
    }
    if a.postcopy_preempt && (a.tls_cert.is_some() || a.tls_key.is_some()) {
        return Err("invalid: --postcopy-preempt runs over plain TCP, not with --tls-*".into());
    }
    if !(1..=MAX_DATA_CONNECTIONS).contains(&a.connections) {
        return Err(format!("invalid --connections: from 1 to {MAX_DATA_CONNECTIONS}").into());
    }
    if a.connections > 1 && (a.tls_cert.is_some() || a.tls_key.is_some()) {
        return Err("invalid: --connections above 1 runs over plain TCP, not with --tls-*".into());
    }
    let mut engine = EngineConfig::default();
    engine.verify = a.verify;
    engine.postcopy_preempt = a.postcopy_preempt;
    engine.recover_timeout = a.recover_timeout;
    a.steer.apply(&mut engine)?;
    let tls = tls_config(a)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe);
    if tls.is_some() {
        for (flag, v) in [
            ("--tls-cert", &a.tls_cert),
            ("--tls-key", &a.tls_key),
            ("--tls-ca", &a.tls_ca),
        ] {
            child
                .arg(flag)
                .arg(v.as_deref().unwrap_or_else(|| "".as_ref()));
        }
        if let Some(n) = &a.tls_name {
            child.args(["--tls-name", n]);
        }
    }
    if let Some(limit) = a.recover_timeout {
        child.args(["--recover-timeout", &format!("{}ms", limit.as_millis())]);
    }
    if a.postcopy_preempt {
        child.arg("--postcopy-preempt");
    }
    child.args(["--connections", &a.connections.to_string()]);
    child.args(["--dest-verify", &dest_verify(a).to_string()]);
    let mut child = child
        .args(["--role", "destination", "--connect", &addr.to_string()])
        .args(["--mem", &a.mem.to_string(), "--wss", &a.wss.to_string()])
        .args(["--vcpus", &a.vcpus.to_string()])
        .args(["--huge-pages", &a.huge_pages])
        .args(["--prefault", &a.prefault])
        .args(["--policy", a.policy.name()])
        .args(["--pacing", a.pacing.to_possible_value().unwrap().get_name()])
        .args([
            "--dirty-rate",
            &format!("{}", a.dirty_rate as u64),
            "--settle",
            &format!("{}us", a.settle.as_micros()),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the destination process: {e}"))?;
    let log = match a.tracker {
        TrackerArg::Bitmap => DirtyLog::Bitmap,
        TrackerArg::Ring => DirtyLog::Ring(RING_ENTRIES),
    };
    let vm = TestVm::source_logged(a.mem, a.vcpus, a.wss / 4096, REPORT_EVERY, pacing(a), log)
        .map_err(|e| e.to_string())?;
    std::thread::sleep(a.settle);
    // Every connection of the migration joins one TLS session: the
    // first fixes its id and the destination's certificate.
    let mut session = TlsSession::acceptor();
    let mut take = |stream: TcpStream| -> Result<Box<dyn Transport>, String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(match &tls {
            Some(cfg) => {
                Box::new(tls::accept(cfg, stream, &mut session).map_err(|e| format!("TLS: {e}"))?)
            }
            None => Box::new(StreamTransport::new(stream).map_err(|e| e.to_string())?),
        })
    };
    let preempt = a.postcopy_preempt;
    let multi = preempt || a.connections > 1;
    let take_set =
        |first: Option<TcpStream>, left: Duration| -> Result<Box<dyn Transport>, String> {
            let mut first = first;
            let t = MultiTransport::accept(|| {
                let s = match first.take() {
                    Some(s) => s,
                    None => accept_within(&listener, left).map_err(std::io::Error::other)?,
                };
                s.set_nodelay(true)?;
                Ok(s)
            })
            .map_err(|e| e.to_string())?;
            if preempt && !t.has_preempt() {
                return Err("the destination opened no preempt connection".into());
            }
            Ok(Box::new(t))
        };
    let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let first = if multi {
        take_set(Some(stream), TIMEOUT)?
    } else {
        take(stream)?
    };
    let plan = a.test_cut_after_batches.map(|nth| {
        let at = FaultAt::NthOfTypeAfter {
            after: RecordType::DeviceState as u8,
            ty: RecordType::PageBatch as u8,
            nth,
        };
        FaultPlan::new(Fault::Cut, at)
    });
    let mut t = FaultyTransport::new(first, plan);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let target = a.downtime_target;
    let mut config = PolicyConfig::default();
    config.precopy.downtime_target = target;
    config.hybrid_precopy.downtime_target = target;
    let policy = a.policy.with_prepaging(a.prepaging).build(&config);
    let mut e = SourceEngine::new(
        vm.tracker(),
        vm.pages(),
        vm.control(),
        policy,
        clock,
        engine,
    );
    ctrlc.watch(&e.handle());
    steer::show_progress(&e.handle(), true);
    let run = if a.recover_timeout.is_some() {
        let mut again = |left: Duration| {
            let t = if multi {
                take_set(None, left)
            } else {
                let s = accept_within(&listener, left)?;
                take(s)
            }
            .map_err(|e| TransportError::Io(std::io::Error::other(e)))?;
            Ok(FaultyTransport::new(t, None))
        };
        run_source_recoverable(&mut e, &mut t, &mut again, TIMEOUT)
    } else {
        run_source(&mut e, &mut t, TIMEOUT)
    };
    let stats = match run {
        Ok(stats) => stats,
        Err(err) => {
            // The destination was told (an abort) and ends too.
            drop(t);
            let _ = child.wait();
            return Err(Failure::Migration(err));
        }
    };
    drop(t);
    let out = child.stdout.take().ok_or("no destination output")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let dest: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("destination said {line:?}: {e}"))?;

    let mut control = vm.control();
    control.pause().map_err(|e| e.to_string())?;
    let layout = vm.pages().layout().clone();
    let src_digest = livemig::core::digest::digest_memory(&mut vm.pages(), &layout)
        .map_err(|e| e.to_string())?;
    let reports = vm.reports();
    let last = reports.last().ok_or("the source guest never reported")?;
    let first_us = dest["first-report-us"].as_u64().unwrap_or(0);
    let gap_us = first_us.saturating_sub(micros(last.wall));
    let interval_us = reports
        .windows(2)
        .rev()
        .take(64)
        .map(|w| w[1].at.duration_since(w[0].at).as_micros() as u64)
        .max()
        .unwrap_or(0);
    let verified = stats.memory_verified
        && dest["digest"].as_str() == Some(&src_digest.to_string())
        && status.success();
    let before = last.value;
    let after = dest["first-counter"].as_u64().unwrap_or(0);
    let continues = after > before && after - before <= REPORT_EVERY;
    if a.json {
        let mut v = serde_json::to_value(&stats).expect("statistics as JSON");
        v["kvm"] = json!({
            "mem-bytes": a.mem, "wss-bytes": a.wss, "huge-pages": a.huge_pages == "on", "dirty-rate-bytes-per-sec": a.dirty_rate, "pacing": format!("{:?}", a.pacing).to_lowercase(),
            "guest-observed-downtime-ms": gap_us as f64 / 1000.0,
            "report-interval-ms": interval_us as f64 / 1000.0,
            "counter-last-on-source": before, "counter-first-on-destination": after,
            "counter-continues": continues, "memory-verified": verified,
            "verify": a.verify.to_string(), "prefault": a.prefault == "on", "connections": a.connections,
            "dest-verify": dest_verify(a).to_string(),
            "tracker": format!("{:?}", a.tracker).to_lowercase(),
            "destination": dest,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "KVM guest: {} MiB, working set {} MiB, dirty rate {:.0} MB/s, policy {}, {:?} dirty log, huge pages {}, source pid {}, destination pid {}",
            a.mem >> 20,
            a.wss >> 20,
            a.dirty_rate / 1e6,
            a.policy,
            a.tracker,
            a.huge_pages,
            std::process::id(),
            child.id()
        );
        println!("{stats}");
        println!(
            "guest-observed downtime: {:.3} ms (last progress report on the source to the first on the destination; reports come every {:.3} ms)",
            gap_us as f64 / 1000.0,
            interval_us as f64 / 1000.0
        );
        let p = &dest["prefault"];
        println!(
            "destination prefault: {} of {} announced pages populated ahead, {:.1} ms on its thread{}",
            p["populated-pages"],
            p["requested-pages"],
            p["busy-ms"].as_f64().unwrap_or(0.0),
            p["unavailable"]
                .as_str()
                .map(|u| format!(" (not done: {u})"))
                .unwrap_or_default()
        );
        println!(
            "guest counter: {before} last reported on the source, {after} first reported on the destination ({})",
            if continues { "continues" } else { "DOES NOT CONTINUE" }
        );
        println!(
            "memory: {}",
            if verified {
                "verified (digests equal on both sides)"
            } else {
                "NOT VERIFIED"
            }
        );
    }
    Ok(verified && continues)
}

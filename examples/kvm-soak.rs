//! One KVM guest migrated back and forth between two processes, again
//! and again: a soak for leaks and drift.
//!
//! ```text
//! cargo run --release --example kvm-soak -- --hops 100
//! ```
//!
//! This process (A) starts the test VMM's guest and a second copy of
//! itself (B). On odd hops A sends the guest to B, on even hops B sends it
//! back, each over a new loopback TCP connection, each into a fresh VM
//! (the sender drops its VM once the guest runs on the other side). At
//! every hop the program checks that the migration verified its memory,
//! that the sender's digest of its memory at the pause equals the
//! receiver's, and that the guest's counter went on from where it stopped
//! (the receiver's first report is the sender's last plus one report
//! interval). It prints each process's resident memory and open file
//! descriptors at the first hop and the last.
//!
//! Exit codes: 0 every hop verified; 1 a hop failed (the line says
//! which and why); 2 bad arguments.

use clap::Parser;
use livemig::core::digest::digest_memory;
use livemig::core::driver::{run_destination, run_source};
use livemig::core::{
    Clock, DestinationEngine, EngineConfig, PageSource, Precopy, SourceEngine, StreamTransport,
    SystemClock,
};
use livemig::kvm::TestVm;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Migrate one KVM guest back and forth between two processes.
#[derive(Parser, Debug)]
#[command(after_help = "Exit codes: 0 every hop verified; 1 a hop failed; 2 bad arguments.")]
struct Args {
    /// Migrations in all (odd ones A to B, even ones B to A).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    hops: u32,
    /// Guest memory in MiB (a multiple of 2, at least 4).
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Internal: this is process B, connecting to A at this address.
    #[arg(long, hide = true)]
    peer_of: Option<String>,
}

/// Pages the guest writes (16 MiB from 1 MiB).
const WSS_PAGES: u64 = 4096;
/// Iterations between progress reports.
const EVERY: u64 = 1 << 12;
/// Pages a second the guest dirties (the VMM holds it to that).
const RATE: f64 = 50_000.0;
/// How long anything may take before the soak calls it a failure.
const PATIENCE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let args = Args::parse();
    if args.mem_mib < 4 || args.mem_mib % 2 != 0 {
        eprintln!("kvm-soak: --mem-mib must be an even number of MiB, at least 4");
        return ExitCode::from(2);
    }
    let r = match &args.peer_of {
        Some(addr) => peer(&args, addr),
        None => lead(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvm-soak: {e}");
            ExitCode::from(1)
        }
    }
}

/// What one side says after a hop, as one line: `SENT hop digest last`
/// or `RECEIVED hop digest first verified`.
fn line(words: &[String]) -> String {
    words.join(" ")
}

/// Resident memory (KiB) and open descriptors of this process.
fn usage() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (rss, fds)
}

/// Waits until `cond` holds, at most [`PATIENCE`].
fn wait(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("{what}: nothing after {PATIENCE:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// One side of the soak: holds the guest between the hops it receives
/// and the hops it sends.
struct Side {
    name: &'static str,
    mem: u64,
    vm: Option<TestVm>,
}

impl Side {
    /// Sends the guest over `stream`; returns the digest of its memory at
    /// the pause and its last report, and drops the VM.
    fn send(&mut self, stream: TcpStream) -> Result<(String, u64), String> {
        let vm = self.vm.take().ok_or("no guest to send")?;
        wait("the guest's next report", || !vm.reports().is_empty())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut t = StreamTransport::new(stream).map_err(|e| e.to_string())?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let mut e = SourceEngine::new(
            vm.tracker(),
            vm.pages(),
            vm.control(),
            Precopy::default(),
            clock,
            EngineConfig::default(),
        );
        let stats = run_source(&mut e, &mut t, PATIENCE).map_err(|e| e.to_string())?;
        if !stats.memory_verified {
            return Err("the migration did not verify".into());
        }
        let layout = vm.pages().layout().clone();
        let digest = digest_memory(&mut vm.pages(), &layout).map_err(|e| e.to_string())?;
        let last = vm.reports().last().map(|r| r.value).ok_or("no report")?;
        Ok((digest.to_string(), last))
    }

    /// Receives the guest over `stream` into a fresh VM; returns the
    /// destination's digest and the guest's first report there.
    fn receive(&mut self, stream: TcpStream) -> Result<(String, u64), String> {
        let vm = TestVm::destination(self.mem, EVERY, Some(RATE)).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut t = StreamTransport::new(stream).map_err(|e| e.to_string())?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let mut e = DestinationEngine::new(vm.pages(), vm.control(), clock);
        let report = run_destination(&mut e, &mut t, None, PATIENCE).map_err(|e| e.to_string())?;
        let digest = report.digest.ok_or("no digest")?.to_string();
        wait("the migrated guest's first report", || {
            !vm.reports().is_empty()
        })?;
        if let Some(f) = vm.fault() {
            return Err(format!("the migrated guest stopped: {f}"));
        }
        let first = vm.reports()[0].value;
        self.vm = Some(vm);
        Ok((digest, first))
    }
}

/// Whether A sends on `hop`.
fn a_sends(hop: u32) -> bool {
    hop % 2 == 1
}

/// Process B: connects to A once per hop and says what it did on stdout.
fn peer(args: &Args, addr: &str) -> Result<(), String> {
    let mut side = Side {
        name: "B",
        mem: args.mem_mib << 20,
        vm: None,
    };
    let out = std::io::stdout();
    for hop in 1..=args.hops {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let words = if a_sends(hop) {
            let (digest, first) = side.receive(stream)?;
            vec![
                "RECEIVED".into(),
                hop.to_string(),
                digest,
                first.to_string(),
            ]
        } else {
            let (digest, last) = side.send(stream)?;
            vec!["SENT".into(), hop.to_string(), digest, last.to_string()]
        };
        let (rss, fds) = usage();
        let mut o = out.lock();
        writeln!(o, "{} {rss} {fds}", line(&words)).map_err(|e| e.to_string())?;
        o.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Process A: starts the guest and B, runs the hops, checks each.
fn lead(args: &Args) -> Result<(), String> {
    let mem = args.mem_mib << 20;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["--hops", &args.hops.to_string()])
        .args(["--mem-mib", &args.mem_mib.to_string()])
        .args(["--peer-of", &addr.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting process B: {e}"))?;
    let mut from_b = BufReader::new(child.stdout.take().ok_or("no output from B")?);
    let vm = TestVm::source(mem, WSS_PAGES, EVERY, Some(RATE)).map_err(|e| e.to_string())?;
    let mut side = Side {
        name: "A",
        mem,
        vm: Some(vm),
    };
    let started = Instant::now();
    let mut usages = Vec::new();
    for hop in 1..=args.hops {
        let t0 = Instant::now();
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let mine = if a_sends(hop) {
            side.send(stream)
        } else {
            side.receive(stream)
        }
        .map_err(|e| format!("hop {hop}, process A: {e}"))?;
        let mut text = String::new();
        from_b
            .read_line(&mut text)
            .map_err(|e| format!("hop {hop}: reading B: {e}"))?;
        let w: Vec<&str> = text.split_whitespace().collect();
        if w.len() != 6 || w[1] != hop.to_string() {
            return Err(format!("hop {hop}: process B said {text:?}"));
        }
        let theirs: (String, u64) = (w[2].to_string(), w[3].parse().map_err(|_| "bad B line")?);
        let b_usage: (u64, usize) = (
            w[4].parse().map_err(|_| "bad B line")?,
            w[5].parse().map_err(|_| "bad B line")?,
        );
        // Sender's (digest, last report) against receiver's (digest, first).
        let ((sd, last), (rd, first)) = if a_sends(hop) {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        if sd != rd {
            return Err(format!("hop {hop}: memory digests differ: {sd} {rd}"));
        }
        if first != last + EVERY {
            return Err(format!(
                "hop {hop}: the counter did not continue: last {last}, then {first}"
            ));
        }
        let a_usage = usage();
        let (from, to) = if a_sends(hop) { ("A", "B") } else { ("B", "A") };
        println!(
            "hop {hop:3}: {from} -> {to} in {:6.1} ms, digest {sd}, counter {last} -> {first}",
            t0.elapsed().as_secs_f64() * 1e3
        );
        usages.push((a_usage, b_usage));
    }
    // The same parity compared: a process holds the guest on alternate hops.
    let n = args.hops as usize;
    let mut shown: Vec<usize> = [1, 2, n.saturating_sub(1), n]
        .into_iter()
        .filter(|h| *h >= 1 && *h <= n)
        .collect();
    shown.dedup();
    for h in shown {
        let ((ar, af), (br, bf)) = usages[h - 1];
        println!(
            "after hop {h:3}: process A RSS {ar} KiB, {af} fds ({}); process B RSS {br} KiB, {bf} fds ({})",
            if a_sends(h as u32) { "no guest" } else { "holds the guest" },
            if a_sends(h as u32) { "holds the guest" } else { "no guest" },
        );
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("process B ended with {status}"));
    }
    println!(
        "{} hops verified in {:.1} s (the guest is now on {})",
        args.hops,
        started.elapsed().as_secs_f64(),
        if side.vm.is_some() { side.name } else { "B" }
    );
    Ok(())
}

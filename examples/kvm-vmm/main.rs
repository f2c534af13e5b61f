//! A small VMM of its own, live-migrated with livemig's KVM backend.
//!
//! ```text
//! sh crates/backend-kvm/payload/build.sh /tmp/payload
//! cargo run --release --example kvm-vmm -- --image /tmp/payload/payload.elf \
//!     --cmdline "payload.elf wss=512 every=4096 ticks=0" --migrate
//! ```
//!
//! Unlike `kvm-migrate`, which runs the backend's test VMM, this program is
//! written the way a VMM built on kvm-ioctls and vm-memory is: it creates
//! the VM, registers its guest memory under slot ids of its own, runs each
//! vCPU in an exit loop on its own thread (port I/O, a serial port, MMIO,
//! HLT, shutdown) and implements [`Vcpus`] over those threads. It then
//! hands the backend what it has: the `VmFd`, the memory and its slot ids
//! ([`KvmMemory::adopt`]), and the vCPUs ([`KvmControl`]).
//!
//! The guest is either a multiboot image (`--image`, such as the
//! backend's `payload.elf`, which reports a progress counter on port 0x10)
//! or a raw x86 boot sector (`--boot-sector`, started in real mode at
//! 0000:7c00 with no BIOS). What the guest writes to port 0x3f8 goes to
//! standard output, a line at a time.
//!
//! Roles:
//!
//! - `--listen ADDR`: a destination. It builds an empty VM of the same
//!   size and vCPU count, receives the guest, resumes it and prints
//!   `kvm-vmm: resumed digest=... first=...` once the guest reports.
//! - `--to ADDR`: a source migrating to a destination started separately.
//! - `--migrate`: a source that starts the destination itself, as a child
//!   process on loopback, and checks both ends: it prints
//!   `MIGRATED verified=... digest=... destination-digest=... last=... first=... every=... continues=... throttle=...`
//!   (`throttle`: the highest vCPU throttle auto-converge set, percent).
//! - none of these: the guest just runs for `--run-for` (a duration).
//!
//! While a migration runs, Ctrl-C cancels it (the source guest runs on),
//! `--max-bandwidth` caps pre-copy and `--auto-converge` throttles the
//! vCPUs, which this VMM's [`Vcpus`] implementation does by holding each
//! vCPU out of the guest for a share of every 10 ms.
//!
//! Progress reports and the VMM's own messages go to standard error.

use clap::Parser;
use livemig::core::digest::digest_memory;
use livemig::core::driver::{run_destination, run_source};
use livemig::core::{
    Clock, DestinationEngine, EngineConfig, ErrorKind, GuestControl, MigrationError, PageSource,
    PolicyConfig, PolicyKind, SourceEngine, StreamTransport, SystemClock,
};
use livemig::kvm::kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
};
use livemig::kvm::kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig::kvm::vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
};
use livemig::kvm::{
    advise_huge_pages, enter_multiboot, load_multiboot, vcpu_cpuid, KvmControl, KvmDirtyTracker,
    KvmError, KvmFaults, KvmMemory, KvmPages, TrackedMemory, VcpuCaps, VcpuKick, Vcpus,
};
use livemig::units::{parse_duration, parse_size};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "../common/steer.rs"]
mod steer;

/// What `--help` says about the exit status.
const EXIT_CODES: &str = "\
Exit status:
  0    done: the guest ran (no migration), or it migrated, memory verified
       and (with --migrate) the destination's counter continued the source's
  1    the migration failed, or did not verify (the source guest runs on)
  2    bad arguments
  3    the guest stopped (shutdown, an exit this VMM does not handle) or did
       not report progress in time
  4    the VM could not be set up (no /dev/kvm, an image that does not load)
  5    cancelled (Ctrl-C) before the point of no return: the source guest
       runs on, dirty tracking off
  6    the outcome is unknown (failed after the point of no return): the
       source guest stays paused
  130  a second Ctrl-C, after the migration passed the point of no return

Ctrl-C cancels a migration; after the point of no return it is refused
and the migration goes on (a second Ctrl-C then exits with 130). Without
a migration, Ctrl-C ends the program as usual.";

/// A small KVM VMM with its own vCPU loop, live-migrated between two
/// processes by livemig.
#[derive(Parser, Debug)]
#[command(version, about, after_help = EXIT_CODES)]
struct Args {
    /// Guest memory (a multiple of 2 MiB, at least 4 MiB): two regions, the
    /// first 2 MiB and the rest, each its own KVM slot.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    mem: u64,
    /// vCPUs. The first starts at the guest's entry; the others wait for
    /// INIT/SIPI in the in-kernel LAPIC.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// A multiboot (version 1) ELF image to boot.
    #[arg(long, conflicts_with = "boot_sector")]
    image: Option<PathBuf>,
    /// The image's command line (default: its file name).
    #[arg(long, requires = "image")]
    cmdline: Option<String>,
    /// A raw x86 boot sector (up to 0x78400 bytes: 0x7c00 to 0x80000),
    /// run in real mode from 0000:7c00 without a BIOS.
    #[arg(long)]
    boot_sector: Option<PathBuf>,
    /// How much the guest's counter grows between two progress reports
    /// (default: `every=` from the multiboot command line, else 256 for an
    /// image and 1 for a boot sector).
    #[arg(long)]
    every: Option<u64>,
    /// Migrate to the destination listening at this address.
    #[arg(long, conflicts_with_all = ["listen", "migrate"])]
    to: Option<String>,
    /// Start a destination as a child process on loopback and migrate to it.
    #[arg(long, conflicts_with = "listen")]
    migrate: bool,
    /// Be a destination: receive a guest on this address.
    #[arg(long, conflicts_with_all = ["image", "boot_sector"])]
    listen: Option<String>,
    /// Migration policy: precopy, stop-and-copy, hca, postcopy or hybrid,
    /// with a pre-paging order for the last two (`postcopy:bubble`); the
    /// source's choice; a `--listen` destination needs `--postcopy` to
    /// take post-copy or hybrid.
    #[arg(long, default_value = "precopy")]
    policy: PolicyKind,
    /// Destination: put memory under userfaultfd, so it can take post-copy.
    #[arg(long, requires = "listen")]
    postcopy: bool,
    /// The KVM slot id of the first memory region (the second is the next).
    #[arg(long, default_value_t = 5)]
    first_slot: u32,
    /// Source: how long the guest runs after its first progress report
    /// before the migration starts (e.g. 500ms).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    settle: Duration,
    /// How long the guest runs (e.g. 1s; a bare number is seconds):
    /// without migration, in all (0: until it stops); on a destination,
    /// after its first report.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    run_for: Duration,
    /// How long to wait for the guest's progress reports (e.g. 120s).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    wait: Duration,
    #[command(flatten)]
    steer: steer::SteerArgs,
}

/// Why the program ends (the exit status in [`EXIT_CODES`]).
#[derive(Debug)]
enum Failure {
    /// The migration failed or did not verify.
    Migration(String),
    /// Bad arguments.
    Usage(String),
    /// The guest stopped or did not report.
    Guest(String),
    /// The VM could not be set up.
    Setup(String),
    /// The migration was cancelled; the source guest runs on.
    Cancelled(String),
    /// The migration failed past the point of no return.
    Settle(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Migration(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Guest(_) => 3,
            Failure::Setup(_) => 4,
            Failure::Cancelled(_) => 5,
            Failure::Settle(_) => 6,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Migration(m) => write!(f, "migration: {m}"),
            Failure::Usage(m) => write!(f, "{m}"),
            Failure::Guest(m) => write!(f, "guest: {m}"),
            Failure::Setup(m) => write!(f, "setting up the VM: {m}"),
            Failure::Cancelled(m) => write!(f, "migration cancelled: {m}"),
            Failure::Settle(m) => write!(f, "migration outcome unknown: {m}"),
        }
    }
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure::Setup(format!("{what}: {e}"))
}

fn migration<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure::Migration(format!("{what}: {e}"))
}

/// A failed migration, by what its error says of the guest.
fn engine_failed(what: &'static str) -> impl Fn(MigrationError) -> Failure {
    move |e| match e.kind() {
        ErrorKind::Cancelled => Failure::Cancelled(format!("{what}: {e}")),
        ErrorKind::Settle => Failure::Settle(format!("{what}: {e}")),
        _ => Failure::Migration(format!("{what}: {e}")),
    }
}

/// How long a migration waits on its peer.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// The first memory region: the low 2 MiB.
const LOW_REGION: u64 = 2 << 20;
/// Where a boot sector is loaded, and the end of what it may fill.
const BOOT_ADDR: u64 = 0x7c00;
const BOOT_END: u64 = 0x80000;
/// The guest's progress port and the serial port (COM1).
const REPORT_PORT: u16 = 0x10;
const COM1: u16 = 0x3f8;
/// COM1's line status register, and what it reads: transmitter holding
/// register and shift register empty.
const COM1_LSR: u16 = COM1 + 5;
const LSR_IDLE: u8 = 0x60;

/// Which side this process is, for its messages.
static ROLE: OnceLock<&'static str> = OnceLock::new();

fn role() -> &'static str {
    ROLE.get().copied().unwrap_or("vmm")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = ROLE.set(if args.listen.is_some() {
        "destination"
    } else if args.to.is_some() || args.migrate {
        "source"
    } else {
        "vmm"
    });
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kvm-vmm {}: {f}", role());
            ExitCode::from(f.code())
        }
    }
}

fn run(a: &Args) -> Result<(), Failure> {
    if !a.mem.is_multiple_of(LOW_REGION) || a.mem < 2 * LOW_REGION {
        return Err(Failure::Usage(format!(
            "--mem must be a multiple of 2 MiB and at least 4 MiB, not {}",
            a.mem
        )));
    }
    if !(1..=16).contains(&a.vcpus) {
        return Err(Failure::Usage("--vcpus must be 1 to 16".into()));
    }
    if a.listen.is_some() {
        return destination(a);
    }
    let guest = match (&a.image, &a.boot_sector) {
        (Some(image), _) => {
            let cmdline = a.cmdline.clone().unwrap_or_else(|| {
                image
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned())
            });
            Guest::Multiboot {
                image: read(image)?,
                cmdline,
            }
        }
        (None, Some(sector)) => Guest::BootSector(read(sector)?),
        (None, None) => {
            return Err(Failure::Usage(
                "give --image, --boot-sector or --listen (see --help)".into(),
            ))
        }
    };
    source(a, guest)
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Usage(format!("reading {}: {e}", path.display())))
}

/// What the source boots.
enum Guest {
    /// A multiboot image and its command line.
    Multiboot { image: Vec<u8>, cmdline: String },
    /// A boot sector.
    BootSector(Vec<u8>),
}

impl Guest {
    /// The counter's step between reports, as `--every` or the guest says.
    fn every(&self, a: &Args) -> u64 {
        a.every.unwrap_or(match self {
            // The payload's parameters are the numbers after each '=':
            // working set, report interval, TSC ticks.
            Guest::Multiboot { cmdline, .. } => cmdline
                .split('=')
                .nth(2)
                .and_then(|s| {
                    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                })
                .unwrap_or(256),
            Guest::BootSector(_) => 1,
        })
    }
}

mod vcpus;
mod vm;

use vcpus::*;
use vm::*;

// Source.

fn source(a: &Args, guest: Guest) -> Result<(), Failure> {
    let every = guest.every(a);
    let vm = Vm::new(a.mem, a.vcpus, a.first_slot, |memory, vcpu| match &guest {
        Guest::Multiboot { image, cmdline } => {
            let entry =
                load_multiboot(memory, image, cmdline).map_err(setup("loading the image"))?;
            enter_multiboot(vcpu, &entry).map_err(setup("entering the image"))
        }
        Guest::BootSector(code) => load_boot_sector(memory, vcpu, code),
    })?;
    vm.vcpus.resume().map_err(setup("starting the vCPUs"))?;
    let wait = a.wait;

    if a.to.is_none() && !a.migrate {
        return run_alone(a, &vm);
    }
    let mut config = EngineConfig::default();
    a.steer.apply(&mut config).map_err(|f| match f {
        steer::Failure::Other(m) => Failure::Usage(m),
        steer::Failure::Migration(e) => Failure::Usage(e.to_string()),
    })?;
    let ctrlc = steer::CtrlC::install().map_err(Failure::Setup)?;
    if !vm.vcpus.wait_for(wait, |c| c.progress.count > 0) {
        return Err(Failure::Guest(vm.vcpus.fault().unwrap_or_else(|| {
            format!("no progress report on port {REPORT_PORT:#x} within {wait:?}")
        })));
    }
    std::thread::sleep(a.settle);

    // The destination: given, or a child process of this program.
    let mut child = None;
    let addr = match &a.to {
        Some(addr) => addr.clone(),
        None => {
            let c = Destination::spawn(a)?;
            let addr = c.addr.clone();
            child = Some(c);
            addr
        }
    };
    let mut transport = StreamTransport::connect_tcp(addr.as_str())
        .map_err(|e| Failure::Migration(format!("connecting to {addr}: {e}")))?;
    let policy = a.policy.build(&PolicyConfig::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut engine = SourceEngine::new(
        KvmDirtyTracker(vm.memory.clone()),
        KvmPages(vm.memory.clone()),
        vm.control.clone(),
        policy,
        clock,
        config,
    );
    ctrlc.watch(&engine.handle());
    steer::show_progress(&engine.handle(), true);
    let stats = match run_source(&mut engine, &mut transport, PEER_TIMEOUT) {
        Ok(stats) => stats,
        Err(e) => {
            let f = engine_failed("the source engine")(e);
            if matches!(f, Failure::Cancelled(_) | Failure::Migration(_)) {
                // The engine resumed the guest here; say so once it shows.
                let before = vm.vcpus.progress().count;
                let runs = vm.vcpus.wait_for(wait.min(Duration::from_secs(10)), |c| {
                    c.progress.count > before
                });
                eprintln!(
                    "kvm-vmm {}: the guest {} here",
                    role(),
                    if runs {
                        "runs on"
                    } else {
                        "did not report again"
                    }
                );
            }
            return Err(f);
        }
    };
    drop(transport);
    eprintln!("{stats}");
    let throttle = stats
        .rounds
        .iter()
        .map(|r| r.throttle_pct)
        .max()
        .unwrap_or(0);

    // The guest stays paused here once it has moved: its memory now is
    // what the destination received.
    let mut control = vm.control.clone();
    control.pause().map_err(migration("pausing the source"))?;
    let mut pages = KvmPages(vm.memory.clone());
    let layout = pages.layout().clone();
    let digest = digest_memory(&mut pages, &layout).map_err(migration("digest"))?;
    let last = vm.vcpus.progress().last;
    let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());

    let Some(child) = child else {
        say(&format!(
            "MIGRATED verified={} digest={digest} last={} throttle={throttle}",
            stats.memory_verified,
            show(last)
        ));
        return if stats.memory_verified {
            Ok(())
        } else {
            Err(Failure::Migration("memory did not verify".into()))
        };
    };
    let mut child = child;
    let dest = child.finish(wait)?;
    let first = dest.first;
    let continues = matches!((last, first), (Some(l), Some(f)) if f == l + every);
    let digests_equal = dest.digest.as_deref() == Some(digest.to_string().as_str());
    say(&format!(
        "MIGRATED verified={} digest={digest} destination-digest={} last={} first={} every={every} continues={} throttle={throttle}",
        stats.memory_verified && digests_equal,
        dest.digest.as_deref().unwrap_or("-"),
        show(last),
        show(first),
        if continues { "yes" } else { "no" },
    ));
    if !(stats.memory_verified && digests_equal) {
        return Err(Failure::Migration("memory did not verify".into()));
    }
    if !continues {
        return Err(Failure::Migration(format!(
            "the destination's counter does not continue the source's (last {}, first {}, every {every})",
            show(last),
            show(first)
        )));
    }
    Ok(())
}

/// Runs the guest without migrating it, for `--run-for` (0: until
/// it stops).
fn run_alone(a: &Args, vm: &Vm) -> Result<(), Failure> {
    let forever = a.run_for.is_zero();
    let span = a.run_for;
    let deadline = Instant::now() + span;
    let all_stopped = |c: &Ctl| {
        c.at.iter()
            .all(|w| matches!(w, Where::Stopped | Where::Halted | Where::Ended))
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !forever && left.is_zero() {
            break;
        }
        let step = if forever {
            Duration::from_secs(1)
        } else {
            left.min(Duration::from_secs(1))
        };
        if vm.vcpus.wait_for(step, all_stopped) {
            break;
        }
        if vm.vcpus.fault().is_some() {
            break;
        }
    }
    vm.vcpus
        .pause(Duration::from_secs(5))
        .map_err(|e| Failure::Guest(e.to_string()))?;
    let p = vm.vcpus.progress();
    eprintln!(
        "kvm-vmm {}: stopped after {} progress reports, last {:?}",
        role(),
        p.count,
        p.last
    );
    match vm.vcpus.fault() {
        Some(why) => Err(Failure::Guest(why)),
        None => Ok(()),
    }
}

/// A destination started as a child process.
struct Destination {
    child: std::process::Child,
    addr: String,
    /// Its `resumed` line, parsed.
    resumed: mpsc::Receiver<Resumed>,
    relay: Option<JoinHandle<()>>,
}

impl Drop for Destination {
    /// Ends a destination that is still running (the migration failed).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a destination reports once its guest runs.
#[derive(Debug, Default)]
struct Resumed {
    digest: Option<String>,
    first: Option<u64>,
}

impl Resumed {
    /// Parses `kvm-vmm: resumed digest=D first=F`.
    fn parse(line: &str) -> Option<Resumed> {
        let rest = line.strip_prefix("kvm-vmm: resumed ")?;
        let mut r = Resumed::default();
        for word in rest.split_whitespace() {
            match word.split_once('=') {
                Some(("digest", d)) if d != "-" => r.digest = Some(d.to_string()),
                Some(("first", f)) => r.first = f.parse().ok(),
                _ => {}
            }
        }
        Some(r)
    }
}

impl Destination {
    /// Starts `kvm-vmm --listen 127.0.0.1:0` with this VM's size and vCPU
    /// count (and slot ids of its own), and reads the address it took.
    fn spawn(a: &Args) -> Result<Destination, Failure> {
        let exe = std::env::current_exe().map_err(setup("finding this program"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(["--mem", &a.mem.to_string()])
            .args(["--vcpus", &a.vcpus.to_string()])
            .args(["--first-slot", &(a.first_slot + 16).to_string()])
            .args(["--run-for", &format!("{}us", a.run_for.as_micros())])
            .args(["--wait", &format!("{}us", a.wait.as_micros())])
            .stdout(Stdio::piped());
        if a.policy.may_postcopy() {
            cmd.arg("--postcopy");
        }
        let mut child = cmd
            .spawn()
            .map_err(setup("starting the destination process"))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(migration("reading the destination"))?;
        let Some(addr) = line.trim().strip_prefix("kvm-vmm: listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::Migration(format!(
                "the destination did not start (it said {line:?})"
            )));
        };
        let addr = addr.to_string();
        // Relays the rest of its output (its guest's serial lines), and
        // hands over its `resumed` line.
        let (tx, resumed) = mpsc::channel();
        let relay = std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                match Resumed::parse(&line) {
                    Some(r) => {
                        let _ = tx.send(r);
                    }
                    None => say(&format!("destination| {line}")),
                }
            }
        });
        Ok(Destination {
            child,
            addr,
            resumed,
            relay: Some(relay),
        })
    }

    /// Waits for its report and for it to end.
    fn finish(&mut self, wait: Duration) -> Result<Resumed, Failure> {
        let r = self.resumed.recv_timeout(wait);
        let status = self
            .child
            .wait()
            .map_err(migration("waiting for the destination"))?;
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
        match r {
            Ok(r) if status.success() => Ok(r),
            Ok(_) | Err(_) => Err(Failure::Migration(format!(
                "the destination did not report its guest running ({status})"
            ))),
        }
    }
}

// Destination.

fn destination(a: &Args) -> Result<(), Failure> {
    let addr = a.listen.as_deref().expect("destination has --listen");
    // An empty VM of the same shape; the migration brings memory, vCPU
    // state and the in-kernel devices.
    let vm = Vm::new(a.mem, a.vcpus, a.first_slot, |_, _| Ok(()))?;
    if a.postcopy {
        vm.memory
            .enable_postcopy()
            .map_err(setup("enabling post-copy"))?;
    }
    let ctrlc = steer::CtrlC::install().map_err(Failure::Setup)?;
    let listener =
        TcpListener::bind(addr).map_err(|e| Failure::Usage(format!("--listen {addr}: {e}")))?;
    let local = listener.local_addr().map_err(setup("listening"))?;
    say(&format!("kvm-vmm: listening on {local}"));
    let (stream, peer) = listener.accept().map_err(migration("accepting"))?;
    eprintln!("kvm-vmm {}: receiving a guest from {peer}", role());
    let _ = stream.set_nodelay(true);
    let mut transport = StreamTransport::new(stream).map_err(migration("transport"))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut engine = DestinationEngine::new(
        KvmPages(vm.memory.clone()),
        vm.control.clone(),
        clock.clone(),
    );
    // With post-copy enabled on the memory, a fault handler serves the
    // guest while its pages arrive; otherwise it stays quiet.
    let mut faults =
        KvmFaults::start(&vm.memory, &vm.control, clock).map_err(migration("the fault handler"))?;
    ctrlc.watch(&engine.handle());
    let report = run_destination(&mut engine, &mut transport, Some(&mut faults), PEER_TIMEOUT)
        .map_err(engine_failed("the destination engine"))?;
    drop(transport);

    // The engine resumed the guest: wait for its first report here.
    let wait = a.wait;
    let reported = vm
        .vcpus
        .wait_for(wait, |c| c.progress.first_since_resume.is_some());
    let first = vm.vcpus.progress().first_since_resume;
    say(&format!(
        "kvm-vmm: resumed digest={} first={}",
        report.digest.map_or("-".to_string(), |d| d.to_string()),
        first.map_or("-".to_string(), |v| v.to_string()),
    ));
    if !reported {
        return Err(Failure::Guest(vm.vcpus.fault().unwrap_or_else(|| {
            format!("no progress report within {wait:?} of the resume")
        })));
    }
    let deadline = Instant::now() + a.run_for;
    while Instant::now() < deadline && vm.vcpus.fault().is_none() {
        vm.vcpus
            .wait_for(deadline - Instant::now(), |c| c.fault.is_some());
    }
    match vm.vcpus.fault() {
        Some(why) => Err(Failure::Guest(why)),
        None => Ok(()),
    }
}

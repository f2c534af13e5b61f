//! Live-migrate a running Xen domain (HVM, PVH or 64-bit PV) into another
//! domain, with the policy of your choice: in one process on one host, or
//! from a sending process to a receiving one over TCP (on another host,
//! or on the same one).
//!
//! ```text
//! xl create -p dest.cfg          # same configuration, another name: paused
//! xen-migrate --domid 3 --dest 4 --policy precopy       # both ends here
//!
//! xen-migrate --dest 4 --listen 0.0.0.0:7700            # receiving host
//! xen-migrate --domid 3 --to desthost:7700 --policy hca  # sending host
//! ```
//!
//! With `--tls-cert`, `--tls-key` and `--tls-ca` on both hosts, the two
//! authenticate each other with mutual TLS before anything else crosses
//! (the frames offer too), and the stream is encrypted.
//!
//! Before the stream, the sender offers its frames (`livemig::xen::offer`)
//! and the receiver prepares its domain for them (a PV domain is given
//! memory at exactly those frames) and answers with the frames both will
//! move, or with its error (`livemig::xen::answer`): records of the
//! library's own protocol, on the connection the migration then uses.
//!
//! Run in dom0 as root. The source engine reads domain `--domid` through
//! log-dirty and foreign mappings; the destination engine, on another
//! thread, writes into domain `--dest` (created paused by the toolstack
//! with the same configuration), loads the source's HVM context into it
//! and unpauses it once every page has arrived and the memory digest
//! matches. The two talk the library's wire protocol over a Unix socket
//! pair. The source is left suspended (or paused), as `xl migrate` leaves
//! it before destroying it; on any failure before the switch-over it is
//! resumed instead.
//!
//! It prints the round lines, the totals and the verification; `--json`
//! prints one JSON object. The sender shows its progress on stderr (a
//! bar on a terminal); Ctrl-C cancels before the point of no return (the
//! source domain runs on, log-dirty mode off); `--max-bandwidth` and
//! `--auto-converge` (through the scheduler's cap) steer it; see `--help`
//! for the exit statuses.

#[path = "common/steer.rs"]
mod steer;

use clap::{Parser, ValueEnum};
use livemig::core::driver::run_source;
use livemig::core::tls::{self, TlsConfig, TlsSession};
use livemig::core::MemoryLayout;
use livemig::core::{
    Clock, DestinationReport, EngineConfig, MigrationStats, Policy, PolicyConfig, PolicyKind,
    SourceEngine, SourceVerify, StreamTransport, SystemClock, Transport,
};
use livemig::units::parse_duration;
use livemig::xen::DestinationError;
use livemig::xen::{ReceiveOptions, StopMode, Xen, XenDomain};
use livemig::xen::{ResumeWindow, SourceFrames};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use steer::{CtrlC, Failure};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum StopArg {
    /// Ask the guest to suspend itself through xenstore (as `xl migrate`).
    Suspend,
    /// Pause the domain, unbeknown to the guest.
    Pause,
}

/// Live-migrate a Xen domain into another, paused, domain.
#[derive(Parser, Debug)]
#[command(version, about, after_help = steer::EXIT_CODES)]
struct Args {
    /// The running domain to migrate.
    #[arg(long)]
    domid: Option<u32>,
    /// The paused domain to migrate into (created with the same
    /// configuration, e.g. `xl create -p`).
    #[arg(long)]
    dest: Option<u32>,
    /// Send `--domid` to a receiving xen-migrate at this address
    /// (HOST:PORT).
    #[arg(long)]
    to: Option<String>,
    /// Receive into `--dest`: listen at this address (HOST:PORT) for one
    /// sender.
    #[arg(long)]
    listen: Option<String>,
    /// Migration policy: precopy, stop-and-copy, hca, postcopy[:PREPAGING]
    /// or hybrid[:PREPAGING]. Post-copy resumes at once at the destination
    /// while pages follow on demand (it needs memory paging on the
    /// receiving hypervisor; HVM/PVH only).
    #[arg(long, default_value = "precopy")]
    policy: PolicyKind,
    /// How the source is stopped for the final copy (the receiver must be
    /// given the same).
    #[arg(long, value_enum, default_value = "suspend")]
    stop: StopArg,
    /// What the completion digest covers, on both sides: `full` reads all
    /// of memory again after the pause on the source (catches a dirty log
    /// that missed a write) and back from the domain's memory on the
    /// destination before it resumes (proves it stored every byte);
    /// `sent` digests pages as they were sent and as they were received
    /// (milliseconds instead). A receiving process takes its own.
    #[arg(long, default_value = "full")]
    verify: SourceVerify,
    /// Pre-copy and hybrid: the downtime the final copy may take (the
    /// policy's default if not given); hybrid switches to post-copy when
    /// its rounds run out before what is left fits.
    #[arg(long, value_parser = parse_duration)]
    downtime_target: Option<Duration>,
    /// Sender: bandwidth cap and auto-converge (through the scheduler's
    /// cap, credit2 or credit; a host that cannot cap the domain
    /// migrates unthrottled).
    #[command(flatten)]
    steer: steer::SteerArgs,
    /// Pre-copy and hybrid: at most this many rounds (the policy's
    /// default if not given); hybrid then switches to post-copy.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Post-copy and hybrid sender: KiB after each vCPU's GS base (a
    /// kernel's per-CPU area) sent before the resume, with the vCPUs'
    /// stacks, code and page tables: a resuming guest hands Xen its
    /// `vcpu_info` from there, and Xen refuses a frame not yet arrived.
    /// The default covers Linux's static per-CPU area.
    #[arg(long, default_value_t = 256)]
    resume_window_kib: u64,
    /// Receiver: serve post-copy (and hybrid) senders, through Xen's
    /// memory paging.
    #[arg(long)]
    postcopy: bool,
    /// Mutual TLS between sender and receiver: this end's certificate
    /// (PEM). With `--tls-key` and `--tls-ca`; without them, plain TCP.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: the certificate's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA the peer's certificate must chain to (PEM).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS, sender: the name the receiver's certificate must bear
    /// (default: the host of `--to`).
    #[arg(long)]
    tls_name: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let a = Args::parse();
    steer::init_tracing();
    let ctrlc = match CtrlC::install() {
        Ok(c) => c,
        Err(e) => return ExitCode::from(Failure::Other(e).report("xen-migrate")),
    };
    let r = match (a.domid, a.dest, &a.to, &a.listen) {
        (Some(s), Some(d), None, None) => run_local(&a, s, d, &ctrlc),
        (Some(s), None, Some(to), None) => run_send(&a, s, to, &ctrlc),
        (None, Some(d), None, Some(at)) => run_receive(&a, d, at),
        _ => Err("invalid arguments: give --domid and --dest (both ends here), --domid and --to (sender), or --dest and --listen (receiver)".into()),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(f) => ExitCode::from(f.report("xen-migrate")),
    }
}

/// A destination's failure: the migration's error (its kind decides the
/// exit status) or the domain's.
fn dest_failure(e: DestinationError) -> Failure {
    match e {
        DestinationError::Migration { source, missing } => {
            if missing > 0 {
                eprintln!("xen-migrate: {missing} frames never arrived");
            }
            Failure::Migration(source)
        }
        other => Failure::Other(format!("destination failed: {other}")),
    }
}

fn stop_mode(a: &Args) -> StopMode {
    match a.stop {
        StopArg::Suspend => StopMode::Suspend,
        StopArg::Pause => StopMode::Pause,
    }
}

fn show(l: &MemoryLayout) -> String {
    l.regions()
        .iter()
        .map(|r| format!("{:#x}+{}", r.first_page, r.pages))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Attaches the source and checks what it needs.
fn attach_source(a: &Args, xen: &Arc<Xen>, domid: u32) -> Result<XenDomain, String> {
    let src = XenDomain::attach(xen.clone(), domid).map_err(|e| e.to_string())?;
    if src.is_pv() && a.stop == StopArg::Pause {
        return Err("a PV guest moves only after suspending itself: use --stop suspend".into());
    }
    Ok(src)
}

/// Makes domain `domid` ready for a source that announced `frames`, says
/// which frames will move, and returns it.
fn prepare_destination(
    xen: &Arc<Xen>,
    domid: u32,
    frames: &SourceFrames,
) -> Result<XenDomain, String> {
    let p = livemig::xen::prepare_destination(xen, domid, frames).map_err(|e| e.to_string())?;
    if frames.pv {
        eprintln!(
            "PV source frames: {}\ndestination prepared: vCPUs down, page tables unpinned, memory at the same frames",
            show(&p.source_layout)
        );
    } else {
        eprintln!(
            "source frames: {}\ndestination frames: {}\nmigrated: {}",
            show(&p.source_layout),
            show(&p.own_layout),
            show(p.domain.layout())
        );
    }
    Ok(p.domain)
}

fn policy(a: &Args) -> Box<dyn Policy> {
    let mut config = PolicyConfig::default();
    for c in [&mut config.precopy, &mut config.hybrid_precopy] {
        if let Some(target) = a.downtime_target {
            c.downtime_target = target;
        }
        if let Some(rounds) = a.max_rounds {
            c.max_rounds = rounds;
        }
    }
    a.policy.build(&config)
}

fn is_postcopy(a: &Args) -> bool {
    a.policy.may_postcopy()
}

/// Runs the source engine over `t`, with Ctrl-C cancelling it and its
/// progress on stderr.
fn source_side(
    a: &Args,
    src: &XenDomain,
    t: &mut dyn Transport,
    ctrlc: &CtrlC,
) -> Result<MigrationStats, Failure> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut config = EngineConfig::default();
    config.verify = a.verify;
    a.steer.apply(&mut config)?;
    let mut engine = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(stop_mode(a))
            .with_resume_window(ResumeWindow::default().with_per_cpu(a.resume_window_kib << 10)),
        policy(a),
        clock,
        config,
    );
    ctrlc.watch(&engine.handle());
    steer::show_progress(&engine.handle(), true);
    run_source(&mut engine, t, TIMEOUT).map_err(Failure::Migration)
}

/// Runs the destination engine over `t` (see [`livemig::xen::receive`]).
fn dest_side(
    xen: &Arc<Xen>,
    dst: &XenDomain,
    stop: StopMode,
    t: &mut dyn Transport,
    postcopy: bool,
    verify: SourceVerify,
) -> Result<DestinationReport, DestinationError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut options = ReceiveOptions::default();
    options.postcopy = postcopy;
    options.verify = verify.into();
    livemig::xen::receive(xen, dst, stop, t, options, clock, TIMEOUT)
}

fn print_source(a: &Args, s: &MigrationStats, dest: Option<&DestinationReport>) {
    if a.json {
        let mut j = serde_json::to_value(s).expect("statistics as JSON");
        j["xen"] = serde_json::json!({
            "source-domid": a.domid, "dest-domid": a.dest, "to": a.to,
            "stop": format!("{:?}", a.stop).to_lowercase(),
            "dest-pages-received": dest.map(|r| r.pages_received),
            "dest-resume-confirmed": dest.map(|r| r.resume_confirmed),
            "dest-digest": dest.and_then(|r| r.digest.map(|d| d.to_string())),
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap());
        return;
    }
    println!("{s}");
    if let Some(r) = dest {
        println!(
            "destination domain {}: {} pages received, resumed: {}, digest {}",
            a.dest.unwrap_or_default(),
            r.pages_received,
            r.resume_confirmed,
            r.digest.map(|d| d.to_string()).unwrap_or_default()
        );
    }
    println!(
        "memory: {}",
        if s.memory_verified {
            "verified (digests equal on both sides)"
        } else {
            "NOT verified"
        }
    );
}

/// Both ends in this process, over a Unix socket pair.
fn run_local(a: &Args, domid: u32, dest: u32, ctrlc: &CtrlC) -> Result<bool, Failure> {
    if domid == dest {
        return Err("invalid arguments: --domid and --dest must differ".into());
    }
    let xen = Arc::new(Xen::open().map_err(|e| e.to_string())?);
    let src = attach_source(a, &xen, domid)?;
    let dst = prepare_destination(&xen, dest, &src.source_frames())?;
    let src = src
        .with_layout(dst.layout().clone())
        .map_err(|e| e.to_string())?;
    eprintln!(
        "source domain {domid}: {} pages in {} regions; destination domain {dest}: {} pages",
        src.layout().total_pages(),
        src.layout().regions().len(),
        dst.layout().total_pages()
    );
    let (sa, sb) = UnixStream::pair().map_err(|e| e.to_string())?;
    let stop = stop_mode(a);
    let (x2, pc, verify) = (xen.clone(), is_postcopy(a), a.verify);
    let mut tb = StreamTransport::new(sb).map_err(|e| e.to_string())?;
    let receiver = std::thread::spawn(move || dest_side(&x2, &dst, stop, &mut tb, pc, verify));
    let mut t = StreamTransport::new(sa).map_err(|e| e.to_string())?;
    let result = source_side(a, &src, &mut t, ctrlc);
    let report = receiver
        .join()
        .map_err(|_| "the destination thread panicked".to_string())?;
    match (result, report) {
        (Ok(s), Ok(r)) => {
            print_source(a, &s, Some(&r));
            Ok(s.memory_verified)
        }
        (Err(e), r) => {
            let src_state = src.info().map(|i| format!("{i:?}")).unwrap_or_default();
            eprintln!("xen-migrate: destination: {r:?}; source domain now: {src_state}");
            Err(e)
        }
        (Ok(_), Err(e)) => Err(dest_failure(e)),
    }
}

/// The TLS configuration the arguments name, if any.
fn tls_config(a: &Args) -> Result<Option<TlsConfig>, String> {
    TlsConfig::from_optional_paths(
        a.tls_cert.as_deref(),
        a.tls_key.as_deref(),
        a.tls_ca.as_deref(),
    )
    .map_err(|e| e.to_string())
}

/// The sending process.
fn run_send(a: &Args, domid: u32, to: &str, ctrlc: &CtrlC) -> Result<bool, Failure> {
    let tls = tls_config(a)?;
    let xen = Arc::new(Xen::open().map_err(|e| e.to_string())?);
    let src = attach_source(a, &xen, domid)?;
    let stream = TcpStream::connect(to).map_err(|e| format!("connecting to {to}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut t: Box<dyn Transport> = match tls {
        // The sender dials: it begins the session.
        Some(cfg) => {
            let mut session = TlsSession::initiator(&cfg).map_err(|e| e.to_string())?;
            let name = a.tls_name.as_deref().unwrap_or(tls::host_of(to));
            Box::new(
                tls::connect(&cfg, stream, name, &mut session)
                    .map_err(|e| format!("TLS with {to}: {e}"))?,
            )
        }
        None => Box::new(StreamTransport::new(stream).map_err(|e| e.to_string())?),
    };
    let agreed =
        livemig::xen::offer(&mut t, &src.source_frames(), TIMEOUT).map_err(|e| e.to_string())?;
    let src = src.with_layout(agreed).map_err(|e| e.to_string())?;
    eprintln!(
        "source domain {domid}: {} pages in {} regions, to {to}",
        src.layout().total_pages(),
        src.layout().regions().len()
    );
    match source_side(a, &src, &mut t, ctrlc) {
        Ok(s) => {
            print_source(a, &s, None);
            Ok(s.memory_verified)
        }
        Err(e) => {
            let src_state = src.info().map(|i| format!("{i:?}")).unwrap_or_default();
            eprintln!("xen-migrate: source domain now: {src_state}");
            Err(e)
        }
    }
}

/// The receiving process.
fn run_receive(a: &Args, dest: u32, at: &str) -> Result<bool, Failure> {
    let tls = tls_config(a)?;
    let xen = Arc::new(Xen::open().map_err(|e| e.to_string())?);
    let listener = TcpListener::bind(at).map_err(|e| format!("listening at {at}: {e}"))?;
    eprintln!("domain {dest}: waiting for a sender at {at}");
    let (stream, peer) = listener.accept().map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut t: Box<dyn Transport> = match tls {
        // Nothing from the sender is read before it is authenticated.
        Some(cfg) => Box::new(
            tls::accept(&cfg, stream, &mut TlsSession::acceptor())
                .map_err(|e| format!("TLS with {peer}: {e}"))?,
        ),
        None => Box::new(StreamTransport::new(stream).map_err(|e| e.to_string())?),
    };
    let (dst, _) = livemig::xen::answer(&mut t, TIMEOUT, |f| {
        prepare_destination(&xen, dest, f).map(|d| {
            let agreed = d.layout().clone();
            (d, agreed)
        })
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "domain {dest}: receiving {} pages from {peer}",
        dst.layout().total_pages()
    );
    let r =
        dest_side(&xen, &dst, stop_mode(a), &mut t, a.postcopy, a.verify).map_err(dest_failure)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dest-domid": dest, "from": peer.to_string(),
                "pages-received": r.pages_received,
                "resume-confirmed": r.resume_confirmed,
                "digest": r.digest.map(|d| d.to_string()),
            }))
            .unwrap()
        );
    } else {
        println!(
            "destination domain {dest}: {} pages received from {peer}, resumed: {}, digest {}",
            r.pages_received,
            r.resume_confirmed,
            r.digest.map(|d| d.to_string()).unwrap_or_default()
        );
    }
    Ok(r.digest.is_some())
}

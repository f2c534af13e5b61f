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
//! (the frames announcement too), and the stream is encrypted.
//!
//! Before the stream, the sender announces its frames in one line
//! (`SourceFrames`) and the receiver prepares its domain for them (a PV
//! domain is given memory at exactly those frames) and answers with the
//! frames both will move, or with its error.
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
//! prints one JSON object.

use clap::{Parser, ValueEnum};
use livemig::core::driver::{run_destination, run_destination_serving, run_source};
use livemig::core::tls::{self, TlsConfig, TlsSession, TlsStream};
use livemig::core::transport::SplitStream;
use livemig::core::MemoryLayout;
use livemig::core::{
    Clock, DestinationEngine, DestinationReport, EngineConfig, Hca, HcaConfig, Hybrid,
    HybridConfig, MigrationStats, Policy, PostCopy, Precopy, PrecopyConfig, Prepaging,
    SourceEngine, SourceVerify, StopAndCopy, StreamTransport, SystemClock,
};
use livemig::xen::domain::{common_layout, regions_from_text, regions_to_text, SourceFrames};
use livemig::xen::paging::Pager;
use livemig::xen::walk::ResumeWindow;
use livemig::xen::{StopMode, Xen, XenDomain};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum PolicyArg {
    /// Iterative pre-copy.
    Precopy,
    /// Pause, copy everything, resume.
    StopAndCopy,
    /// Hierarchical copy: cold pages first, hot pages held for the end.
    Hca,
    /// Resume at once at the destination, pages follow on demand (needs
    /// memory paging on the receiving hypervisor; HVM/PVH only).
    Postcopy,
    /// Pre-copy rounds, then post-copy for what is left.
    Hybrid,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum VerifyArg {
    /// A full scan of memory after the pause.
    Full,
    /// The content of each page as it was sent.
    Sent,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum StopArg {
    /// Ask the guest to suspend itself through xenstore (as `xl migrate`).
    Suspend,
    /// Pause the domain, unbeknown to the guest.
    Pause,
}

/// Live-migrate a Xen domain into another, paused, domain.
#[derive(Parser, Debug)]
#[command(version, about)]
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
    /// Migration policy.
    #[arg(long, value_enum, default_value = "precopy")]
    policy: PolicyArg,
    /// How the source is stopped for the final copy (the receiver must be
    /// given the same).
    #[arg(long, value_enum, default_value = "suspend")]
    stop: StopArg,
    /// What the completion digest covers: `full` reads all of memory
    /// again after the pause (catches a dirty log that missed a write);
    /// `sent` digests pages as they were sent (milliseconds instead).
    #[arg(long, value_enum, default_value = "full")]
    verify: VerifyArg,
    /// Pre-copy and hybrid: the downtime the final copy may take (the
    /// policy's default if not given); hybrid switches to post-copy when
    /// its rounds run out before what is left fits.
    #[arg(long)]
    downtime_target_ms: Option<u64>,
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
/// The longest handshake line accepted.
const MAX_LINE: usize = 1 << 20;

fn main() -> ExitCode {
    let a = Args::parse();
    let r = match (a.domid, a.dest, &a.to, &a.listen) {
        (Some(s), Some(d), None, None) => run_local(&a, s, d),
        (Some(s), None, Some(to), None) => run_send(&a, s, to),
        (None, Some(d), None, Some(at)) => run_receive(&a, d, at),
        _ => Err("give --domid and --dest (both ends here), --domid and --to (sender), or --dest and --listen (receiver)".into()),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("xen-migrate: {e}");
            ExitCode::from(2)
        }
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

/// Makes domain `domid` ready for a source that announced `frames`, and
/// returns it with the frames both will move.
fn prepare_destination(
    xen: &Arc<Xen>,
    domid: u32,
    frames: &SourceFrames,
) -> Result<XenDomain, String> {
    if frames.pv {
        // The destination takes memory at exactly the source's frames.
        let dst = XenDomain::attach_pv_destination(xen.clone(), domid, frames)
            .map_err(|e| e.to_string())?;
        eprintln!(
            "PV source frames: {}\ndestination prepared: vCPUs down, page tables unpinned, memory at the same frames",
            show(&frames.layout)
        );
        return Ok(dst);
    }
    let dst = XenDomain::attach(xen.clone(), domid).map_err(|e| e.to_string())?;
    if dst.is_pv() {
        return Err(format!("domain {domid} is PV and the source is not"));
    }
    if !dst.info().map_err(|e| e.to_string())?.paused {
        return Err(format!(
            "domain {domid} is running; create it paused (xl create -p)"
        ));
    }
    // Migrate the RAM both domains have (see `common_layout`), and say
    // what differs.
    let common = common_layout(&frames.layout, dst.layout()).map_err(|e| e.to_string())?;
    eprintln!(
        "source frames: {}\ndestination frames: {}\nmigrated: {}",
        show(&frames.layout),
        show(dst.layout()),
        show(&common)
    );
    dst.with_layout(common).map_err(|e| e.to_string())
}

fn policy(a: &Args) -> Box<dyn Policy> {
    match a.policy {
        PolicyArg::Precopy => Box::new(Precopy::new(precopy_config(a))),
        PolicyArg::StopAndCopy => Box::new(StopAndCopy),
        PolicyArg::Hca => Box::new(Hca::new(HcaConfig::default())),
        PolicyArg::Postcopy => Box::new(PostCopy::new(Prepaging::default())),
        PolicyArg::Hybrid => Box::new(Hybrid::new(HybridConfig {
            precopy: precopy_config(a),
            ..HybridConfig::default()
        })),
    }
}

fn precopy_config(a: &Args) -> PrecopyConfig {
    let d = PrecopyConfig::default();
    PrecopyConfig {
        downtime_target: a
            .downtime_target_ms
            .map_or(d.downtime_target, Duration::from_millis),
        max_rounds: a.max_rounds.unwrap_or(d.max_rounds),
        ..d
    }
}

fn is_postcopy(a: &Args) -> bool {
    matches!(a.policy, PolicyArg::Postcopy | PolicyArg::Hybrid)
}

/// Runs the source engine over `stream`.
fn source_side<S: SplitStream>(
    a: &Args,
    src: &XenDomain,
    stream: S,
) -> Result<MigrationStats, String> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut t = StreamTransport::new(stream).map_err(|e| e.to_string())?;
    let mut engine = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(stop_mode(a)).with_resume_window(ResumeWindow {
            per_cpu: a.resume_window_kib << 10,
            ..ResumeWindow::default()
        }),
        policy(a),
        clock,
        EngineConfig {
            verify: match a.verify {
                VerifyArg::Full => SourceVerify::FullScan,
                VerifyArg::Sent => SourceVerify::SentContent,
            },
            ..EngineConfig::default()
        },
    );
    run_source(&mut engine, &mut t, TIMEOUT).map_err(|e| e.to_string())
}

/// Runs the destination engine over `stream`.
///
/// With `postcopy`, a pager serves the guest's touches of pages that have
/// not arrived. If the source is lost after the guest resumed here, the
/// domain is paused and its missing pages stay paged out.
fn dest_side<S: SplitStream>(
    xen: &Arc<Xen>,
    dst: &XenDomain,
    stop: StopMode,
    stream: S,
    postcopy: bool,
) -> Result<DestinationReport, String> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let mut t = StreamTransport::new(stream).map_err(|e| e.to_string())?;
    if !postcopy {
        let mut e = DestinationEngine::new(dst.pages(), dst.control(stop), clock);
        return run_destination(&mut e, &mut t, TIMEOUT).map_err(|e| e.to_string());
    }
    if dst.is_pv() {
        return Err(
            "post-copy on Xen needs memory paging, which serves HVM and PVH guests, not PV".into(),
        );
    }
    let (pager, faults) = Pager::enable(xen.clone(), dst.domid(), clock.clone())
        .map_err(|e| format!("enabling memory paging in domain {}: {e}", dst.domid()))?;
    let pager = Arc::new(pager);
    // Nothing has arrived: page everything out now, while the guest
    // still runs on the source, rather than at the switch-over; each
    // page that arrives is paged back in.
    let t0 = std::time::Instant::now();
    for p in dst.layout().pages() {
        pager
            .page_out(p)
            .map_err(|e| format!("paging out frame {p:#x} of domain {}: {e}", dst.domid()))?;
    }
    eprintln!(
        "domain {}: {} frames paged out in {:.0} ms, ready for post-copy",
        dst.domid(),
        dst.layout().total_pages(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let d = dst.clone().with_pager(pager.clone());
    let mut e = DestinationEngine::new(d.pages(), d.control(stop), clock);
    match run_destination_serving(&mut e, &mut t, &faults, TIMEOUT) {
        Ok(r) => {
            pager
                .finish()
                .map_err(|e| format!("ending memory paging: {e}"))?;
            Ok(r)
        }
        Err(err) => {
            if e.resumed() {
                let _ = xen.pause(dst.domid());
            }
            Err(format!("{err} ({} pages still paged out)", pager.missing()))
        }
    }
}

fn print_source(a: &Args, s: &MigrationStats, dest: Option<&DestinationReport>) {
    if a.json {
        let mut j = s.to_json();
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
fn run_local(a: &Args, domid: u32, dest: u32) -> Result<bool, String> {
    if domid == dest {
        return Err("--domid and --dest must differ".into());
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
    let (x2, pc) = (xen.clone(), is_postcopy(a));
    let receiver = std::thread::spawn(move || dest_side(&x2, &dst, stop, sb, pc));
    let result = source_side(a, &src, sa);
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
            Err(format!(
                "migration failed: {e}; destination: {r:?}; source domain now: {src_state}"
            ))
        }
        (Ok(_), Err(e)) => Err(format!("destination failed: {e}")),
    }
}

/// Reads one handshake line, a byte at a time (nothing after it is
/// consumed: the wire protocol follows).
fn read_line<S: Read>(s: &mut S) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err("the peer closed the connection during the handshake".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("handshake: {e}")),
        }
        if line.len() > MAX_LINE {
            return Err(format!("handshake line longer than {MAX_LINE} bytes"));
        }
    }
    String::from_utf8(line).map_err(|_| "handshake line is not UTF-8".into())
}

/// A stream the handshake line can wait on with a bound.
trait Timed: SplitStream {
    fn read_bound(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Timed for TcpStream {
    fn read_bound(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Timed for TlsStream {
    fn read_bound(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
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
fn run_send(a: &Args, domid: u32, to: &str) -> Result<bool, String> {
    let tls = tls_config(a)?;
    let xen = Arc::new(Xen::open().map_err(|e| e.to_string())?);
    let src = attach_source(a, &xen, domid)?;
    let stream = TcpStream::connect(to).map_err(|e| format!("connecting to {to}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    match tls {
        Some(cfg) => {
            let mut session = TlsSession::initiator(&cfg).map_err(|e| e.to_string())?;
            let name = a.tls_name.as_deref().unwrap_or(tls::host_of(to));
            let s = tls::connect_stream(&cfg, stream, name, &mut session)
                .map_err(|e| format!("TLS with {to}: {e}"))?;
            send_over(a, src, to, s)
        }
        None => send_over(a, src, to, stream),
    }
}

/// The sender's handshake and migration over a connected stream.
fn send_over<S: Timed>(a: &Args, src: XenDomain, to: &str, mut stream: S) -> Result<bool, String> {
    let domid = src.domid();
    stream
        .read_bound(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let frames = src.source_frames();
    writeln!(stream, "{}", frames.to_line()).map_err(|e| format!("handshake: {e}"))?;
    let reply = read_line(&mut stream)?;
    let agreed = match reply.split_once(' ') {
        Some(("ok", regions)) => regions_from_text(regions, src.layout().total_pages())
            .map_err(|e| format!("the receiver's answer: {e}"))?,
        Some(("error", why)) => return Err(format!("the receiver refused: {why}")),
        _ => return Err(format!("the receiver answered {reply:?}")),
    };
    if frames.pv && agreed != frames.layout {
        return Err("the receiver would move other frames than a PV source has".into());
    }
    let src = src.with_layout(agreed).map_err(|e| e.to_string())?;
    stream.read_bound(None).map_err(|e| e.to_string())?;
    eprintln!(
        "source domain {domid}: {} pages in {} regions, to {to}",
        src.layout().total_pages(),
        src.layout().regions().len()
    );
    match source_side(a, &src, stream) {
        Ok(s) => {
            print_source(a, &s, None);
            Ok(s.memory_verified)
        }
        Err(e) => {
            let src_state = src.info().map(|i| format!("{i:?}")).unwrap_or_default();
            Err(format!(
                "migration failed: {e}; source domain now: {src_state}"
            ))
        }
    }
}

/// The receiving process.
fn run_receive(a: &Args, dest: u32, at: &str) -> Result<bool, String> {
    let tls = tls_config(a)?;
    let xen = Arc::new(Xen::open().map_err(|e| e.to_string())?);
    let listener = TcpListener::bind(at).map_err(|e| format!("listening at {at}: {e}"))?;
    eprintln!("domain {dest}: waiting for a sender at {at}");
    let (stream, peer) = listener.accept().map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    match tls {
        Some(cfg) => {
            // Nothing from the sender is read before it is authenticated.
            let s = tls::accept_stream(&cfg, stream, &mut TlsSession::acceptor())
                .map_err(|e| format!("TLS with {peer}: {e}"))?;
            receive_over(a, &xen, dest, peer, s)
        }
        None => receive_over(a, &xen, dest, peer, stream),
    }
}

/// The receiver's handshake and migration over an accepted stream.
fn receive_over<S: Timed>(
    a: &Args,
    xen: &Arc<Xen>,
    dest: u32,
    peer: std::net::SocketAddr,
    mut stream: S,
) -> Result<bool, String> {
    stream
        .read_bound(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let line = read_line(&mut stream)?;
    let prepared = SourceFrames::from_line(&line)
        .map_err(|e| e.to_string())
        .and_then(|f| prepare_destination(xen, dest, &f));
    let dst = match prepared {
        Ok(d) => {
            writeln!(stream, "ok {}", regions_to_text(d.layout()))
                .map_err(|e| format!("handshake: {e}"))?;
            d
        }
        Err(e) => {
            let _ = writeln!(stream, "error {}", e.replace('\n', " "));
            return Err(e);
        }
    };
    stream.read_bound(None).map_err(|e| e.to_string())?;
    eprintln!(
        "domain {dest}: receiving {} pages from {peer}",
        dst.layout().total_pages()
    );
    let r = dest_side(xen, &dst, stop_mode(a), stream, a.postcopy)
        .map_err(|e| format!("destination failed: {e}"))?;
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

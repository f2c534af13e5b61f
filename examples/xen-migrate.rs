//! Live-migrate a running Xen domain (HVM, PVH or 64-bit PV) into another
//! domain on the same host, with the policy of your choice.
//!
//! ```text
//! xl create -p dest.cfg          # same configuration, another name: paused
//! xen-migrate --domid 3 --dest 4 --policy precopy
//! ```
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
use livemig::core::driver::{run_destination, run_source};
use livemig::core::MemoryLayout;
use livemig::core::{
    Clock, DestinationEngine, EngineConfig, Hca, HcaConfig, Policy, Precopy, SourceEngine,
    SourceVerify, StopAndCopy, StreamTransport, SystemClock,
};
use livemig::xen::domain::common_layout;
use livemig::xen::{StopMode, Xen, XenDomain};
use std::os::unix::net::UnixStream;
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

/// Live-migrate a Xen domain into another, paused, domain on this host.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The running domain to migrate.
    #[arg(long)]
    domid: u32,
    /// The paused domain to migrate into (created with the same
    /// configuration, e.g. `xl create -p`).
    #[arg(long)]
    dest: u32,
    /// Migration policy.
    #[arg(long, value_enum, default_value = "precopy")]
    policy: PolicyArg,
    /// How the source is stopped for the final copy.
    #[arg(long, value_enum, default_value = "suspend")]
    stop: StopArg,
    /// What the completion digest covers: `full` reads all of memory
    /// again after the pause (catches a dirty log that missed a write);
    /// `sent` digests pages as they were sent (milliseconds instead).
    #[arg(long, value_enum, default_value = "full")]
    verify: VerifyArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("xen-migrate: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(a: &Args) -> Result<bool, String> {
    if a.domid == a.dest {
        return Err("--domid and --dest must differ".into());
    }
    let xen = Arc::new(Xen::open().map_err(|e| e.to_string())?);
    let src = XenDomain::attach(xen.clone(), a.domid).map_err(|e| e.to_string())?;
    if src.is_pv() && a.stop == StopArg::Pause {
        return Err("a PV guest moves only after suspending itself: use --stop suspend".into());
    }
    let show = |l: &MemoryLayout| {
        l.regions()
            .iter()
            .map(|r| format!("{:#x}+{}", r.first_page, r.pages))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (src, dst) = if src.is_pv() {
        // The destination takes memory at exactly the source's frames.
        let dst = XenDomain::attach_pv_destination(xen, a.dest, &src).map_err(|e| e.to_string())?;
        eprintln!(
            "PV source frames: {}\ndestination prepared: vCPUs down, page tables unpinned, memory at the same frames",
            show(src.layout())
        );
        (src, dst)
    } else {
        let dst = XenDomain::attach(xen, a.dest).map_err(|e| e.to_string())?;
        if !dst.info().map_err(|e| e.to_string())?.paused {
            return Err(format!(
                "domain {} is running; create it paused (xl create -p)",
                a.dest
            ));
        }
        // Migrate the RAM both domains have (see `common_layout`), and
        // say what differs.
        let common = common_layout(src.layout(), dst.layout()).map_err(|e| e.to_string())?;
        eprintln!(
            "source frames: {}\ndestination frames: {}\nmigrated: {}",
            show(src.layout()),
            show(dst.layout()),
            show(&common)
        );
        (
            src.with_layout(common.clone()).map_err(|e| e.to_string())?,
            dst.with_layout(common).map_err(|e| e.to_string())?,
        )
    };
    let stop = match a.stop {
        StopArg::Suspend => StopMode::Suspend,
        StopArg::Pause => StopMode::Pause,
    };
    eprintln!(
        "source domain {}: {} pages in {} regions; destination domain {}: {} pages",
        a.domid,
        src.layout().total_pages(),
        src.layout().regions().len(),
        a.dest,
        dst.layout().total_pages()
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (sa, sb) = UnixStream::pair().map_err(|e| e.to_string())?;
    let (dpages, dctl, c2) = (dst.pages(), dst.control(stop), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = StreamTransport::new(sb).map_err(|e| e.to_string())?;
        let mut e = DestinationEngine::new(dpages, dctl, c2);
        run_destination(&mut e, &mut t, TIMEOUT).map_err(|e| e.to_string())
    });
    let policy: Box<dyn Policy> = match a.policy {
        PolicyArg::Precopy => Box::new(Precopy::default()),
        PolicyArg::StopAndCopy => Box::new(StopAndCopy),
        PolicyArg::Hca => Box::new(Hca::new(HcaConfig::default())),
    };
    let mut t = StreamTransport::new(sa).map_err(|e| e.to_string())?;
    let mut engine = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(stop),
        policy,
        clock,
        EngineConfig {
            verify: match a.verify {
                VerifyArg::Full => SourceVerify::FullScan,
                VerifyArg::Sent => SourceVerify::SentContent,
            },
            ..EngineConfig::default()
        },
    );
    let result = run_source(&mut engine, &mut t, TIMEOUT);
    let report = dest
        .join()
        .map_err(|_| "the destination thread panicked".to_string())?;
    let stats = match (result, report) {
        (Ok(s), Ok(r)) => {
            if a.json {
                let mut j = s.to_json();
                j["xen"] = serde_json::json!({
                    "source-domid": a.domid, "dest-domid": a.dest,
                    "stop": format!("{:?}", a.stop).to_lowercase(),
                    "dest-pages-received": r.pages_received,
                    "dest-resume-confirmed": r.resume_confirmed,
                    "dest-digest": r.digest.map(|d| d.to_string()),
                });
                println!("{}", serde_json::to_string_pretty(&j).unwrap());
            } else {
                println!("{s}");
                println!(
                    "destination domain {}: {} pages received, resumed: {}, digest {}",
                    a.dest,
                    r.pages_received,
                    r.resume_confirmed,
                    r.digest.map(|d| d.to_string()).unwrap_or_default()
                );
            }
            s
        }
        (Err(e), r) => {
            let src_state = src.info().map(|i| format!("{i:?}")).unwrap_or_default();
            return Err(format!(
                "migration failed: {e}; destination: {r:?}; source domain now: {src_state}"
            ));
        }
        (Ok(_), Err(e)) => return Err(format!("destination failed: {e}")),
    };
    println!(
        "memory: {}",
        if stats.memory_verified {
            "verified (digests equal on both sides)"
        } else {
            "NOT verified"
        }
    );
    Ok(stats.memory_verified)
}

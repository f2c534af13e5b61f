//! What the example programs share to steer and watch a migration: a
//! progress bar on a terminal (plain lines otherwise), Ctrl-C that
//! cancels through the handle, tracing printed with `RUST_LOG`, and the
//! exit statuses they document.

// Each program uses the parts it needs.
#![allow(dead_code)]

use indicatif::{ProgressBar, ProgressStyle};
use livemig::core::protocol::Codec;
use livemig::core::{
    AutoConverge, EngineConfig, ErrorKind, Event, MigrationError, MigrationHandle, Phase,
};
use livemig::units::parse_bandwidth;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The exit statuses every migrating example uses, for `--help`.
pub const EXIT_CODES: &str = "\
Exit status:
  0    the guest was migrated and its memory verified
  1    the migration failed, or did not verify (the source guest runs on)
  2    invalid arguments
  3    cancelled (Ctrl-C) before the point of no return: the source guest
       runs on, dirty tracking off
  4    the outcome is unknown (failed after the point of no return): the
       source guest stays paused until the outcome is settled
  130  a second Ctrl-C, after the migration passed the point of no return

Ctrl-C cancels the migration; after the point of no return it is refused
and the migration goes on (a second Ctrl-C then exits with 130).
RUST_LOG=info prints a span per migration, phase and round with its figures.";

/// The flags that steer a source engine: a bandwidth cap, auto-converge
/// and compression (`#[command(flatten)]` into a program's arguments).
#[derive(clap::Args, Debug)]
pub struct SteerArgs {
    /// Cap the bandwidth of the pre-copy stage (e.g. 500Mbit, 50MB/s).
    #[arg(long, value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<f64>,
    /// Throttle the guest's vCPUs step by step while pre-copy does not
    /// converge (QEMU's auto-converge: 20 %, +10 % a step, at most 99 %).
    #[arg(long)]
    pub auto_converge: bool,
    /// auto-converge: the first throttle, percent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_initial: u8,
    /// auto-converge: the throttle's step, percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_step: u8,
    /// Compress page batches: lz4, or zstd with a level (zstd:3; zstd
    /// alone is level 1). Used if the destination announces the codec;
    /// a batch it does not pay for goes as it is.
    #[arg(long, value_parser = parse_codec)]
    pub compress: Option<Codec>,
}

/// `lz4`, `zstd` or `zstd:LEVEL`.
fn parse_codec(s: &str) -> Result<Codec, String> {
    match s.split_once(':') {
        None if s == "lz4" => Ok(Codec::Lz4),
        None if s == "zstd" => Ok(Codec::Zstd { level: 1 }),
        Some(("zstd", level)) => level
            .parse()
            .map(|level| Codec::Zstd { level })
            .map_err(|_| format!("not a zstd level: {level}")),
        _ => Err(format!("unknown codec {s} (lz4, zstd or zstd:LEVEL)")),
    }
}

impl SteerArgs {
    /// Sets the cap and auto-converge in `engine`.
    pub fn apply(&self, engine: &mut EngineConfig) -> Result<(), Failure> {
        if let Some(bits) = self.max_bandwidth {
            if !(bits.is_finite() && bits >= 8.0) {
                return Err("invalid --max-bandwidth: at least 1 byte a second".into());
            }
            engine.max_bandwidth = Some((bits / 8.0) as u64);
        }
        if self.auto_converge {
            let mut ac = AutoConverge::default();
            ac.initial_pct = self.throttle_initial;
            ac.increment_pct = self.throttle_step;
            engine.auto_converge = Some(ac);
        }
        engine.compression = self.compress;
        Ok(())
    }
}

/// Why a program failed: the migration (its error decides the exit
/// status) or anything else (a message; `invalid...` exits with 2).
pub enum Failure {
    /// The migration failed.
    Migration(MigrationError),
    /// Anything else.
    Other(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Other(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure::Other(s.to_owned())
    }
}

impl Failure {
    /// Prints the failure as `program` and returns the exit status.
    pub fn report(&self, program: &str) -> u8 {
        match self {
            Failure::Migration(e) => {
                eprintln!("{program}: migration failed: {e}");
                exit_status(e)
            }
            Failure::Other(e) => {
                eprintln!("{program}: {e}");
                if e.starts_with("invalid") {
                    2
                } else {
                    1
                }
            }
        }
    }
}

/// Exit status of a cancelled migration.
pub const EXIT_CANCELLED: u8 = 3;
/// Exit status of a migration whose outcome is unknown.
pub const EXIT_SETTLE: u8 = 4;

/// The exit status for a failed migration.
pub fn exit_status(e: &MigrationError) -> u8 {
    match e.kind() {
        ErrorKind::Cancelled => EXIT_CANCELLED,
        ErrorKind::Settle => EXIT_SETTLE,
        _ => 1,
    }
}

/// Prints tracing to stderr as `RUST_LOG` says (nothing when unset), with
/// each span's figures when it closes.
pub fn init_tracing() {
    use tracing_subscriber::fmt::format::FmtSpan;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The handle Ctrl-C cancels, once there is one.
#[derive(Clone, Default)]
pub struct CtrlC {
    handle: Arc<Mutex<Option<MigrationHandle>>>,
    pressed: Arc<AtomicBool>,
}

impl CtrlC {
    /// Installs the Ctrl-C handler.
    pub fn install() -> Result<Self, String> {
        let c = CtrlC::default();
        let c2 = c.clone();
        ctrlc::set_handler(move || {
            if c2.pressed.swap(true, Ordering::SeqCst) {
                let refused = c2
                    .handle
                    .lock()
                    .map(|h| h.as_ref().is_some_and(|h| h.cancel().is_err()))
                    .unwrap_or(true);
                if refused {
                    eprintln!(
                        "second Ctrl-C: exiting; the migration had passed the point of no return"
                    );
                    std::process::exit(130);
                }
            }
            let guard = c2.handle.lock();
            match guard.as_ref().ok().and_then(|h| h.as_ref()) {
                Some(h) => match h.cancel() {
                    Ok(()) => eprintln!("Ctrl-C: cancelling the migration"),
                    Err(e) => eprintln!("Ctrl-C: cannot cancel: {e}"),
                },
                None => eprintln!("Ctrl-C: cancelling before the migration starts"),
            }
        })
        .map_err(|e| format!("installing the Ctrl-C handler: {e}"))?;
        Ok(c)
    }

    /// Ctrl-C now cancels `handle` (and does at once if it was pressed
    /// before).
    pub fn watch(&self, handle: &MigrationHandle) {
        if let Ok(mut h) = self.handle.lock() {
            *h = Some(handle.clone());
        }
        if self.pressed.load(Ordering::SeqCst) {
            let _ = handle.cancel();
        }
    }
}

/// Shows a migration's progress on stderr: a bar (round, share sent,
/// rate, time left) when stderr is a terminal, one line per round
/// otherwise. `ticks` also refreshes the bar every 200 ms from a thread
/// (for a migration in real time).
pub fn show_progress(handle: &MigrationHandle, ticks: bool) {
    if !std::io::stderr().is_terminal() {
        let h = handle.clone();
        handle.on_event(move |e| match e {
            Event::RoundFinished {
                round,
                pages,
                bytes,
                dirtied,
                duration,
                throttle_pct,
            } => {
                let p = h.progress();
                eprintln!(
                    "round {round}: {pages} pages, {:.1} MB in {:.1} ms, {dirtied} dirtied, throttle {throttle_pct}%, {} pending, {:.1} s elapsed",
                    *bytes as f64 / 1e6,
                    duration.as_secs_f64() * 1e3,
                    p.pending_pages,
                    p.elapsed.as_secs_f64()
                )
            }
            Event::SwitchOver { postcopy, reason } => eprintln!(
                "switch-over ({}){}",
                if *postcopy { "post-copy" } else { "stop-and-copy" },
                reason.map(|r| format!(": {}", r.describe())).unwrap_or_default()
            ),
            Event::Throttled { pct } => eprintln!("auto-converge: vCPU throttle {pct}%"),
            _ => {}
        });
        return;
    }
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let update = {
        let bar = bar.clone();
        let h = handle.clone();
        move || {
            let p = h.progress();
            let total = p.guest_pages.max(1);
            let done = total.saturating_sub(p.pending_pages.min(total));
            bar.set_position(done * 1000 / total);
            let left = if p.bandwidth > 0.0 {
                format!(
                    ", {:.1} s left",
                    p.pending_pages as f64 * p.page_size as f64 / p.bandwidth
                )
            } else {
                String::new()
            };
            bar.set_message(format!(
                "{} round {}, {:.0} MB/s{left}{}",
                p.phase.name(),
                p.round,
                p.bandwidth / 1e6,
                if p.throttle_pct > 0 {
                    format!(", throttle {}%", p.throttle_pct)
                } else {
                    String::new()
                }
            ));
            if matches!(p.phase, Phase::Completed | Phase::Failed | Phase::Cancelled) {
                bar.finish_and_clear();
                return false;
            }
            true
        }
    };
    let u2 = update.clone();
    handle.on_event(move |_| {
        u2();
    });
    if ticks {
        std::thread::spawn(move || {
            while update() {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
}

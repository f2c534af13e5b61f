//! Blocking drivers: run an engine over a real [`Transport`].

use crate::backend::{DirtyTracker, GuestControl, PageSink, PageSource};
use crate::engine::{DestStatus, DestinationEngine, DestinationReport, SourceEngine, SourceStep};
use crate::error::MigrationError;
use crate::policy::Policy;
use crate::protocol::abort_frame;
use crate::stats::MigrationStats;
use crate::transport::{Transport, TransportError};
use std::time::Duration;

/// How long a side waits for its peer before giving up (30 s).
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the source to the end over `transport`.
///
/// On failure before the completion record went out, the source guest is
/// running again (resumed if it had been paused) and an abort record was
/// sent to the destination if the transport still worked.
pub fn run_source<T, S, G, P, X>(
    engine: &mut SourceEngine<T, S, G, P>,
    transport: &mut X,
    peer_timeout: Duration,
) -> Result<MigrationStats, MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport + ?Sized,
{
    loop {
        let step = match engine.poll() {
            Ok(s) => s,
            Err(e) => {
                let _ = transport.send(&abort_frame(&e.to_string()));
                return Err(e);
            }
        };
        match step {
            SourceStep::Send(frame) => {
                if let Err(e) = transport.send(&frame) {
                    return Err(engine.fail(e.into()));
                }
                // Pick up an early abort from the destination.
                match transport.recv(Some(Duration::ZERO)) {
                    Ok(Some(f)) => engine.handle_frame(&f)?,
                    Ok(None) => {}
                    Err(e) => return Err(engine.fail(e.into())),
                }
            }
            SourceStep::Wait => match transport.recv(Some(peer_timeout)) {
                Ok(Some(f)) => engine.handle_frame(&f)?,
                Ok(None) => return Err(engine.fail(TransportError::Timeout(peer_timeout).into())),
                Err(e) => return Err(engine.fail(e.into())),
            },
            SourceStep::Done => {
                return engine
                    .stats()
                    .cloned()
                    .ok_or(MigrationError::InvalidUse("done without statistics"))
            }
        }
    }
}

/// Runs the destination until the migration completes here (or fails, in
/// which case a guest not yet resumed is not resumed and an abort is sent
/// back).
///
/// Once the guest is resumed this returns `Ok` even if the confirmation
/// could not be sent; [`DestinationReport::resume_confirmed`] says so.
/// A post-copy destination that loses its source before every page
/// arrived returns [`MigrationError::Incomplete`] naming the missing pages:
/// its guest cannot go on.
///
/// This driver does not serve post-copy faults by itself (the pages are
/// pushed to it in any case); a backend that traps guest faults asks for
/// pages with [`DestinationEngine::request_pages`] between frames.
pub fn run_destination<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    peer_timeout: Duration,
) -> Result<DestinationReport, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    let mut confirmed = false;
    loop {
        let frame = match transport.recv(Some(peer_timeout)) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(lost(engine, TransportError::Timeout(peer_timeout))),
            Err(e) => return Err(lost(engine, e)),
        };
        let status = match engine.handle_frame(&frame) {
            Ok(s) => s,
            Err(e) => {
                let _ = transport.send(&abort_frame(&e.to_string()));
                return Err(e);
            }
        };
        let mut send_error = None;
        while let Some(reply) = engine.poll_transmit() {
            if let Err(e) = transport.send(&reply) {
                send_error = Some(e);
                break;
            }
        }
        match status {
            DestStatus::Continue => {
                if let Some(e) = send_error {
                    return Err(lost(engine, e));
                }
            }
            DestStatus::Resumed => {
                // Post-copy: the guest runs here now; the pages follow.
                if let Some(e) = send_error {
                    return Err(lost(engine, e));
                }
                confirmed = true;
            }
            DestStatus::Completed => {
                // The guest runs here now, whatever happens to the reply.
                let mut report = engine.report().clone();
                report.resume_confirmed = if report.postcopy.is_some() {
                    confirmed
                } else {
                    send_error.is_none()
                };
                if let Some(e) = send_error {
                    tracing::warn!(error = %e, "guest resumed but the source could not be told");
                }
                return Ok(report);
            }
        }
    }
}

fn lost<K, G>(engine: &mut DestinationEngine<K, G>, e: TransportError) -> MigrationError
where
    K: PageSink + PageSource,
    G: GuestControl,
{
    let postcopy = engine.in_postcopy();
    engine.fail();
    if postcopy {
        MigrationError::Incomplete(format!(
            "the source was lost during post-copy ({e}); the guest runs here without all of its memory and cannot go on"
        ))
    } else {
        e.into()
    }
}

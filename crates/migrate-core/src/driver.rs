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

/// Runs the destination until the guest is resumed (or the migration fails,
/// in which case the guest is not resumed and an abort is sent back).
///
/// Once the guest is resumed this returns `Ok` even if the confirmation
/// could not be sent; [`DestinationReport::resume_confirmed`] says so.
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
    loop {
        let frame = match transport.recv(Some(peer_timeout)) {
            Ok(Some(f)) => f,
            Ok(None) => {
                engine.fail();
                return Err(TransportError::Timeout(peer_timeout).into());
            }
            Err(e) => {
                engine.fail();
                return Err(e.into());
            }
        };
        let status = match engine.handle_frame(&frame) {
            Ok(s) => s,
            Err(e) => {
                let _ = transport.send(&abort_frame(&e.to_string()));
                return Err(e);
            }
        };
        if status == DestStatus::Resumed {
            // The guest runs here now, whatever happens to the reply.
            let mut report = engine.report().clone();
            report.resume_confirmed = true;
            while let Some(reply) = engine.poll_transmit() {
                if let Err(e) = transport.send(&reply) {
                    tracing::warn!(error = %e, "guest resumed but the source could not be told");
                    report.resume_confirmed = false;
                }
            }
            return Ok(report);
        }
        while let Some(reply) = engine.poll_transmit() {
            transport.send(&reply)?;
        }
    }
}

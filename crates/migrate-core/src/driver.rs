//! Blocking drivers: run an engine over a real [`Transport`].
//!
//! A driver owns the transport and moves frames; every timer is the
//! engine's ([`SourceEngine::poll_timeout`],
//! [`DestinationEngine::poll_timeout`]). While it waits for a frame it
//! wakes at the engine's next deadline, or every [`CONTROL_TICK`] at the
//! latest, so that a request made through the engine's
//! [`crate::MigrationHandle`] (a cancel, a new bandwidth cap) takes effect
//! within one tick.

use crate::backend::{DirtyTracker, GuestControl, PageSink, PageSource};
use crate::engine::{DestStatus, DestinationEngine, DestinationReport, SourceEngine, SourceStep};
use crate::error::MigrationError;
use crate::page::PageNum;
use crate::policy::Policy;
use crate::stats::MigrationStats;
use crate::transport::{Transport, TransportError};
use std::sync::mpsc::Receiver;
use std::time::Duration;

mod preempt;

use preempt::{Requester, Served, SourceServing};

/// How long a side waits for its peer before giving up (30 s).
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a driver waiting for frames looks at the handle's requests
/// and the engine's timers.
pub const CONTROL_TICK: Duration = Duration::from_millis(20);

/// How long the source reads what the destination sent last after a
/// send failed (its abort may be on the way).
const SEND_FAILURE_GRACE: Duration = Duration::from_millis(200);

/// Runs the source to the end over `transport`.
///
/// Over a transport with a preempt connection
/// ([`Transport::serve_preempt`]) and with memory that can be shared
/// ([`SourceEngine::shared_pages`]), the destination's page requests are
/// answered on that connection's own thread, after the switch-over only,
/// without waiting for this driver; the engine learns what was served.
///
/// Every send and every wait is bounded by `peer_timeout` (the transport's
/// send timeout is set to it), so a peer that stalls, stops reading or
/// vanishes is detected within that time.
///
/// On failure before the point of no return (the completion record in
/// pre-copy, the device state in post-copy, handed to the transport and
/// sent) the source guest is running again (resumed if it had been
/// paused), an abort record was sent to the destination if the transport
/// still worked, and the error's kind is not [`crate::ErrorKind::Settle`].
/// After it the error is [`MigrationError::OutcomeUnknown`]: the source
/// stays paused until the caller settles the outcome.
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
    drive_source(engine, transport, None, peer_timeout)
}

/// How a driver gets a new connection to the same peer after a
/// post-copy's connection broke: the side that dialled dials again, the
/// other accepts again (over TLS, bound to the same `tls::TlsSession`
/// when the feature is on). Any `FnMut(Duration) -> Result<X,
/// TransportError>` is one.
pub trait Reconnect<X> {
    /// A new connection, waiting at most `timeout` for it. An error is
    /// not the end: the driver tries again until the engine's recovery
    /// timeout.
    fn reconnect(&mut self, timeout: Duration) -> Result<X, TransportError>;
}

impl<X, F> Reconnect<X> for F
where
    F: FnMut(Duration) -> Result<X, TransportError>,
{
    fn reconnect(&mut self, timeout: Duration) -> Result<X, TransportError> {
        self(timeout)
    }
}

/// How long a driver waits between attempts at a new connection.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// [`run_source`], recovering a post-copy whose connection breaks: with
/// [`crate::EngineConfig::recover_timeout`] set, when the connection
/// breaks after the switch-over (the transport fails, the destination
/// stays silent past the peer timeout, or a frame from it arrives cut,
/// altered, lost or repeated) the driver closes it and asks `reconnect`
/// for a new one until the recovery timeout, replacing `transport`; the
/// destination then says which pages it holds, and the push goes on
/// with the rest. Past the recovery timeout the source fails with
/// [`MigrationError::OutcomeUnknown`], its guest paused (see
/// `docs/postcopy.md`, *Recovery*). Before the switch-over a failure is
/// handled as by [`run_source`].
pub fn run_source_recoverable<T, S, G, P, X>(
    engine: &mut SourceEngine<T, S, G, P>,
    transport: &mut X,
    reconnect: &mut dyn Reconnect<X>,
    peer_timeout: Duration,
) -> Result<MigrationStats, MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport,
{
    let mut again = |t: &mut X, timeout: Duration| -> Result<(), TransportError> {
        *t = reconnect.reconnect(timeout)?;
        Ok(())
    };
    drive_source(engine, transport, Some(&mut again), peer_timeout)
}

/// Replaces a transport with a new connection, waiting at most the time
/// given.
type Relink<'a, X> = &'a mut dyn FnMut(&mut X, Duration) -> Result<(), TransportError>;

/// A frame for the source engine: `Ok` also when the link broke and the
/// engine now waits for a new connection.
fn source_frame<T, S, G, P>(
    engine: &mut SourceEngine<T, S, G, P>,
    frame: &[u8],
) -> Result<(), MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
{
    match engine.handle_frame(frame) {
        Err(_) if engine.needs_connection() => Ok(()),
        r => r,
    }
}

fn drive_source<T, S, G, P, X>(
    engine: &mut SourceEngine<T, S, G, P>,
    transport: &mut X,
    mut relink: Option<Relink<'_, X>>,
    peer_timeout: Duration,
) -> Result<MigrationStats, MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport + ?Sized,
{
    transport.set_send_timeout(Some(peer_timeout));
    engine.set_peer_timeout(Some(peer_timeout));
    let serving = SourceServing::new();
    if serve_apart(engine, transport, &serving) {
        engine.serve_requests_apart();
    }
    loop {
        take_served(engine, transport, &serving)?;
        if engine.needs_connection() {
            transport.close();
            let Some(relink) = relink.as_mut() else {
                return Err(engine.fail(MigrationError::InvalidUse(
                    "post-copy recovery needs a driver that reconnects",
                )));
            };
            source_reconnect(engine, transport, &mut **relink, peer_timeout)?;
            serve_apart(engine, transport, &serving);
            continue;
        }
        let step = match engine.poll() {
            Ok(s) => s,
            Err(e) => {
                let _ = transport.send(&engine.abort_frame(&e.to_string()));
                return Err(e);
            }
        };
        // Before the switch-over's frames leave: once the destination
        // resumes, its requests may come at any time.
        serving.set_round(engine.request_round());
        match step {
            SourceStep::Send(frame) => {
                if let Err(e) = send_serving(engine, transport, frame)? {
                    // The destination may have said why before it went:
                    // its abort, in sequence and with no resume
                    // confirmation before it, settles that it did not
                    // resume.
                    let grace = peer_timeout.min(SEND_FAILURE_GRACE);
                    while let Ok(Some(f)) = transport.recv(Some(grace)) {
                        source_frame(engine, &f)?;
                        if let Some(stats) = engine.stats() {
                            return Ok(stats.clone());
                        }
                        if engine.needs_connection() {
                            break;
                        }
                    }
                    if engine.needs_connection() {
                        continue;
                    }
                    // After the switch-over, with recovery on, the
                    // post-copy waits for a new connection.
                    if !engine.last_was_commit() && engine.recoverable() {
                        engine.connection_lost(e.into())?;
                        continue;
                    }
                    // A failed send delivered no whole frame (the
                    // transport contract): if this was the point-of-no-
                    // return record, the destination cannot resume.
                    return Err(engine.send_failed(e.into()));
                }
                // Pick up an early abort from the destination.
                match transport.recv(Some(Duration::ZERO)) {
                    Ok(Some(f)) => source_frame(engine, &f)?,
                    Ok(None) => {}
                    Err(e) => engine.connection_lost(e.into())?,
                }
            }
            SourceStep::Wait => {
                // Wait for a frame until the engine's next timer, looking
                // at the handle's requests every CONTROL_TICK.
                let now = engine.now();
                let wait = engine
                    .poll_timeout()
                    .map_or(CONTROL_TICK, |t| t.saturating_sub(now))
                    .min(CONTROL_TICK);
                match transport.recv(Some(wait)) {
                    Ok(Some(f)) => source_frame(engine, &f)?,
                    Ok(None) => {
                        // A destination that gave up waiting for us (its
                        // timer started before ours) says so with an
                        // abort: wait a little for it before calling the
                        // outcome unknown.
                        if engine.peer_timed_out() && engine.committed() && !engine.recoverable() {
                            if let Ok(Some(f)) = transport.recv(Some(SEND_FAILURE_GRACE)) {
                                engine.handle_frame(&f)?;
                                continue;
                            }
                        }
                        if let Err(e) = engine.handle_timeout() {
                            let _ = transport.send(&engine.abort_frame(&e.to_string()));
                            return Err(e);
                        }
                    }
                    Err(e) => engine.connection_lost(e.into())?,
                }
            }
            SourceStep::Done => {
                return engine
                    .stats()
                    .cloned()
                    .ok_or(MigrationError::InvalidUse("done without statistics"))
            }
        }
    }
}

/// Serves the destination's requests on `transport`'s preempt connection,
/// on its own thread, when it has one and the engine's memory can be
/// shared ([`SourceEngine::shared_pages`]).
fn serve_apart<T, S, G, P, X>(
    engine: &SourceEngine<T, S, G, P>,
    transport: &mut X,
    serving: &SourceServing,
) -> bool
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport + ?Sized,
{
    match engine.shared_pages() {
        Some(memory) => serving.install(transport, memory, engine.layout().clone()),
        None => false,
    }
}

/// Tells the engine what the preempt thread served; a failure there
/// (a bad frame, a request before the switch-over) fails the migration,
/// or after the switch-over with recovery on, a damaged frame or a failed
/// link makes the post-copy wait for a new connection.
fn take_served<T, S, G, P, X>(
    engine: &mut SourceEngine<T, S, G, P>,
    transport: &mut X,
    serving: &SourceServing,
) -> Result<(), MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport + ?Sized,
{
    while let Some(s) = serving.take() {
        match s {
            Served::Frame(f) => {
                if let Err(e) = engine.requested_pages_served(&f) {
                    let _ = transport.send(&engine.abort_frame(&e.to_string()));
                    return Err(engine.fail(e));
                }
            }
            Served::Failed(g, e) if g != serving.generation() => {
                // A transport a recovery replaced since.
                tracing::debug!(error = %e, "an earlier preempt connection failed");
            }
            Served::Failed(_, e) if e.is_link_failure() && engine.recoverable() => {
                if !engine.needs_connection() {
                    engine.connection_lost(e)?;
                }
            }
            Served::Failed(_, e) => {
                tracing::warn!(error = %e, "the preempt connection failed");
                let _ = transport.send(&engine.abort_frame(&e.to_string()));
                return Err(engine.fail(e));
            }
        }
    }
    Ok(())
}

/// How long a source whose push is held up by a busy link waits for a
/// frame from the destination before it offers the push frame again.
const PUSH_WAIT: Duration = Duration::from_micros(50);

/// Sends a frame the engine handed out. With the preempt connection on
/// ([`SourceEngine::preempt_active`]) a push frame is offered with
/// [`Transport::try_send`]; while the link holds it up, the driver reads
/// what the destination sent and sends the requested pages it asks for
/// ([`SourceEngine::poll_preempt`]), which the transport carries on their
/// own connection. The inner result is the transport's, for the caller's
/// handling of a failed send; a link that broke while the push waited
/// leaves the engine waiting for a new connection and the frame unsent
/// (the destination then says which pages it holds).
fn send_serving<T, S, G, P, X>(
    engine: &mut SourceEngine<T, S, G, P>,
    transport: &mut X,
    frame: Vec<u8>,
) -> Result<Result<(), TransportError>, MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport + ?Sized,
{
    if !engine.preempt_active() {
        return Ok(transport.send(&frame));
    }
    if frame.first() == Some(&(crate::protocol::RecordType::RequestedPages as u8)) {
        let r = transport.send(&frame);
        tracing::trace!(target: "livemig::fault", "fault: requested pages sent");
        return Ok(r);
    }
    let mut frame = frame;
    loop {
        match transport.try_send(frame) {
            Ok(None) => return Ok(Ok(())),
            Ok(Some(back)) => frame = back,
            Err(e) => return Ok(Err(e)),
        }
        match transport.recv(Some(PUSH_WAIT)) {
            Ok(Some(f)) => source_frame(engine, &f)?,
            Ok(None) => {}
            Err(e) => {
                engine.connection_lost(e.into())?;
                return Ok(Ok(()));
            }
        }
        if engine.needs_connection() {
            return Ok(Ok(()));
        }
        while let Some(p) = engine.poll_preempt()? {
            if let Err(e) = transport.send(&p) {
                return Ok(Err(e));
            }
            tracing::trace!(target: "livemig::fault", "fault: requested pages sent (push held up)");
        }
    }
}

/// Post-copy recovery on the source: a new connection, tried until the
/// engine's recovery timeout.
fn source_reconnect<T, S, G, P, X>(
    engine: &mut SourceEngine<T, S, G, P>,
    transport: &mut X,
    relink: &mut dyn FnMut(&mut X, Duration) -> Result<(), TransportError>,
    peer_timeout: Duration,
) -> Result<(), MigrationError>
where
    T: DirtyTracker,
    S: PageSource,
    G: GuestControl,
    P: Policy,
    X: Transport + ?Sized,
{
    loop {
        // Fails once the recovery timeout has passed.
        engine.handle_timeout()?;
        let now = engine.now();
        let left = engine
            .poll_timeout()
            .map_or(peer_timeout, |t| t.saturating_sub(now))
            .max(Duration::from_millis(1));
        match relink(transport, left) {
            Ok(()) => {
                transport.set_send_timeout(Some(peer_timeout));
                return engine.reconnected();
            }
            Err(e) => {
                tracing::debug!(error = %e, "no new connection to the destination yet");
                std::thread::sleep(RECONNECT_PAUSE.min(left));
            }
        }
    }
}

/// What a backend that traps the guest's accesses to missing pages gives
/// the destination driver ([`run_destination`]): the faults its handler
/// saw, and what to do when the migration ends. KVM's userfaultfd handler
/// and Xen's memory pager are two; a bare [`Receiver`] of [`Faults`] is
/// one with nothing to finish.
pub trait FaultSource {
    /// The faults, as the backend's handler reports them.
    fn faults(&self) -> &Receiver<Faults>;

    /// The same receiver, for the driver to lend to a thread of its own
    /// while the migration runs (it is back before
    /// [`FaultSource::finish`] or [`FaultSource::abandon`]): over a
    /// transport with a preempt connection, a requester thread sends each
    /// fault's request there the moment it is reported. `None`, the
    /// default, keeps the requests in the driver's loop.
    fn faults_mut(&mut self) -> Option<&mut Receiver<Faults>> {
        None
    }

    /// Has the backend's handler thread hand each report to `deliver`
    /// itself, on that thread, instead of sending it down the channel
    /// (`None`: back to the channel); `false`, the default, when it
    /// cannot. Over a transport with a preempt connection the driver uses
    /// it to send each request from the handler's thread the moment the
    /// fault is read, and takes it back before [`FaultSource::finish`] or
    /// [`FaultSource::abandon`]. `deliver` must not block for long: it
    /// writes one small frame.
    fn deliver_to(&mut self, deliver: Option<FaultDelivery>) -> bool {
        let _ = deliver;
        false
    }

    /// Every page arrived: leave fault-serving mode (KVM: userfaultfd;
    /// Xen: memory paging).
    fn finish(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }

    /// The migration failed after the guest resumed here with pages still
    /// missing: stop the guest where it is (it cannot go on).
    fn abandon(&mut self) {}
}

/// What a backend's fault handler calls with each report, on its own
/// thread ([`FaultSource::deliver_to`]).
pub type FaultDelivery = Box<dyn FnMut(Faults) + Send>;

impl FaultSource for Receiver<Faults> {
    fn faults(&self) -> &Receiver<Faults> {
        self
    }

    fn faults_mut(&mut self) -> Option<&mut Receiver<Faults>> {
        Some(self)
    }
}

/// Runs the destination until the migration completes here (or fails, in
/// which case a guest not yet resumed is not resumed and an abort is sent
/// back). This is the destination driver of every backend.
///
/// Once the guest is resumed this returns `Ok` even if the confirmation
/// could not be sent; [`DestinationReport::resume_confirmed`] says so.
/// A post-copy destination that loses its source before every page
/// arrived returns [`MigrationError::SourceLost`] (kind
/// [`crate::ErrorKind::Settle`]): its guest cannot go on, and the rest of
/// its memory is on the paused source.
///
/// With `faults`, while the guest runs in post-copy the driver asks the
/// source for the pages the backend's handler reports, ahead of the
/// pushed ones: it hands each [`Faults`] to
/// [`DestinationEngine::request_pages_at`] and sends the requests, looking
/// after every frame and every [`FAULT_POLL`] while none arrives. Over
/// a transport with a preempt connection ([`Transport::preempt_link`])
/// each request leaves on that connection as soon as the fault is
/// reported instead: from the backend's handler thread where it can send
/// ([`FaultSource::deliver_to`]), or from a requester thread blocked on
/// the fault channel the backend lends ([`FaultSource::faults_mut`]); the
/// driver records it in the engine
/// ([`DestinationEngine::requests_sent_at`]) before it hands over any
/// frame. Once the guest runs here, the pages that answer them are
/// placed on that connection's reader thread where the memory can share
/// a placer ([`DestinationEngine::preempt_placing`]), and the driver
/// takes them in ([`DestinationEngine::absorb_placed`]) after it records
/// the requests and before each frame. When
/// every page has arrived it calls [`FaultSource::finish`]; if the source
/// is lost after the guest resumed, [`FaultSource::abandon`]. Without
/// `faults` the pages are pushed all the same, and a guest that touches
/// one before it arrives is the backend's business.
pub fn run_destination<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    faults: Option<&mut dyn FaultSource>,
    peer_timeout: Duration,
) -> Result<DestinationReport, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    serve_destination(engine, transport, faults, None, peer_timeout)
}

/// [`run_destination`], recovering a post-copy whose connection breaks:
/// with [`DestinationEngine::set_recover_timeout`] set and a source that
/// named its session, when the connection breaks after the guest resumed
/// here (the transport fails, the source stays silent past the peer
/// timeout, or a frame arrives cut, altered, lost or repeated) the guest
/// runs on — a vCPU that needs a missing page waits, its fault recorded —
/// and the driver closes the connection and asks `reconnect` for a new
/// one (it accepts the source's next connection), replacing `transport`.
/// A connection that does not resume this session is dropped and the wait
/// goes on. On the source's return the destination says which pages it
/// holds, asks again for the faults outstanding, and the migration ends
/// as usual. Past the recovery timeout it fails with
/// [`MigrationError::SourceLost`] and calls [`FaultSource::abandon`].
pub fn run_destination_recoverable<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    faults: Option<&mut dyn FaultSource>,
    reconnect: &mut dyn Reconnect<X>,
    peer_timeout: Duration,
) -> Result<DestinationReport, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport,
{
    let mut again = |t: &mut X, timeout: Duration| -> Result<(), TransportError> {
        *t = reconnect.reconnect(timeout)?;
        Ok(())
    };
    serve_destination(engine, transport, faults, Some(&mut again), peer_timeout)
}

fn serve_destination<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    faults: Option<&mut dyn FaultSource>,
    relink: Option<Relink<'_, X>>,
    peer_timeout: Duration,
) -> Result<DestinationReport, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    let Some(source) = faults else {
        return drive_destination(engine, transport, None, relink, peer_timeout);
    };
    // With a preempt connection, requests leave from the backend's fault
    // handler thread, or from a thread of their own woken by the fault.
    let requester = if transport.preempt_link().is_some() {
        Requester::on_handler(source).or_else(|| match source.faults_mut() {
            Some(rx) => {
                let (_, idle) = std::sync::mpsc::channel();
                match Requester::start(std::mem::replace(rx, idle)) {
                    Ok(r) => Some(r),
                    Err(back) => {
                        *rx = back;
                        None
                    }
                }
            }
            None => None,
        })
    } else {
        None
    };
    let result = match &requester {
        Some(r) => drive_destination(
            engine,
            transport,
            Some(FaultFeed::Apart(r)),
            relink,
            peer_timeout,
        ),
        None => drive_destination(
            engine,
            transport,
            Some(FaultFeed::Plain(source.faults())),
            relink,
            peer_timeout,
        ),
    };
    if let Some(r) = requester {
        r.stop(source);
    }
    match result {
        Ok(report) => {
            source.finish()?;
            Ok(report)
        }
        Err(e) => {
            if engine.resumed() {
                source.abandon();
            }
            Err(e)
        }
    }
}

/// Pages the destination's guest touched and does not have, as a
/// backend's fault handler saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults {
    /// The pages.
    pub pages: Vec<PageNum>,
    /// When the faults were seen, on the engine's clock: the fault
    /// latency of each page is measured from here until it is placed.
    pub at: Duration,
}

/// How often a post-copy destination looks for faults while no frame
/// arrives (when its requests go through its loop).
pub const FAULT_POLL: Duration = Duration::from_micros(100);

/// Where the destination driver gets the faults: straight from the
/// backend, or from the requester thread, which sent their requests on
/// the preempt connection already.
#[derive(Clone, Copy)]
enum FaultFeed<'a> {
    Plain(&'a Receiver<Faults>),
    Apart(&'a Requester),
}

impl FaultFeed<'_> {
    /// Hands every fault reported so far to the engine: queued to be
    /// sent, or recorded when the requester sent it already.
    fn record<K, G>(&self, engine: &mut DestinationEngine<K, G>) -> Result<(), MigrationError>
    where
        K: PageSink + PageSource,
        G: GuestControl,
    {
        match self {
            FaultFeed::Plain(rx) => {
                while let Ok(f) = rx.try_recv() {
                    engine.request_pages_at(&f.pages, f.at)?;
                }
            }
            FaultFeed::Apart(r) => {
                while let Ok(f) = r.sent.try_recv() {
                    engine.requests_sent_at(&f.pages, f.at)?;
                }
            }
        }
        Ok(())
    }

    /// The requester sends on `transport`'s preempt connection (`Some`),
    /// or on none.
    fn link<X: Transport + ?Sized>(&self, transport: Option<&X>) {
        if let FaultFeed::Apart(r) = self {
            r.set_link(transport.and_then(|t| t.preempt_link()));
        }
    }
}

fn drive_destination<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    faults: Option<FaultFeed<'_>>,
    mut relink: Option<Relink<'_, X>>,
    peer_timeout: Duration,
) -> Result<DestinationReport, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    transport.set_send_timeout(Some(peer_timeout));
    engine.set_peer_timeout(Some(peer_timeout));
    let mut confirmed = false;
    // Recovering: whether the connection in hand is to be replaced, and
    // when the one in hand came (a new one that does not resume the
    // session within the peer timeout is dropped).
    let mut need_link = false;
    let mut linked_at = engine.now();
    // Whether the requester sends on this transport's preempt connection.
    let mut requesting = false;
    // Whether requested pages are placed on this transport's preempt
    // thread, or that was tried.
    let mut placing = false;
    loop {
        if engine.recovering()
            && (need_link || engine.now().saturating_sub(linked_at) >= peer_timeout)
        {
            if let Some(feed) = faults {
                feed.link::<X>(None);
                requesting = false;
            }
            transport.close();
            let Some(relink) = relink.as_mut() else {
                engine.fail();
                return Err(MigrationError::SourceLost(
                    "the connection broke and this driver does not reconnect".into(),
                ));
            };
            destination_reconnect(engine, transport, faults, &mut **relink, peer_timeout)?;
            placing = false;
            need_link = false;
            linked_at = engine.now();
            continue;
        }
        let serving = faults.filter(|_| engine.in_postcopy() && !engine.recovering());
        if let Some(feed) = faults {
            // Once the guest runs here (the source answers only after its
            // switch-over); not while recovering (the connection in hand
            // may not resume the session).
            if serving.is_some() != requesting {
                requesting = serving.is_some();
                feed.link(Some(&*transport).filter(|_| requesting));
            }
        }
        if !placing && engine.in_postcopy() && !engine.recovering() {
            // The requested pages are placed on the preempt connection's
            // thread from now on, where the transport and the memory can.
            placing = true;
            if transport.preempt_link().is_some() {
                if let Some(serve) = engine.preempt_placing() {
                    if !transport.serve_preempt(serve) {
                        tracing::debug!("requested pages go through the driver");
                    }
                }
            }
        }
        if let Some(feed) = serving {
            if let Err(e) = feed.record(engine) {
                let _ = transport.send(&engine.abort_frame(&e.to_string()));
                engine.fail();
                return Err(e);
            }
            while let Some(request) = engine.poll_transmit() {
                if let Err(e) = transport.send(&request) {
                    engine.connection_lost(e.into())?;
                    need_link = true;
                    break;
                }
                tracing::trace!(target: "livemig::fault", "fault: request sent");
            }
            if need_link {
                continue;
            }
        }
        if absorb_placed(engine, transport)? {
            need_link = true;
            continue;
        }
        let was_recovering = engine.recovering();
        if let Err(e) = engine.handle_timeout() {
            if !engine.resumed() {
                // Tell the source, in sequence, that the guest was not
                // resumed here: it may then resume its own.
                let _ = transport.send(&engine.abort_frame(&e.to_string()));
            }
            return Err(e);
        }
        if engine.recovering() && !was_recovering {
            // The source was silent past the peer timeout.
            need_link = true;
            continue;
        }
        let wait = if matches!(serving, Some(FaultFeed::Plain(_))) {
            FAULT_POLL
        } else {
            let now = engine.now();
            engine
                .poll_timeout()
                .map_or(CONTROL_TICK, |t| t.saturating_sub(now))
                .min(CONTROL_TICK)
        };
        let frame = match transport.recv(Some(wait)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                engine.connection_lost(e.into())?;
                need_link = true;
                continue;
            }
        };
        // A request that left from the requester's thread is recorded
        // before any frame that may answer it is handled, and before the
        // pages the preempt thread placed are taken in.
        if let Some(feed @ FaultFeed::Apart(_)) = faults.filter(|_| engine.in_postcopy()) {
            if let Err(e) = feed.record(engine) {
                let _ = transport.send(&engine.abort_frame(&e.to_string()));
                engine.fail();
                return Err(e);
            }
        }
        if absorb_placed(engine, transport)? {
            need_link = true;
            continue;
        }
        let status = match engine.handle_frame(&frame) {
            Ok(s) => s,
            Err(_) if engine.recovering() => {
                // The link broke, or a new connection was not the
                // session's: wait for another.
                need_link = true;
                continue;
            }
            Err(e) => {
                let _ = transport.send(&engine.abort_frame(&e.to_string()));
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
            DestStatus::Continue | DestStatus::Resumed => {
                if let Some(e) = send_error {
                    engine.connection_lost(e.into())?;
                    need_link = true;
                    continue;
                }
                if status == DestStatus::Resumed {
                    // Post-copy: the guest runs here now; the pages follow.
                    confirmed = true;
                }
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

/// Takes in the pages the preempt thread placed
/// ([`DestinationEngine::absorb_placed`]); `true` when its failure broke
/// a link that a recovery waits out. Any other failure is told to the
/// source and returned.
fn absorb_placed<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
) -> Result<bool, MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    match engine.absorb_placed() {
        Ok(()) => Ok(false),
        Err(_) if engine.recovering() => Ok(true),
        Err(e) => {
            let _ = transport.send(&engine.abort_frame(&e.to_string()));
            Err(e)
        }
    }
}

/// Post-copy recovery on the destination: a new connection, tried
/// until the engine's recovery timeout, with the guest's faults recorded
/// meanwhile.
fn destination_reconnect<K, G, X>(
    engine: &mut DestinationEngine<K, G>,
    transport: &mut X,
    faults: Option<FaultFeed<'_>>,
    relink: &mut dyn FnMut(&mut X, Duration) -> Result<(), TransportError>,
    peer_timeout: Duration,
) -> Result<(), MigrationError>
where
    K: PageSink + PageSource,
    G: GuestControl,
    X: Transport + ?Sized,
{
    loop {
        if let Some(feed) = faults {
            feed.record(engine)?;
        }
        // What a former connection's preempt thread placed: held, and
        // said so to the source.
        engine.absorb_placed()?;
        // Fails once the recovery timeout has passed.
        engine.handle_timeout()?;
        let now = engine.now();
        let left = engine
            .poll_timeout()
            .map_or(peer_timeout, |t| t.saturating_sub(now))
            .clamp(Duration::from_millis(1), RECOVERY_TICK);
        match relink(transport, left) {
            Ok(()) => {
                transport.set_send_timeout(Some(peer_timeout));
                return Ok(());
            }
            Err(TransportError::Timeout(_)) => {}
            Err(e) => {
                tracing::debug!(error = %e, "no new connection from the source yet");
                std::thread::sleep(RECONNECT_PAUSE.min(left));
            }
        }
    }
}

/// How long a recovering destination waits for a connection at a time
/// before it looks at the guest's faults and its timers again.
const RECOVERY_TICK: Duration = Duration::from_millis(100);

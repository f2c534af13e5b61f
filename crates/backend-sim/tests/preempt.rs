//! Post-copy with a preempt connection: requested pages on a connection
//! of their own, ahead of the push, over TCP and a Unix socket; requests
//! answered on the connection's own thread while the source's driver is
//! stuck in the push; why a requested page placed first is never
//! overwritten by its push copy; and what a cut preempt connection and
//! bad preempt frames, in either direction, do.

use backend_sim::{SimControl, SimGuest, SimPages, SimTracker};
use bytes::Bytes;
use migrate_core::driver::{run_destination, run_source, FaultDelivery, FaultSource, Faults};
use migrate_core::protocol::{
    encode_page_batch, encode_to_vec, reseal, Capabilities, Decoder, ProtocolError, Record,
    RecordType, Sequencer, VERSION,
};
use migrate_core::transport::{PreemptLink, PreemptServe, Transport, TransportError};
use migrate_core::{
    Clock, DestinationEngine, DestinationReport, EngineConfig, MigrationError, MultiTransport,
    PageSink, PageSize, PageSource, PostCopy, SourceEngine, SourceStep,
};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{guests, TIMEOUT};

/// Engine settings with the preempt connection on.
fn preempt_config() -> EngineConfig {
    let mut c = EngineConfig::default();
    c.postcopy_preempt = true;
    c
}

/// Pages the destination's guest "touched" before anything arrived:
/// queued before the migration starts, they are asked for as soon as the
/// guest resumes, when no pushed page has arrived yet.
fn early_faults(dst: &SimGuest) -> (mpsc::Receiver<Faults>, Vec<u64>) {
    let end = dst.layout().page_end();
    let pages: Vec<u64> = vec![end - 1, end / 2, end / 3 + 7, 5];
    let (tx, rx) = mpsc::channel();
    tx.send(Faults {
        pages: pages.clone(),
        at: Duration::ZERO,
    })
    .unwrap();
    (rx, pages)
}

/// A post-copy source engine over `src` with the preempt connection on.
fn preempt_source(src: &SimGuest, clock: Arc<dyn Clock>) -> Source {
    SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        PostCopy::default(),
        clock,
        preempt_config(),
    )
}

type Source = SourceEngine<SimTracker, SimPages, SimControl, PostCopy>;
type DestThread = std::thread::JoinHandle<Result<DestinationReport, MigrationError>>;

/// Runs the destination of `dst` over `t` on its own thread, its guest
/// having touched the pages of [`early_faults`] (returned) first.
fn spawn_faulting_destination<T: Transport + 'static>(
    dst: &SimGuest,
    clock: &Arc<dyn Clock>,
    t: T,
) -> (DestThread, Vec<u64>) {
    let (faults, asked) = early_faults(dst);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = t;
        let mut faults = faults;
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        run_destination(&mut e, &mut t, Some(&mut faults), TIMEOUT)
    });
    (dest, asked)
}

/// A post-copy of a fresh 32 MiB guest over `src_t` (source) and `dst_t`
/// (destination) with the preempt connection, its destination guest
/// faulting at the resume: memory verifies, no page is missing, and the
/// early faults were asked for.
fn verified_postcopy<A, B>(src_t: A, dst_t: B) -> (migrate_core::MigrationStats, DestinationReport)
where
    A: Transport + 'static,
    B: Transport + 'static,
{
    let (src, dst, clock) = guests(32 << 20, 20_000.0);
    let (dest, asked) = spawn_faulting_destination(&dst, &clock, dst_t);
    let mut t = src_t;
    let mut e = preempt_source(&src, clock);
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("source");
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified);
    assert_eq!(report.digest.unwrap(), src.digest());
    assert_eq!(dst.absent_pages(), 0);
    let pc = stats.postcopy.as_ref().expect("post-copy");
    assert!(
        pc.requests >= asked.len() as u64,
        "{} requests",
        pc.requests
    );
    (stats, report)
}

/// A post-copy over `src_t` (source) and `dst_t` (destination) with the
/// preempt connection: memory verifies, and every requested page went as
/// requested pages, which the transport puts on the preempt connection.
fn postcopy_over<A, B>(src_t: A, dst_t: B)
where
    A: Transport + 'static,
    B: Transport + 'static,
{
    let (stats, report) = verified_postcopy(src_t, dst_t);
    let pc = stats.postcopy.clone().expect("post-copy");
    assert_eq!(
        pc.preempt_pages, pc.requests,
        "every requested page went as requested pages"
    );
    assert!(pc.preempt_bytes > 0 && pc.preempt_bytes <= pc.bytes);
    assert_eq!(report.preempt_pages, pc.preempt_pages, "and all arrived");
    // A requested page the push had sent already arrives twice: the
    // second copy is counted, not placed.
    let dp = report.postcopy.expect("post-copy report");
    assert_eq!(dp.duplicates, pc.pages - stats.guest_pages);
}

#[test]
fn postcopy_with_a_preempt_connection_over_tcp_and_a_unix_socket() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || {
        MultiTransport::accept(|| {
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .unwrap()
    });
    let client = MultiTransport::connect_preempt(1, || {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
    .unwrap();
    let server = acceptor.join().unwrap();
    assert!(client.has_preempt() && server.has_preempt());
    assert_eq!(server.connections(), 3);
    postcopy_over(client, server);

    let dir = std::env::temp_dir().join(format!("livemig-preempt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("migrate.sock");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    let acceptor =
        std::thread::spawn(move || MultiTransport::accept(|| Ok(l.accept()?.0)).unwrap());
    let client = MultiTransport::connect_preempt(2, || UnixStream::connect(&path)).unwrap();
    let server = acceptor.join().unwrap();
    assert_eq!(server.connections(), 4);
    // The destination dials here, as `kvm-migrate` does.
    postcopy_over(server, client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without the preempt connection the same settings still migrate:
/// requested pages go first in the push, as plain page batches.
#[test]
fn preempt_settings_over_a_single_connection_fall_back_to_the_push_when_the_peer_says_nothing() {
    // A destination that does not announce the capability: its
    // capabilities record is rewritten on the way.
    struct NoPreempt<T: Transport>(T);
    impl<T: Transport> Transport for NoPreempt<T> {
        fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
            if frame.first() == Some(&(RecordType::Capabilities as u8)) {
                let mut f = frame.to_vec();
                f[16] &= !(Capabilities::PREEMPT.0 as u8);
                reseal(&mut f);
                return self.0.send(&f);
            }
            self.0.send(frame)
        }
        fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
            self.0.recv(timeout)
        }
    }
    let (src, dst, clock) = guests(16 << 20, 20_000.0);
    let (a, b) = migrate_core::transport::channel_pair(8);
    let (dest, _) = spawn_faulting_destination(&dst, &clock, NoPreempt(b));
    let mut t = a;
    let mut e = preempt_source(&src, clock);
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("source");
    assert!(!e.preempt_active());
    let report = dest.join().unwrap().expect("destination");
    assert_eq!(report.digest.unwrap(), src.digest());
    let pc = stats.postcopy.unwrap();
    assert!(pc.requests > 0);
    assert_eq!((pc.preempt_pages, report.preempt_pages), (0, 0));
    assert_eq!(pc.pages, stats.guest_pages, "each page once");
}

/// A source and a destination engine pumped by hand, frames passed
/// straight through, until the destination's guest resumed; the pages of
/// the push frames handed out since can be read with `batch_pages`.
struct Pump {
    src: SimGuest,
    dst: SimGuest,
    s: Source,
    d: DestinationEngine<SimPages, SimControl>,
}

impl Pump {
    fn to_resume() -> Pump {
        let (src, dst, clock): (SimGuest, SimGuest, Arc<dyn Clock>) = guests(8 << 20, 20_000.0);
        let s = preempt_source(&src, clock.clone());
        let d = DestinationEngine::new(dst.pages(), dst.control(), clock);
        let mut p = Pump { src, dst, s, d };
        while !p.d.resumed() {
            let f = p.next_frame();
            p.deliver(&f);
        }
        assert!(p.s.preempt_active());
        p
    }

    /// The source's next frame (it never waits here: every reply was
    /// handed back).
    fn next_frame(&mut self) -> Vec<u8> {
        match self.s.poll().unwrap() {
            SourceStep::Send(f) => f,
            other => panic!("the source did not send: {other:?}"),
        }
    }

    /// Hands a frame to the destination and its replies to the source.
    fn deliver(&mut self, f: &[u8]) {
        self.d.handle_frame(f).unwrap();
        while let Some(r) = self.d.poll_transmit() {
            self.s.handle_frame(&r).unwrap();
        }
    }

    /// The first push frame, not delivered (held back, as a slow data
    /// connection would); the frames before it delivered.
    fn first_push(&mut self) -> Vec<u8> {
        loop {
            let f = self.next_frame();
            if f[0] == RecordType::PageBatch as u8 {
                return f;
            }
            self.deliver(&f);
        }
    }

    /// The guest faults on `page`: its request goes to the source, and
    /// the source's answer, a requested-pages frame, comes back
    /// undelivered.
    fn ask(&mut self, page: u64) -> Vec<u8> {
        self.d.request_pages(&[page]).unwrap();
        while let Some(r) = self.d.poll_transmit() {
            self.s.handle_frame(&r).unwrap();
        }
        let pre = self.next_frame();
        assert_eq!(
            pre[0],
            RecordType::RequestedPages as u8,
            "ahead of the push"
        );
        pre
    }

    /// The pages of a page-batch frame and the data of its first page.
    fn batch_pages(&self, f: &[u8]) -> (Vec<u64>, Option<Vec<u8>>) {
        // A decoder that checks frames on their own, told the stream's
        // header and layout.
        let mut plain = Decoder::new();
        for rec in [
            Record::Header { version: VERSION },
            Record::Layout(self.src.layout().clone()),
        ] {
            plain.decode(&encode_to_vec(&rec)).unwrap();
        }
        match plain.decode(f).unwrap() {
            Record::PageBatch(b) => {
                let first = b.iter().next().and_then(|(_, d)| d.map(<[u8]>::to_vec));
                (b.iter().map(|(p, _)| p).collect(), first)
            }
            other => panic!("not a page batch: {:?}", other.record_type()),
        }
    }
}

/// The ordering rule of the preempt connection holds and is needed: a
/// requested page that arrives ahead of the push copy the source sent
/// first is placed, the guest writes it, and the push copy arriving
/// after it is counted as a duplicate and not placed; placing it would
/// have lost the guest's write. The migration completes verified.
#[test]
fn a_requested_page_placed_first_keeps_the_guests_write_when_its_push_copy_arrives() {
    let mut p = Pump::to_resume();
    // The first push frame, held back (as a slow data connection would).
    let held = p.first_push();
    let (pages, first) = p.batch_pages(&held);
    let page = pages[0];
    let push_copy = first.unwrap_or_else(|| vec![0; 4096]);
    // The guest touches it: asked for, sent again ahead of the push.
    let pre = p.ask(page);
    p.deliver(&pre);
    assert!(p.d.has_page(page));
    // The guest runs on and writes the page.
    let written = vec![0xA5u8; 4096];
    assert_ne!(written, push_copy, "the push copy differs from the write");
    p.dst.pages().write_page(page, &written).unwrap();
    // Now the held push copy arrives, then the rest.
    p.deliver(&held);
    let mut now = vec![0u8; 4096];
    p.dst.pages().read_pages(&[page], &mut now).unwrap();
    assert_eq!(
        now, written,
        "the older push copy did not overwrite the write"
    );
    while !p.d.completed() {
        let f = p.next_frame();
        p.deliver(&f);
    }
    assert!(matches!(p.s.poll().unwrap(), SourceStep::Done));
    let stats = p.s.stats().unwrap().clone();
    assert!(stats.memory_verified);
    let report = p.d.report();
    assert_eq!(report.postcopy.unwrap().duplicates, 1);
    assert_eq!(report.preempt_pages, 1);
    let pc = stats.postcopy.unwrap();
    assert_eq!((pc.requests, pc.preempt_pages), (1, 1));
    assert_eq!(pc.pages, stats.guest_pages + 1, "one page twice");
}

/// Requested pages numbered out of their own order, or sent before
/// post-copy, are refused with typed errors.
#[test]
fn bad_requested_pages_are_refused() {
    let mut p = Pump::to_resume();
    let page = p.src.layout().page_end() - 1;
    let pre = p.ask(page);
    p.d.handle_frame(&pre).unwrap();
    // The same frame again: a repeated frame of the preempt numbering.
    let r = p.d.handle_frame(&pre);
    assert!(
        matches!(
            r,
            Err(MigrationError::Protocol(
                ProtocolError::OutOfSequence { .. }
            ))
        ),
        "{r:?}"
    );

    // Before the guest runs here: out of place.
    let (_, dst, clock) = guests(8 << 20, 20_000.0);
    let mut d = DestinationEngine::new(dst.pages(), dst.control(), clock);
    let mut seq = Sequencer::new();
    let mut f = encode_to_vec(&Record::Header { version: VERSION });
    seq.seal(&mut f);
    d.handle_frame(&f).unwrap();
    let mut batch = Vec::new();
    encode_page_batch(0, PageSize::DEFAULT, &[1], &[7u8; 4096], &mut batch);
    batch[0] = RecordType::RequestedPages as u8;
    reseal(&mut batch);
    Sequencer::new().seal(&mut batch);
    let r = d.handle_frame(&batch);
    assert!(
        matches!(
            r,
            Err(MigrationError::UnexpectedRecord {
                got: RecordType::RequestedPages,
                ..
            })
        ),
        "{r:?}"
    );
    // A damaged one: its CRC.
    let mut p = Pump::to_resume();
    let page = p.src.layout().page_end() - 2;
    let mut pre = p.ask(page);
    let at = pre.len() - 100;
    pre[at] ^= 1;
    let r = p.d.handle_frame(&pre);
    assert!(
        matches!(
            r,
            Err(MigrationError::Protocol(
                ProtocolError::FrameChecksum { .. }
            ))
        ),
        "{r:?}"
    );
}

/// Paces the push: each page batch waits `per_batch` (so that a
/// post-copy push lasts long enough for a cut to land in it), and the
/// first one waits, besides, until `gate` opens or its sender is gone (the
/// source's driver is then stuck inside the push). With `preempt` the
/// preempt connection is passed on, so that the source serves requests on
/// its thread; without, requests reach the source's engine through
/// `recv`.
struct Paced<T: Transport> {
    inner: T,
    per_batch: Duration,
    gate: Option<mpsc::Receiver<()>>,
    preempt: bool,
}

impl<T: Transport> Paced<T> {
    /// Page batches no faster than one per `per_batch`.
    fn slow(inner: T, per_batch: Duration, preempt: bool) -> Self {
        Paced {
            inner,
            per_batch,
            gate: None,
            preempt,
        }
    }
}

impl<T: Transport> Transport for Paced<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if frame.first() == Some(&(RecordType::PageBatch as u8)) {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            std::thread::sleep(self.per_batch);
        }
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        self.inner.recv(timeout)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_send_timeout(timeout)
    }
    fn close(&mut self) {
        self.inner.close()
    }
    fn preempt_link(&self) -> Option<PreemptLink> {
        self.inner.preempt_link().filter(|_| self.preempt)
    }
    fn serve_preempt(&mut self, serve: PreemptServe) -> bool {
        self.preempt && self.inner.serve_preempt(serve)
    }
}

/// The preempt connection cut once the guest runs on the destination is
/// a broken link: without recovery the destination fails with
/// `SourceLost` (its guest cannot go on) and the source with the outcome
/// to settle, its guest paused.
#[test]
fn a_cut_preempt_connection_is_a_broken_link() {
    let (src, dst, clock) = guests(32 << 20, 20_000.0);
    let (a, b): (Vec<UnixStream>, Vec<UnixStream>) =
        (0..3).map(|_| UnixStream::pair().unwrap()).unzip();
    let cut = a[2].try_clone().unwrap();
    let mut b = b.into_iter();
    let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
    let mut a = a.into_iter();
    let tx = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap())).unwrap();
    let rx = acceptor.join().unwrap().unwrap();
    let (dest, _) = spawn_faulting_destination(&dst, &clock, rx);
    // 8,192 pages in batches of 16, one every 20 ms: ten seconds of push.
    // Requests reach the source's engine through `recv`.
    let mut t = Paced::slow(tx, Duration::from_millis(20), false);
    // Cut once a requested page came on the first preempt connection:
    // the last page, which the push reaches only at its end (a cut at the
    // resume alone could beat the first requests, which would then all be
    // asked again and answered over the new set).
    let (d, last) = (dst.clone(), dst.layout().page_end() - 1);
    let cutter = std::thread::spawn(move || {
        wait_for("the resume", || d.resumed_at().is_some());
        wait_for("the last page", || !d.is_absent(last));
        cut.shutdown(std::net::Shutdown::Both).unwrap();
    });
    let mut e = preempt_source(&src, clock);
    let r = run_source(&mut e, &mut t, TIMEOUT);
    cutter.join().unwrap();
    assert!(matches!(r, Err(MigrationError::OutcomeUnknown(_))), "{r:?}");
    assert!(src.is_paused(), "the source keeps its guest paused");
    drop(t);
    let r = dest.join().unwrap();
    assert!(matches!(r, Err(MigrationError::SourceLost(_))), "{r:?}");
    assert!(dst.absent_pages() > 0, "the push never finished");
}

/// With post-copy recovery on, a cut preempt connection is recovered
/// from as any broken link: both sides take a new set of connections
/// (preempt connection included), the destination says which pages it
/// holds and asks again for the faults outstanding, and the migration
/// verifies.
#[test]
fn a_cut_preempt_connection_is_recovered_from() {
    use migrate_core::driver::{run_destination_recoverable, run_source_recoverable};
    use migrate_core::transport::accept_within;

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (src, dst, clock) = guests(8 << 20, 20_000.0);
    let (faults, _) = early_faults(&dst);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        let take = |left: Duration| {
            MultiTransport::accept(|| accept_within(&l, left).map_err(std::io::Error::other))
        };
        let mut t = take(TIMEOUT).unwrap();
        let mut faults = faults;
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        e.set_recover_timeout(Some(TIMEOUT));
        let mut again = |left: Duration| take(left);
        run_destination_recoverable(&mut e, &mut t, Some(&mut faults), &mut again, TIMEOUT)
    });
    // The first set's preempt connection, to cut it.
    let mut preempt = None;
    let mut n = 0;
    let first = MultiTransport::connect_preempt(1, || {
        let s = TcpStream::connect(addr)?;
        n += 1;
        if n == 3 {
            preempt = Some(s.try_clone()?);
        }
        Ok(s)
    })
    .unwrap();
    let cut = preempt.unwrap();
    // 2,048 pages in batches of 16, one every 20 ms: 2.6 s of push.
    // Requests served on the preempt connection's thread, on each set.
    let slow = |t: MultiTransport<TcpStream>| Paced::slow(t, Duration::from_millis(20), true);
    let mut t = slow(first);
    // Cut once a requested page came on the first preempt connection:
    // the last page, which the push reaches only at its end (a cut at the
    // resume alone could beat the first requests, which would then all be
    // asked again and answered over the new set).
    let (d, last) = (dst.clone(), dst.layout().page_end() - 1);
    let cutter = std::thread::spawn(move || {
        wait_for("the resume", || d.resumed_at().is_some());
        wait_for("the last page", || !d.is_absent(last));
        cut.shutdown(std::net::Shutdown::Both).unwrap();
    });
    let mut config = preempt_config();
    config.recover_timeout = Some(TIMEOUT);
    let mut e = SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        PostCopy::default(),
        clock,
        config,
    );
    let mut again =
        |_left: Duration| MultiTransport::connect_preempt(1, || TcpStream::connect(addr)).map(slow);
    let stats = run_source_recoverable(&mut e, &mut t, &mut again, TIMEOUT).expect("source");
    cutter.join().unwrap();
    let report = dest.join().unwrap().expect("destination");
    let pc = stats.postcopy.unwrap();
    assert_eq!((pc.recoveries, report.recoveries), (1, 1));
    assert!(pc.preempt_pages > 0);
    assert_eq!(report.digest.unwrap(), src.digest());
    assert_eq!(dst.absent_pages(), 0);
    assert!(src.is_paused() && !dst.is_paused());
}

/// Waits, up to two minutes, for `done`.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}: never");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A connected pair over socket pairs: one data connection and a
/// preempt one; the connecting end first.
fn socket_preempt_pair() -> (MultiTransport<UnixStream>, MultiTransport<UnixStream>) {
    let (a, b): (Vec<UnixStream>, Vec<UnixStream>) =
        (0..3).map(|_| UnixStream::pair().unwrap()).unzip();
    let mut b = b.into_iter();
    let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
    let mut a = a.into_iter();
    let tx = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap())).unwrap();
    (tx, acceptor.join().unwrap().unwrap())
}

/// Faults reported as a backend's handler thread reports them (KVM's
/// userfaultfd handler does so): down a channel, or, once the driver asks
/// ([`FaultSource::deliver_to`]), to the driver's callback on that thread.
struct HandlerFaults {
    rx: mpsc::Receiver<Faults>,
    deliver: Arc<Mutex<Option<FaultDelivery>>>,
    /// Whether the driver had the handler send: it must be back on the
    /// channel at the end.
    used: Arc<AtomicBool>,
}

impl HandlerFaults {
    /// A handler thread that reports what comes from `events`.
    fn start(events: mpsc::Receiver<Faults>) -> Self {
        let (tx, rx) = mpsc::channel();
        let deliver: Arc<Mutex<Option<FaultDelivery>>> = Arc::new(Mutex::new(None));
        let to = deliver.clone();
        std::thread::spawn(move || {
            for f in events {
                let mut d = to.lock().unwrap();
                match d.as_mut() {
                    Some(deliver) => deliver(f),
                    None => {
                        if tx.send(f).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        HandlerFaults {
            rx,
            deliver,
            used: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl FaultSource for HandlerFaults {
    fn faults(&self) -> &mpsc::Receiver<Faults> {
        &self.rx
    }
    fn deliver_to(&mut self, deliver: Option<FaultDelivery>) -> bool {
        if deliver.is_some() {
            self.used.store(true, Ordering::SeqCst);
        }
        *self.deliver.lock().unwrap() = deliver;
        true
    }
}

/// A page the resumed guest faults on is answered while the source's
/// driver is stuck sending the first push frame: the request leaves on
/// the preempt connection from the destination's requester thread, or
/// from the backend's handler thread, and the source's preempt thread
/// reads the page and sends it, without the driver. Once the push is let
/// go the migration completes verified, the page counted as requested
/// and served.
#[test]
fn a_request_is_answered_while_the_source_driver_is_stuck_in_the_push() {
    for on_handler in [false, true] {
        answered_while_stuck(on_handler);
    }
}

fn answered_while_stuck(on_handler: bool) {
    let (src, dst, clock) = guests(32 << 20, 20_000.0);
    let (tx, rx) = socket_preempt_pair();
    let (fault_tx, faults) = mpsc::channel();
    let (d, c) = (dst.clone(), clock.clone());
    let (handler, mut plain) = if on_handler {
        (Some(HandlerFaults::start(faults)), None)
    } else {
        (None, Some(faults))
    };
    let sent_by_handler = handler.as_ref().map(|h| h.used.clone());
    let dest = std::thread::spawn(move || {
        let mut t = rx;
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        match (handler, plain.as_mut()) {
            (Some(mut h), _) => {
                let r = run_destination(&mut e, &mut t, Some(&mut h), TIMEOUT);
                assert!(h.deliver.lock().unwrap().is_none(), "handed back");
                r
            }
            (None, faults) => run_destination(
                &mut e,
                &mut t,
                faults.map(|f| f as &mut dyn FaultSource),
                TIMEOUT,
            ),
        }
    });
    let (open, gate) = mpsc::channel();
    let source = {
        let (s, c) = (src.clone(), clock.clone());
        std::thread::spawn(move || {
            let mut t = Paced {
                inner: tx,
                per_batch: Duration::ZERO,
                gate: Some(gate),
                preempt: true,
            };
            let mut e = preempt_source(&s, c);
            let r = run_source(&mut e, &mut t, TIMEOUT);
            (r, e.preempt_active())
        })
    };
    wait_for("the destination's guest resumed", || {
        dst.resumed_at().is_some()
    });
    let page = dst.layout().page_end() - 1;
    assert!(dst.is_absent(page), "no push page arrived yet");
    fault_tx
        .send(Faults {
            pages: vec![page],
            at: clock.now(),
        })
        .unwrap();
    wait_for("the requested page arrived", || !dst.is_absent(page));
    open.send(()).unwrap();
    let (r, engine_served) = source.join().unwrap();
    let stats = r.expect("source");
    assert!(!engine_served, "the preempt thread served, not the engine");
    let report = dest.join().unwrap().expect("destination");
    served_on_the_preempt_connection(&stats, &report, &src, &dst);
    if let Some(used) = sent_by_handler {
        assert!(used.load(Ordering::SeqCst), "the handler thread sent");
    }
}

/// A migration whose requests went on the preempt connection: memory
/// verified and equal, every page here, at least one request, each
/// answered as requested pages and each taken in by the destination.
fn served_on_the_preempt_connection(
    stats: &migrate_core::MigrationStats,
    report: &DestinationReport,
    src: &SimGuest,
    dst: &SimGuest,
) {
    assert!(stats.memory_verified);
    assert_eq!(report.digest.unwrap(), src.digest());
    assert_eq!(dst.absent_pages(), 0);
    let pc = stats.postcopy.as_ref().unwrap();
    assert!(pc.requests >= 1 && pc.preempt_pages == pc.requests);
    assert!(pc.preempt_bytes > 0);
    assert_eq!(report.preempt_pages, pc.preempt_pages, "and all arrived");
}

/// A destination that lies: it opens the preempt connection with `bad`
/// before the source switched over, then reads what the source sends.
/// The source fails with the error that comes back, its guest running,
/// and the liar is told with an abort.
fn lying_destination(bad: Vec<u8>) -> MigrationError {
    let (src, _dst, clock) = guests(8 << 20, 20_000.0);
    let (tx, mut rx) = socket_preempt_pair();
    let liar = std::thread::spawn(move || {
        rx.preempt_link()
            .expect("a preempt link")
            .send(&bad)
            .unwrap();
        loop {
            match rx.recv(Some(Duration::from_secs(120))) {
                Ok(Some(f)) if f.first() == Some(&(RecordType::Abort as u8)) => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    });
    let mut t = tx;
    let mut e = preempt_source(&src, clock);
    let r = run_source(&mut e, &mut t, TIMEOUT);
    drop(t);
    assert!(liar.join().unwrap(), "the destination was told");
    assert!(!src.is_paused(), "the source guest runs on");
    r.expect_err("the migration fails")
}

/// A page request numbered `seq` on the preempt connection.
fn preempt_request(seq: u32, page: u64) -> Vec<u8> {
    let mut f = encode_to_vec(&Record::PreemptRequest(vec![page]));
    migrate_core::protocol::seal(&mut f, seq);
    f
}

/// A request before the switch-over (the source guest still runs, so its
/// pages may still change) is refused; so is a damaged frame, one out
/// of its own numbering, and a record that has no place on the preempt
/// connection. Each fails the migration with a typed error.
#[test]
fn bad_frames_on_the_preempt_connection_from_the_destination_are_refused() {
    let r = lying_destination(preempt_request(0, 3));
    assert!(
        matches!(
            r,
            MigrationError::UnexpectedRecord {
                got: RecordType::PreemptRequest,
                ..
            }
        ),
        "{r:?}"
    );
    let mut damaged = preempt_request(0, 3);
    let at = damaged.len() - 3;
    damaged[at] ^= 0x10;
    let r = lying_destination(damaged);
    assert!(
        matches!(
            r,
            MigrationError::Protocol(ProtocolError::FrameChecksum { .. })
        ),
        "{r:?}"
    );
    let r = lying_destination(preempt_request(3, 3));
    assert!(
        matches!(
            r,
            MigrationError::Protocol(ProtocolError::OutOfSequence {
                expected: 0,
                got: 3
            })
        ),
        "{r:?}"
    );
    let mut ready = encode_to_vec(&Record::Ready);
    Sequencer::new().seal(&mut ready);
    let r = lying_destination(ready);
    assert!(
        matches!(
            r,
            MigrationError::UnexpectedRecord {
                got: RecordType::Ready,
                ..
            }
        ),
        "{r:?}"
    );
}

/// A link that goes nowhere, for serving frames by hand.
fn no_link() -> PreemptLink {
    PreemptLink::new(|_: &[u8]| Ok(()))
}

/// The destination places a requested page on the preempt connection's
/// thread (here: by hand, as that thread would), the guest writes it,
/// and the push copy the source sent earlier is handed to the engine
/// before the engine heard of the placed page: the memory says the page
/// is present, the copy counts as a duplicate and the guest's write
/// stays. The engine then learns of the placed page and counts nothing
/// twice; the migration completes verified.
#[test]
fn a_push_copy_after_a_page_placed_on_the_preempt_thread_keeps_the_guests_write() {
    let mut p = Pump::to_resume();
    let mut serve =
        p.d.preempt_placing()
            .expect("the sim memory shares a placer");
    let held = p.first_push();
    let (pages, first) = p.batch_pages(&held);
    let page = pages[0];
    let push_copy = first.unwrap_or_else(|| vec![0; 4096]);
    assert!(p.dst.is_absent(page));
    let pre = p.ask(page);
    serve(Bytes::from(pre), &no_link());
    assert!(!p.dst.is_absent(page), "placed by the preempt thread");
    assert!(!p.d.has_page(page), "the engine has not heard yet");
    let written = vec![0x5Au8; 4096];
    assert_ne!(written, push_copy);
    p.dst.pages().write_page(page, &written).unwrap();
    // The push copy, before the engine takes in what was placed.
    p.deliver(&held);
    let mut now = vec![0u8; 4096];
    p.dst.pages().read_pages(&[page], &mut now).unwrap();
    assert_eq!(now, written, "the push copy did not overwrite the write");
    assert!(p.d.has_page(page));
    p.d.absorb_placed().unwrap();
    while !p.d.completed() {
        let f = p.next_frame();
        p.d.absorb_placed().unwrap();
        p.deliver(&f);
    }
    assert!(matches!(p.s.poll().unwrap(), SourceStep::Done));
    let stats = p.s.stats().unwrap().clone();
    assert!(stats.memory_verified);
    let report = p.d.report();
    assert_eq!(report.postcopy.unwrap().duplicates, 1);
    assert_eq!(report.preempt_pages, 1);
    assert_eq!(p.dst.absent_pages(), 0);
    // What arrived is the source's memory, the placed page's hash taken
    // on the preempt thread.
    assert_eq!(report.digest.unwrap(), p.src.digest());
}

/// The reverse order: the push copy is placed first, then the requested
/// copy reaches the preempt thread, which finds the page present and
/// leaves it (the guest's write after the push copy stays); the engine
/// counts it as a duplicate once told.
#[test]
fn a_requested_copy_after_the_push_copy_is_left_alone_on_the_preempt_thread() {
    let mut p = Pump::to_resume();
    let mut serve = p.d.preempt_placing().expect("a placer");
    let held = p.first_push();
    let (pages, _) = p.batch_pages(&held);
    let page = pages[0];
    let pre = p.ask(page);
    p.deliver(&held);
    assert!(p.d.has_page(page));
    let written = vec![0xC3u8; 4096];
    p.dst.pages().write_page(page, &written).unwrap();
    serve(Bytes::from(pre), &no_link());
    let mut now = vec![0u8; 4096];
    p.dst.pages().read_pages(&[page], &mut now).unwrap();
    assert_eq!(
        now, written,
        "the requested copy did not overwrite the write"
    );
    p.d.absorb_placed().unwrap();
    assert_eq!(p.d.report().preempt_pages, 1);
    while !p.d.completed() {
        let f = p.next_frame();
        p.deliver(&f);
    }
    assert!(p.s.stats().unwrap().memory_verified);
    assert_eq!(p.d.report().postcopy.unwrap().duplicates, 1);
}

/// A damaged or repeated frame on the preempt thread places nothing and
/// fails the destination with the typed error a damaged frame through
/// the engine gives: checked whole before any page is placed.
#[test]
fn a_bad_frame_on_the_preempt_thread_places_nothing_and_fails_typed() {
    for damage in [true, false] {
        let mut p = Pump::to_resume();
        let mut serve = p.d.preempt_placing().expect("a placer");
        // A page with data (as in `bad_requested_pages_are_refused`).
        let page = p.src.layout().page_end() - 2;
        let mut pre = p.ask(page);
        if damage {
            let at = pre.len() - 100;
            pre[at] ^= 1;
        } else {
            // Once as it should be, then again: out of its numbering.
            serve(Bytes::from(pre.clone()), &no_link());
            p.d.absorb_placed().unwrap();
            assert!(p.d.has_page(page));
        }
        let before = p.dst.absent_pages();
        serve(Bytes::from(pre), &no_link());
        assert_eq!(p.dst.absent_pages(), before, "nothing placed");
        let r = p.d.absorb_placed();
        let want = if damage {
            matches!(
                r,
                Err(MigrationError::Protocol(
                    ProtocolError::FrameChecksum { .. }
                ))
            )
        } else {
            matches!(
                r,
                Err(MigrationError::Protocol(
                    ProtocolError::OutOfSequence { .. }
                ))
            )
        };
        assert!(want, "{r:?}");
        let next = p.next_frame();
        assert!(p.d.handle_frame(&next).is_err(), "failed");
    }
}

/// Holds the destination's driver inside the first push frame it
/// receives once its guest runs, until `gate` opens.
struct Held<T: Transport> {
    inner: T,
    guest: SimGuest,
    gate: Option<mpsc::Receiver<()>>,
    /// Told when the driver is held.
    held: mpsc::Sender<()>,
}

impl<T: Transport> Transport for Held<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        let f = self.inner.recv(timeout)?;
        let push = f
            .as_ref()
            .is_some_and(|f| f.first() == Some(&(RecordType::PageBatch as u8)));
        if push && self.guest.resumed_at().is_some() {
            if let Some(gate) = self.gate.take() {
                let _ = self.held.send(());
                let _ = gate.recv();
            }
        }
        Ok(f)
    }
    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_send_timeout(timeout)
    }
    fn close(&mut self) {
        self.inner.close()
    }
    fn preempt_link(&self) -> Option<PreemptLink> {
        self.inner.preempt_link()
    }
    fn serve_preempt(&mut self, serve: PreemptServe) -> bool {
        self.inner.serve_preempt(serve)
    }
}

/// A page the resumed guest faults on arrives and is placed while the
/// destination's driver is held inside a push frame: the request leaves
/// from the requester (or the fault handler's) thread, the source's
/// preempt thread answers, and the destination's preempt thread places
/// it. Once the driver goes on, the migration completes verified, the
/// page counted as requested, placed once, its latency measured.
#[test]
fn a_requested_page_is_placed_while_the_destination_driver_is_held_in_a_push_frame() {
    for on_handler in [false, true] {
        placed_while_held(on_handler);
    }
}

fn placed_while_held(on_handler: bool) {
    let (src, dst, clock) = guests(32 << 20, 20_000.0);
    let (tx, rx) = socket_preempt_pair();
    let (fault_tx, faults) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let (held_tx, held) = mpsc::channel();
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut t = Held {
            inner: rx,
            guest: d.clone(),
            gate: Some(gate),
            held: held_tx,
        };
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        if on_handler {
            let mut h = HandlerFaults::start(faults);
            run_destination(&mut e, &mut t, Some(&mut h), TIMEOUT)
        } else {
            let mut f = faults;
            run_destination(&mut e, &mut t, Some(&mut f), TIMEOUT)
        }
    });
    let source = {
        let (s, c) = (src.clone(), clock.clone());
        std::thread::spawn(move || {
            let mut t = tx;
            let mut e = preempt_source(&s, c);
            run_source(&mut e, &mut t, TIMEOUT)
        })
    };
    held.recv_timeout(Duration::from_secs(120))
        .expect("the destination's driver is held in a push frame");
    let page = (0..dst.layout().page_end())
        .rev()
        .find(|p| dst.is_absent(*p))
        .expect("a page not pushed yet");
    fault_tx
        .send(Faults {
            pages: vec![page],
            at: clock.now(),
        })
        .unwrap();
    wait_for("the requested page placed with the driver held", || {
        !dst.is_absent(page)
    });
    open.send(()).unwrap();
    let stats = source.join().unwrap().expect("source");
    let report = dest.join().unwrap().expect("destination");
    served_on_the_preempt_connection(&stats, &report, &src, &dst);
    let pc = stats.postcopy.unwrap();
    let dp = report.postcopy.unwrap();
    assert!(dp.faults >= 1);
    assert_eq!(dp.duplicates, pc.pages - stats.guest_pages);
}

/// The completion follows the push in sequence, so it never overtakes a
/// requested page still on its way on the preempt connection: with every
/// answer on that connection held back until the migration has ended,
/// the requested pages still arrive, in the push, and memory verifies.
#[test]
fn the_completion_never_overtakes_a_requested_page_held_on_the_preempt_connection() {
    let (mut a, mut b): (Vec<UnixStream>, Vec<UnixStream>) =
        (0..2).map(|_| UnixStream::pair().unwrap()).unzip();
    // The preempt connection runs through a relay that passes requests
    // on at once and, once `hold` is set, keeps the answers.
    let (src_end, relay_src) = UnixStream::pair().unwrap();
    let (relay_dst, dst_end) = UnixStream::pair().unwrap();
    a.push(src_end);
    b.push(dst_end);
    let hold = Arc::new(AtomicBool::new(false));
    let held = Arc::new(Mutex::new(0usize));
    {
        let (mut from, mut to) = (
            relay_dst.try_clone().unwrap(),
            relay_src.try_clone().unwrap(),
        );
        std::thread::spawn(move || std::io::copy(&mut from, &mut to));
    }
    {
        let (hold, held) = (hold.clone(), held.clone());
        let (mut from, mut to) = (relay_src, relay_dst);
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) if hold.load(Ordering::Acquire) => *held.lock().unwrap() += n,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut b = b.into_iter();
    let acceptor = std::thread::spawn(move || MultiTransport::accept(|| Ok(b.next().unwrap())));
    let mut a = a.into_iter();
    let src_t = MultiTransport::connect_preempt(1, || Ok(a.next().unwrap())).unwrap();
    let dst_t = acceptor.join().unwrap().unwrap();
    assert!(src_t.has_preempt() && dst_t.has_preempt());
    // The handshake went through; from here on the answers stay in the relay.
    hold.store(true, Ordering::Release);

    let (stats, report) = verified_postcopy(src_t, dst_t);
    let pc = stats.postcopy.expect("post-copy");
    assert!(
        pc.preempt_pages > 0,
        "the source answered on the preempt connection"
    );
    assert!(*held.lock().unwrap() > 0, "and the answers were held back");
    assert_eq!(report.preempt_pages, 0, "none of them arrived");
}

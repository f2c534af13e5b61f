//! The preempt connection's own threads: on the destination, a requester
//! that sends each fault's request on the preempt connection as soon as
//! the backend's handler reports it; on the source, the preempt
//! connection's reader thread, which reads the requested pages from the
//! guest's memory and sends them back at once. Neither waits for its
//! driver's loop; each tells its engine what it did through a channel.
//! Why this is safe is in `docs/protocol.md` (*The preempt connection*).

use super::{FaultSource, Faults};
use crate::backend::PageSource;
use crate::error::MigrationError;
use crate::page::{MemoryLayout, PageNum};
use crate::protocol::{self, Decoder, Record, RecordType, Sequencer, MAX_REQUEST_PAGES};
use crate::transport::{PreemptLink, PreemptServe, Transport};
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the requester thread, waiting for faults, looks whether it
/// is to stop.
const REQUESTER_TICK: Duration = Duration::from_millis(10);

/// What the source's preempt thread did.
pub(super) enum Served {
    /// A [`Record::RequestedPages`] frame it sent.
    Frame(Vec<u8>),
    /// It stopped serving: a bad frame, a request before the switch-over,
    /// a page it could not read, or a link that failed. With the
    /// generation of the transport it served (see
    /// [`SourceServing::generation`]): a failure of a transport that a
    /// recovery replaced since is no news.
    Failed(u64, MigrationError),
}

/// The source's side: the requests served on the preempt connection's
/// reader thread of each transport in turn (a recovery brings a new
/// one), and what they served.
pub(super) struct SourceServing {
    /// The post-copy push's round number plus one once requests may be
    /// served (switched over, guest paused); 0 before and after.
    open: Arc<AtomicU64>,
    /// How many transports were served so far.
    generation: AtomicU64,
    tx: Sender<Served>,
    rx: Receiver<Served>,
}

impl SourceServing {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        SourceServing {
            open: Arc::new(AtomicU64::new(0)),
            generation: AtomicU64::new(0),
            tx,
            rx,
        }
    }

    /// Serves the requests arriving on `transport`'s preempt connection
    /// from `memory`, on that connection's reader thread, with a fresh
    /// numbering both ways. `false` when the transport has no preempt
    /// connection.
    pub(super) fn install<X: Transport + ?Sized>(
        &self,
        transport: &mut X,
        memory: Box<dyn PageSource + Send>,
        layout: MemoryLayout,
    ) -> bool {
        if transport.preempt_link().is_none() {
            return false;
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut server = RequestServer {
            generation,
            decoder: Decoder::preempt(layout.page_size()),
            sequencer: Sequencer::new(),
            memory,
            layout,
            open: self.open.clone(),
            served: self.tx.clone(),
            failed: false,
            buf: Vec::new(),
        };
        let serve: PreemptServe = Box::new(move |frame: Bytes, link: &PreemptLink| {
            server.serve(&frame, link);
        });
        transport.serve_preempt(serve)
    }

    /// Opens serving at the push's round `round`, or closes it (`None`).
    pub(super) fn set_round(&self, round: Option<u32>) {
        let v = round.map_or(0, |r| u64::from(r) + 1);
        self.open.store(v, Ordering::Release);
    }

    /// The transport served now: 1 for the first, one more for each
    /// that a recovery brought.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What was served since the last call, oldest first.
    pub(super) fn take(&self) -> Option<Served> {
        self.rx.try_recv().ok()
    }
}

impl Drop for SourceServing {
    fn drop(&mut self) {
        // The driver is done: nothing more is served from this memory.
        self.open.store(0, Ordering::Release);
    }
}

/// Serves one transport's preempt connection (see [`SourceServing`]).
struct RequestServer {
    /// Which transport it serves ([`SourceServing::generation`]).
    generation: u64,
    /// Reads the destination's [`Record::PreemptRequest`] frames.
    decoder: Decoder,
    /// Numbers the [`Record::RequestedPages`] frames.
    sequencer: Sequencer,
    memory: Box<dyn PageSource + Send>,
    layout: MemoryLayout,
    open: Arc<AtomicU64>,
    served: Sender<Served>,
    /// It stopped: later frames are dropped (the driver fails the
    /// migration, or waits for a new connection).
    failed: bool,
    buf: Vec<u8>,
}

impl RequestServer {
    fn serve(&mut self, frame: &[u8], link: &PreemptLink) {
        if self.failed {
            return;
        }
        match self.answer(frame, link) {
            Ok(()) => {}
            Err(e) => {
                self.failed = true;
                let _ = self.served.send(Served::Failed(self.generation, e));
            }
        }
    }

    fn answer(&mut self, frame: &[u8], link: &PreemptLink) -> Result<(), MigrationError> {
        let pages = match self.decoder.decode(frame)? {
            Record::PreemptRequest(pages) => pages,
            other => {
                return Err(MigrationError::UnexpectedRecord {
                    got: other.record_type(),
                    state: "reading page requests on the preempt connection",
                })
            }
        };
        let round = match self.open.load(Ordering::Acquire) {
            0 => {
                return Err(MigrationError::UnexpectedRecord {
                    got: RecordType::PreemptRequest,
                    state: "before the post-copy switch-over",
                })
            }
            r => (r - 1) as u32,
        };
        if let Some(&p) = pages.iter().find(|p| !self.layout.contains(**p)) {
            return Err(MigrationError::PageOutOfRange(p));
        }
        tracing::trace!(target: "livemig::fault", pages = pages.len(), first = pages.first(), "fault: request read on the preempt connection");
        let ps = self.layout.page_size();
        for chunk in pages.chunks(protocol::max_batch_pages(ps)) {
            self.buf.resize(chunk.len() * ps.get(), 0);
            self.memory
                .read_pages(chunk, &mut self.buf)
                .map_err(MigrationError::backend("read requested pages"))?;
            let mut f = Vec::with_capacity(self.buf.len() + 64);
            protocol::encode_page_batch(round, ps, chunk, &self.buf, &mut f);
            f[0] = RecordType::RequestedPages as u8;
            protocol::reseal(&mut f);
            self.sequencer.seal(&mut f);
            link.send(&f)?;
            tracing::trace!(target: "livemig::fault", pages = chunk.len(), first = chunk.first(), "fault: requested pages sent by the preempt thread");
            // The engine learns of it after it left.
            let _ = self.served.send(Served::Frame(f));
        }
        Ok(())
    }
}

/// The link the requester sends on, with its numbering and the pages it
/// asked for on it.
struct Link {
    link: PreemptLink,
    sequencer: Sequencer,
    asked: HashSet<PageNum>,
}

/// What the requester thread and the driver share.
struct Shared {
    /// Where requests go now; `None` before the guest resumes and while
    /// a post-copy waits for a new connection.
    link: Option<Link>,
    /// Faults reported while there was no link, sent once there is one.
    held: Vec<Faults>,
    /// To the driver: each fault, before its request leaves.
    to_driver: Sender<Faults>,
}

impl Shared {
    /// Hands the pages of `f` not asked for on this link yet to the
    /// driver, then sends their request; without a link, keeps `f`.
    fn request(&mut self, f: Faults) {
        let Some(l) = self.link.as_mut() else {
            self.held.push(f);
            return;
        };
        let new: Vec<PageNum> = f
            .pages
            .iter()
            .copied()
            .filter(|p| l.asked.insert(*p))
            .collect();
        if new.is_empty() {
            // Each asked for on this link already.
            return;
        }
        // The driver learns of the requests before their answer can
        // arrive.
        let _ = self.to_driver.send(Faults {
            pages: new.clone(),
            at: f.at,
        });
        for chunk in new.chunks(MAX_REQUEST_PAGES) {
            let mut frame = protocol::encode_to_vec(&Record::PreemptRequest(chunk.to_vec()));
            l.sequencer.seal(&mut frame);
            if let Err(e) = l.link.send(&frame) {
                // The link shut its transport down: the driver sees the
                // connection end, and a recovery asks again for every
                // request it recorded.
                tracing::debug!(error = %e, "page request not sent on the preempt connection");
                self.link = None;
                return;
            }
            tracing::trace!(target: "livemig::fault", pages = chunk.len(), first = chunk.first(), "fault: request sent on the preempt connection");
        }
    }
}

/// The destination's side: a thread blocked on the backend's faults that
/// sends each one's request on the preempt connection at once, and hands
/// the fault on to the driver before it sends it, so that the engine
/// records every request before any frame that could answer it is
/// handled. Faults reported while it has no link (before the guest
/// resumed, while a post-copy waits for a new connection) wait for one.
pub(super) struct Requester {
    shared: Arc<Mutex<Shared>>,
    /// The thread, when the backend's handler does not send itself.
    worker: Option<Worker>,
    /// The faults whose requests left on the preempt connection.
    pub(super) sent: Receiver<Faults>,
}

/// The requester's own thread.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The backend's receiver, while the thread holds it.
    faults: Arc<Mutex<Option<Receiver<Faults>>>>,
}

impl Requester {
    /// The shared part, and the channel to the driver.
    fn shared() -> (Arc<Mutex<Shared>>, Receiver<Faults>) {
        let (to_driver, sent) = mpsc::channel();
        let shared = Arc::new(Mutex::new(Shared {
            link: None,
            held: Vec::new(),
            to_driver,
        }));
        (shared, sent)
    }

    /// Has the backend's handler thread send each request itself
    /// ([`FaultSource::deliver_to`]), the faults it reported before first;
    /// `None` when it cannot.
    pub(super) fn on_handler(source: &mut dyn FaultSource) -> Option<Self> {
        let (shared, sent) = Self::shared();
        let on_handler = shared.clone();
        let deliver = Box::new(move |f: Faults| {
            if let Ok(mut sh) = on_handler.lock() {
                sh.request(f);
            }
        });
        if !source.deliver_to(Some(deliver)) {
            return None;
        }
        while let Ok(f) = source.faults().try_recv() {
            if let Ok(mut sh) = shared.lock() {
                sh.request(f);
            }
        }
        Some(Requester {
            shared,
            worker: None,
            sent,
        })
    }

    /// Starts the thread on the backend's fault receiver; `Err` gives it
    /// back.
    pub(super) fn start(faults: Receiver<Faults>) -> Result<Self, Receiver<Faults>> {
        let faults = Arc::new(Mutex::new(Some(faults)));
        let (shared, sent) = Self::shared();
        let stop = Arc::new(AtomicBool::new(false));
        let spawned = {
            let (faults, shared, stop) = (faults.clone(), shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("livemig-request".into())
                .spawn(move || {
                    let Ok(slot) = faults.lock() else {
                        return;
                    };
                    if let Some(rx) = slot.as_ref() {
                        request_loop(rx, &shared, &stop);
                    }
                })
        };
        match spawned {
            Ok(thread) => Ok(Requester {
                shared,
                worker: Some(Worker {
                    stop,
                    thread: Some(thread),
                    faults,
                }),
                sent,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no requester thread; requests go through the driver");
                let rx = faults.lock().ok().and_then(|mut f| f.take());
                Err(rx.unwrap_or_else(|| mpsc::channel().1))
            }
        }
    }

    /// Sends the requests on `link` from now on, numbered from 0 (a new
    /// connection), the faults held meanwhile first; or on none (`None`:
    /// they are held).
    pub(super) fn set_link(&self, link: Option<PreemptLink>) {
        let Ok(mut sh) = self.shared.lock() else {
            return;
        };
        sh.link = link.map(|link| Link {
            link,
            sequencer: Sequencer::new(),
            asked: HashSet::new(),
        });
        if sh.link.is_some() {
            for f in std::mem::take(&mut sh.held) {
                sh.request(f);
            }
        }
    }

    /// Stops sending: the thread stops and the backend gets its receiver
    /// back, or its handler sends down the channel again.
    pub(super) fn stop(self, source: &mut dyn FaultSource) {
        let Some(mut w) = self.worker else {
            source.deliver_to(None);
            return;
        };
        w.stop.store(true, Ordering::Release);
        if let Some(t) = w.thread.take() {
            let _ = t.join();
        }
        let back = w.faults.lock().ok().and_then(|mut f| f.take());
        if let (Some(back), Some(rx)) = (back, source.faults_mut()) {
            *rx = back;
        }
    }
}

fn request_loop(faults: &Receiver<Faults>, shared: &Mutex<Shared>, stop: &AtomicBool) {
    loop {
        let f = match faults.recv_timeout(REQUESTER_TICK) {
            Ok(f) => f,
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Acquire) => continue,
            Err(_) => return,
        };
        match shared.lock() {
            Ok(mut sh) => sh.request(f),
            Err(_) => return,
        }
    }
}

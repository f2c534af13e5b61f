//! Post-copy: the requested pages placed on the destination's preempt
//! connection reader thread, and what the destination engine learns of
//! them afterwards. Why this is safe next to the engine's own placing,
//! the discards and a recovery is in `docs/protocol.md` (*The preempt
//! connection*).

use super::*;
use crate::backend::PagePlacer;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

/// One page of a [`Record::RequestedPages`] frame as the preempt thread
/// handled it.
#[derive(Clone, Copy, Debug)]
pub(super) struct PlacedPage {
    pub(super) page: PageNum,
    /// The hash of the copy that arrived (equal to every other copy sent
    /// after the switch-over: the source is paused).
    pub(super) hash: u64,
    /// A zero page.
    pub(super) zero: bool,
    /// It was placed; `false`: the page was present already.
    pub(super) new: bool,
}

/// What the preempt thread did, for the engine.
pub(super) enum Placed {
    /// The pages of one frame, checked whole and placed, `at` on the
    /// engine's clock; `wire` its length on the wire.
    Frame {
        wire: u64,
        pages: Vec<PlacedPage>,
        at: Duration,
    },
    /// It stopped at a bad frame of the connection of link number
    /// `link`, or the memory refused a page.
    Failed { link: u64, error: MigrationError },
}

/// Places the requested pages of one connection on its reader thread.
pub(super) struct PagePlacing {
    /// The engine's decoder of the preempt numbering, shared: frames
    /// handed to the engine before this thread took over keep their
    /// numbering.
    pub(super) decoder: Arc<Mutex<Decoder>>,
    pub(super) placer: Box<dyn PagePlacer>,
    pub(super) layout: MemoryLayout,
    pub(super) clock: Arc<dyn Clock>,
    /// The engine's link generation when this began.
    pub(super) link: u64,
    pub(super) to_engine: Sender<Placed>,
    /// It stopped: later frames are dropped (the engine fails the
    /// migration or waits for a new connection).
    pub(super) failed: bool,
}

impl PagePlacing {
    /// Checks `frame` whole (CRC, numbering, record, every page in the
    /// layout), then places its pages and tells the engine.
    pub(super) fn serve(&mut self, frame: &[u8]) {
        if self.failed {
            return;
        }
        match self.place(frame) {
            Ok(pages) => {
                let at = self.clock.now();
                tracing::trace!(target: "livemig::fault", pages = pages.len(), first = pages.first().map(|p| p.page), "fault: requested pages placed by the preempt thread");
                let _ = self.to_engine.send(Placed::Frame {
                    wire: wire_len(frame) as u64,
                    pages,
                    at,
                });
            }
            Err(error) => {
                self.failed = true;
                let _ = self.to_engine.send(Placed::Failed {
                    link: self.link,
                    error,
                });
            }
        }
    }

    fn place(&mut self, frame: &[u8]) -> Result<Vec<PlacedPage>, MigrationError> {
        let rec = {
            let mut d = self
                .decoder
                .lock()
                .map_err(|_| MigrationError::InvalidUse("the preempt decoder was poisoned"))?;
            d.decode(frame)?
        };
        let Record::RequestedPages(batch) = rec else {
            return Err(MigrationError::UnexpectedRecord {
                got: rec.record_type(),
                state: "reading the preempt connection",
            });
        };
        if let Some((p, _)) = batch.iter().find(|(p, _)| !self.layout.contains(*p)) {
            return Err(MigrationError::PageOutOfRange(p));
        }
        tracing::trace!(target: "livemig::fault", pages = batch.len(), first = batch.iter().next().map(|(p, _)| p), "fault: requested pages received");
        let zero_hash = zero_page_hash(self.layout.page_size().get());
        let mut pages = Vec::with_capacity(batch.len());
        for (page, data) in batch.iter() {
            let new = self
                .placer
                .place_absent(page, data)
                .map_err(MigrationError::backend("place requested pages"))?;
            pages.push(PlacedPage {
                page,
                hash: data.map_or(zero_hash, page_hash),
                zero: data.is_none(),
                new,
            });
        }
        Ok(pages)
    }
}

//! The traits a backend implements: what the engine needs from a guest.
//!
//! A backend (the simulator, KVM, Xen, or a VMM's own memory) implements
//! [`DirtyTracker`] and [`PageSource`] and [`GuestControl`] on the source,
//! [`PageSink`], [`PageSource`] (to read back for verification) and
//! [`GuestControl`] on the destination. Each trait is small; the engine
//! takes them as separate values so a VMM can hand over objects it
//! already has.

use crate::bitmap::DirtyBitmap;
use crate::page::{MemoryLayout, PageNum};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What kind of failure a backend reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The host or guest does not support the operation.
    Unsupported,
    /// A page or argument outside what the guest has.
    InvalidArgument,
    /// An operating-system call failed.
    Io,
    /// The guest is in a state that forbids the operation (for example
    /// resuming a guest that was never restored).
    InvalidState,
    /// The saved state is of a format or version this backend cannot read.
    IncompatibleState,
    /// Anything else.
    Other,
}

/// An error from a backend.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// The kind, for callers that match on it.
    pub kind: BackendErrorKind,
    /// A human-readable description.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// An error of `kind` with a message.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error of `kind` with a message and the error that caused it,
    /// kept as [`std::error::Error::source`] so a caller can walk the chain
    /// or downcast it.
    pub fn with_source(
        kind: BackendErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BackendError {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        BackendError {
            kind: BackendErrorKind::Io,
            message: context.into(),
            source: Some(Box::new(err)),
        }
    }
}

/// Tracks which guest pages are written.
///
/// Bitmaps are GFN-indexed and cover at least the layout's `page_end()`.
pub trait DirtyTracker {
    /// Starts tracking; every page written from now on is reported.
    fn start(&mut self) -> Result<(), BackendError>;

    /// Replaces `into` with the pages written since `start` or the last
    /// collect, and clears that record (Xen's CLEAN, KVM's GET_DIRTY_LOG).
    fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError>;

    /// Replaces `into` with the pages written since `start` or the last
    /// collect, without clearing anything (Xen's PEEK).
    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError>;

    /// Stops tracking.
    fn stop(&mut self) -> Result<(), BackendError>;
}

/// Reads guest pages.
pub trait PageSource {
    /// The guest's memory layout.
    fn layout(&self) -> &MemoryLayout;

    /// Copies the contents of `pages` into `out`, one page after another
    /// (`out.len() == pages.len() * page_size`).
    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError>;

    /// Sets `zero[i]` for each of `pages` this source knows to be all
    /// zeros without reading it (`zero.len() == pages.len()`, all `false`
    /// on entry); the engine then neither reads nor checks those pages
    /// and sends them as zero pages. A page left `false` is read as
    /// usual, so an answer may be partial but never wrong: a page the
    /// guest may have written must stay `false`. A KVM guest's memory,
    /// for instance, knows which of its pages the host never populated.
    /// The default knows none.
    fn known_zero(&mut self, pages: &[PageNum], zero: &mut [bool]) -> Result<(), BackendError> {
        let _ = (pages, zero);
        Ok(())
    }
    /// Whether [`PageSource::read_pages`] costs about the same per page
    /// however few pages one call asks for, as memory this process maps
    /// does (KVM's, the simulator's). The engine then reads each batch a
    /// few pages per call straight into the frame it sends, checking each
    /// piece for zeros and taking its CRC while it is in cache
    /// ([`crate::protocol::encode_page_batch_from`]). The default, `false`,
    /// suits a source whose every call has a fixed cost (Xen maps the
    /// guest's frames on each call): the engine reads a batch in one call
    /// into a buffer and builds the frame from there.
    fn small_reads_are_cheap(&self) -> bool {
        false
    }

    /// Writes a token naming the content of each of `pages` into `out`
    /// (`out.len() == pages.len()`): 0 for a zero page, and two pages with
    /// equal tokens have equal contents. Only a backend that models pages
    /// rather than holding bytes (the simulator) can; the default refuses.
    /// See [`crate::model`].
    fn read_tokens(&mut self, pages: &[PageNum], out: &mut [u64]) -> Result<(), BackendError> {
        let _ = out;
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "this source holds page bytes, not page models ({} pages asked)",
                pages.len()
            ),
        ))
    }

    /// The pages of guest memory that may hold data, as `(first, count)`
    /// ranges in ascending order, every other page being zero as
    /// [`PageSource::known_zero`] would say; `None` where the source
    /// cannot tell (the default). Asked once, before the first round; the
    /// destination may prepare those pages ahead of their data
    /// ([`PageSink::expect_pages`]).
    fn populated_ranges(&mut self) -> Result<Option<Vec<(PageNum, u64)>>, BackendError> {
        Ok(None)
    }

    /// A second handle on the same memory, for a thread of its own: a
    /// post-copy source serves the pages its destination asks for from it
    /// on the preempt connection's thread while the engine pushes (the
    /// guest is paused then, so both read the same bytes). `None`, the
    /// default, where the source cannot give one: requests then go
    /// through the engine.
    fn share(&self) -> Option<Box<dyn PageSource + Send>> {
        None
    }
}

/// Places guest pages on the destination.
pub trait PageSink {
    /// The destination guest's memory layout.
    fn layout(&self) -> &MemoryLayout;

    /// Writes one page (`data.len()` is the page size).
    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError>;

    /// Makes `page` all zeros. Backends that can do better than writing
    /// zeros (for example `UFFDIO_ZEROPAGE`) override this.
    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        let zeros = vec![0u8; self.layout().page_size().get()];
        self.write_page(page, &zeros)
    }

    /// Makes each of `pages` all zeros. The default calls
    /// [`PageSink::write_zero_page`] for each; a backend that can tell
    /// which pages are zero already without touching them (memory the
    /// host never populated) overrides this to leave those alone.
    fn write_zero_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        pages.iter().try_for_each(|p| self.write_zero_page(*p))
    }

    /// Post-copy: forgets `page` so that the guest faults on its next
    /// access until the page is written again (KVM: drop it from the
    /// mapping so userfaultfd reports the access). A sink that cannot do
    /// post-copy keeps the default, which refuses.
    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("this destination cannot do post-copy (discard of page {page:#x})"),
        ))
    }

    /// Post-copy: [`PageSink::discard`] of each of `pages` (ascending). A
    /// backend that can drop runs of pages at once overrides this.
    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        pages.iter().try_for_each(|p| self.discard(*p))
    }

    /// Places each of `pages` with the content token `tokens[i]` (see
    /// [`PageSource::read_tokens`]). Only a backend that models pages can;
    /// the default refuses.
    fn write_tokens(&mut self, pages: &[PageNum], tokens: &[u64]) -> Result<(), BackendError> {
        let _ = tokens;
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "this destination holds page bytes, not page models ({} pages offered)",
                pages.len()
            ),
        ))
    }

    /// The source's [`PageSource::populated_ranges`], before its first
    /// round: these pages will arrive with data, the others stay zero. A
    /// sink may prepare them in the background (KVM populates its memory
    /// ahead of the data, off the round's critical path); nothing may
    /// depend on it. Ranges lie inside the layout (the engine checks).
    /// The default does nothing.
    fn expect_pages(&mut self, ranges: &[(PageNum, u64)]) -> Result<(), BackendError> {
        let _ = ranges;
        Ok(())
    }

    /// Post-copy: a second handle on the same memory, for a thread of its
    /// own, that places a page only where none is present
    /// ([`PagePlacer`]). A post-copy destination places the pages its
    /// faults asked for with it on the preempt connection's reader thread
    /// while the engine places the push; while one is out, the engine
    /// places through a handle of its own too, so that neither copy of a
    /// page overwrites the other (or a guest write after it). `None`, the
    /// default, where the sink cannot give one: requested pages then go
    /// through the engine.
    fn share_placer(&self) -> Option<Box<dyn PagePlacer>> {
        None
    }
}

/// Places pages of a post-copy destination whose guest runs, from any
/// thread ([`PageSink::share_placer`]): a page that is present (placed
/// before by any handle, or never discarded) is left alone, as
/// userfaultfd's `UFFDIO_COPY` leaves it (`EEXIST`). Placing a page wakes
/// whatever waits for it.
pub trait PagePlacer: Send {
    /// Places `page` with `data` (`None`: zeros) if it is absent, and
    /// says whether it did: `false` means the page was present and
    /// nothing was written.
    fn place_absent(&mut self, page: PageNum, data: Option<&[u8]>) -> Result<bool, BackendError>;
}

/// vCPU and device state, saved by the source and restored by the
/// destination. The backend owns the format; the library carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Which backend wrote it (`"sim"`, `"kvm"`, `"xen"`...).
    pub format: String,
    /// The backend's version of that format.
    pub version: u32,
    /// The state itself.
    pub data: Vec<u8>,
}

/// Pauses, resumes, saves and restores a guest.
pub trait GuestControl {
    /// Stops the guest's vCPUs; memory stops changing.
    fn pause(&mut self) -> Result<(), BackendError>;

    /// Lets the guest run.
    fn resume(&mut self) -> Result<(), BackendError>;

    /// Saves vCPU and device state (guest paused).
    fn save_state(&mut self) -> Result<DeviceState, BackendError>;

    /// Restores state saved by a source of the same backend.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError>;

    /// CPU time the guest has used so far, where the backend can say
    /// (for the `target %` column).
    fn guest_cpu_time(&self) -> Option<Duration> {
        None
    }

    /// Post-copy: pages the destination must hold before the guest runs
    /// there, because something other than the guest's own accesses will
    /// touch them at resume and cannot wait for a fault to be served. Xen
    /// is the case in point: a guest re-registers its `vcpu_info` page as
    /// it resumes, and the hypervisor refuses (rather than waits for) a
    /// frame that is paged out. Called on the source with the guest
    /// stopped, after [`GuestControl::save_state`]; the engine sends the
    /// pages named here with the guest paused, before the device state.
    /// Pages outside the layout are ignored. The default names none, which
    /// is right where the destination's faults cover every access (KVM's
    /// userfaultfd blocks in-kernel accesses too).
    fn resume_pages(&mut self) -> Result<Vec<PageNum>, BackendError> {
        Ok(Vec::new())
    }

    /// Auto-converge: holds the guest's vCPUs out for `pct` percent of
    /// each period (0 lifts the throttle), so that the guest dirties
    /// memory more slowly. A backend that cannot throttle keeps the
    /// default, which refuses with [`BackendErrorKind::Unsupported`]; the
    /// engine then goes on unthrottled.
    fn set_throttle(&mut self, pct: u8) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("this backend cannot throttle vCPUs (asked for {pct}%)"),
        ))
    }
}

impl<T: DirtyTracker + ?Sized> DirtyTracker for &mut T {
    fn start(&mut self) -> Result<(), BackendError> {
        (**self).start()
    }
    fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        (**self).collect_and_clear(into)
    }
    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        (**self).peek(into)
    }
    fn stop(&mut self) -> Result<(), BackendError> {
        (**self).stop()
    }
}

impl<T: PageSource + ?Sized> PageSource for &mut T {
    fn layout(&self) -> &MemoryLayout {
        (**self).layout()
    }
    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        (**self).read_pages(pages, out)
    }
    fn read_tokens(&mut self, pages: &[PageNum], out: &mut [u64]) -> Result<(), BackendError> {
        (**self).read_tokens(pages, out)
    }
    fn known_zero(&mut self, pages: &[PageNum], zero: &mut [bool]) -> Result<(), BackendError> {
        (**self).known_zero(pages, zero)
    }
    fn populated_ranges(&mut self) -> Result<Option<Vec<(PageNum, u64)>>, BackendError> {
        (**self).populated_ranges()
    }
    fn small_reads_are_cheap(&self) -> bool {
        (**self).small_reads_are_cheap()
    }
    fn share(&self) -> Option<Box<dyn PageSource + Send>> {
        (**self).share()
    }
}

impl<T: PageSink + ?Sized> PageSink for &mut T {
    fn layout(&self) -> &MemoryLayout {
        (**self).layout()
    }
    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        (**self).write_page(page, data)
    }
    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        (**self).write_zero_page(page)
    }
    fn write_zero_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        (**self).write_zero_pages(pages)
    }
    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        (**self).discard(page)
    }
    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        (**self).discard_pages(pages)
    }
    fn write_tokens(&mut self, pages: &[PageNum], tokens: &[u64]) -> Result<(), BackendError> {
        (**self).write_tokens(pages, tokens)
    }
    fn expect_pages(&mut self, ranges: &[(PageNum, u64)]) -> Result<(), BackendError> {
        (**self).expect_pages(ranges)
    }
    fn share_placer(&self) -> Option<Box<dyn PagePlacer>> {
        (**self).share_placer()
    }
}

impl<T: GuestControl + ?Sized> GuestControl for &mut T {
    fn pause(&mut self) -> Result<(), BackendError> {
        (**self).pause()
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        (**self).resume()
    }
    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        (**self).save_state()
    }
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        (**self).restore_state(state)
    }
    fn guest_cpu_time(&self) -> Option<Duration> {
        (**self).guest_cpu_time()
    }
    fn resume_pages(&mut self) -> Result<Vec<PageNum>, BackendError> {
        (**self).resume_pages()
    }
    fn set_throttle(&mut self, pct: u8) -> Result<(), BackendError> {
        (**self).set_throttle(pct)
    }
}

//! Dirty tracking: Xen's log-dirty mode as the core's [`DirtyTracker`].

use super::{be, XenDomain};
use crate::xc::{HypercallBitmap, LogDirtyOp};
use migrate_core::DirtyBitmap;
use migrate_core::MemoryLayout;
use migrate_core::{BackendError, BackendErrorKind, DirtyTracker};

/// Xen log-dirty as a [`DirtyTracker`]: `ENABLE_LOGDIRTY`, `CLEAN`,
/// `PEEK` and `OFF`, with a bitmap sized from the domain's maximum GFN.
#[derive(Debug)]
pub struct XenDirtyTracker {
    d: XenDomain,
    bitmap: Option<HypercallBitmap>,
    /// The layout's frames, made once.
    mask: Option<DirtyBitmap>,
}

/// The frames of `layout` as a bitmap, the mask for [`bitmap_from_xen`].
pub(super) fn layout_mask(layout: &MemoryLayout) -> DirtyBitmap {
    let mut inside = DirtyBitmap::new(layout.page_end());
    for r in layout.regions() {
        for p in r.first_page..r.first_page + r.pages {
            inside.set(p);
        }
    }
    inside
}

/// Turns Xen's bitmap words into the core's bitmap over `mask` (from
/// [`layout_mask`]): bits beyond the layout's end, or in its holes, are
/// dropped.
pub(super) fn bitmap_from_xen(words: Vec<u64>, mask: &DirtyBitmap) -> DirtyBitmap {
    let end = mask.len();
    let mut words = words;
    words.resize(end.div_ceil(64) as usize, 0);
    let mut b = DirtyBitmap::from_words(words, end);
    b.intersect_with(mask);
    b
}

impl XenDirtyTracker {
    fn read(&mut self, op: LogDirtyOp, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        let Some(bm) = self.bitmap.as_mut() else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidState,
                "log-dirty read before start",
            ));
        };
        self.d.xen.logdirty_read(self.d.domid, op, bm).map_err(be)?;
        let mask = self.mask.get_or_insert_with(|| layout_mask(&self.d.layout));
        *into = bitmap_from_xen(bm.words(), mask);
        Ok(())
    }
}

impl DirtyTracker for XenDirtyTracker {
    fn start(&mut self) -> Result<(), BackendError> {
        if self.bitmap.is_none() {
            self.bitmap = Some(self.d.xen.bitmap(self.d.max_gpfn + 1).map_err(be)?);
        }
        self.d.xen.logdirty_enable(self.d.domid).map_err(be)
    }

    fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.read(LogDirtyOp::Clean, into)
    }

    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.read(LogDirtyOp::Peek, into)
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        let r = self.d.xen.logdirty_off(self.d.domid).map_err(be);
        if let Some(bm) = self.bitmap.take() {
            self.d.xen.free_bitmap(bm);
        }
        r
    }
}

impl Drop for XenDirtyTracker {
    fn drop(&mut self) {
        if let Some(bm) = self.bitmap.take() {
            self.d.xen.free_bitmap(bm);
        }
    }
}

impl XenDomain {
    /// The log-dirty tracker.
    pub fn tracker(&self) -> XenDirtyTracker {
        XenDirtyTracker {
            d: self.clone(),
            bitmap: None,
            mask: None,
        }
    }
}

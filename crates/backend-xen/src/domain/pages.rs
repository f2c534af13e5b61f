//! Guest memory: reading and writing frames through foreign mappings, in
//! batches, as the core's [`PageSource`] and [`PageSink`].

use super::{be, DomainKind, PvInfo, XenDomain, MAP_BATCH};
use crate::frame::{Gfn, Mfn};
use crate::pv::{self};
use crate::xc::Mapping;
use migrate_core::{BackendError, BackendErrorKind, PageSink, PageSource};
use migrate_core::{MemoryLayout, PageNum};

/// The domain's memory through foreign mappings: reads in batches of up
/// to `MAP_BATCH` (1,024) frames; writes go straight into a writable window of
/// `MAP_BATCH` consecutive frames, mapped again when a page falls
/// outside it.
#[derive(Debug)]
pub struct XenPages {
    d: XenDomain,
}

/// Splits `pages` into the batches one mapping call each covers.
pub(super) fn batches(pages: &[PageNum]) -> impl Iterator<Item = &[PageNum]> {
    pages.chunks(MAP_BATCH)
}

impl XenPages {
    /// Rewrites the page tables among `pages` (just read into `out`) to
    /// canonical form, as their types are now.
    fn canonicalise(
        &self,
        pv: &PvInfo,
        pages: &[PageNum],
        frames: &[u64],
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        let types = self.d.xen.page_types(self.d.domid, frames).map_err(be)?;
        let mut unsettled = pv.unsettled.lock().unwrap_or_else(|e| e.into_inner());
        for (i, (&p, &t)) in pages.iter().zip(&types).enumerate() {
            let Some(level) = pv::table_level(t) else {
                unsettled.remove(&p);
                continue;
            };
            let page = &mut out[i * 4096..(i + 1) * 4096];
            let foreign = pv::canonicalise_table(page, level, &|m| pv.pfn(Mfn(m)).map(|p| p.0))
                .map_err(|e| {
                    BackendError::new(
                        BackendErrorKind::Unsupported,
                        format!("domain {} frame {p:#x}: {e}", self.d.domid),
                    )
                })?;
            if foreign > 0 {
                unsettled.insert(p);
            } else {
                unsettled.remove(&p);
            }
        }
        Ok(())
    }

    fn in_layout(&self, page: PageNum) -> Result<(), BackendError> {
        if self.d.layout.dense_index(page).is_none() {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("frame {page:#x} is not in domain {}'s memory", self.d.domid),
            ));
        }
        Ok(())
    }
}

impl PageSource for XenPages {
    fn layout(&self) -> &MemoryLayout {
        &self.d.layout
    }

    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        if out.len() != pages.len() * 4096 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "output buffer is not one page per frame",
            ));
        }
        let mut at = 0;
        for batch in batches(pages) {
            for &p in batch {
                self.in_layout(p)?;
            }
            let frames: Vec<u64> = batch.iter().map(|&p| self.d.frame(p)).collect();
            let m = self.d.xen.map(self.d.domid, &frames, false).map_err(be)?;
            let first = at;
            for i in 0..batch.len() {
                m.read(i, &mut out[at..at + 4096]).map_err(be)?;
                at += 4096;
            }
            drop(m);
            if let DomainKind::Pv(pv) = &self.d.kind {
                self.canonicalise(pv, batch, &frames, &mut out[first..at])?;
            }
        }
        Ok(())
    }
}

impl PageSink for XenPages {
    fn layout(&self) -> &MemoryLayout {
        &self.d.layout
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        if data.len() != 4096 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "page data is not 4 KiB",
            ));
        }
        self.in_layout(page)?;
        if let Some(pager) = &self.d.pager {
            if pager.is_out(Gfn(page)) {
                return pager.page_in(Gfn(page), data).map_err(be);
            }
        }
        let mut window = self.d.window.lock().unwrap_or_else(|e| e.into_inner());
        let fits = matches!(&*window, Some(w) if page >= w.first && page < w.first + MAP_BATCH as u64 && w.mapped[(page - w.first) as usize]);
        if !fits {
            *window = None;
            let end = (page + MAP_BATCH as u64).min(self.d.max_gpfn + 1);
            // Mapping a frame that is paged out makes libxenforeignmemory
            // wait until it is paged in, which only this thread would do:
            // such slots map `page` (which is in) again, and are not used.
            let out = |p: u64| self.d.pager.as_ref().is_some_and(|g| g.is_out(Gfn(p)));
            let mapped: Vec<bool> = (page..end).map(|p| !out(p)).collect();
            let frames: Vec<u64> = (page..end)
                .zip(&mapped)
                .map(|(p, &m)| {
                    if m {
                        self.d.frame(p)
                    } else {
                        self.d.frame(page)
                    }
                })
                .collect();
            let map = self.d.xen.map(self.d.domid, &frames, true).map_err(be)?;
            *window = Some(Window {
                first: page,
                map,
                mapped,
            });
        }
        let w = window.as_ref().expect("window just mapped");
        w.map.write((page - w.first) as usize, data).map_err(be)
    }

    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.discard_pages(&[page])
    }

    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        let Some(pager) = &self.d.pager else {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "domain {} has no pager: post-copy on Xen needs memory paging (see backend_xen::paging)",
                    self.d.domid
                ),
            ));
        };
        // A frame mapped here cannot be paged out.
        *self.d.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for &p in pages {
            self.in_layout(p)?;
            pager.page_out(Gfn(p)).map_err(be)?;
        }
        Ok(())
    }
}

/// The sink's writable window: `MAP_BATCH` frames from `first`; a slot
/// not `mapped` holds another frame and is not written through.
#[derive(Debug)]
pub(super) struct Window {
    first: u64,
    map: Mapping,
    mapped: Vec<bool>,
}

impl XenDomain {
    /// The domain's memory.
    pub fn pages(&self) -> XenPages {
        XenPages { d: self.clone() }
    }
}

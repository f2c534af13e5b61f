//! A conformance suite for backends, generic over the traits.
//!
//! Every backend's tests run these checks against its own implementations
//! (the simulator's do; KVM and Xen are to do the same), so that all of
//! them honour one contract. Each check returns `Err` with a description
//! of the first violation instead of panicking, for the caller to assert.
//!
//! The contract checked:
//! - a [`DirtyTracker`] reports every page written after `start` (it may
//!   report more, never less, unless it says it is exact); `peek` does not
//!   clear and is stable; `collect_and_clear` returns what `peek` saw and
//!   clears it; pages written before `start` are not reported;
//! - a [`PageSource`] and a [`PageSink`] move every page of the layout
//!   unchanged, zero pages included, and refuse pages outside the layout
//!   and buffers of the wrong size with an error, not a panic.

use crate::backend::{DirtyTracker, PageSink, PageSource};
use crate::bitmap::DirtyBitmap;
use crate::page::{MemoryLayout, PageNum};

/// How precise a tracker claims to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Reports exactly the pages written (the simulator).
    Exact,
    /// May report pages that were not written (hardware logs at a coarser
    /// grain, or a guest that keeps running); never fewer.
    Superset,
}

fn missing(what: &str, want: &[PageNum], got: &DirtyBitmap) -> Result<(), String> {
    match want.iter().find(|p| !got.get(**p)) {
        Some(p) => Err(format!(
            "{what}: page {p:#x} was written but is not reported"
        )),
        None => Ok(()),
    }
}

fn exact(what: &str, want: &[PageNum], got: &DirtyBitmap) -> Result<(), String> {
    missing(what, want, got)?;
    match got.iter_ones().find(|p| !want.contains(p)) {
        Some(p) => Err(format!(
            "{what}: page {p:#x} is reported but was not written"
        )),
        None => Ok(()),
    }
}

/// Checks a dirty tracker. `write` must make the guest (or the VMM on its
/// behalf) write the given page; the pages used are spread over the
/// layout's regions.
pub fn check_dirty_tracker<T: DirtyTracker + ?Sized>(
    tracker: &mut T,
    layout: &MemoryLayout,
    precision: Precision,
    write: &mut dyn FnMut(PageNum),
) -> Result<(), String> {
    let n = layout.total_pages();
    let pick = |k: u64| layout.page_at(k % n).unwrap_or(0);
    let before = pick(n / 3);
    let first: Vec<PageNum> = [0, n / 2, n - 1].iter().map(|k| pick(*k)).collect();
    let second: Vec<PageNum> = [1, n / 4, n - 2].iter().map(|k| pick(*k)).collect();
    let check = |what: &str, want: &[PageNum], got: &DirtyBitmap| match precision {
        Precision::Exact => exact(what, want, got),
        Precision::Superset => missing(what, want, got),
    };
    write(before);
    tracker.start().map_err(|e| format!("start: {e}"))?;
    let mut a = DirtyBitmap::new(layout.page_end());
    let mut b = DirtyBitmap::new(layout.page_end());
    tracker
        .collect_and_clear(&mut a)
        .map_err(|e| format!("collect: {e}"))?;
    if precision == Precision::Exact && a.get(before) {
        return Err(format!("page {before:#x} written before start is reported"));
    }
    for p in &first {
        write(*p);
    }
    tracker.peek(&mut a).map_err(|e| format!("peek: {e}"))?;
    check("peek", &first, &a)?;
    tracker
        .peek(&mut b)
        .map_err(|e| format!("second peek: {e}"))?;
    if let Some(p) = a.iter_ones().find(|p| !b.get(*p)) {
        return Err(format!("peek cleared page {p:#x}"));
    }
    tracker
        .collect_and_clear(&mut a)
        .map_err(|e| format!("collect: {e}"))?;
    check("collect after peek", &first, &a)?;
    for p in &second {
        write(*p);
    }
    tracker
        .collect_and_clear(&mut a)
        .map_err(|e| format!("collect: {e}"))?;
    check("second collect", &second, &a)?;
    if precision == Precision::Exact {
        tracker
            .collect_and_clear(&mut a)
            .map_err(|e| format!("collect: {e}"))?;
        if !a.none() {
            return Err("collect with no writes since the last one reports pages".into());
        }
    }
    tracker.stop().map_err(|e| format!("stop: {e}"))?;
    Ok(())
}

/// Checks that every page read from `source` and written to `sink` reads
/// back unchanged from the sink, zero pages included, and that both refuse
/// bad arguments with an error. The two must have the same layout.
pub fn check_page_roundtrip<S, K>(source: &mut S, sink: &mut K) -> Result<(), String>
where
    S: PageSource + ?Sized,
    K: PageSink + PageSource + ?Sized,
{
    let layout = PageSource::layout(source).clone();
    if &layout != PageSink::layout(sink) {
        return Err("source and sink layouts differ".into());
    }
    let ps = layout.page_size().get();
    let pages: Vec<PageNum> = layout.pages().collect();
    let mut buf = vec![0u8; ps * 64];
    let mut back = vec![0u8; ps * 64];
    let zeros = vec![0u8; ps];
    for chunk in pages.chunks(64) {
        let len = chunk.len() * ps;
        source
            .read_pages(chunk, &mut buf[..len])
            .map_err(|e| format!("read: {e}"))?;
        for (p, data) in chunk.iter().zip(buf[..len].chunks_exact(ps)) {
            if data == zeros.as_slice() {
                sink.write_zero_page(*p)
            } else {
                sink.write_page(*p, data)
            }
            .map_err(|e| format!("write page {p:#x}: {e}"))?;
        }
        sink.read_pages(chunk, &mut back[..len])
            .map_err(|e| format!("read back: {e}"))?;
        if let Some(i) =
            (0..chunk.len()).find(|i| buf[i * ps..(i + 1) * ps] != back[i * ps..(i + 1) * ps])
        {
            return Err(format!("page {:#x} differs after the round trip", chunk[i]));
        }
    }
    let outside = layout.page_end();
    if source.read_pages(&[outside], &mut buf[..ps]).is_ok() {
        return Err(format!(
            "reading page {outside:#x}, past the end, succeeded"
        ));
    }
    if sink.write_page(outside, &buf[..ps]).is_ok() {
        return Err(format!(
            "writing page {outside:#x}, past the end, succeeded"
        ));
    }
    if let Some(first) = pages.first() {
        if source.read_pages(&[*first], &mut buf[..ps - 1]).is_ok() {
            return Err("reading into a buffer one byte short succeeded".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, BackendErrorKind};
    use crate::page::PageSize;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A tracker over a shared bitmap, with switchable faults.
    struct Toy {
        dirty: Rc<RefCell<DirtyBitmap>>,
        peek_clears: bool,
        loses_last: bool,
    }

    impl DirtyTracker for Toy {
        fn start(&mut self) -> Result<(), BackendError> {
            self.dirty.borrow_mut().clear_all();
            Ok(())
        }
        fn collect_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
            into.copy_from(&self.dirty.borrow());
            if self.loses_last {
                if let Some(p) = into.iter_ones().last() {
                    into.clear(p);
                }
            }
            self.dirty.borrow_mut().clear_all();
            Ok(())
        }
        fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
            into.copy_from(&self.dirty.borrow());
            if self.peek_clears {
                self.dirty.borrow_mut().clear_all();
            }
            Ok(())
        }
        fn stop(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    fn run(peek_clears: bool, loses_last: bool) -> Result<(), String> {
        let layout = MemoryLayout::flat(PageSize::DEFAULT, 64 * 4096).unwrap();
        let dirty = Rc::new(RefCell::new(DirtyBitmap::new(64)));
        let mut t = Toy {
            dirty: dirty.clone(),
            peek_clears,
            loses_last,
        };
        check_dirty_tracker(&mut t, &layout, Precision::Exact, &mut |p| {
            dirty.borrow_mut().set(p);
        })
    }

    #[test]
    fn a_correct_tracker_passes_and_broken_ones_fail() {
        assert_eq!(run(false, false), Ok(()));
        assert!(run(true, false).unwrap_err().contains("peek cleared"));
        assert!(run(false, true).unwrap_err().contains("not reported"));
    }

    /// Memory that can be told to corrupt what it stores.
    struct Mem {
        layout: MemoryLayout,
        data: Vec<u8>,
        corrupt: bool,
    }

    impl Mem {
        fn range(&self, p: PageNum) -> Result<std::ops::Range<usize>, BackendError> {
            let ps = self.layout.page_size().get();
            let i = self.layout.dense_index(p).ok_or_else(|| {
                BackendError::new(BackendErrorKind::InvalidArgument, "page outside the layout")
            })? as usize;
            Ok(i * ps..(i + 1) * ps)
        }
    }

    impl PageSource for Mem {
        fn layout(&self) -> &MemoryLayout {
            &self.layout
        }
        fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
            let ps = self.layout.page_size().get();
            if out.len() != pages.len() * ps {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidArgument,
                    "buffer size",
                ));
            }
            for (p, o) in pages.iter().zip(out.chunks_exact_mut(ps)) {
                o.copy_from_slice(&self.data[self.range(*p)?]);
            }
            Ok(())
        }
    }

    impl PageSink for Mem {
        fn layout(&self) -> &MemoryLayout {
            &self.layout
        }
        fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
            let r = self.range(page)?;
            self.data[r.clone()].copy_from_slice(data);
            if self.corrupt {
                self.data[r.start] ^= 1;
            }
            Ok(())
        }
    }

    #[test]
    fn a_sink_that_corrupts_pages_fails() {
        let layout = MemoryLayout::flat(PageSize::DEFAULT, 8 * 4096).unwrap();
        let mk = |corrupt| Mem {
            layout: layout.clone(),
            data: (0..8 * 4096).map(|i| (i % 251) as u8).collect(),
            corrupt,
        };
        assert_eq!(check_page_roundtrip(&mut mk(false), &mut mk(false)), Ok(()));
        let err = check_page_roundtrip(&mut mk(false), &mut mk(true)).unwrap_err();
        assert!(err.contains("differs"), "{err}");
    }
}

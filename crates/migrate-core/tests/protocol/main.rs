//! Tests of the wire protocol: every record round-trips, the decoder
//! accepts exactly the canonical encoding of a record, and any other input
//! (random bytes, cut, extended or corrupted frames, hand-built bad frames)
//! gives the right [`ProtocolError`] without panicking and without
//! allocating more than the frame holds.

use migrate_core::digest::MemoryDigest;
use migrate_core::protocol::{
    self, encode_to_vec, max_batch_pages, Decoder, ProtocolError, Record, RecordType, MAGIC,
    MAX_BATCH_DATA, MAX_BATCH_PAGES, MAX_DEVICE_STATE, MAX_DISCARD_RANGES, MAX_DISCARD_WORDS,
    MAX_FRAME_LEN, MAX_REGIONS, MAX_REQUEST_PAGES, MAX_TEXT, PAGE_FLAG_ZERO, RECORD_HEADER_LEN,
    VERSION,
};
use migrate_core::transport::{StreamTransport, Transport};
use migrate_core::DeviceState;
use migrate_core::{LayoutError, MemoryLayout, PageNum, PageSize, Region, MAX_PAGE_END};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

// allocation measurement
/// The system allocator, noting the largest single request made by a
/// thread while that thread measures (see [`largest_allocation`]).
struct MeasuringAllocator;

thread_local! {
    /// `Some(largest request so far)` while this thread is measuring.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note_allocation(size: usize) {
    // `try_with`: allocations during thread teardown are simply not noted.
    let _ = LARGEST.try_with(|l| {
        if let Some(m) = l.get() {
            l.set(Some(m.max(size)));
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds the `GlobalAlloc` contract; noting a size neither allocates nor
// touches the memory handed out.
unsafe impl GlobalAlloc for MeasuringAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: MeasuringAllocator = MeasuringAllocator;

/// Runs `f` and returns its result with the largest single allocation it
/// made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(Some(0)));
    let r = f();
    let largest = LARGEST.with(|l| l.replace(None)).unwrap_or(0);
    (r, largest)
}

mod common;
#[allow(unused_imports)]
use common::*;
mod limits_and_edges;
mod malformed_frames_and_checksums;
mod out_of_range;
mod round_trips;
mod truncated_and_oversized;
mod versions_and_record_order;

//! Helpers the test modules share.

#![allow(dead_code, unused_imports)]

use super::*;

pub(crate) use migrate_core::digest::{
    completion_digest, digest_memory, DigestBuilder, MemoryDigest,
};
pub(crate) use migrate_core::driver::run_destination;
pub(crate) use migrate_core::protocol::{
    encode_page_batch, encode_to_vec, Decoder, ProtocolError, Record, RecordType, Sequencer,
    RECORD_HEADER_LEN, VERSION,
};
pub(crate) use migrate_core::transport::{channel_pair, Transport, TransportError};
pub(crate) use migrate_core::{
    BackendError, BackendErrorKind, DeviceState, GuestControl, PageSink, PageSource,
};
pub(crate) use migrate_core::{Clock, VirtualClock};
pub(crate) use migrate_core::{DestStatus, DestinationEngine};
pub(crate) use migrate_core::{ErrorKind, MigrationError};
pub(crate) use migrate_core::{MemoryLayout, PageNum, PageSize, Region};
pub(crate) use std::sync::Arc;
pub(crate) use std::time::Duration;

// test backend

/// Guest memory: a layout and its pages, densely packed (holes take no
/// room).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TestMemory {
    pub(crate) layout: MemoryLayout,
    pub(crate) bytes: Vec<u8>,
    /// A page this sink stores wrongly (one byte flipped), as faulty
    /// memory would.
    pub(crate) corrupt_page: Option<PageNum>,
    /// The ranges given to `expect_pages`, in order.
    pub(crate) expected: Vec<(PageNum, u64)>,
}

impl TestMemory {
    /// All-zero memory.
    pub(crate) fn zeroed(layout: &MemoryLayout) -> Self {
        TestMemory {
            layout: layout.clone(),
            bytes: vec![0; layout.total_bytes() as usize],
            corrupt_page: None,
            expected: Vec::new(),
        }
    }

    /// Memory where some pages are zero and the others hold a pattern
    /// made of their number.
    pub(crate) fn patterned(layout: &MemoryLayout) -> Self {
        let mut m = Self::zeroed(layout);
        for page in layout.pages() {
            if page % 3 == 0 {
                continue;
            }
            for (i, b) in m.page_mut(page).iter_mut().enumerate() {
                *b = ((page as u8).wrapping_mul(31) ^ i as u8) | 1;
            }
        }
        m
    }

    pub(crate) fn range(&self, page: PageNum) -> Option<std::ops::Range<usize>> {
        let ps = self.layout.page_size().get();
        let i = self.layout.dense_index(page)? as usize;
        Some(i * ps..(i + 1) * ps)
    }

    pub(crate) fn page(&self, page: PageNum) -> &[u8] {
        let r = self.range(page).expect("page in layout");
        &self.bytes[r]
    }

    pub(crate) fn page_mut(&mut self, page: PageNum) -> &mut [u8] {
        let r = self.range(page).expect("page in layout");
        &mut self.bytes[r]
    }

    /// The contents of `pages`, one after another.
    pub(crate) fn read(&self, pages: &[PageNum]) -> Vec<u8> {
        pages.iter().flat_map(|p| self.page(*p).to_vec()).collect()
    }

    /// The memory digest, computed page by page as the protocol defines it.
    pub(crate) fn digest(&self) -> MemoryDigest {
        let mut d = DigestBuilder::new();
        for page in self.layout.pages() {
            d.add_page(page, self.page(page));
        }
        d.finish()
    }
}

pub(crate) fn invalid(page: PageNum) -> BackendError {
    BackendError::new(
        BackendErrorKind::InvalidArgument,
        format!("page {page} is not guest memory"),
    )
}

impl PageSource for TestMemory {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        let ps = self.layout.page_size().get();
        assert_eq!(out.len(), pages.len() * ps);
        for (p, chunk) in pages.iter().zip(out.chunks_exact_mut(ps)) {
            let r = self.range(*p).ok_or_else(|| invalid(*p))?;
            chunk.copy_from_slice(&self.bytes[r]);
        }
        Ok(())
    }
}

impl PageSink for TestMemory {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        assert_eq!(data.len(), self.layout.page_size().get());
        let r = self.range(page).ok_or_else(|| invalid(page))?;
        let at = r.start;
        self.bytes[r].copy_from_slice(data);
        if self.corrupt_page == Some(page) {
            self.bytes[at] ^= 0x20;
        }
        Ok(())
    }

    fn discard(&mut self, page: PageNum) -> Result<(), BackendError> {
        let r = self.range(page).ok_or_else(|| invalid(page))?;
        self.bytes[r].fill(0);
        Ok(())
    }

    fn expect_pages(&mut self, ranges: &[(PageNum, u64)]) -> Result<(), BackendError> {
        self.expected.extend_from_slice(ranges);
        Ok(())
    }
}

/// A destination guest that records what was done to it.
#[derive(Debug, Default)]
pub(crate) struct TestGuest {
    pub(crate) resumed: bool,
    pub(crate) restored: Option<DeviceState>,
}

impl GuestControl for TestGuest {
    fn pause(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        assert!(
            self.restored.is_some(),
            "resumed before the device state was restored"
        );
        self.resumed = true;
        Ok(())
    }

    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            "a destination never saves state",
        ))
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        self.restored = Some(state.clone());
        Ok(())
    }
}

/// The destination engine, fed frames numbered as a source numbers them:
/// each frame handed to [`Engine::handle_frame`] is stamped with the next
/// sequence number first, so the streams below are built from the plain
/// encoders and still arrive in sequence.
pub(crate) struct Engine {
    pub(crate) inner: DestinationEngine<TestMemory, TestGuest>,
    pub(crate) seq: Sequencer,
}

impl Engine {
    pub(crate) fn handle_frame(&mut self, frame: &[u8]) -> Result<DestStatus, MigrationError> {
        let mut f = frame.to_vec();
        self.seq.seal(&mut f);
        self.inner.handle_frame(&f)
    }

    pub(crate) fn into_parts(self) -> (TestMemory, TestGuest) {
        self.inner.into_parts()
    }
}

impl std::ops::Deref for Engine {
    type Target = DestinationEngine<TestMemory, TestGuest>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for Engine {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

/// `frames` numbered 0, 1, 2, … as a source sends them.
pub(crate) fn sealed(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut seq = Sequencer::new();
    frames
        .into_iter()
        .map(|mut f| {
            seq.seal(&mut f);
            f
        })
        .collect()
}

// the streams

/// 4 KiB pages in two regions with a hole between them: pages 0..6 and
/// 10..16 (12 pages).
pub(crate) fn layout() -> MemoryLayout {
    MemoryLayout::new(
        PageSize::DEFAULT,
        vec![
            Region {
                first_page: 0,
                pages: 6,
            },
            Region {
                first_page: 10,
                pages: 6,
            },
        ],
    )
    .unwrap()
}

/// A page in the hole of [`layout`].
pub(crate) const HOLE: PageNum = 7;

pub(crate) fn engine() -> Engine {
    let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    Engine {
        inner: DestinationEngine::new(TestMemory::zeroed(&layout()), TestGuest::default(), clock),
        seq: Sequencer::new(),
    }
}

pub(crate) fn device_state() -> DeviceState {
    DeviceState {
        format: "test".into(),
        version: 2,
        data: b"vcpu0: rip=0xfff0".to_vec(),
    }
}

pub(crate) fn header() -> Vec<u8> {
    encode_to_vec(&Record::Header { version: VERSION })
}

pub(crate) fn layout_frame(layout: &MemoryLayout) -> Vec<u8> {
    encode_to_vec(&Record::Layout(layout.clone()))
}

/// A page batch of `pages` with their contents in `memory`.
pub(crate) fn pages(memory: &TestMemory, round: u32, pages: &[PageNum]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_page_batch(
        round,
        memory.layout.page_size(),
        pages,
        &memory.read(pages),
        &mut out,
    );
    out
}

pub(crate) fn round_end(round: u32, pages_sent: u64) -> Vec<u8> {
    encode_to_vec(&Record::RoundEnd { round, pages_sent })
}

pub(crate) fn switch_over(round: u32) -> Vec<u8> {
    encode_to_vec(&Record::SwitchOver {
        round,
        postcopy: false,
    })
}

pub(crate) fn postcopy_switch_over(round: u32) -> Vec<u8> {
    encode_to_vec(&Record::SwitchOver {
        round,
        postcopy: true,
    })
}

pub(crate) fn discard(ranges: &[(PageNum, u64)]) -> Vec<u8> {
    encode_to_vec(&Record::Discard(ranges.to_vec()))
}

pub(crate) fn state_frame() -> Vec<u8> {
    encode_to_vec(&Record::DeviceState(device_state()))
}

/// A completion record for memory of digest `digest` and the
/// [`device_state`] (the record binds the two).
pub(crate) fn complete(total_pages: u64, digest: MemoryDigest) -> Vec<u8> {
    encode_to_vec(&Record::Complete {
        total_pages,
        digest: completion_digest(digest, &device_state()),
    })
}

/// The source's guest memory.
pub(crate) fn source() -> TestMemory {
    TestMemory::patterned(&layout())
}

/// Every page of the source once, in two batches.
pub(crate) fn all_pages(src: &TestMemory, round: u32) -> Vec<Vec<u8>> {
    let all: Vec<PageNum> = src.layout.pages().collect();
    let (a, b) = all.split_at(all.len() / 2);
    vec![pages(src, round, a), pages(src, round, b)]
}

/// A complete, correct stream: a pre-copy round of every page, a final
/// round re-sending two pages, device state and completion.
pub(crate) fn good_stream(src: &TestMemory) -> Vec<Vec<u8>> {
    let total = src.layout.total_pages();
    let mut s = vec![header(), layout_frame(&src.layout)];
    s.extend(all_pages(src, 1));
    s.push(round_end(1, total));
    s.push(switch_over(2));
    s.push(pages(src, 2, &[1, 14]));
    s.push(round_end(2, 2));
    s.push(state_frame());
    s.push(complete(total, src.digest()));
    s
}

/// Feeds `frames` to a fresh engine, expecting every frame but the last
/// to be accepted and the last to fail. Checks that the guest was not
/// resumed, that no resume confirmation is queued, and that the engine
/// refuses anything after the failure. Returns the error and the parts.
pub(crate) fn fails_on_last(frames: &[Vec<u8>]) -> (MigrationError, TestMemory, TestGuest) {
    let mut e = engine();
    let (last, init) = frames.split_last().expect("at least one frame");
    for (i, f) in init.iter().enumerate() {
        match e.handle_frame(f) {
            Ok(DestStatus::Continue) => {}
            other => panic!("frame {i} of {}: {other:?}", frames.len()),
        }
    }
    let err = match e.handle_frame(last) {
        Err(err) => err,
        Ok(s) => panic!("last frame accepted: {s:?}"),
    };
    assert!(!e.resumed());
    assert!(!e.completed());
    assert!(e.report().digest.is_none());
    let mut decoder = Decoder::new();
    while let Some(reply) = e.poll_transmit() {
        let r = decoder.decode(&reply).expect("replies decode");
        assert!(
            matches!(
                r,
                Record::Header { .. } | Record::Capabilities(_) | Record::Ready
            ),
            "unexpected reply {r:?} after a failure"
        );
    }
    // A failed engine takes nothing more, not even a valid frame.
    for f in [last, &header(), &encode_to_vec(&Record::Ready)] {
        assert!(matches!(
            e.handle_frame(f),
            Err(MigrationError::InvalidUse(_))
        ));
    }
    assert!(e.poll_transmit().is_none());
    let (memory, guest) = e.into_parts();
    assert!(!guest.resumed, "guest resumed after {err}");
    (err, memory, guest)
}

// post-copy

/// Pages 1 and 14 change after the pre-copy round; post-copy discards
/// them and pushes their new content after the guest resumed here.
pub(crate) const DIRTIED: [PageNum; 2] = [1, 14];

/// Memory as pre-copy saw it, and as it is at switch-over.
pub(crate) fn postcopy_source() -> (TestMemory, TestMemory) {
    let before = source();
    let mut after = before.clone();
    for p in DIRTIED {
        after.page_mut(p).fill(0x5c);
    }
    (before, after)
}

/// Up to the device state that resumes the guest.
pub(crate) fn postcopy_prefix(before: &TestMemory) -> Vec<Vec<u8>> {
    let mut s = vec![header(), layout_frame(&before.layout)];
    s.extend(all_pages(before, 1));
    s.push(round_end(1, before.layout.total_pages()));
    s.push(postcopy_switch_over(2));
    s.push(discard(&[(1, 1), (14, 1)]));
    s
}

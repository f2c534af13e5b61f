//! The destination engine given good and bad streams: it resumes its
//! guest only after a complete, verified stream, and refuses everything
//! else with the right error, without resuming.

use migrate_core::digest::{completion_digest, digest_memory, DigestBuilder, MemoryDigest};
use migrate_core::driver::run_destination;
use migrate_core::protocol::{
    encode_page_batch, encode_to_vec, Decoder, ProtocolError, Record, RecordType, Sequencer,
    RECORD_HEADER_LEN, VERSION,
};
use migrate_core::transport::{channel_pair, Transport, TransportError};
use migrate_core::{
    BackendError, BackendErrorKind, DeviceState, GuestControl, PageSink, PageSource,
};
use migrate_core::{Clock, VirtualClock};
use migrate_core::{DestStatus, DestinationEngine};
use migrate_core::{ErrorKind, MigrationError};
use migrate_core::{MemoryLayout, PageNum, PageSize, Region};
use std::sync::Arc;
use std::time::Duration;

// ------------------------------------------------------------ test backend

/// Guest memory: a layout and its pages, densely packed (holes take no
/// room).
#[derive(Clone, Debug, PartialEq, Eq)]
struct TestMemory {
    layout: MemoryLayout,
    bytes: Vec<u8>,
    /// A page this sink stores wrongly (one byte flipped), as faulty
    /// memory would.
    corrupt_page: Option<PageNum>,
}

impl TestMemory {
    /// All-zero memory.
    fn zeroed(layout: &MemoryLayout) -> Self {
        TestMemory {
            layout: layout.clone(),
            bytes: vec![0; layout.total_bytes() as usize],
            corrupt_page: None,
        }
    }

    /// Memory where some pages are zero and the others hold a pattern
    /// made of their number.
    fn patterned(layout: &MemoryLayout) -> Self {
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

    fn range(&self, page: PageNum) -> Option<std::ops::Range<usize>> {
        let ps = self.layout.page_size().get();
        let i = self.layout.dense_index(page)? as usize;
        Some(i * ps..(i + 1) * ps)
    }

    fn page(&self, page: PageNum) -> &[u8] {
        let r = self.range(page).expect("page in layout");
        &self.bytes[r]
    }

    fn page_mut(&mut self, page: PageNum) -> &mut [u8] {
        let r = self.range(page).expect("page in layout");
        &mut self.bytes[r]
    }

    /// The contents of `pages`, one after another.
    fn read(&self, pages: &[PageNum]) -> Vec<u8> {
        pages.iter().flat_map(|p| self.page(*p).to_vec()).collect()
    }

    /// The memory digest, computed page by page as the protocol defines it.
    fn digest(&self) -> MemoryDigest {
        let mut d = DigestBuilder::new();
        for page in self.layout.pages() {
            d.add_page(page, self.page(page));
        }
        d.finish()
    }
}

fn invalid(page: PageNum) -> BackendError {
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
}

/// A destination guest that records what was done to it.
#[derive(Debug, Default)]
struct TestGuest {
    resumed: bool,
    restored: Option<DeviceState>,
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
struct Engine {
    inner: DestinationEngine<TestMemory, TestGuest>,
    seq: Sequencer,
}

impl Engine {
    fn handle_frame(&mut self, frame: &[u8]) -> Result<DestStatus, MigrationError> {
        let mut f = frame.to_vec();
        self.seq.seal(&mut f);
        self.inner.handle_frame(&f)
    }

    fn into_parts(self) -> (TestMemory, TestGuest) {
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
fn sealed(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut seq = Sequencer::new();
    frames
        .into_iter()
        .map(|mut f| {
            seq.seal(&mut f);
            f
        })
        .collect()
}

// ------------------------------------------------------------ the streams

/// 4 KiB pages in two regions with a hole between them: pages 0..6 and
/// 10..16 (12 pages).
fn layout() -> MemoryLayout {
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
const HOLE: PageNum = 7;

fn engine() -> Engine {
    let clock: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    Engine {
        inner: DestinationEngine::new(TestMemory::zeroed(&layout()), TestGuest::default(), clock),
        seq: Sequencer::new(),
    }
}

fn device_state() -> DeviceState {
    DeviceState {
        format: "test".into(),
        version: 2,
        data: b"vcpu0: rip=0xfff0".to_vec(),
    }
}

fn header() -> Vec<u8> {
    encode_to_vec(&Record::Header { version: VERSION })
}

fn layout_frame(layout: &MemoryLayout) -> Vec<u8> {
    encode_to_vec(&Record::Layout(layout.clone()))
}

/// A page batch of `pages` with their contents in `memory`.
fn pages(memory: &TestMemory, round: u32, pages: &[PageNum]) -> Vec<u8> {
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

fn round_end(round: u32, pages_sent: u64) -> Vec<u8> {
    encode_to_vec(&Record::RoundEnd { round, pages_sent })
}

fn switch_over(round: u32) -> Vec<u8> {
    encode_to_vec(&Record::SwitchOver {
        round,
        postcopy: false,
    })
}

fn postcopy_switch_over(round: u32) -> Vec<u8> {
    encode_to_vec(&Record::SwitchOver {
        round,
        postcopy: true,
    })
}

fn discard(ranges: &[(PageNum, u64)]) -> Vec<u8> {
    encode_to_vec(&Record::Discard(ranges.to_vec()))
}

fn state_frame() -> Vec<u8> {
    encode_to_vec(&Record::DeviceState(device_state()))
}

/// A completion record for memory of digest `digest` and the
/// [`device_state`] (the record binds the two).
fn complete(total_pages: u64, digest: MemoryDigest) -> Vec<u8> {
    encode_to_vec(&Record::Complete {
        total_pages,
        digest: completion_digest(digest, &device_state()),
    })
}

/// The source's guest memory.
fn source() -> TestMemory {
    TestMemory::patterned(&layout())
}

/// Every page of the source once, in two batches.
fn all_pages(src: &TestMemory, round: u32) -> Vec<Vec<u8>> {
    let all: Vec<PageNum> = src.layout.pages().collect();
    let (a, b) = all.split_at(all.len() / 2);
    vec![pages(src, round, a), pages(src, round, b)]
}

/// A complete, correct stream: a pre-copy round of every page, a final
/// round re-sending two pages, device state and completion.
fn good_stream(src: &TestMemory) -> Vec<Vec<u8>> {
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
fn fails_on_last(frames: &[Vec<u8>]) -> (MigrationError, TestMemory, TestGuest) {
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
            matches!(r, Record::Header { .. } | Record::Ready),
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

// -------------------------------------------------------- the good stream

#[test]
fn a_complete_stream_resumes_the_guest() {
    let src = source();
    let stream = good_stream(&src);
    let mut e = engine();
    let (last, init) = stream.split_last().unwrap();
    for f in init {
        assert_eq!(e.handle_frame(f).unwrap(), DestStatus::Continue);
        assert!(!e.resumed());
    }
    assert_eq!(e.handle_frame(last).unwrap(), DestStatus::Completed);
    assert!(e.resumed());
    assert!(e.completed());
    assert!(!e.in_postcopy());

    // Replies: our header, ready, resumed.
    let mut d = Decoder::new();
    let replies: Vec<Vec<u8>> = std::iter::from_fn(|| e.poll_transmit()).collect();
    assert_eq!(replies.len(), 3);
    assert_eq!(
        d.decode(&replies[0]),
        Ok(Record::Header { version: VERSION })
    );
    assert_eq!(d.decode(&replies[1]), Ok(Record::Ready));
    assert_eq!(
        d.decode(&replies[2]),
        Ok(Record::Resumed(e.report().resume))
    );

    let report = e.report().clone();
    let zero = src
        .layout
        .pages()
        .filter(|p| src.page(*p).iter().all(|b| *b == 0))
        .count() as u64;
    assert!(zero > 0);
    assert_eq!(report.pages_received, src.layout.total_pages() + 2);
    assert_eq!(report.zero_pages, zero);
    assert_eq!(report.rounds, 2);
    assert_eq!(report.digest, Some(src.digest()));
    assert_eq!(
        report.bytes_received,
        stream.iter().map(|f| f.len() as u64).sum::<u64>()
    );

    // Nothing is taken after the resume.
    assert!(matches!(
        e.handle_frame(&round_end(3, 0)),
        Err(MigrationError::InvalidUse(_))
    ));
    assert!(e.resumed());

    let (mut memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(guest.restored, Some(device_state()));
    assert_eq!(memory.bytes, src.bytes);
    // The digest the test computes is the library's.
    let mut src = src;
    assert_eq!(digest_memory(&mut src, &layout()).unwrap(), memory.digest());
    assert_eq!(
        digest_memory(&mut memory, &layout()).unwrap(),
        report.digest.unwrap()
    );
}

#[test]
fn a_stream_that_stops_early_never_resumes() {
    let src = source();
    let stream = good_stream(&src);
    // Every prefix of the stream short of completion.
    for cut in 0..stream.len() {
        let mut e = engine();
        for f in &stream[..cut] {
            assert_eq!(e.handle_frame(f).unwrap(), DestStatus::Continue);
        }
        assert!(!e.resumed(), "resumed after {cut} frames");
        assert!(!e.completed());
        // The driver gives up on a stream that ended; the guest stays put.
        e.fail();
        assert!(!e.resumed());
        assert!(matches!(
            e.handle_frame(&stream[cut]),
            Err(MigrationError::InvalidUse(_))
        ));
        let (_, guest) = e.into_parts();
        assert!(!guest.resumed);
        assert!(guest.restored.is_none());
    }
}

// ------------------------------------------------------ incomplete streams

#[test]
fn completion_without_switch_over() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(round_end(1, src.layout.total_pages()));
    stream.push(complete(src.layout.total_pages(), src.digest()));
    let (err, _, guest) = fails_on_last(&stream);
    assert!(matches!(err, MigrationError::Incomplete(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
    assert!(guest.restored.is_none());
}

#[test]
fn device_state_before_switch_over_is_unexpected() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(state_frame());
    let (err, _, _) = fails_on_last(&stream);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::DeviceState,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn completion_with_missing_pages() {
    let src = source();
    let total = src.layout.total_pages();
    // Every page but one (page 12), in one batch.
    let some: Vec<PageNum> = src.layout.pages().filter(|p| *p != 12).collect();
    let stream = vec![
        header(),
        layout_frame(&src.layout),
        pages(&src, 1, &some),
        switch_over(2),
        state_frame(),
        complete(total, src.digest()),
    ];
    let (err, memory, guest) = fails_on_last(&stream);
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("1 of 12"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(guest.restored.is_none());
    // The pages that did arrive were written.
    for p in some {
        assert_eq!(memory.page(p), src.page(p));
    }
}

#[test]
fn completion_that_miscounts_the_pages() {
    let src = source();
    let mut stream = good_stream(&src);
    let last = stream.len() - 1;
    stream[last] = complete(src.layout.total_pages() + 1, src.digest());
    let (err, _, _) = fails_on_last(&stream);
    assert!(matches!(err, MigrationError::Incomplete(_)), "{err:?}");
}

#[test]
fn completion_without_device_state() {
    let src = source();
    let mut stream = good_stream(&src);
    let state = stream.len() - 2;
    assert_eq!(stream[state], state_frame());
    stream.remove(state);
    let (err, _, guest) = fails_on_last(&stream);
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("device state"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(guest.restored.is_none());
}

#[test]
fn completion_whose_digest_does_not_match() {
    let src = source();
    // The source claims memory other than what it sent: one byte differs.
    let mut claimed = src.clone();
    claimed.page_mut(13)[100] ^= 0x40;
    let mut stream = good_stream(&src);
    let last = stream.len() - 1;
    stream[last] = complete(src.layout.total_pages(), claimed.digest());
    let (err, memory, guest) = fails_on_last(&stream);
    match err {
        MigrationError::DigestMismatch { expected, actual } => {
            assert_eq!(
                expected,
                completion_digest(claimed.digest(), &device_state())
            );
            assert_eq!(actual, completion_digest(src.digest(), &device_state()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(memory.bytes, src.bytes);
    assert!(
        guest.restored.is_none(),
        "state restored before verification"
    );
}

#[test]
fn pages_corrupted_in_a_valid_frame_fail_the_digest() {
    // A page batch that is well formed but carries wrong content (a
    // corrupt source read) is caught by the digest.
    let src = source();
    let mut wrong = src.clone();
    wrong.page_mut(4).fill(0xee);
    let mut stream = good_stream(&src);
    let final_batch = stream.len() - 4;
    stream.insert(final_batch + 1, pages(&wrong, 2, &[4]));
    let (err, memory, _) = fails_on_last(&stream);
    match err {
        MigrationError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, completion_digest(src.digest(), &device_state()));
            assert_eq!(actual, completion_digest(wrong.digest(), &device_state()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(memory.page(4), wrong.page(4));
}

// ------------------------------------------------------------ bad records

#[test]
fn page_in_a_hole_is_out_of_range() {
    let src = source();
    assert!(!src.layout.contains(HOLE));
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    // A batch with a good page, then the hole.
    let mut f = Vec::new();
    encode_page_batch(1, PageSize::DEFAULT, &[2, HOLE], &[7u8; 8192], &mut f);
    stream.push(f);
    let (err, _, _) = fails_on_last(&stream);
    assert!(
        matches!(err, MigrationError::PageOutOfRange(HOLE)),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
}

#[test]
fn page_past_the_end_is_out_of_range() {
    let src = source();
    let end = src.layout.page_end();
    for page in [end, end + 1000, (1 << 52) - 1] {
        let mut f = Vec::new();
        encode_page_batch(1, PageSize::DEFAULT, &[page], &[0u8; 4096], &mut f);
        let stream = vec![header(), layout_frame(&src.layout), f];
        let (err, _, _) = fails_on_last(&stream);
        assert!(
            matches!(err, MigrationError::PageOutOfRange(p) if p == page),
            "{err:?}"
        );
    }
}

#[test]
fn layout_differing_from_the_destinations() {
    let r = |first_page, pages| Region { first_page, pages };
    let cases = [
        // More memory.
        (
            MemoryLayout::new(PageSize::DEFAULT, vec![r(0, 6), r(10, 7)]).unwrap(),
            13,
        ),
        // The same number of pages, without the hole.
        (
            MemoryLayout::flat(PageSize::DEFAULT, 12 * 4096).unwrap(),
            12,
        ),
        // The same regions with 2 MiB pages.
        (
            MemoryLayout::new(PageSize::new(2 << 20).unwrap(), vec![r(0, 6), r(10, 6)]).unwrap(),
            12,
        ),
    ];
    for (other, pages) in cases {
        let (err, _, _) = fails_on_last(&[header(), layout_frame(&other)]);
        match err {
            MigrationError::LayoutMismatch {
                source_pages,
                dest_pages,
            } => {
                assert_eq!(source_pages, pages);
                assert_eq!(dest_pages, 12);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn abort_from_the_source() {
    let src = source();
    let stream = good_stream(&src);
    let abort = encode_to_vec(&Record::Abort {
        reason: "source guest crashed".into(),
    });
    // After the header, during pre-copy, after switch-over, after the
    // device state: all the same.
    for at in [1, 2, 6, stream.len() - 1] {
        let mut s = stream[..at].to_vec();
        s.push(abort.clone());
        let (err, _, guest) = fails_on_last(&s);
        match &err {
            MigrationError::PeerAborted(why) => assert_eq!(why, "source guest crashed"),
            other => panic!("abort after {at} frames: {other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::Abort);
        assert!(guest.restored.is_none());
    }
}

#[test]
fn records_of_the_wrong_kind() {
    let src = source();
    let mut receiving = vec![header(), layout_frame(&src.layout)];
    receiving.extend(all_pages(&src, 1));
    let cases: Vec<(Vec<Vec<u8>>, RecordType)> = vec![
        // Records only a destination sends.
        (
            [
                receiving.clone(),
                vec![encode_to_vec(&Record::PageRequest(vec![1, 2]))],
            ]
            .concat(),
            RecordType::PageRequest,
        ),
        (
            [receiving.clone(), vec![encode_to_vec(&Record::Ready)]].concat(),
            RecordType::Ready,
        ),
        (
            [
                receiving.clone(),
                vec![encode_to_vec(&Record::Resumed(Default::default()))],
            ]
            .concat(),
            RecordType::Resumed,
        ),
        // Something other than the layout after the header.
        (vec![header(), round_end(1, 0)], RecordType::RoundEnd),
        (vec![header(), switch_over(1)], RecordType::SwitchOver),
        (
            vec![header(), complete(12, src.digest())],
            RecordType::Complete,
        ),
        // A second switch-over.
        (
            [receiving.clone(), vec![switch_over(2), switch_over(3)]].concat(),
            RecordType::SwitchOver,
        ),
        // A second device state.
        (
            [
                receiving.clone(),
                vec![switch_over(2), state_frame(), state_frame()],
            ]
            .concat(),
            RecordType::DeviceState,
        ),
    ];
    for (stream, want) in cases {
        let (err, _, _) = fails_on_last(&stream);
        assert!(
            matches!(err, MigrationError::UnexpectedRecord { got, .. } if got == want),
            "{want:?}: {err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
    }
}

#[test]
fn garbled_frames_are_protocol_errors() {
    let src = source();
    let mut prefix = vec![header(), layout_frame(&src.layout)];
    let batch = pages(&src, 1, &[1, 2]);
    prefix.push(batch.clone());

    // A flipped byte in the page data: caught by the checksum, and the
    // page is not written.
    let mut bad = pages(&src, 1, &[4, 5]);
    let at = bad.len() - 20;
    bad[at] ^= 1;
    let (err, memory, _) = fails_on_last(&[prefix.clone(), vec![bad]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::ChecksumMismatch { .. })
        ),
        "{err:?}"
    );
    assert!(memory.page(4).iter().all(|b| *b == 0));
    assert!(memory.page(5).iter().all(|b| *b == 0));

    // A cut frame.
    let (err, _, _) =
        fails_on_last(&[prefix.clone(), vec![batch[..batch.len() - 1].to_vec()]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::Truncated { .. })
        ),
        "{err:?}"
    );

    // Not a record at all.
    let (err, _, _) =
        fails_on_last(&[prefix.clone(), vec![b"GET / HTTP/1.1\r\n".to_vec()]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnknownRecordType(b'G'))
        ),
        "{err:?}"
    );

    // Not a migration stream.
    let mut h = header();
    h[RECORD_HEADER_LEN] = b'X';
    let (err, _, _) = fails_on_last(&[h]);
    assert!(
        matches!(err, MigrationError::Protocol(ProtocolError::BadMagic)),
        "{err:?}"
    );

    // A record before the header.
    let (err, _, _) = fails_on_last(&[layout_frame(&src.layout)]);
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnexpectedRecord {
                got: RecordType::Layout,
                ..
            })
        ),
        "{err:?}"
    );

    // A second layout.
    let (err, _, _) = fails_on_last(&[prefix.clone(), vec![layout_frame(&src.layout)]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnexpectedRecord {
                got: RecordType::Layout,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);

    // A protocol version from the future.
    let (err, _, _) = fails_on_last(&[encode_to_vec(&Record::Header {
        version: VERSION + 1,
    })]);
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnsupportedVersion(v)) if v == VERSION + 1
        ),
        "{err:?}"
    );
}

#[test]
fn frames_after_a_failure_are_invalid_use() {
    let src = source();
    let stream = good_stream(&src);
    // Header, layout and the first half of the pages arrive.
    let mut e = engine();
    for f in &stream[..3] {
        e.handle_frame(f).unwrap();
    }
    // A bad frame fails the engine...
    assert!(matches!(
        e.handle_frame(&encode_to_vec(&Record::Ready)),
        Err(MigrationError::UnexpectedRecord {
            got: RecordType::Ready,
            ..
        })
    ));
    // ...and the rest of a perfectly good stream is refused.
    for f in &stream[3..] {
        assert!(matches!(
            e.handle_frame(f),
            Err(MigrationError::InvalidUse(_))
        ));
    }
    assert!(!e.resumed());
    let (memory, guest) = e.into_parts();
    assert!(!guest.resumed);
    assert!(guest.restored.is_none());
    // What arrived before the failure stays written; nothing after it is.
    let all: Vec<PageNum> = src.layout.pages().collect();
    let (first, second) = all.split_at(all.len() / 2);
    for p in first {
        assert_eq!(memory.page(*p), src.page(*p), "page {p}");
    }
    for p in second {
        assert!(memory.page(*p).iter().all(|b| *b == 0), "page {p}");
    }
    assert!(second.iter().any(|p| src.page(*p).iter().any(|b| *b != 0)));
}

// -------------------------------------------------------------- post-copy

/// Pages 1 and 14 change after the pre-copy round; post-copy discards
/// them and pushes their new content after the guest resumed here.
const DIRTIED: [PageNum; 2] = [1, 14];

/// Memory as pre-copy saw it, and as it is at switch-over.
fn postcopy_source() -> (TestMemory, TestMemory) {
    let before = source();
    let mut after = before.clone();
    for p in DIRTIED {
        after.page_mut(p).fill(0x5c);
    }
    (before, after)
}

/// Up to the device state that resumes the guest.
fn postcopy_prefix(before: &TestMemory) -> Vec<Vec<u8>> {
    let mut s = vec![header(), layout_frame(&before.layout)];
    s.extend(all_pages(before, 1));
    s.push(round_end(1, before.layout.total_pages()));
    s.push(postcopy_switch_over(2));
    s.push(discard(&[(1, 1), (14, 1)]));
    s
}

#[test]
fn a_postcopy_stream_resumes_on_device_state_and_completes() {
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        assert_eq!(e.handle_frame(&f).unwrap(), DestStatus::Continue);
    }
    assert!(!e.resumed());
    assert_eq!(e.handle_frame(&state_frame()).unwrap(), DestStatus::Resumed);
    assert!(e.resumed() && e.in_postcopy() && !e.completed());
    for p in DIRTIED {
        assert!(!e.has_page(p));
    }
    assert_eq!(
        e.handle_frame(&pages(&after, 2, &DIRTIED)).unwrap(),
        DestStatus::Continue
    );
    let total = after.layout.total_pages();
    assert_eq!(
        e.handle_frame(&complete(total, after.digest())).unwrap(),
        DestStatus::Completed
    );
    assert!(e.completed());
    let mut d = Decoder::new();
    let replies: Vec<RecordType> = std::iter::from_fn(|| e.poll_transmit())
        .map(|f| d.decode(&f).unwrap().record_type())
        .collect();
    assert_eq!(
        replies,
        vec![
            RecordType::Header,
            RecordType::Ready,
            RecordType::Resumed,
            RecordType::Verified
        ]
    );
    assert_eq!(e.report().digest, Some(after.digest()));
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(guest.restored, Some(device_state()));
    assert_eq!(memory.bytes, after.bytes);
}

#[test]
fn discard_in_a_precopy_stream_is_unexpected() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(switch_over(2));
    stream.push(discard(&[(1, 1)]));
    let (err, _, _) = fails_on_last(&stream);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::Discard,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn discard_before_switch_over_is_unexpected() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(discard(&[(1, 1)]));
    let (err, memory, _) = fails_on_last(&stream);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::Discard,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(memory.page(1), src.page(1));
}

#[test]
fn discard_into_a_hole_is_out_of_range() {
    let src = source();
    for (ranges, bad) in [
        (vec![(HOLE, 1)], HOLE),
        // From guest memory into the hole after page 5.
        (vec![(2, 1), (4, 4)], 6),
        // Past the end, and as far as the protocol allows.
        (vec![(15, 2)], 16),
        (vec![(10, (1 << 52) - 10)], 16),
    ] {
        let mut stream = vec![header(), layout_frame(&src.layout)];
        stream.extend(all_pages(&src, 1));
        stream.push(postcopy_switch_over(2));
        stream.push(discard(&ranges));
        let (err, _, _) = fails_on_last(&stream);
        assert!(
            matches!(err, MigrationError::PageOutOfRange(p) if p == bad),
            "{ranges:?}: {err:?}"
        );
    }
}

#[test]
fn postcopy_completion_with_missing_pages() {
    // The guest already runs here (post-copy resumes on the device state),
    // but a discarded page never came back: the migration cannot complete.
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        e.handle_frame(&f).unwrap();
    }
    assert_eq!(e.handle_frame(&state_frame()).unwrap(), DestStatus::Resumed);
    e.handle_frame(&pages(&after, 2, &[1])).unwrap();
    let total = after.layout.total_pages();
    let err = e
        .handle_frame(&complete(total, after.digest()))
        .unwrap_err();
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("1 of 12"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!e.completed());
    assert!(!e.has_page(14));
    assert!(matches!(
        e.handle_frame(&pages(&after, 2, &[14])),
        Err(MigrationError::InvalidUse(_))
    ));
    let replies: Vec<Vec<u8>> = std::iter::from_fn(|| e.poll_transmit()).collect();
    let mut d = Decoder::new();
    assert!(replies
        .iter()
        .all(|f| d.decode(f).unwrap().record_type() != RecordType::Verified));
}

#[test]
fn postcopy_completion_whose_digest_does_not_match() {
    // The source pushed stale content for a discarded page.
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        e.handle_frame(&f).unwrap();
    }
    e.handle_frame(&state_frame()).unwrap();
    e.handle_frame(&pages(&after, 2, &[1])).unwrap();
    e.handle_frame(&pages(&before, 2, &[14])).unwrap();
    let total = after.layout.total_pages();
    let err = e
        .handle_frame(&complete(total, after.digest()))
        .unwrap_err();
    let mut arrived = after.clone();
    arrived.page_mut(14).copy_from_slice(before.page(14));
    match err {
        MigrationError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, completion_digest(after.digest(), &device_state()));
            assert_eq!(actual, completion_digest(arrived.digest(), &device_state()));
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.completed());
}

// ------------------------------------------------------------- the driver

#[test]
fn driver_reports_a_closed_stream_and_does_not_resume() {
    let src = source();
    let stream = sealed(good_stream(&src));
    let half = stream.len() / 2;
    assert!(half > 2);
    let (mut source_end, mut dest_end) = channel_pair(stream.len());
    let sender = std::thread::spawn(move || {
        for f in &stream[..half] {
            source_end.send(f).unwrap();
        }
        // Take the destination's replies, so only the end of the stream
        // can fail it, then go away.
        let mut d = Decoder::new();
        let mut replies = Vec::new();
        for _ in 0..2 {
            let f = source_end
                .recv(Some(Duration::from_secs(30)))
                .unwrap()
                .expect("reply in time");
            replies.push(d.decode(&f).unwrap().record_type());
        }
        drop(source_end);
        replies
    });
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut dest_end, Duration::from_secs(30));
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert_eq!(
        sender.join().unwrap(),
        vec![RecordType::Header, RecordType::Ready]
    );
    assert!(!e.resumed());
    // The half that arrived was applied; the engine takes nothing more.
    assert_eq!(e.report().pages_received, src.layout.total_pages());
    assert!(matches!(
        e.handle_frame(&switch_over(2)),
        Err(MigrationError::InvalidUse(_))
    ));
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
    assert!(guest.restored.is_none());
}

#[test]
fn driver_reports_a_source_gone_before_reading_replies() {
    let src = source();
    let stream = sealed(good_stream(&src));
    let (mut source_end, mut dest_end) = channel_pair(stream.len());
    for f in &stream[..stream.len() - 1] {
        source_end.send(f).unwrap();
    }
    drop(source_end);
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut dest_end, Duration::from_secs(30));
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert!(!e.resumed());
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
}

#[test]
fn driver_sends_an_abort_back_on_a_bad_stream() {
    let src = source();
    let (mut source_end, mut dest_end) = channel_pair(16);
    for f in sealed(vec![
        header(),
        layout_frame(&src.layout),
        encode_to_vec(&Record::PageRequest(vec![1])),
    ]) {
        source_end.send(&f).unwrap();
    }
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut dest_end, Duration::from_secs(30));
    assert!(
        matches!(
            r,
            Err(MigrationError::UnexpectedRecord {
                got: RecordType::PageRequest,
                ..
            })
        ),
        "{r:?}"
    );
    // The source hears header, ready, then why the destination gave up.
    let mut d = Decoder::new();
    let mut got = Vec::new();
    while let Some(f) = source_end.recv(Some(Duration::ZERO)).unwrap() {
        got.push(d.decode(&f).unwrap().record_type());
    }
    assert_eq!(
        got,
        vec![RecordType::Header, RecordType::Ready, RecordType::Abort]
    );
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
}

#[test]
fn driver_runs_a_good_stream_to_resume() {
    let src = source();
    let stream = sealed(good_stream(&src));
    let (mut source_end, mut dest_end) = channel_pair(stream.len());
    for f in &stream {
        source_end.send(f).unwrap();
    }
    let mut e = engine();
    let report = run_destination(&mut e.inner, &mut dest_end, Duration::from_secs(30)).unwrap();
    assert_eq!(report.digest, Some(src.digest()));
    assert!(report.resume_confirmed);
    assert!(e.resumed());
    let mut d = Decoder::new();
    let mut got = Vec::new();
    while let Some(f) = source_end.recv(Some(Duration::ZERO)).unwrap() {
        got.push(d.decode(&f).unwrap().record_type());
    }
    assert_eq!(
        got,
        vec![RecordType::Header, RecordType::Ready, RecordType::Resumed]
    );
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(memory.bytes, src.bytes);
}

/// A transport that hands out a fixed list of frames, then reports the
/// source gone, and whose sends fail once `sends_ok` frames went out.
struct Scripted {
    incoming: std::collections::VecDeque<Vec<u8>>,
    sends_ok: usize,
    decoder: Decoder,
    sent: Vec<RecordType>,
}

impl Scripted {
    fn new(incoming: Vec<Vec<u8>>, sends_ok: usize) -> Self {
        Scripted {
            incoming: incoming.into(),
            sends_ok,
            decoder: Decoder::new(),
            sent: Vec::new(),
        }
    }
}

impl Transport for Scripted {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if self.sent.len() == self.sends_ok {
            return Err(TransportError::Closed);
        }
        let r = self.decoder.decode(frame).expect("replies decode");
        self.sent.push(r.record_type());
        Ok(())
    }

    fn recv(&mut self, _timeout: Option<Duration>) -> Result<Option<bytes::Bytes>, TransportError> {
        match self.incoming.pop_front() {
            Some(f) => Ok(Some(f.into())),
            None => Err(TransportError::Closed),
        }
    }
}

#[test]
fn driver_keeps_a_resumed_guest_when_the_confirmation_is_lost() {
    // The whole stream arrives, but the source is gone before the
    // resume confirmation can go back: the guest runs here, so this is a
    // success whose confirmation is missing, not a failure.
    let src = source();
    let mut t = Scripted::new(sealed(good_stream(&src)), 2);
    let mut e = engine();
    let report = run_destination(&mut e.inner, &mut t, Duration::from_secs(1)).unwrap();
    assert!(!report.resume_confirmed);
    assert_eq!(report.digest, Some(src.digest()));
    assert_eq!(t.sent, vec![RecordType::Header, RecordType::Ready]);
    assert!(e.completed());
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(memory.bytes, src.bytes);
}

#[test]
fn driver_does_not_resume_when_replies_cannot_be_sent() {
    // The source stops listening after our header: the layout's Ready
    // cannot go back, and the engine is failed.
    let src = source();
    let mut t = Scripted::new(sealed(good_stream(&src)), 1);
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut t, Duration::from_secs(1));
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert_eq!(t.sent, vec![RecordType::Header]);
    assert!(!e.resumed());
    assert!(matches!(
        e.handle_frame(&t.incoming[0]),
        Err(MigrationError::InvalidUse(_))
    ));
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
    assert!(guest.restored.is_none());
}

fn discard_bitmap(first_page: PageNum, words: Vec<u64>) -> Vec<u8> {
    encode_to_vec(&Record::DiscardBitmap { first_page, words })
}

#[test]
fn discards_must_ascend_across_the_stream() {
    // Twice over the same pages: a source could otherwise make the
    // destination walk guest memory once per record.
    let src = source();
    for second in [discard(&[(1, 2)]), discard_bitmap(0, vec![0b10])] {
        let mut stream = vec![header(), layout_frame(&src.layout)];
        stream.extend(all_pages(&src, 1));
        stream.push(postcopy_switch_over(2));
        stream.push(discard(&[(1, 3)]));
        stream.push(second);
        let (err, _, guest) = fails_on_last(&stream);
        assert!(
            matches!(
                err,
                MigrationError::Protocol(ProtocolError::OutOfRange { .. })
            ),
            "{err:?}"
        );
        assert!(!guest.resumed);
    }
}

#[test]
fn discard_bitmap_marks_pages_absent_and_rejects_holes() {
    let src = source();
    // Pages 1 and 3 absent, then the completion says pages never arrived.
    let mut e = engine();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(postcopy_switch_over(2));
    stream.push(discard_bitmap(0, vec![0b1010]));
    for f in &stream {
        e.handle_frame(f).unwrap();
    }
    assert!(!e.has_page(1) && !e.has_page(3) && e.has_page(2));
    // Bit 6 is page 6, in the hole.
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(postcopy_switch_over(2));
    stream.push(discard_bitmap(0, vec![1 << 6]));
    let (err, _, _) = fails_on_last(&stream);
    assert!(matches!(err, MigrationError::PageOutOfRange(6)), "{err:?}");
}

// ------------------------------------------------ issue 15: integrity

/// Finding 1: a post-copy resume with a page that was neither received
/// nor discarded (a lost batch or a lost discard) is refused: the guest
/// would see memory that is not the source's.
#[test]
fn postcopy_resume_with_a_page_neither_received_nor_discarded_is_refused() {
    let (before, _) = postcopy_source();
    let all: Vec<PageNum> = before.layout.pages().collect();
    // Every page but 12 arrives; pages 1 and 14 are discarded.
    let sent: Vec<PageNum> = all.iter().copied().filter(|p| *p != 12).collect();
    let frames = vec![
        header(),
        layout_frame(&before.layout),
        pages(&before, 1, &sent),
        round_end(1, sent.len() as u64),
        postcopy_switch_over(2),
        discard(&[(1, 1), (14, 1)]),
        state_frame(),
    ];
    let (err, _, guest) = fails_on_last(&frames);
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("1 of 12"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
    assert!(guest.restored.is_none(), "state restored");
}

/// Finding 1: the completion check covers memory as the destination
/// holds it: a sink that stores a page wrongly fails it, although every
/// page arrived intact.
#[test]
fn completion_checks_memory_as_the_destination_holds_it() {
    let src = source();
    let mut e = engine();
    e.inner = DestinationEngine::new(
        TestMemory {
            corrupt_page: Some(13),
            ..TestMemory::zeroed(&layout())
        },
        TestGuest::default(),
        Arc::new(VirtualClock::new()),
    );
    let stream = good_stream(&src);
    let (last, init) = stream.split_last().unwrap();
    for f in init {
        assert_eq!(e.handle_frame(f).unwrap(), DestStatus::Continue);
    }
    let err = e.handle_frame(last).unwrap_err();
    assert!(
        matches!(err, MigrationError::DigestMismatch { .. }),
        "{err}"
    );
    assert!(!e.resumed());
    let (_, guest) = e.into_parts();
    assert!(guest.restored.is_none() && !guest.resumed);
}

/// Finding 1: the completion digest covers the device state: a state
/// other than the one the source saved (altered, or from another run) is
/// refused before it is restored.
#[test]
fn completion_checks_the_device_state() {
    let src = source();
    let mut stream = good_stream(&src);
    let state_at = stream.len() - 2;
    let mut other = device_state();
    other.data[3] ^= 1;
    stream[state_at] = encode_to_vec(&Record::DeviceState(other));
    let (err, memory, guest) = fails_on_last(&stream);
    assert!(
        matches!(err, MigrationError::DigestMismatch { .. }),
        "{err}"
    );
    assert_eq!(memory.bytes, src.bytes, "memory itself was whole");
    assert!(guest.restored.is_none());
}

/// Finding 1: a lost, repeated or altered frame anywhere in a good
/// stream never lets the guest resume.
#[test]
fn no_lost_repeated_or_altered_frame_lets_the_guest_resume() {
    let src = source();
    let stream = sealed(good_stream(&src));
    for k in 0..stream.len() {
        let mut variants: Vec<Vec<Vec<u8>>> = Vec::new();
        // Lost.
        let mut lost = stream.clone();
        lost.remove(k);
        variants.push(lost);
        // Repeated.
        let mut repeated = stream.clone();
        repeated.insert(k, stream[k].clone());
        variants.push(repeated);
        // Altered: one byte flipped in the middle.
        let mut altered = stream.clone();
        let mid = altered[k].len() / 2;
        altered[k][mid] ^= 0x04;
        variants.push(altered);
        for (v, frames) in variants.into_iter().enumerate() {
            let mut e = engine();
            let mut resumed_at = None;
            for (i, f) in frames.iter().enumerate() {
                match e.inner.handle_frame(f) {
                    Ok(DestStatus::Continue) => {}
                    Ok(_) => {
                        resumed_at = Some(i);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Only a repeat of the completion itself, after the whole
            // stream arrived intact, comes after the resume.
            let fine = v == 1 && resumed_at.is_some_and(|i| i <= k);
            assert!(
                resumed_at.is_none() || fine,
                "frame {k}, variant {v}: resumed at {resumed_at:?}"
            );
        }
    }
}

/// Finding 4: the kinds a caller acts on.
#[test]
fn error_kinds_for_unknown_outcomes() {
    assert_eq!(
        MigrationError::OutcomeUnknown("cut".into()).kind(),
        ErrorKind::Settle
    );
    assert_eq!(
        MigrationError::SourceLost("cut".into()).kind(),
        ErrorKind::Settle
    );
    assert_eq!(
        MigrationError::Transport(TransportError::Closed).kind(),
        ErrorKind::Retry
    );
    assert_eq!(
        MigrationError::Incomplete("short".into()).kind(),
        ErrorKind::PeerMisbehaved
    );
}

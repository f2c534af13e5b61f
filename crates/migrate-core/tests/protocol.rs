//! Tests of the wire protocol: every record round-trips, the decoder
//! accepts exactly the canonical encoding of a record, and any other input
//! (random bytes, cut, extended or corrupted frames, hand-built bad frames)
//! gives the right [`ProtocolError`] without panicking and without
//! allocating more than the frame holds.

use migrate_core::digest::MemoryDigest;
use migrate_core::protocol::{
    self, encode_page_batch, encode_to_vec, max_batch_pages, Decoder, PostcopyReport,
    ProtocolError, Record, RecordType, ResumeReport, MAGIC, MAX_BATCH_DATA, MAX_BATCH_PAGES,
    MAX_DEVICE_STATE, MAX_DISCARD_RANGES, MAX_DISCARD_WORDS, MAX_FRAME_LEN, MAX_REGIONS,
    MAX_REQUEST_PAGES, MAX_TEXT, PAGE_FLAG_ZERO, RECORD_HEADER_LEN, VERSION,
};
use migrate_core::transport::{StreamTransport, Transport};
use migrate_core::DeviceState;
use migrate_core::{LayoutError, MemoryLayout, PageNum, PageSize, Region, MAX_PAGE_END};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

// ------------------------------------------------- allocation measurement

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

// ---------------------------------------------------------------- helpers

/// Every record type with its code on the wire.
const ALL_TYPES: [(u8, RecordType); 13] = [
    (1, RecordType::Header),
    (2, RecordType::Layout),
    (3, RecordType::PageBatch),
    (4, RecordType::RoundEnd),
    (5, RecordType::DeviceState),
    (6, RecordType::SwitchOver),
    (7, RecordType::PageRequest),
    (8, RecordType::Complete),
    (9, RecordType::Abort),
    (10, RecordType::Ready),
    (11, RecordType::Resumed),
    (12, RecordType::Discard),
    (13, RecordType::Verified),
];

fn ps(bytes: u32) -> PageSize {
    PageSize::new(bytes).expect("valid page size")
}

fn region(first_page: PageNum, pages: u64) -> Region {
    Region { first_page, pages }
}

/// A frame with a hand-made record header: `code`, zero reserved bytes,
/// and the body's real length.
fn raw_frame(code: u8, body: &[u8]) -> Vec<u8> {
    raw_frame_len(code, body.len() as u32, body)
}

/// A frame whose header claims `len` bytes of body, whatever `body` holds.
///
/// The frame carries sequence number 0 and a CRC over the bytes given, so
/// the decoder's structural checks, not the CRC, are what it meets.
fn raw_frame_len(code: u8, len: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![code, 0, 0, 0];
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(body);
    protocol::reseal(&mut f);
    f
}

fn header_frame() -> Vec<u8> {
    encode_to_vec(&Record::Header { version: VERSION })
}

fn layout_frame(layout: &MemoryLayout) -> Vec<u8> {
    encode_to_vec(&Record::Layout(layout.clone()))
}

fn decoder_after_header() -> Decoder {
    let mut d = Decoder::new();
    d.decode(&header_frame()).expect("header decodes");
    d
}

/// A decoder that has seen a header and a one-region layout of `page_size`.
fn decoder_after_layout(page_size: PageSize) -> Decoder {
    let mut d = decoder_after_header();
    let layout = MemoryLayout::new(page_size, vec![region(0, 16)]).expect("valid layout");
    d.decode(&layout_frame(&layout)).expect("layout decodes");
    assert_eq!(d.page_size(), Some(page_size));
    d
}

/// The decoder a frame of `record`'s type needs to be accepted: fresh for
/// a header, after a header for anything else (page batches go through
/// [`decoder_after_layout`]).
fn decoder_for(record: &Record<'_>) -> Decoder {
    match record {
        Record::Header { .. } => Decoder::new(),
        _ => decoder_after_header(),
    }
}

/// A page batch frame of `pages`, with page `i`'s content filled with a
/// byte pattern (`0` means a zero page).
fn batch_frame(page_size: PageSize, round: u32, pages: &[PageNum], fill: &[u8]) -> Vec<u8> {
    assert_eq!(pages.len(), fill.len());
    let contents: Vec<u8> = fill
        .iter()
        .flat_map(|b| std::iter::repeat_n(*b, page_size.get()))
        .collect();
    let mut out = Vec::new();
    encode_page_batch(round, page_size, pages, &contents, &mut out);
    out
}

/// Offset in a page-batch frame of the flags of a batch of `n` pages.
fn batch_flags_offset(n: usize) -> usize {
    RECORD_HEADER_LEN + 8 + 8 * n
}

/// Offset in a page-batch frame of the page data of a batch of `n` pages.
fn batch_data_offset(n: usize) -> usize {
    batch_flags_offset(n) + n.div_ceil(8) * 8
}

/// Decodes `frame` with `decoder` and checks what every input must
/// satisfy: no allocation larger than the frame, and, if it is accepted,
/// the frame is exactly the encoding of the record decoded (the encoding
/// is canonical, so no two frames decode to the same record).
fn decode_checked(decoder: &mut Decoder, frame: &[u8]) -> Result<(), ProtocolError> {
    let (result, largest) = largest_allocation(|| decoder.decode(frame));
    assert!(
        largest <= frame.len(),
        "decoding a {}-byte frame allocated {largest} bytes at once",
        frame.len()
    );
    let record = result?;
    assert_eq!(
        encode_to_vec(&record),
        frame,
        "accepted a frame that is not the canonical encoding of {record:?}"
    );
    Ok(())
}

/// Every byte pattern in `frame` with byte `i` xor'ed with `mask`.
fn flipped(frame: &[u8], i: usize, mask: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[i] ^= mask;
    f
}

// ------------------------------------------------------------- strategies

fn page_size() -> impl Strategy<Value = PageSize> {
    (9u32..=21).prop_map(|shift| ps(1 << shift))
}

/// Page sizes for tests that decode a frame once per byte.
fn small_page_size() -> impl Strategy<Value = PageSize> {
    (9u32..=12).prop_map(|shift| ps(1 << shift))
}

fn page_num() -> impl Strategy<Value = PageNum> {
    prop_oneof![0u64..64, 0..MAX_PAGE_END, Just(MAX_PAGE_END - 1),]
}

fn layout() -> impl Strategy<Value = MemoryLayout> {
    let span = prop_oneof![0u64..4, 0u64..1 << 20, 0u64..1 << 40];
    let len = prop_oneof![1u64..4, 1u64..1 << 20, 1u64..1 << 40];
    (
        page_size(),
        prop::collection::vec((span, len), 1..48),
        any::<bool>(),
    )
        .prop_map(|(page_size, spans, at_top)| {
            let mut regions = Vec::with_capacity(spans.len());
            let mut end = 0u64;
            for (gap, pages) in spans {
                regions.push(region(end + gap, pages));
                end += gap + pages;
            }
            if at_top {
                // Slide everything up so the last page is the largest allowed.
                let shift = MAX_PAGE_END - end;
                for r in &mut regions {
                    r.first_page += shift;
                }
            }
            MemoryLayout::new(page_size, regions).expect("generated layout is valid")
        })
}

/// A discard range: a first page and a non-zero count that stays below
/// the largest page number.
fn discard_range() -> impl Strategy<Value = (PageNum, u64)> {
    (page_num(), prop_oneof![0u64..16, any::<u64>()])
        .prop_map(|(first, raw)| (first, 1 + raw % (MAX_PAGE_END - first)))
}

fn text() -> impl Strategy<Value = String> {
    "(?s).{0,48}"
}

fn device_state() -> impl Strategy<Value = DeviceState> {
    (
        text(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..1024),
    )
        .prop_map(|(format, version, data)| DeviceState {
            format,
            version,
            data,
        })
}

/// Any record but a page batch (which borrows its frame).
fn owned_record() -> impl Strategy<Value = Record<'static>> {
    prop_oneof![
        Just(Record::Header { version: VERSION }),
        layout().prop_map(Record::Layout),
        (any::<u32>(), any::<u64>())
            .prop_map(|(round, pages_sent)| Record::RoundEnd { round, pages_sent }),
        device_state().prop_map(Record::DeviceState),
        (any::<u32>(), any::<bool>())
            .prop_map(|(round, postcopy)| Record::SwitchOver { round, postcopy }),
        prop::collection::vec(discard_range(), 0..32).prop_map(Record::Discard),
        (0u64..(1 << 40), prop::collection::vec(any::<u64>(), 0..64))
            .prop_map(|(first_page, words)| Record::DiscardBitmap { first_page, words }),
        any::<[u64; 6]>().prop_map(|t| Record::Verified({
            let mut v = PostcopyReport::default();
            v.faults = t[0];
            v.duplicates = t[1];
            v.latency_p50_ns = t[2];
            v.latency_p99_ns = t[3];
            v.latency_max_ns = t[4];
            v.stall_ns = t[5];
            v
        })),
        prop::collection::vec(page_num(), 0..48).prop_map(Record::PageRequest),
        (0..=MAX_PAGE_END, any::<u128>()).prop_map(|(total_pages, d)| Record::Complete {
            total_pages,
            digest: MemoryDigest(d),
        }),
        text().prop_map(|reason| Record::Abort { reason }),
        Just(Record::Ready),
        any::<[u64; 4]>().prop_map(|t| Record::Resumed({
            let mut v = ResumeReport::default();
            v.verify_ns = t[0];
            v.restore_ns = t[1];
            v.resume_ns = t[2];
            v.total_ns = t[3];
            v
        })),
    ]
}

/// What one page of a generated batch holds.
#[derive(Clone, Debug)]
enum Content {
    /// All zeros: sent as a flag.
    Zero,
    /// Pseudo-random bytes from a seed.
    Noise(u64),
    /// Zeros but for one byte (at `at` modulo the page size), which the
    /// zero-page check must not miss wherever it is.
    OneByte { at: usize, value: u8 },
}

impl Content {
    fn render(&self, out: &mut Vec<u8>, page_size: usize) {
        match *self {
            Content::Zero => out.resize(out.len() + page_size, 0),
            Content::Noise(seed) => {
                let mut x = seed;
                out.extend((0..page_size).map(|_| {
                    // splitmix64
                    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = x;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    (z ^ (z >> 31)) as u8
                }));
            }
            Content::OneByte { at, value } => {
                let start = out.len();
                out.resize(start + page_size, 0);
                out[start + at % page_size] = value;
            }
        }
    }
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        Just(Content::Zero),
        any::<u64>().prop_map(Content::Noise),
        (any::<usize>(), 1u8..=255).prop_map(|(at, value)| Content::OneByte { at, value }),
        (1u8..=255).prop_map(|value| Content::OneByte {
            at: usize::MAX,
            value
        }),
    ]
}

/// A page batch to encode: round, page size, page numbers and the pages'
/// contents (`pages.len() * page_size` bytes).
#[derive(Clone, Debug)]
struct BatchInput {
    round: u32,
    page_size: PageSize,
    pages: Vec<PageNum>,
    contents: Vec<u8>,
}

impl BatchInput {
    fn encode(&self) -> (Vec<u8>, protocol::BatchSummary) {
        let mut out = Vec::new();
        let s = encode_page_batch(
            self.round,
            self.page_size,
            &self.pages,
            &self.contents,
            &mut out,
        );
        (out, s)
    }
}

fn batch_with(sizes: impl Strategy<Value = PageSize>) -> impl Strategy<Value = BatchInput> {
    (sizes, any::<u32>()).prop_flat_map(|(page_size, round)| {
        let most = max_batch_pages(page_size).min(24);
        prop::collection::vec((page_num(), content()), 0..=most).prop_map(move |pages| {
            let ps = page_size.get();
            let mut contents = Vec::with_capacity(pages.len() * ps);
            for (_, c) in &pages {
                c.render(&mut contents, ps);
            }
            BatchInput {
                round,
                page_size,
                pages: pages.into_iter().map(|(p, _)| p).collect(),
                contents,
            }
        })
    })
}

fn batch() -> impl Strategy<Value = BatchInput> {
    batch_with(page_size())
}

/// A record header (reserved bytes zero or not) with a length that is
/// right for the body, close to it, or anything at all.
fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![0u8..=14, any::<u8>()],
        prop_oneof![Just([0u8; 3]), any::<[u8; 3]>()],
        prop::collection::vec(any::<u8>(), 0..512),
        prop_oneof![
            Just(None),
            (-9i64..=9).prop_map(Some),
            any::<u32>().prop_map(|l| Some(i64::from(l) - 1_000_000_000_000)),
        ],
    )
        .prop_map(|(code, reserved, body, len)| {
            let len = match len {
                None => body.len() as u32,
                Some(d) if d < -1_000_000 => (d + 1_000_000_000_000) as u32,
                Some(d) => (body.len() as i64 + d).max(0) as u32,
            };
            let mut f = vec![code, reserved[0], reserved[1], reserved[2]];
            f.extend_from_slice(&len.to_le_bytes());
            f.extend_from_slice(&body);
            f
        })
}

// ------------------------------------------------------------ round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_record_round_trips(record in owned_record()) {
        let frame = encode_to_vec(&record);
        let mut d = decoder_for(&record);
        let decoded = d.decode(&frame);
        prop_assert_eq!(decoded.as_ref(), Ok(&record));
        prop_assert!(frame.len() <= MAX_FRAME_LEN);
        prop_assert!(frame.len() - RECORD_HEADER_LEN <= record.record_type().max_body());
        if let Record::Layout(l) = &record {
            prop_assert_eq!(d.page_size(), Some(l.page_size()));
        }
    }

    #[test]
    fn page_batches_round_trip(input in batch()) {
        let (frame, summary) = input.encode();
        let ps = input.page_size.get();
        let expected_zero = input
            .contents
            .chunks_exact(ps)
            .filter(|c| c.iter().all(|b| *b == 0))
            .count();
        prop_assert_eq!(summary.pages, input.pages.len());
        prop_assert_eq!(summary.zero_pages, expected_zero);
        prop_assert_eq!(summary.frame_bytes, frame.len());
        prop_assert!(frame.len() <= MAX_FRAME_LEN);

        let mut d = decoder_after_layout(input.page_size);
        let decoded = d.decode(&frame);
        let Ok(Record::PageBatch(b)) = decoded else {
            return Err(TestCaseError::fail(format!("expected a page batch, got {decoded:?}")));
        };
        prop_assert_eq!(b.round, input.round);
        prop_assert_eq!(b.len(), input.pages.len());
        prop_assert_eq!(b.is_empty(), input.pages.is_empty());
        prop_assert_eq!(b.zero_pages(), expected_zero);
        let mut seen = 0;
        for ((page, data), (want_page, want)) in
            b.iter().zip(input.pages.iter().zip(input.contents.chunks_exact(ps)))
        {
            prop_assert_eq!(page, *want_page);
            match data {
                None => prop_assert!(want.iter().all(|x| *x == 0), "page {} came back as zero", page),
                Some(got) => {
                    prop_assert!(want.iter().any(|x| *x != 0), "zero page {} sent as data", page);
                    prop_assert!(got == want, "content of page {} differs", page);
                }
            }
            seen += 1;
        }
        prop_assert_eq!(seen, input.pages.len());
        // Encoding the decoded batch again gives the same frame.
        prop_assert_eq!(encode_to_vec(&Record::PageBatch(b)), frame);
    }

    // --------------------------------------------------- arbitrary input

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        ps in small_page_size(),
    ) {
        let _ = decode_checked(&mut Decoder::new(), &bytes);
        let _ = decode_checked(&mut decoder_after_header(), &bytes);
        let _ = decode_checked(&mut decoder_after_layout(ps), &bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_a_record_header_never_panic(
        frame in framed_garbage(),
        ps in small_page_size(),
    ) {
        let _ = decode_checked(&mut Decoder::new(), &frame);
        let _ = decode_checked(&mut decoder_after_header(), &frame);
        let _ = decode_checked(&mut decoder_after_layout(ps), &frame);
    }

    #[test]
    fn frames_of_another_stream_state_never_panic(record in owned_record(), ps in small_page_size()) {
        // A valid frame fed to a decoder in every state either decodes to
        // the same record or is refused.
        let frame = encode_to_vec(&record);
        for mut d in [Decoder::new(), decoder_after_header(), decoder_after_layout(ps)] {
            if let Ok(r) = d.decode(&frame) {
                prop_assert_eq!(r, record.clone());
            }
        }
    }

    // ------------------------------------------------------- mutations

    #[test]
    fn cut_frames_are_truncated(record in owned_record()) {
        let frame = encode_to_vec(&record);
        for cut in 0..frame.len() {
            let r = decoder_for(&record).decode(&frame[..cut]);
            prop_assert!(
                matches!(r, Err(ProtocolError::Truncated { .. })),
                "frame cut to {} of {} bytes gave {:?}", cut, frame.len(), r
            );
        }
    }

    #[test]
    fn cut_page_batches_are_truncated(input in batch_with(small_page_size())) {
        let (frame, _) = input.encode();
        let mut d = decoder_after_layout(input.page_size);
        for cut in 0..frame.len() {
            let r = d.decode(&frame[..cut]);
            prop_assert!(
                matches!(r, Err(ProtocolError::Truncated { .. })),
                "batch cut to {} of {} bytes gave {:?}", cut, frame.len(), r
            );
        }
        prop_assert!(d.decode(&frame).is_ok());
    }

    #[test]
    fn extended_frames_have_trailing_bytes(
        record in owned_record(),
        extra in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut frame = encode_to_vec(&record);
        frame.extend_from_slice(&extra);
        prop_assert_eq!(
            decoder_for(&record).decode(&frame),
            Err(ProtocolError::TrailingBytes { record: record.record_type(), extra: extra.len() })
        );
    }

    #[test]
    fn extended_page_batches_have_trailing_bytes(
        input in batch_with(small_page_size()),
        extra in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let (mut frame, _) = input.encode();
        frame.extend_from_slice(&extra);
        prop_assert_eq!(
            decoder_after_layout(input.page_size).decode(&frame),
            Err(ProtocolError::TrailingBytes { record: RecordType::PageBatch, extra: extra.len() })
        );
    }

    #[test]
    fn flipped_bytes_never_panic_and_never_decode_to_the_original(
        record in owned_record(),
        mask in 1u8..=255,
    ) {
        let frame = encode_to_vec(&record);
        for i in 0..frame.len() {
            let bad = flipped(&frame, i, mask);
            // Fields no check covers (a round number, a digest) may flip
            // into another valid record, but never into the same one.
            let mut d = decoder_for(&record);
            let _ = decode_checked(&mut d, &bad);
            if let Ok(r) = decoder_for(&record).decode(&bad) {
                prop_assert_ne!(r, record.clone(), "byte {} flipped by {:#x}", i, mask);
            }
            // Bytes 1..4 are reserved, bytes 4..8 are the length.
            if (1..RECORD_HEADER_LEN).contains(&i) {
                prop_assert!(decoder_for(&record).decode(&bad).is_err(), "byte {} flipped", i);
            }
        }
    }

    #[test]
    fn any_flip_in_a_page_batch_is_an_error(
        input in batch_with(small_page_size()),
        mask in 1u8..=255,
    ) {
        let (frame, _) = input.encode();
        let mut d = decoder_after_layout(input.page_size);
        prop_assert!(d.decode(&frame).is_ok());
        // The type code: another record type may happen to parse, but
        // the decoder must not panic and must stay canonical.
        let _ = decode_checked(&mut d.clone(), &flipped(&frame, 0, mask));
        for i in 1..frame.len() {
            let bad = flipped(&frame, i, mask);
            let r = d.decode(&bad);
            prop_assert!(r.is_err(), "byte {} of {} flipped by {:#x} was accepted: {:?}", i, frame.len(), mask, r);
        }
    }

    #[test]
    fn flips_in_page_data_are_checksum_mismatches(
        input in batch_with(small_page_size()),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let (frame, _) = input.encode();
        let n = input.pages.len();
        let data = batch_data_offset(n);
        let checksum = frame.len() - 8;
        prop_assume!(data < checksum);
        let i = data + at.index(checksum - data);
        let mut bad = flipped(&frame, i, mask);
        // Past the frame's CRC (which the sender would have computed over
        // the wrong data), the batch's own checksum catches it.
        protocol::reseal(&mut bad);
        let r = decoder_after_layout(input.page_size).decode(&bad);
        let stored = u64::from_le_bytes(frame[checksum..].try_into().unwrap());
        prop_assert!(
            matches!(r, Err(ProtocolError::ChecksumMismatch { expected, computed })
                if expected == stored && computed != stored),
            "{:?}", r
        );
    }
}

// ------------------------------------------------------- limits and edges

#[test]
fn largest_records_round_trip() {
    let d = decoder_after_header;

    let regions: Vec<Region> = (0..MAX_REGIONS as u64).map(|i| region(i * 3, 2)).collect();
    let layout = Record::Layout(MemoryLayout::new(PageSize::DEFAULT, regions).unwrap());
    let f = encode_to_vec(&layout);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(f.len() - RECORD_HEADER_LEN, RecordType::Layout.max_body());
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(d().decode(&f), Ok(layout));

    let request = Record::PageRequest((0..MAX_REQUEST_PAGES as u64).collect());
    let f = encode_to_vec(&request);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(
        f.len() - RECORD_HEADER_LEN,
        RecordType::PageRequest.max_body()
    );
    assert_eq!(d().decode(&f), Ok(request));

    let discard = Record::Discard(
        (0..MAX_DISCARD_RANGES as u64)
            .map(|i| (i * 1000, 999))
            .chain(std::iter::once((MAX_PAGE_END - 1, 1)))
            .skip(1)
            .collect(),
    );
    let f = encode_to_vec(&discard);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(f.len() - RECORD_HEADER_LEN, RecordType::Discard.max_body());
    assert_eq!(d().decode(&f), Ok(discard));

    let abort = Record::Abort {
        reason: "x".repeat(MAX_TEXT),
    };
    let f = encode_to_vec(&abort);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(f.len() - RECORD_HEADER_LEN, RecordType::Abort.max_body());
    assert_eq!(d().decode(&f), Ok(abort));

    let state = Record::DeviceState(DeviceState {
        format: "f".repeat(MAX_TEXT),
        version: 7,
        data: vec![0xa5; MAX_DEVICE_STATE],
    });
    let f = encode_to_vec(&state);
    assert_eq!(
        f.len() - RECORD_HEADER_LEN,
        RecordType::DeviceState.max_body()
    );
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(d().decode(&f), Ok(state));
}

#[test]
fn largest_device_state_crosses_a_stream_transport() {
    // The stream transport refuses frames above MAX_FRAME_LEN, so the
    // largest record the protocol allows must still get through.
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = StreamTransport::new(a).unwrap();
    let mut rx = StreamTransport::new(b).unwrap();
    let state = DeviceState {
        format: "f".repeat(MAX_TEXT),
        version: 3,
        data: (0..MAX_DEVICE_STATE).map(|i| (i % 253) as u8).collect(),
    };
    let frame = encode_to_vec(&Record::DeviceState(state.clone()));
    let sender = std::thread::spawn(move || tx.send(&frame).map(|()| tx));
    let got = rx
        .recv(Some(Duration::from_secs(60)))
        .expect("frame received")
        .expect("frame arrived in time");
    let _tx = sender.join().unwrap().expect("largest device state sent");
    assert_eq!(
        decoder_after_header().decode(&got),
        Ok(Record::DeviceState(state))
    );
}

#[test]
fn full_page_batches_round_trip() {
    for page_size in [ps(512), PageSize::DEFAULT, ps(2 << 20)] {
        let n = max_batch_pages(page_size);
        assert_eq!(n, (MAX_BATCH_DATA / page_size.get()).min(MAX_BATCH_PAGES));
        let pages: Vec<PageNum> = (0..n as u64).map(|i| MAX_PAGE_END - 1 - i).collect();
        let fill: Vec<u8> = (0..n).map(|i| (i % 251) as u8 + 1).collect();
        let frame = batch_frame(page_size, u32::MAX, &pages, &fill);
        assert!(frame.len() <= MAX_FRAME_LEN);
        let mut d = decoder_after_layout(page_size);
        let Ok(Record::PageBatch(b)) = d.decode(&frame) else {
            panic!("full batch of {page_size} pages refused");
        };
        assert_eq!(b.len(), n);
        assert_eq!(b.zero_pages(), 0);
        for ((p, data), (want_p, want_fill)) in b.iter().zip(pages.iter().zip(&fill)) {
            assert_eq!(p, *want_p);
            let data = data.expect("non-zero page has data");
            assert_eq!(data.len(), page_size.get());
            assert!(data.iter().all(|x| x == want_fill));
        }
    }
}

#[test]
fn long_abort_reasons_are_cut_at_a_char_boundary() {
    // 'é' is two bytes; MAX_TEXT + 1 bytes of them cut mid-character.
    let reason = format!("a{}", "é".repeat(MAX_TEXT / 2));
    assert_eq!(reason.len(), MAX_TEXT + 1);
    let f = encode_to_vec(&Record::Abort {
        reason: reason.clone(),
    });
    let Ok(Record::Abort { reason: got }) = decoder_after_header().decode(&f) else {
        panic!("long abort reason refused");
    };
    assert_eq!(got.len(), MAX_TEXT - 1);
    assert!(reason.starts_with(&got));
    assert_eq!(protocol::abort_frame(&reason), f);
}

#[test]
fn empty_layout_body_is_truncated_not_a_panic() {
    // Layouts must have at least one region.
    let mut body = Vec::new();
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
        Err(ProtocolError::Layout(LayoutError::NoRegions))
    );
}

// ---------------------------------------------------------- typed errors

#[test]
fn truncated() {
    // The frame is shorter than its record header.
    let f = header_frame();
    assert_eq!(
        Decoder::new().decode(&f[..5]),
        Err(ProtocolError::Truncated {
            what: "record header",
            needed: RECORD_HEADER_LEN,
            available: 5
        })
    );
    // The body is shorter than the header says.
    let f = encode_to_vec(&Record::RoundEnd {
        round: 1,
        pages_sent: 2,
    });
    assert_eq!(
        decoder_after_header().decode(&f[..f.len() - 1]),
        Err(ProtocolError::Truncated {
            what: "record body",
            needed: 16,
            available: 15
        })
    );
    // The body is shorter than its own fields say: two regions announced,
    // one present.
    let mut body = Vec::new();
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&8u64.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
        Err(ProtocolError::Truncated {
            what: "layout",
            needed: 8,
            available: 0
        })
    );
    // A page batch whose data stops short of its non-zero pages.
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2], &[1, 0]);
    let mut short = f[RECORD_HEADER_LEN..batch_data_offset(2)].to_vec();
    short.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decoder_after_layout(PageSize::DEFAULT).decode(&raw_frame(3, &short)),
        Err(ProtocolError::Truncated {
            what: "page batch",
            needed: 4096,
            available: 8
        })
    ));
    // A device state whose data is shorter than announced.
    let f = encode_to_vec(&Record::DeviceState(DeviceState {
        format: "sim".into(),
        version: 1,
        data: vec![1, 2, 3],
    }));
    let mut body = f[RECORD_HEADER_LEN..].to_vec();
    body.pop();
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::DeviceState as u8, &body)),
        Err(ProtocolError::Truncated {
            what: "device state",
            needed: 3,
            available: 2
        })
    );
}

#[test]
fn counts_beyond_the_body_are_truncated_without_allocating() {
    // Counts at their limits, with almost no bytes behind them: the
    // decoder must not reserve room for what the count claims.
    let mut layout = raw_layout_body(4096, &[(0, 1)]);
    layout[4..8].copy_from_slice(&(MAX_REGIONS as u32).to_le_bytes());
    let mut request = Vec::new();
    request.extend_from_slice(&(MAX_REQUEST_PAGES as u32).to_le_bytes());
    request.extend_from_slice(&[0; 4]);
    request.extend_from_slice(&1u64.to_le_bytes());
    let mut state = Vec::new();
    state.extend_from_slice(&1u32.to_le_bytes());
    state.extend_from_slice(&0u32.to_le_bytes());
    state.extend_from_slice(&(MAX_DEVICE_STATE as u32).to_le_bytes());
    state.extend_from_slice(&[1; 16]);
    let mut batch = Vec::new();
    batch.extend_from_slice(&1u32.to_le_bytes());
    batch.extend_from_slice(&(MAX_BATCH_PAGES as u32).to_le_bytes());
    batch.extend_from_slice(&[0; 24]);
    let mut discard = Vec::new();
    discard.extend_from_slice(&(MAX_DISCARD_RANGES as u32).to_le_bytes());
    discard.extend_from_slice(&[0; 4]);
    discard.extend_from_slice(&1u64.to_le_bytes());
    discard.extend_from_slice(&1u64.to_le_bytes());
    for (code, body) in [
        (2u8, layout),
        (7, request),
        (5, state),
        (3, batch),
        (12, discard),
    ] {
        let f = raw_frame(code, &body);
        let mut d = decoder_after_layout(PageSize::DEFAULT);
        if code == 2 {
            d = decoder_after_header();
        }
        let (r, largest) = largest_allocation(|| d.decode(&f));
        assert!(
            matches!(r, Err(ProtocolError::Truncated { .. })),
            "type {code}: {r:?}"
        );
        assert!(
            largest <= f.len(),
            "type {code}: a {}-byte frame made a {largest}-byte allocation",
            f.len()
        );
    }
}

#[test]
fn oversized() {
    // A ready record has no body at all.
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Ready as u8, &[0])),
        Err(ProtocolError::Oversized {
            record: RecordType::Ready,
            len: 1,
            max: 0
        })
    );
    // A page batch claiming the whole largest frame as its body.
    assert_eq!(
        decoder_after_layout(PageSize::DEFAULT).decode(&raw_frame_len(
            RecordType::PageBatch as u8,
            MAX_FRAME_LEN as u32,
            &[]
        )),
        Err(ProtocolError::Oversized {
            record: RecordType::PageBatch,
            len: MAX_FRAME_LEN,
            max: RecordType::PageBatch.max_body()
        })
    );
    // One byte over each type's limit; exactly at the limit is not
    // oversized (merely truncated here, as no body follows).
    for (code, ty) in ALL_TYPES {
        let max = ty.max_body();
        assert_eq!(
            Decoder::new().decode(&raw_frame_len(code, max as u32 + 1, &[])),
            Err(ProtocolError::Oversized {
                record: ty,
                len: max + 1,
                max
            })
        );
        if max > 0 {
            assert!(matches!(
                Decoder::new().decode(&raw_frame_len(code, max as u32, &[])),
                Err(ProtocolError::Truncated { .. })
            ));
        }
    }
}

#[test]
fn every_record_fits_in_the_largest_frame() {
    // The transports refuse frames above MAX_FRAME_LEN, so every record
    // the decoder accepts must fit in one.
    for (_, ty) in ALL_TYPES {
        assert!(
            RECORD_HEADER_LEN + ty.max_body() <= MAX_FRAME_LEN,
            "a {ty:?} record may need {} bytes, more than MAX_FRAME_LEN {MAX_FRAME_LEN}",
            RECORD_HEADER_LEN + ty.max_body()
        );
    }
    assert!(ALL_TYPES
        .iter()
        .any(|(_, ty)| RECORD_HEADER_LEN + ty.max_body() == MAX_FRAME_LEN));
}

#[test]
fn huge_length_is_refused_without_allocating() {
    let started = Instant::now();
    for code in 1..=11u8 {
        for len in [u32::MAX, MAX_FRAME_LEN as u32, 1 << 31] {
            let f = raw_frame_len(code, len, &[]);
            for mut d in [
                Decoder::new(),
                decoder_after_header(),
                decoder_after_layout(PageSize::DEFAULT),
            ] {
                let (r, largest) = largest_allocation(|| d.decode(&f));
                assert!(
                    matches!(r, Err(ProtocolError::Oversized { len: l, .. }) if l == len as usize),
                    "type {code}, length {len}: {r:?}"
                );
                assert_eq!(
                    largest, 0,
                    "type {code}, length {len}: allocated {largest} bytes"
                );
            }
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn trailing_bytes() {
    // Bytes after the body the header announced.
    let mut f = encode_to_vec(&Record::SwitchOver {
        round: 3,
        postcopy: false,
    });
    f.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::SwitchOver,
            extra: 3
        })
    );
    // Bytes inside the body after the last field: a layout of one region
    // with room for two.
    let l = MemoryLayout::new(PageSize::DEFAULT, vec![region(0, 4)]).unwrap();
    let mut body = layout_frame(&l)[RECORD_HEADER_LEN..].to_vec();
    body.extend_from_slice(&[0; 16]);
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::Layout,
            extra: 16
        })
    );
    // An abort whose reason is shorter than its body.
    let mut body = encode_to_vec(&Record::Abort {
        reason: "no".into(),
    })[RECORD_HEADER_LEN..]
        .to_vec();
    body.push(b'!');
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Abort as u8, &body)),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::Abort,
            extra: 1
        })
    );
    // A page batch with bytes after its checksum.
    let f = batch_frame(PageSize::DEFAULT, 1, &[5], &[9]);
    let mut body = f[RECORD_HEADER_LEN..].to_vec();
    body.extend_from_slice(&[0; 5]);
    assert_eq!(
        decoder_after_layout(PageSize::DEFAULT).decode(&raw_frame(3, &body)),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::PageBatch,
            extra: 5
        })
    );
}

#[test]
fn bad_magic() {
    let mut f = header_frame();
    assert_eq!(&f[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 8], &MAGIC);
    f[RECORD_HEADER_LEN + 7] = b'X';
    protocol::reseal(&mut f);
    assert_eq!(Decoder::new().decode(&f), Err(ProtocolError::BadMagic));
    // A refused header leaves the decoder waiting for one.
    let mut d = Decoder::new();
    assert_eq!(d.decode(&f), Err(ProtocolError::BadMagic));
    assert!(matches!(
        d.decode(&encode_to_vec(&Record::Ready)),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Ready,
            ..
        })
    ));
}

#[test]
fn unsupported_version() {
    for version in [0, VERSION + 1, u32::MAX] {
        let f = encode_to_vec(&Record::Header { version });
        assert_eq!(
            Decoder::new().decode(&f),
            Err(ProtocolError::UnsupportedVersion(version))
        );
    }
}

#[test]
fn unknown_record_type() {
    for code in [0u8, 15, 16, 0x80, 255] {
        for mut d in [
            Decoder::new(),
            decoder_after_header(),
            decoder_after_layout(PageSize::DEFAULT),
        ] {
            assert_eq!(
                d.decode(&raw_frame(code, &[])),
                Err(ProtocolError::UnknownRecordType(code))
            );
        }
    }
}

#[test]
fn unexpected_page_batch_before_layout() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[0], &[1]);
    assert!(matches!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::PageBatch,
            ..
        })
    ));
}

#[test]
fn unexpected_record_before_header() {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 1 << 20).unwrap();
    let records = [
        Record::Layout(layout),
        Record::Ready,
        Record::Abort {
            reason: "early".into(),
        },
        Record::SwitchOver {
            round: 1,
            postcopy: true,
        },
    ];
    for r in records {
        let got = r.record_type();
        assert!(
            matches!(
                Decoder::new().decode(&encode_to_vec(&r)),
                Err(ProtocolError::UnexpectedRecord { got: g, .. }) if g == got
            ),
            "{got:?} accepted before the header"
        );
    }
    let f = batch_frame(PageSize::DEFAULT, 1, &[0], &[1]);
    assert!(matches!(
        Decoder::new().decode(&f),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::PageBatch,
            ..
        })
    ));
}

#[test]
fn unexpected_second_header() {
    let mut d = decoder_after_header();
    assert!(matches!(
        d.decode(&header_frame()),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Header,
            ..
        })
    ));
    let mut d = decoder_after_layout(PageSize::DEFAULT);
    assert!(matches!(
        d.decode(&header_frame()),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Header,
            ..
        })
    ));
}

#[test]
fn unexpected_second_layout() {
    let mut d = decoder_after_layout(ps(512));
    let other = MemoryLayout::flat(PageSize::DEFAULT, 1 << 20).unwrap();
    assert!(matches!(
        d.decode(&layout_frame(&other)),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Layout,
            ..
        })
    ));
    // The first layout's page size still applies.
    assert_eq!(d.page_size(), Some(ps(512)));
}

#[test]
fn out_of_range_page_number_in_batch() {
    let mut d = decoder_after_layout(PageSize::DEFAULT);
    let ok = batch_frame(PageSize::DEFAULT, 1, &[MAX_PAGE_END - 1], &[1]);
    assert!(d.decode(&ok).is_ok());
    for page in [MAX_PAGE_END, u64::MAX] {
        let f = batch_frame(PageSize::DEFAULT, 1, &[3, page], &[1, 0]);
        assert_eq!(
            d.decode(&f),
            Err(ProtocolError::OutOfRange {
                what: "page number",
                value: page
            })
        );
    }
}

#[test]
fn out_of_range_page_number_in_request() {
    let mut d = decoder_after_header();
    let ok = Record::PageRequest(vec![MAX_PAGE_END - 1]);
    assert_eq!(d.decode(&encode_to_vec(&ok)), Ok(ok));
    let f = encode_to_vec(&Record::PageRequest(vec![1, MAX_PAGE_END]));
    assert_eq!(
        d.decode(&f),
        Err(ProtocolError::OutOfRange {
            what: "page number",
            value: MAX_PAGE_END
        })
    );
    // More pages than one request may hold.
    let f = encode_to_vec(&Record::PageRequest(vec![0; MAX_REQUEST_PAGES + 1]));
    assert!(matches!(
        d.decode(&f),
        Err(ProtocolError::Oversized {
            record: RecordType::PageRequest,
            ..
        })
    ));
    let mut body = Vec::new();
    body.extend_from_slice(&(MAX_REQUEST_PAGES as u32 + 1).to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    assert_eq!(
        d.decode(&raw_frame(RecordType::PageRequest as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "requested page count",
            value: MAX_REQUEST_PAGES as u64 + 1
        })
    );
}

#[test]
fn out_of_range_region_count() {
    for count in [MAX_REGIONS as u32 + 1, u32::MAX] {
        let mut body = Vec::new();
        body.extend_from_slice(&4096u32.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
            Err(ProtocolError::OutOfRange {
                what: "region count",
                value: u64::from(count)
            })
        );
    }
}

#[test]
fn out_of_range_pages_in_batch() {
    for (page_size, most) in [(PageSize::DEFAULT, MAX_BATCH_PAGES), (ps(2 << 20), 4)] {
        assert_eq!(max_batch_pages(page_size), most);
        for n in [most as u32 + 1, u32::MAX] {
            let mut body = Vec::new();
            body.extend_from_slice(&1u32.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&[0; 64]);
            assert_eq!(
                decoder_after_layout(page_size).decode(&raw_frame(3, &body)),
                Err(ProtocolError::OutOfRange {
                    what: "pages in batch",
                    value: u64::from(n)
                })
            );
        }
    }
}

#[test]
fn out_of_range_other_fields() {
    let f = encode_to_vec(&Record::Complete {
        total_pages: MAX_PAGE_END + 1,
        digest: MemoryDigest(1),
    });
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::OutOfRange {
            what: "total pages",
            value: MAX_PAGE_END + 1
        })
    );
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&(MAX_TEXT as u32 + 1).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::DeviceState as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "device state format length",
            value: MAX_TEXT as u64 + 1
        })
    );
    let mut body = Vec::new();
    body.extend_from_slice(&(MAX_TEXT as u32 + 1).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Abort as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "abort reason length",
            value: MAX_TEXT as u64 + 1
        })
    );
}

/// A discard body from raw ranges, unchecked.
fn raw_discard_body(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    for (first, count) in ranges {
        body.extend_from_slice(&first.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
    }
    body
}

#[test]
fn out_of_range_discard_ranges() {
    let frame =
        |ranges: &[(u64, u64)]| raw_frame(RecordType::Discard as u8, &raw_discard_body(ranges));
    let decode = |frame: &[u8]| -> Result<(), ProtocolError> {
        decoder_after_header().decode(frame).map(|_| ())
    };
    let ok: &[(u64, u64)] = &[(0, 1), (MAX_PAGE_END - 1, 1), (0, MAX_PAGE_END)];
    assert_eq!(
        decoder_after_header().decode(&frame(ok)),
        Ok(Record::Discard(ok.to_vec()))
    );
    assert_eq!(
        decode(&frame(&[(0, 1), (MAX_PAGE_END, 1)])),
        Err(ProtocolError::OutOfRange {
            what: "page number",
            value: MAX_PAGE_END
        })
    );
    for (first, count) in [
        (5, 0),
        (1, MAX_PAGE_END),
        (MAX_PAGE_END - 1, 2),
        (0, u64::MAX),
    ] {
        assert_eq!(
            decode(&frame(&[(first, count)])),
            Err(ProtocolError::OutOfRange {
                what: "discard range length",
                value: count
            }),
            "({first}, {count})"
        );
    }
    let mut body = Vec::new();
    body.extend_from_slice(&(MAX_DISCARD_RANGES as u32 + 1).to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Discard as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "discard range count",
            value: MAX_DISCARD_RANGES as u64 + 1
        })
    );
}

#[test]
fn out_of_range_switch_over_mode() {
    for (mode, postcopy) in [(0u32, false), (1, true)] {
        let mut body = 9u32.to_le_bytes().to_vec();
        body.extend_from_slice(&mode.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::SwitchOver as u8, &body)),
            Ok(Record::SwitchOver { round: 9, postcopy })
        );
    }
    for mode in [2u32, 0x100, u32::MAX] {
        let mut body = 9u32.to_le_bytes().to_vec();
        body.extend_from_slice(&mode.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::SwitchOver as u8, &body)),
            Err(ProtocolError::OutOfRange {
                what: "switch-over mode",
                value: u64::from(mode)
            })
        );
    }
}

#[test]
fn malformed_reserved_bytes() {
    // The record header's reserved bytes.
    for i in 1..4 {
        let mut f = encode_to_vec(&Record::Ready);
        f[i] = 1;
        assert_eq!(
            decoder_after_header().decode(&f),
            Err(ProtocolError::Malformed("record header reserved bytes"))
        );
    }
    // Reserved fields in bodies: the last 4 bytes of a header, the second
    // 4 of a round marker, discard, page request and abort.
    let cases: [(Record<'static>, usize, &str); 5] = [
        (Record::Header { version: VERSION }, 12, "header flags"),
        (
            Record::RoundEnd {
                round: 1,
                pages_sent: 1,
            },
            4,
            "round marker reserved field",
        ),
        (Record::Discard(vec![(1, 2)]), 4, "discard reserved field"),
        (
            Record::PageRequest(vec![1]),
            4,
            "page request reserved field",
        ),
        (
            Record::Abort { reason: "r".into() },
            4,
            "abort reserved field",
        ),
    ];
    for (record, at, what) in cases {
        let mut f = encode_to_vec(&record);
        f[RECORD_HEADER_LEN + at] = 0x10;
        protocol::reseal(&mut f);
        assert_eq!(
            decoder_for(&record).decode(&f),
            Err(ProtocolError::Malformed(what)),
            "{record:?}"
        );
    }
    // The padding after a batch's flags.
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2, 3], &[0, 1, 0]);
    let mut bad = flipped(&f, batch_flags_offset(3) + 3, 1);
    protocol::reseal(&mut bad);
    assert_eq!(
        decoder_after_layout(PageSize::DEFAULT).decode(&bad),
        Err(ProtocolError::Malformed("page batch padding"))
    );
}

#[test]
fn malformed_page_flags() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2], &[0, 7]);
    let flags = batch_flags_offset(2);
    assert_eq!(f[flags], PAGE_FLAG_ZERO);
    assert_eq!(f[flags + 1], 0);
    for (at, value) in [
        (flags, 2),
        (flags, PAGE_FLAG_ZERO | 0x80),
        (flags + 1, 0x40),
    ] {
        let mut bad = f.clone();
        bad[at] = value;
        protocol::reseal(&mut bad);
        assert_eq!(
            decoder_after_layout(PageSize::DEFAULT).decode(&bad),
            Err(ProtocolError::Malformed("page flags"))
        );
    }
}

#[test]
fn malformed_text() {
    let mut f = encode_to_vec(&Record::Abort {
        reason: "abc".into(),
    });
    let at = f.len() - 2;
    f[at] = 0xff;
    protocol::reseal(&mut f);
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Malformed("abort reason"))
    );
    // A multi-byte character cut in half.
    let mut f = encode_to_vec(&Record::Abort {
        reason: "é".into()
    });
    let mut body = f.split_off(RECORD_HEADER_LEN);
    body.pop();
    body[0] = 1;
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Abort as u8, &body)),
        Err(ProtocolError::Malformed("abort reason"))
    );
    let mut f = encode_to_vec(&Record::DeviceState(DeviceState {
        format: "kvm".into(),
        version: 1,
        data: vec![0xff; 4],
    }));
    f[RECORD_HEADER_LEN + 12] = 0xc3;
    protocol::reseal(&mut f);
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Malformed("device state format name"))
    );
}

/// Finding 1: a flipped byte anywhere in any record (control records
/// included) is refused by the frame's CRC, and a frame cut short is
/// refused as truncated.
#[test]
fn any_flipped_byte_in_any_record_fails_the_frame_checksum() {
    let records = [
        Record::Discard(vec![(1, 2), (9, 4)]),
        Record::DiscardBitmap {
            first_page: 64,
            words: vec![0xf0f0, 1],
        },
        Record::DeviceState(DeviceState {
            format: "sim".into(),
            version: 1,
            data: vec![1, 2, 3, 4, 5, 6, 7, 8],
        }),
        Record::SwitchOver {
            round: 4,
            postcopy: true,
        },
        Record::RoundEnd {
            round: 2,
            pages_sent: 7,
        },
        Record::Complete {
            total_pages: 12,
            digest: migrate_core::MemoryDigest(0x1234_5678),
        },
    ];
    for record in records {
        let f = encode_to_vec(&record);
        for at in 0..f.len() {
            for mask in [0x01u8, 0x80] {
                let bad = flipped(&f, at, mask);
                let r = decoder_for(&record).decode(&bad);
                assert!(r.is_err(), "{record:?}: flip at {at} accepted: {r:?}");
                if (RECORD_HEADER_LEN..f.len()).contains(&at) || (8..16).contains(&at) {
                    assert!(
                        matches!(r, Err(ProtocolError::FrameChecksum { .. })),
                        "{record:?}: flip at {at}: {r:?}"
                    );
                }
            }
        }
        for cut in 0..f.len() {
            assert!(decoder_for(&record).decode(&f[..cut]).is_err());
        }
    }
}

/// Finding 1: a sequenced decoder refuses a lost, repeated or reordered
/// frame; aborts are accepted whatever their number.
#[test]
fn sequenced_decoder_refuses_lost_repeated_and_reordered_frames() {
    let layout = MemoryLayout::new(PageSize::DEFAULT, vec![region(0, 16)]).unwrap();
    let frames = |n: u32| -> Vec<Vec<u8>> {
        let mut seq = protocol::Sequencer::new();
        let mut v = vec![
            header_frame(),
            layout_frame(&layout),
            encode_to_vec(&Record::Discard(vec![(1, 2)])),
            encode_to_vec(&Record::RoundEnd {
                round: 1,
                pages_sent: 0,
            }),
        ];
        v.truncate(n as usize);
        for f in &mut v {
            seq.seal(f);
        }
        v
    };
    let all = frames(4);
    // In order: accepted.
    let mut d = Decoder::sequenced();
    for f in &all {
        d.decode(f).unwrap();
    }
    // Lost (frame 2 skipped), repeated (frame 1 twice), reordered.
    for order in [[0, 1, 3], [0, 1, 1], [0, 2, 1]] {
        let mut d = Decoder::sequenced();
        let mut result = Ok(());
        for i in order {
            if let Err(e) = d.decode(&all[i]) {
                result = Err(e);
                break;
            }
        }
        assert!(
            matches!(result, Err(ProtocolError::OutOfSequence { .. })),
            "{order:?}: {result:?}"
        );
    }
    // An abort with any number is taken.
    let mut d = Decoder::sequenced();
    d.decode(&all[0]).unwrap();
    let mut abort = protocol::abort_frame("gone");
    protocol::seal(&mut abort, 77);
    assert!(matches!(d.decode(&abort), Ok(Record::Abort { .. })));
    // A plain decoder does not look at numbers.
    let mut d = Decoder::new();
    for f in [&all[0], &all[1], &all[1]] {
        assert!(d.decode(f).is_ok() || f == &all[1]);
    }
}

#[test]
fn checksum_mismatch() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2, 3], &[4, 0, 6]);
    let stored = u64::from_le_bytes(f[f.len() - 8..].try_into().unwrap());
    // A flipped data byte, a flipped round, a flipped page number, a
    // flipped checksum.
    let data = batch_data_offset(3);
    for at in [
        data,
        data + 4096 + 17,
        f.len() - 9,
        RECORD_HEADER_LEN,
        RECORD_HEADER_LEN + 8,
        f.len() - 1,
    ] {
        let mut bad = flipped(&f, at, 0x01);
        protocol::reseal(&mut bad);
        let expected_stored = u64::from_le_bytes(bad[bad.len() - 8..].try_into().unwrap());
        match decoder_after_layout(PageSize::DEFAULT).decode(&bad) {
            Err(ProtocolError::ChecksumMismatch { expected, computed }) => {
                assert_eq!(expected, expected_stored, "byte {at}");
                assert_ne!(computed, expected, "byte {at}");
                if at < f.len() - 8 {
                    assert_eq!(expected, stored);
                } else {
                    assert_eq!(computed, stored);
                }
            }
            other => panic!("byte {at} flipped: {other:?}"),
        }
    }
    // Flipping a zero page's flag changes how much data the batch has,
    // so it is caught before the checksum.
    let bad = flipped(&f, batch_flags_offset(3) + 1, PAGE_FLAG_ZERO);
    assert!(decoder_after_layout(PageSize::DEFAULT)
        .decode(&bad)
        .is_err());
}

#[test]
fn layout_bad_page_size() {
    for size in [3000u32, 0, 256, 4 << 20, 4097] {
        let mut body = Vec::new();
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
            Err(ProtocolError::Layout(LayoutError::BadPageSize(size)))
        );
    }
}

/// A layout body from raw regions, unchecked.
fn raw_layout_body(page_size: u32, regions: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&page_size.to_le_bytes());
    body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for (first, pages) in regions {
        body.extend_from_slice(&first.to_le_bytes());
        body.extend_from_slice(&pages.to_le_bytes());
    }
    body
}

#[test]
fn layout_overlapping_regions() {
    let cases: [(&[(u64, u64)], LayoutError); 5] = [
        (&[(0, 10), (5, 10)], LayoutError::Unordered { index: 1 }),
        (
            &[(0, 10), (20, 1), (19, 3)],
            LayoutError::Unordered { index: 2 },
        ),
        (&[(8, 1), (0, 1)], LayoutError::Unordered { index: 1 }),
        (&[(0, 4), (4, 0)], LayoutError::EmptyRegion { index: 1 }),
        (&[(MAX_PAGE_END - 1, 2)], LayoutError::TooLarge),
    ];
    for (regions, err) in cases {
        let f = raw_frame(RecordType::Layout as u8, &raw_layout_body(4096, regions));
        let mut d = decoder_after_header();
        assert_eq!(d.decode(&f), Err(ProtocolError::Layout(err)), "{regions:?}");
        // A refused layout does not count as the stream's layout.
        assert_eq!(d.page_size(), None);
    }
    // Adjacent regions are fine, and so is one ending at the largest page.
    let f = raw_frame(
        RecordType::Layout as u8,
        &raw_layout_body(4096, &[(0, 4), (4, 4), (MAX_PAGE_END - 1, 1)]),
    );
    assert!(decoder_after_header().decode(&f).is_ok());
    let f = raw_frame(
        RecordType::Layout as u8,
        &raw_layout_body(4096, &[(u64::MAX, u64::MAX)]),
    );
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Layout(LayoutError::TooLarge))
    );
}

#[test]
fn discard_bitmap_bounds_are_checked() {
    let mut d = decoder_after_header();
    // Ends past the largest page number.
    let f = encode_to_vec(&Record::DiscardBitmap {
        first_page: (1 << 52) - 64,
        words: vec![0, 0],
    });
    assert!(matches!(
        d.decode(&f),
        Err(ProtocolError::OutOfRange { .. })
    ));
    // More words than a record may hold.
    let mut body = Vec::new();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(MAX_DISCARD_WORDS as u32 + 1).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    let f = raw_frame(RecordType::DiscardBitmap as u8, &body);
    assert!(matches!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::OutOfRange { .. })
    ));
    // Words announced but not present.
    let mut body = Vec::new();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 8]);
    let f = raw_frame(RecordType::DiscardBitmap as u8, &body);
    assert!(matches!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Truncated { .. })
    ));
}

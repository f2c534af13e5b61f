//! Helpers the test modules share.

#![allow(dead_code, unused_imports)]

use super::*;

pub(crate) use migrate_core::digest::MemoryDigest;
pub(crate) use migrate_core::protocol::{
    self, encode_page_batch, encode_to_vec, max_batch_pages, Capabilities, Decoder, PostcopyReport,
    ProtocolError, Record, RecordType, ResumeReport, MAGIC, MAX_BATCH_DATA, MAX_BATCH_PAGES,
    MAX_DEVICE_STATE, MAX_DISCARD_RANGES, MAX_DISCARD_WORDS, MAX_FRAME_LEN, MAX_REGIONS,
    MAX_REQUEST_PAGES, MAX_TEXT, PAGE_FLAG_ZERO, RECORD_HEADER_LEN, VERSION,
};
pub(crate) use migrate_core::transport::{StreamTransport, Transport};
pub(crate) use migrate_core::DeviceState;
pub(crate) use migrate_core::{LayoutError, MemoryLayout, PageNum, PageSize, Region, MAX_PAGE_END};
pub(crate) use proptest::prelude::*;
pub(crate) use std::alloc::{GlobalAlloc, Layout, System};
pub(crate) use std::cell::Cell;
pub(crate) use std::os::unix::net::UnixStream;
pub(crate) use std::time::{Duration, Instant};

// helpers

/// Every record type with its code on the wire.
pub(crate) const ALL_TYPES: [(u8, RecordType); 13] = [
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

pub(crate) fn ps(bytes: u32) -> PageSize {
    PageSize::new(bytes).expect("valid page size")
}

pub(crate) fn region(first_page: PageNum, pages: u64) -> Region {
    Region { first_page, pages }
}

/// A frame with a hand-made record header: `code`, zero reserved bytes,
/// and the body's real length.
pub(crate) fn raw_frame(code: u8, body: &[u8]) -> Vec<u8> {
    raw_frame_len(code, body.len() as u32, body)
}

/// A frame whose header claims `len` bytes of body, whatever `body` holds.
///
/// The frame carries sequence number 0 and a CRC over the bytes given, so
/// the decoder's structural checks, not the CRC, are what it meets.
pub(crate) fn raw_frame_len(code: u8, len: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![code, 0, 0, 0];
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(body);
    protocol::reseal(&mut f);
    f
}

pub(crate) fn header_frame() -> Vec<u8> {
    encode_to_vec(&Record::Header { version: VERSION })
}

pub(crate) fn layout_frame(layout: &MemoryLayout) -> Vec<u8> {
    encode_to_vec(&Record::Layout(layout.clone()))
}

pub(crate) fn decoder_after_header() -> Decoder {
    let mut d = Decoder::new();
    d.decode(&header_frame()).expect("header decodes");
    d
}

/// A decoder that has seen a header and a one-region layout of `page_size`.
pub(crate) fn decoder_after_layout(page_size: PageSize) -> Decoder {
    let mut d = decoder_after_header();
    let layout = MemoryLayout::new(page_size, vec![region(0, 16)]).expect("valid layout");
    d.decode(&layout_frame(&layout)).expect("layout decodes");
    assert_eq!(d.page_size(), Some(page_size));
    d
}

/// The decoder a frame of `record`'s type needs to be accepted: fresh for
/// a header, after a header for anything else (page batches go through
/// [`decoder_after_layout`]).
pub(crate) fn decoder_for(record: &Record<'_>) -> Decoder {
    match record {
        Record::Header { .. } => Decoder::new(),
        _ => decoder_after_header(),
    }
}

/// A page batch frame of `pages`, with page `i`'s content filled with a
/// byte pattern (`0` means a zero page).
pub(crate) fn batch_frame(
    page_size: PageSize,
    round: u32,
    pages: &[PageNum],
    fill: &[u8],
) -> Vec<u8> {
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
pub(crate) fn batch_flags_offset(n: usize) -> usize {
    RECORD_HEADER_LEN + 8 + 8 * n
}

/// Offset in a page-batch frame of the page data of a batch of `n` pages.
pub(crate) fn batch_data_offset(n: usize) -> usize {
    batch_flags_offset(n) + n.div_ceil(8) * 8
}

/// Decodes `frame` with `decoder` and checks what every input must
/// satisfy: no allocation larger than the frame, and, if it is accepted,
/// the frame is exactly the encoding of the record decoded (the encoding
/// is canonical, so no two frames decode to the same record).
pub(crate) fn decode_checked(decoder: &mut Decoder, frame: &[u8]) -> Result<(), ProtocolError> {
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
pub(crate) fn flipped(frame: &[u8], i: usize, mask: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[i] ^= mask;
    f
}

// strategies

pub(crate) fn page_size() -> impl Strategy<Value = PageSize> {
    (9u32..=21).prop_map(|shift| ps(1 << shift))
}

/// Page sizes for tests that decode a frame once per byte.
pub(crate) fn small_page_size() -> impl Strategy<Value = PageSize> {
    (9u32..=12).prop_map(|shift| ps(1 << shift))
}

pub(crate) fn page_num() -> impl Strategy<Value = PageNum> {
    prop_oneof![0u64..64, 0..MAX_PAGE_END, Just(MAX_PAGE_END - 1),]
}

pub(crate) fn layout() -> impl Strategy<Value = MemoryLayout> {
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
pub(crate) fn discard_range() -> impl Strategy<Value = (PageNum, u64)> {
    (page_num(), prop_oneof![0u64..16, any::<u64>()])
        .prop_map(|(first, raw)| (first, 1 + raw % (MAX_PAGE_END - first)))
}

pub(crate) fn text() -> impl Strategy<Value = String> {
    "(?s).{0,48}"
}

pub(crate) fn device_state() -> impl Strategy<Value = DeviceState> {
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
pub(crate) fn owned_record() -> impl Strategy<Value = Record<'static>> {
    prop_oneof![
        Just(Record::Header { version: VERSION }),
        layout().prop_map(Record::Layout),
        (any::<u32>(), any::<u64>())
            .prop_map(|(round, pages_sent)| Record::RoundEnd { round, pages_sent }),
        any::<u32>().prop_map(|round| Record::RoundReceived { round }),
        device_state().prop_map(Record::DeviceState),
        (any::<u32>(), any::<bool>())
            .prop_map(|(round, postcopy)| Record::SwitchOver { round, postcopy }),
        prop::collection::vec(discard_range(), 0..32).prop_map(Record::Discard),
        (0u64..(1 << 40), prop::collection::vec(any::<u64>(), 0..64))
            .prop_map(|(first_page, words)| Record::DiscardBitmap { first_page, words }),
        (0u64..(1 << 40), prop::collection::vec(any::<u64>(), 0..64))
            .prop_map(|(first_page, words)| Record::ReceivedBitmap { first_page, words }),
        (any::<u128>(), any::<bool>()).prop_map(|(id, resume)| Record::Session { id, resume }),
        (0u64..(1 << 50)).prop_map(|held| Record::Recovered { held }),
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
        prop::collection::vec(page_num(), 0..48).prop_map(Record::PreemptRequest),
        (0..=MAX_PAGE_END, any::<u128>()).prop_map(|(total_pages, d)| Record::Complete {
            total_pages,
            digest: MemoryDigest(d),
        }),
        text().prop_map(|reason| Record::Abort { reason }),
        Just(Record::Ready),
        any::<u32>().prop_map(|c| Record::Capabilities(Capabilities(c))),
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
pub(crate) enum Content {
    /// All zeros: sent as a flag.
    Zero,
    /// Pseudo-random bytes from a seed.
    Noise(u64),
    /// Zeros but for one byte (at `at` modulo the page size), which the
    /// zero-page check must not miss wherever it is.
    OneByte { at: usize, value: u8 },
}

impl Content {
    pub(crate) fn render(&self, out: &mut Vec<u8>, page_size: usize) {
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

pub(crate) fn content() -> impl Strategy<Value = Content> {
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
pub(crate) struct BatchInput {
    pub(crate) round: u32,
    pub(crate) page_size: PageSize,
    pub(crate) pages: Vec<PageNum>,
    pub(crate) contents: Vec<u8>,
}

impl BatchInput {
    pub(crate) fn encode(&self) -> (Vec<u8>, protocol::BatchSummary) {
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

pub(crate) fn batch_with(
    sizes: impl Strategy<Value = PageSize>,
) -> impl Strategy<Value = BatchInput> {
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

pub(crate) fn batch() -> impl Strategy<Value = BatchInput> {
    batch_with(page_size())
}

/// A record header (reserved bytes zero or not) with a length that is
/// right for the body, close to it, or anything at all.
pub(crate) fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
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

/// A layout body from raw regions, unchecked.
pub(crate) fn raw_layout_body(page_size: u32, regions: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&page_size.to_le_bytes());
    body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for (first, pages) in regions {
        body.extend_from_slice(&first.to_le_bytes());
        body.extend_from_slice(&pages.to_le_bytes());
    }
    body
}

//! The wire protocol: a stream of typed, length-bounded records.
//!
//! Each transport frame carries exactly one record:
//!
//! ```text
//!  0      1      2      4              8
//!  +------+------+------+--------------+------------------------+
//!  | type | 0    | 0    | body length  | body (length bytes)    |
//!  +------+------+------+--------------+------------------------+
//!    u8     u8     u16    u32 LE
//! ```
//!
//! Each direction opens with a [`Record::Header`] (magic `LVMIGRAT`, protocol
//! version). The source then sends the memory [`Record::Layout`], page batches
//! and round markers, a [`Record::SwitchOver`] when it pauses the guest, the
//! final pages, the [`Record::DeviceState`], and a [`Record::Complete`] that
//! carries the digest of all guest memory. The destination answers with
//! [`Record::Ready`] after accepting the layout and [`Record::Resumed`] once
//! the guest runs. In post-copy the switch-over is followed by
//! [`Record::Discard`] ranges (pages the destination must fault on) and
//! (or [`Record::DiscardBitmap`]s, for scattered sets) and the device
//! state; the destination resumes at once, asks for pages with
//! [`Record::PageRequest`], and sends [`Record::Verified`] when every page
//! has arrived and the digest matched. Either side may send
//! [`Record::Abort`].
//!
//! Every record type has a maximum body length, every count is checked
//! against the bytes present, page batches carry an XXH3 checksum, and the
//! [`Decoder`] returns a [`ProtocolError`] for any input it cannot accept:
//! it never panics and never allocates more than the record's bound.

use crate::backend::DeviceState;
use crate::digest::{is_zero_page, MemoryDigest};
use crate::page::{LayoutError, MemoryLayout, PageNum, PageSize, Region, MAX_PAGE_END};
use bytes::BufMut;
use xxhash_rust::xxh3::xxh3_64;

/// The 8 bytes that open every stream.
pub const MAGIC: [u8; 8] = *b"LVMIGRAT";
/// The protocol version this library speaks.
pub const VERSION: u32 = 1;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 8;
/// The largest frame any record may need (header + largest body).
pub const MAX_FRAME_LEN: usize = RECORD_HEADER_LEN
    + if MAX_PAGE_BATCH_BODY > MAX_DEVICE_STATE_BODY {
        MAX_PAGE_BATCH_BODY
    } else {
        MAX_DEVICE_STATE_BODY
    };
/// Most pages in one batch.
pub const MAX_BATCH_PAGES: usize = 1024;
/// Most page data bytes in one batch (so 2 MiB pages go 4 to a batch).
pub const MAX_BATCH_DATA: usize = 8 << 20;
/// Most regions in a layout.
pub const MAX_REGIONS: usize = 4096;
/// Most bytes of device state.
pub const MAX_DEVICE_STATE: usize = 16 << 20;
/// Most bytes of an abort reason or a device-state format name.
pub const MAX_TEXT: usize = 4096;
/// Most pages in one post-copy request.
pub const MAX_REQUEST_PAGES: usize = 1024;
/// Most page ranges in one discard record.
pub const MAX_DISCARD_RANGES: usize = 4096;
/// Most 64-bit words in one discard-bitmap record (512 Ki pages).
pub const MAX_DISCARD_WORDS: usize = 8192;

const MAX_PAGE_BATCH_BODY: usize = 8 + MAX_BATCH_PAGES * 9 + 8 + MAX_BATCH_DATA + 8;
const MAX_DEVICE_STATE_BODY: usize = 12 + MAX_TEXT + MAX_DEVICE_STATE;

/// Page flag: the page is all zeros and carries no data.
pub const PAGE_FLAG_ZERO: u8 = 1;

/// Record type codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum RecordType {
    /// Stream header.
    Header = 1,
    /// Memory layout.
    Layout = 2,
    /// A batch of pages.
    PageBatch = 3,
    /// End of a pre-copy round.
    RoundEnd = 4,
    /// vCPU and device state.
    DeviceState = 5,
    /// The source paused the guest.
    SwitchOver = 6,
    /// Destination asks for pages (post-copy).
    PageRequest = 7,
    /// All memory sent, with its digest.
    Complete = 8,
    /// The sender gives up.
    Abort = 9,
    /// Destination accepted the layout.
    Ready = 10,
    /// Destination resumed the guest.
    Resumed = 11,
    /// Post-copy: pages the destination must treat as absent.
    Discard = 12,
    /// Post-copy: every page arrived and the digest matched.
    Verified = 13,
    /// Post-copy: absent pages as a bitmap (for scattered sets).
    DiscardBitmap = 14,
    /// A batch of page models (see [`ModelBatch`]): the simulator's fast
    /// path, never sent by a real backend.
    ModelBatch = 0x40,
}

impl RecordType {
    fn from_u8(v: u8) -> Option<Self> {
        use RecordType::*;
        Some(match v {
            1 => Header,
            2 => Layout,
            3 => PageBatch,
            4 => RoundEnd,
            5 => DeviceState,
            6 => SwitchOver,
            7 => PageRequest,
            8 => Complete,
            9 => Abort,
            10 => Ready,
            11 => Resumed,
            12 => Discard,
            13 => Verified,
            14 => DiscardBitmap,
            0x40 => ModelBatch,
            _ => return None,
        })
    }

    /// The largest body this record type may have.
    pub fn max_body(self) -> usize {
        use RecordType::*;
        match self {
            Header => 16,
            Layout => 8 + MAX_REGIONS * 16,
            PageBatch => MAX_PAGE_BATCH_BODY,
            RoundEnd => 16,
            DeviceState => MAX_DEVICE_STATE_BODY,
            SwitchOver => 8,
            PageRequest => 8 + MAX_REQUEST_PAGES * 8,
            Complete => 24,
            Abort => 8 + MAX_TEXT,
            Ready => 0,
            Resumed => 32,
            Discard => 8 + MAX_DISCARD_RANGES * 16,
            Verified => 48,
            DiscardBitmap => 16 + MAX_DISCARD_WORDS * 8,
            ModelBatch => 16 + MAX_BATCH_PAGES * 16 + 8,
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Fewer bytes than the record says it has.
    #[error("truncated {what}: needed {needed} bytes, had {available}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// A body longer than its type allows.
    #[error("{record:?} record of {len} bytes exceeds its limit of {max}")]
    Oversized {
        /// The record type.
        record: RecordType,
        /// The length claimed.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes after the end of the record.
    #[error("{extra} unexpected bytes after a {record:?} record")]
    TrailingBytes {
        /// The record type.
        record: RecordType,
        /// How many extra bytes.
        extra: usize,
    },
    /// The stream does not start with our magic.
    #[error("not a migration stream (bad magic)")]
    BadMagic,
    /// A protocol version we do not speak.
    #[error("unsupported protocol version {0} (this library speaks {VERSION})")]
    UnsupportedVersion(u32),
    /// An unknown record type code.
    #[error("unknown record type {0}")]
    UnknownRecordType(u8),
    /// A record in a place the protocol does not allow.
    #[error("unexpected {got:?} record: {why}")]
    UnexpectedRecord {
        /// What arrived.
        got: RecordType,
        /// Why it is not allowed here.
        why: &'static str,
    },
    /// A field out of its valid range.
    #[error("{what} out of range: {value}")]
    OutOfRange {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A reserved field or flag that is not zero, or text that is not UTF-8.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A page batch whose checksum does not match its contents.
    #[error("page batch checksum mismatch (expected {expected:016x}, computed {computed:016x})")]
    ChecksumMismatch {
        /// The checksum in the record.
        expected: u64,
        /// The checksum of the bytes received.
        computed: u64,
    },
    /// An invalid memory layout.
    #[error("invalid memory layout: {0}")]
    Layout(#[from] LayoutError),
}

/// A batch of pages as it lies in a received frame (no copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageBatch<'a> {
    /// The round the pages belong to.
    pub round: u32,
    page_size: PageSize,
    pages: &'a [u8],
    flags: &'a [u8],
    data: &'a [u8],
}

impl<'a> PageBatch<'a> {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// Whether the batch has no pages.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// The pages in order: their GFN and their data, `None` for a zero page.
    pub fn iter(&self) -> impl Iterator<Item = (PageNum, Option<&'a [u8]>)> + 'a {
        let ps = self.page_size.get();
        let data = self.data;
        let mut offset = 0usize;
        self.pages
            .chunks_exact(8)
            .zip(self.flags.iter())
            .map(move |(p, f)| {
                let page = u64::from_le_bytes(p.try_into().unwrap_or_default());
                if f & PAGE_FLAG_ZERO != 0 {
                    (page, None)
                } else {
                    let d = &data[offset..offset + ps];
                    offset += ps;
                    (page, Some(d))
                }
            })
    }

    /// Number of zero pages in the batch.
    pub fn zero_pages(&self) -> usize {
        self.flags
            .iter()
            .filter(|f| **f & PAGE_FLAG_ZERO != 0)
            .count()
    }
}

/// A batch of page models as it lies in a received frame (no copy).
///
/// The simulator's fast path: instead of a page's bytes, a 64-bit token
/// that names its content (0: all zeros). The frame also carries the
/// length the same pages would have as a [`PageBatch`] frame, and
/// [`wire_len`] reports that length, so a modelled link and the
/// statistics count the bytes the page batch would have put on the wire.
/// Only a sink that stores page models (the simulator's) accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelBatch<'a> {
    /// The round the pages belong to.
    pub round: u32,
    /// Length of the [`PageBatch`] frame these pages stand for.
    pub nominal_len: u64,
    pages: &'a [u8],
    tokens: &'a [u8],
}

impl<'a> ModelBatch<'a> {
    /// A batch over encoded page numbers and tokens (8 bytes each, little
    /// endian, as [`encode_model_batch`] lays them out).
    pub fn new(round: u32, nominal_len: u64, pages: &'a [u8], tokens: &'a [u8]) -> Self {
        ModelBatch {
            round,
            nominal_len,
            pages,
            tokens,
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len() / 8
    }

    /// Whether the batch has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The pages in order: their GFN and their content token.
    pub fn iter(&self) -> impl Iterator<Item = (PageNum, u64)> + 'a {
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or_default());
        self.pages
            .chunks_exact(8)
            .zip(self.tokens.chunks_exact(8))
            .map(move |(p, t)| (word(p), word(t)))
    }
}

/// What the destination reports when it has resumed the guest: how long
/// each of its steps took, on its own clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// Nanoseconds spent digesting memory before resume.
    pub verify_ns: u64,
    /// Nanoseconds spent restoring device state.
    pub restore_ns: u64,
    /// Nanoseconds spent in the backend's resume.
    pub resume_ns: u64,
    /// Nanoseconds from the completion record's arrival to resume, in all.
    pub total_ns: u64,
}

/// What a post-copy destination reports once every page has arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyReport {
    /// Network faults: pages the guest touched before they arrived.
    pub faults: u64,
    /// Pages that arrived when already present (not placed again).
    pub duplicates: u64,
    /// Median fault latency (request to page placed), nanoseconds.
    pub latency_p50_ns: u64,
    /// 99th-percentile fault latency, nanoseconds.
    pub latency_p99_ns: u64,
    /// Longest fault latency, nanoseconds.
    pub latency_max_ns: u64,
    /// Sum of fault latencies: the time vCPUs waited, nanoseconds.
    pub stall_ns: u64,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record<'a> {
    /// Stream header.
    Header {
        /// Protocol version of the sender.
        version: u32,
    },
    /// Memory layout of the guest being migrated.
    Layout(MemoryLayout),
    /// Pages.
    PageBatch(PageBatch<'a>),
    /// Page models standing for pages (the simulator's fast path).
    ModelBatch(ModelBatch<'a>),
    /// Marks the end of a pre-copy round.
    RoundEnd {
        /// The round.
        round: u32,
        /// Pages sent in it.
        pages_sent: u64,
    },
    /// vCPU and device state.
    DeviceState(DeviceState),
    /// The source paused the guest; the final pages follow.
    SwitchOver {
        /// The round number of the final copy (or of the post-copy push).
        round: u32,
        /// Post-copy: the destination resumes the guest as soon as the
        /// device state arrives, before the pages.
        postcopy: bool,
    },
    /// Post-copy: pages (as `(first, count)` ranges) whose copy on the
    /// destination is stale or missing; the guest must fault on them.
    Discard(Vec<(PageNum, u64)>),
    /// Post-copy: every page arrived and the digest matched.
    Verified(PostcopyReport),
    /// Post-copy: pages the destination must treat as absent, as a bitmap:
    /// bit `i` of word `w` is page `first_page + 64 * w + i`.
    DiscardBitmap {
        /// The page of bit 0 of word 0.
        first_page: PageNum,
        /// The bits.
        words: Vec<u64>,
    },
    /// Destination asks for these pages now (post-copy).
    PageRequest(Vec<PageNum>),
    /// Everything has been sent.
    Complete {
        /// Guest pages in the layout.
        total_pages: u64,
        /// Digest of all guest memory on the source after pause.
        digest: MemoryDigest,
    },
    /// The sender gives up.
    Abort {
        /// Why.
        reason: String,
    },
    /// Destination accepted the layout and is ready for pages.
    Ready,
    /// Destination has resumed the guest.
    Resumed(ResumeReport),
}

impl Record<'_> {
    /// The record's type code.
    pub fn record_type(&self) -> RecordType {
        match self {
            Record::Header { .. } => RecordType::Header,
            Record::Layout(_) => RecordType::Layout,
            Record::PageBatch(_) => RecordType::PageBatch,
            Record::ModelBatch(_) => RecordType::ModelBatch,
            Record::RoundEnd { .. } => RecordType::RoundEnd,
            Record::DeviceState(_) => RecordType::DeviceState,
            Record::SwitchOver { .. } => RecordType::SwitchOver,
            Record::PageRequest(_) => RecordType::PageRequest,
            Record::Complete { .. } => RecordType::Complete,
            Record::Abort { .. } => RecordType::Abort,
            Record::Ready => RecordType::Ready,
            Record::Resumed(_) => RecordType::Resumed,
            Record::Discard(_) => RecordType::Discard,
            Record::Verified(_) => RecordType::Verified,
            Record::DiscardBitmap { .. } => RecordType::DiscardBitmap,
        }
    }
}

// ---------------------------------------------------------------- encoding

fn begin(out: &mut Vec<u8>, ty: RecordType) -> usize {
    let start = out.len();
    out.put_u8(ty as u8);
    out.put_u8(0);
    out.put_u16_le(0);
    out.put_u32_le(0);
    start
}

fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start - RECORD_HEADER_LEN) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
}

/// Appends `record` as one frame to `out`.
///
/// Page batches are better built with [`encode_page_batch`], which reads
/// pages straight from a buffer and detects zero pages.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) {
    let start = begin(out, record.record_type());
    match record {
        Record::Header { version } => {
            out.put_slice(&MAGIC);
            out.put_u32_le(*version);
            out.put_u32_le(0);
        }
        Record::Layout(layout) => {
            out.put_u32_le(layout.page_size().bytes());
            out.put_u32_le(layout.regions().len() as u32);
            for r in layout.regions() {
                out.put_u64_le(r.first_page);
                out.put_u64_le(r.pages);
            }
        }
        Record::ModelBatch(b) => {
            put_model_body(out, b.round, b.nominal_len, b.pages, b.tokens);
        }
        Record::PageBatch(b) => {
            put_batch_body(out, b.round, b.pages, b.flags, b.data);
        }
        Record::RoundEnd { round, pages_sent } => {
            out.put_u32_le(*round);
            out.put_u32_le(0);
            out.put_u64_le(*pages_sent);
        }
        Record::DeviceState(s) => {
            out.put_u32_le(s.version);
            out.put_u32_le(s.format.len() as u32);
            out.put_u32_le(s.data.len() as u32);
            out.put_slice(s.format.as_bytes());
            out.put_slice(&s.data);
        }
        Record::SwitchOver { round, postcopy } => {
            out.put_u32_le(*round);
            out.put_u32_le(u32::from(*postcopy));
        }
        Record::Discard(ranges) => {
            out.put_u32_le(ranges.len() as u32);
            out.put_u32_le(0);
            for (first, count) in ranges {
                out.put_u64_le(*first);
                out.put_u64_le(*count);
            }
        }
        Record::DiscardBitmap { first_page, words } => {
            out.put_u64_le(*first_page);
            out.put_u32_le(words.len() as u32);
            out.put_u32_le(0);
            for w in words {
                out.put_u64_le(*w);
            }
        }
        Record::Verified(r) => {
            out.put_u64_le(r.faults);
            out.put_u64_le(r.duplicates);
            out.put_u64_le(r.latency_p50_ns);
            out.put_u64_le(r.latency_p99_ns);
            out.put_u64_le(r.latency_max_ns);
            out.put_u64_le(r.stall_ns);
        }
        Record::PageRequest(pages) => {
            out.put_u32_le(pages.len() as u32);
            out.put_u32_le(0);
            for p in pages {
                out.put_u64_le(*p);
            }
        }
        Record::Complete {
            total_pages,
            digest,
        } => {
            out.put_u64_le(*total_pages);
            out.put_u128_le(digest.0);
        }
        Record::Abort { reason } => {
            let mut r = reason.as_str();
            if r.len() > MAX_TEXT {
                let mut cut = MAX_TEXT;
                while !r.is_char_boundary(cut) {
                    cut -= 1;
                }
                r = &r[..cut];
            }
            out.put_u32_le(r.len() as u32);
            out.put_u32_le(0);
            out.put_slice(r.as_bytes());
        }
        Record::Ready => {}
        Record::Resumed(r) => {
            out.put_u64_le(r.verify_ns);
            out.put_u64_le(r.restore_ns);
            out.put_u64_le(r.resume_ns);
            out.put_u64_le(r.total_ns);
        }
    }
    finish(out, start);
}

fn put_batch_body(out: &mut Vec<u8>, round: u32, pages: &[u8], flags: &[u8], data: &[u8]) {
    let body_start = out.len();
    out.put_u32_le(round);
    out.put_u32_le(flags.len() as u32);
    out.put_slice(pages);
    out.put_slice(flags);
    out.resize(out.len() + pad8(flags.len()), 0);
    out.put_slice(data);
    let sum = xxh3_64(&out[body_start..]);
    out.put_u64_le(sum);
}

fn pad8(n: usize) -> usize {
    (8 - n % 8) % 8
}

/// The largest number of pages of `page_size` one batch may hold.
pub fn max_batch_pages(page_size: PageSize) -> usize {
    (MAX_BATCH_DATA / page_size.get()).clamp(1, MAX_BATCH_PAGES)
}

/// What [`encode_page_batch`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchSummary {
    /// Pages in the batch.
    pub pages: usize,
    /// Of those, zero pages (sent as a flag, no data).
    pub zero_pages: usize,
    /// Bytes of the frame.
    pub frame_bytes: usize,
}

/// Appends one page-batch frame to `out`: `pages[i]`'s content is
/// `contents[i * page_size ..][.. page_size]`. Zero pages are sent as a flag.
///
/// # Panics
/// Never on valid arguments; `pages.len()` must not exceed
/// [`max_batch_pages`] and `contents` must hold exactly one page per entry,
/// which the engine guarantees (a debug assertion checks it).
pub fn encode_page_batch(
    round: u32,
    page_size: PageSize,
    pages: &[PageNum],
    contents: &[u8],
    out: &mut Vec<u8>,
) -> BatchSummary {
    let ps = page_size.get();
    debug_assert!(pages.len() <= max_batch_pages(page_size));
    debug_assert_eq!(contents.len(), pages.len() * ps);
    let n = pages.len();
    let zero: Vec<bool> = contents.chunks_exact(ps).map(is_zero_page).collect();
    let nonzero = zero.iter().filter(|z| !**z).count();
    let before = out.len();
    out.reserve(RECORD_HEADER_LEN + 8 + n * 9 + pad8(n) + nonzero * ps + 8);
    let start = begin(out, RecordType::PageBatch);
    let body_start = out.len();
    out.put_u32_le(round);
    out.put_u32_le(n as u32);
    for p in pages {
        out.put_u64_le(*p);
    }
    for z in &zero {
        out.put_u8(if *z { PAGE_FLAG_ZERO } else { 0 });
    }
    out.resize(out.len() + pad8(n), 0);
    for (chunk, z) in contents.chunks_exact(ps).zip(&zero) {
        if !*z {
            out.put_slice(chunk);
        }
    }
    let sum = xxh3_64(&out[body_start..]);
    out.put_u64_le(sum);
    finish(out, start);
    BatchSummary {
        pages: n,
        zero_pages: n - nonzero,
        frame_bytes: out.len() - before,
    }
}

/// Length of the [`RecordType::PageBatch`] frame that [`encode_page_batch`]
/// builds for `pages` pages of `page_size`, `zero_pages` of them zero.
pub fn page_batch_len(page_size: PageSize, pages: usize, zero_pages: usize) -> usize {
    RECORD_HEADER_LEN + 8 + pages * 9 + pad8(pages) + (pages - zero_pages) * page_size.get() + 8
}

fn put_model_body(out: &mut Vec<u8>, round: u32, nominal: u64, pages: &[u8], tokens: &[u8]) {
    let body_start = out.len();
    out.put_u32_le(round);
    out.put_u32_le((pages.len() / 8) as u32);
    out.put_u64_le(nominal);
    out.put_slice(pages);
    out.put_slice(tokens);
    let sum = xxh3_64(&out[body_start..]);
    out.put_u64_le(sum);
}

/// Appends one model-batch frame to `out` (see [`ModelBatch`]): page
/// `pages[i]` has content token `tokens[i]`, 0 for a zero page. The
/// summary's `frame_bytes` is the length of the page batch the frame
/// stands for, not of the frame.
pub fn encode_model_batch(
    round: u32,
    page_size: PageSize,
    pages: &[PageNum],
    tokens: &[u64],
    out: &mut Vec<u8>,
) -> BatchSummary {
    debug_assert!(pages.len() <= max_batch_pages(page_size));
    debug_assert_eq!(pages.len(), tokens.len());
    let n = pages.len();
    let zero = tokens.iter().filter(|t| **t == 0).count();
    let nominal = page_batch_len(page_size, n, zero);
    out.reserve(RECORD_HEADER_LEN + 16 + n * 16 + 8);
    let start = begin(out, RecordType::ModelBatch);
    let body_start = out.len();
    out.put_u32_le(round);
    out.put_u32_le(n as u32);
    out.put_u64_le(nominal as u64);
    for p in pages {
        out.put_u64_le(*p);
    }
    for t in tokens {
        out.put_u64_le(*t);
    }
    let sum = xxh3_64(&out[body_start..]);
    out.put_u64_le(sum);
    finish(out, start);
    BatchSummary {
        pages: n,
        zero_pages: zero,
        frame_bytes: nominal,
    }
}

/// The bytes `frame` stands for on a wire: its length, except for a
/// [`RecordType::ModelBatch`] frame, which stands for the page batch it
/// models. Links and statistics count this. The length read from a frame
/// is trusted only up to [`MAX_FRAME_LEN`] (the decoder checks it
/// exactly), so a damaged frame cannot inflate a count without bound.
pub fn wire_len(frame: &[u8]) -> usize {
    if frame.len() >= RECORD_HEADER_LEN + 16 && frame[0] == RecordType::ModelBatch as u8 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&frame[RECORD_HEADER_LEN + 8..RECORD_HEADER_LEN + 16]);
        return usize::try_from(u64::from_le_bytes(a))
            .ok()
            .filter(|n| *n <= MAX_FRAME_LEN)
            .unwrap_or(frame.len());
    }
    frame.len()
}

/// An abort record telling the peer why, as a frame.
pub fn abort_frame(reason: &str) -> Vec<u8> {
    encode_to_vec(&Record::Abort {
        reason: reason.to_owned(),
    })
}

/// Encodes one record into a new frame.
pub fn encode_to_vec(record: &Record<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    encode(record, &mut v);
    v
}

// ---------------------------------------------------------------- decoding

struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.buf.len() {
            return Err(ProtocolError::Truncated {
                what: self.what,
                needed: n,
                available: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn u128(&mut self) -> Result<u128, ProtocolError> {
        let b = self.take(16)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ok(u128::from_le_bytes(a))
    }
    fn zero_u32(&mut self, what: &'static str) -> Result<(), ProtocolError> {
        if self.u32()? != 0 {
            return Err(ProtocolError::Malformed(what));
        }
        Ok(())
    }
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as u64;
        if n > max as u64 {
            return Err(ProtocolError::OutOfRange { what, value: n });
        }
        Ok(n as usize)
    }
}

/// Decodes the frames of one direction of a stream, checking that they
/// come in an order the protocol allows.
///
/// The first frame must be a [`Record::Header`]. Page batches are accepted
/// only after a [`Record::Layout`] (whose page size they need); a second
/// layout is refused.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    header_seen: bool,
    page_size: Option<PageSize>,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The page size announced by the stream's layout, once seen.
    pub fn page_size(&self) -> Option<PageSize> {
        self.page_size
    }

    /// Decodes one frame. Any input gives a record or an error, never a panic.
    pub fn decode<'a>(&mut self, frame: &'a [u8]) -> Result<Record<'a>, ProtocolError> {
        let mut c = Cursor {
            buf: frame,
            what: "record header",
        };
        let head = c.take(RECORD_HEADER_LEN)?;
        let code = head[0];
        let ty = RecordType::from_u8(code).ok_or(ProtocolError::UnknownRecordType(code))?;
        if head[1] != 0 || head[2] != 0 || head[3] != 0 {
            return Err(ProtocolError::Malformed("record header reserved bytes"));
        }
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > ty.max_body() {
            return Err(ProtocolError::Oversized {
                record: ty,
                len,
                max: ty.max_body(),
            });
        }
        c.what = "record body";
        let body = c.take(len)?;
        if !c.buf.is_empty() {
            return Err(ProtocolError::TrailingBytes {
                record: ty,
                extra: c.buf.len(),
            });
        }
        if !self.header_seen && ty != RecordType::Header {
            return Err(ProtocolError::UnexpectedRecord {
                got: ty,
                why: "a stream must begin with a header",
            });
        }
        let mut b = Cursor {
            buf: body,
            what: record_name(ty),
        };
        let rec = match ty {
            RecordType::Header => {
                if self.header_seen {
                    return Err(ProtocolError::UnexpectedRecord {
                        got: ty,
                        why: "second header",
                    });
                }
                if b.take(8)? != MAGIC {
                    return Err(ProtocolError::BadMagic);
                }
                let version = b.u32()?;
                if version != VERSION {
                    return Err(ProtocolError::UnsupportedVersion(version));
                }
                b.zero_u32("header flags")?;
                self.header_seen = true;
                Record::Header { version }
            }
            RecordType::Layout => {
                if self.page_size.is_some() {
                    return Err(ProtocolError::UnexpectedRecord {
                        got: ty,
                        why: "second layout",
                    });
                }
                let ps = PageSize::new(b.u32()?)?;
                let n = b.count("region count", MAX_REGIONS)?;
                let mut regions = Vec::with_capacity(n.min(b.buf.len() / 16));
                for _ in 0..n {
                    let first_page = b.u64()?;
                    let pages = b.u64()?;
                    regions.push(Region { first_page, pages });
                }
                let layout = MemoryLayout::new(ps, regions)?;
                self.page_size = Some(ps);
                Record::Layout(layout)
            }
            RecordType::PageBatch => {
                let ps = self.page_size.ok_or(ProtocolError::UnexpectedRecord {
                    got: ty,
                    why: "pages before the memory layout",
                })?;
                let batch = decode_batch(body, ps)?;
                b.buf = &[];
                Record::PageBatch(batch)
            }
            RecordType::ModelBatch => {
                let ps = self.page_size.ok_or(ProtocolError::UnexpectedRecord {
                    got: ty,
                    why: "page models before the memory layout",
                })?;
                let batch = decode_model_batch(body, ps)?;
                b.buf = &[];
                Record::ModelBatch(batch)
            }
            RecordType::RoundEnd => {
                let round = b.u32()?;
                b.zero_u32("round marker reserved field")?;
                let pages_sent = b.u64()?;
                Record::RoundEnd { round, pages_sent }
            }
            RecordType::DeviceState => {
                let version = b.u32()?;
                let flen = b.count("device state format length", MAX_TEXT)?;
                let dlen = b.count("device state length", MAX_DEVICE_STATE)?;
                let format = std::str::from_utf8(b.take(flen)?)
                    .map_err(|_| ProtocolError::Malformed("device state format name"))?
                    .to_owned();
                let data = b.take(dlen)?.to_vec();
                Record::DeviceState(DeviceState {
                    format,
                    version,
                    data,
                })
            }
            RecordType::SwitchOver => {
                let round = b.u32()?;
                let postcopy = match b.u32()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(ProtocolError::OutOfRange {
                            what: "switch-over mode",
                            value: other as u64,
                        })
                    }
                };
                Record::SwitchOver { round, postcopy }
            }
            RecordType::Discard => {
                let n = b.count("discard range count", MAX_DISCARD_RANGES)?;
                b.zero_u32("discard reserved field")?;
                let mut ranges = Vec::with_capacity(n.min(b.buf.len() / 16));
                for _ in 0..n {
                    let first = check_page(b.u64()?)?;
                    let count = b.u64()?;
                    if count == 0 || count > MAX_PAGE_END - first {
                        return Err(ProtocolError::OutOfRange {
                            what: "discard range length",
                            value: count,
                        });
                    }
                    ranges.push((first, count));
                }
                Record::Discard(ranges)
            }
            RecordType::DiscardBitmap => {
                let first_page = check_page(b.u64()?)?;
                let n = b.count("discard bitmap words", MAX_DISCARD_WORDS)?;
                b.zero_u32("discard bitmap reserved field")?;
                if n as u64 * 64 > MAX_PAGE_END - first_page {
                    return Err(ProtocolError::OutOfRange {
                        what: "discard bitmap end",
                        value: first_page + n as u64 * 64,
                    });
                }
                let mut words = Vec::with_capacity(n.min(b.buf.len() / 8));
                for _ in 0..n {
                    words.push(b.u64()?);
                }
                Record::DiscardBitmap { first_page, words }
            }
            RecordType::Verified => Record::Verified(PostcopyReport {
                faults: b.u64()?,
                duplicates: b.u64()?,
                latency_p50_ns: b.u64()?,
                latency_p99_ns: b.u64()?,
                latency_max_ns: b.u64()?,
                stall_ns: b.u64()?,
            }),
            RecordType::PageRequest => {
                let n = b.count("requested page count", MAX_REQUEST_PAGES)?;
                b.zero_u32("page request reserved field")?;
                let mut pages = Vec::with_capacity(n.min(b.buf.len() / 8));
                for _ in 0..n {
                    pages.push(check_page(b.u64()?)?);
                }
                Record::PageRequest(pages)
            }
            RecordType::Complete => {
                let total_pages = b.u64()?;
                if total_pages > MAX_PAGE_END {
                    return Err(ProtocolError::OutOfRange {
                        what: "total pages",
                        value: total_pages,
                    });
                }
                let digest = MemoryDigest(b.u128()?);
                Record::Complete {
                    total_pages,
                    digest,
                }
            }
            RecordType::Abort => {
                let n = b.count("abort reason length", MAX_TEXT)?;
                b.zero_u32("abort reserved field")?;
                let reason = std::str::from_utf8(b.take(n)?)
                    .map_err(|_| ProtocolError::Malformed("abort reason"))?
                    .to_owned();
                Record::Abort { reason }
            }
            RecordType::Ready => Record::Ready,
            RecordType::Resumed => Record::Resumed(ResumeReport {
                verify_ns: b.u64()?,
                restore_ns: b.u64()?,
                resume_ns: b.u64()?,
                total_ns: b.u64()?,
            }),
        };
        if !b.buf.is_empty() {
            return Err(ProtocolError::TrailingBytes {
                record: ty,
                extra: b.buf.len(),
            });
        }
        Ok(rec)
    }
}

fn record_name(ty: RecordType) -> &'static str {
    match ty {
        RecordType::Header => "header",
        RecordType::Layout => "layout",
        RecordType::PageBatch => "page batch",
        RecordType::ModelBatch => "model batch",
        RecordType::RoundEnd => "round marker",
        RecordType::DeviceState => "device state",
        RecordType::SwitchOver => "switch-over",
        RecordType::PageRequest => "page request",
        RecordType::Complete => "completion",
        RecordType::Abort => "abort",
        RecordType::Ready => "ready",
        RecordType::Resumed => "resumed",
        RecordType::Discard => "discard",
        RecordType::Verified => "verified",
        RecordType::DiscardBitmap => "discard bitmap",
    }
}

fn check_page(p: u64) -> Result<PageNum, ProtocolError> {
    if p >= MAX_PAGE_END {
        return Err(ProtocolError::OutOfRange {
            what: "page number",
            value: p,
        });
    }
    Ok(p)
}

fn decode_model_batch(body: &[u8], ps: PageSize) -> Result<ModelBatch<'_>, ProtocolError> {
    let mut b = Cursor {
        buf: body,
        what: "model batch",
    };
    let round = b.u32()?;
    let n = b.count("pages in batch", max_batch_pages(ps))?;
    let nominal_len = b.u64()?;
    let pages = b.take(n * 8)?;
    let tokens = b.take(n * 8)?;
    for p in pages.chunks_exact(8) {
        let mut a = [0u8; 8];
        a.copy_from_slice(p);
        check_page(u64::from_le_bytes(a))?;
    }
    let covered = body.len() - b.buf.len();
    let expected = b.u64()?;
    if !b.buf.is_empty() {
        return Err(ProtocolError::TrailingBytes {
            record: RecordType::ModelBatch,
            extra: b.buf.len(),
        });
    }
    let computed = xxh3_64(&body[..covered]);
    if computed != expected {
        return Err(ProtocolError::ChecksumMismatch { expected, computed });
    }
    let batch = ModelBatch::new(round, nominal_len, pages, tokens);
    let zero = batch.iter().filter(|(_, t)| *t == 0).count();
    if nominal_len != page_batch_len(ps, n, zero) as u64 {
        return Err(ProtocolError::OutOfRange {
            what: "model batch nominal length",
            value: nominal_len,
        });
    }
    Ok(batch)
}

fn decode_batch(body: &[u8], ps: PageSize) -> Result<PageBatch<'_>, ProtocolError> {
    let mut b = Cursor {
        buf: body,
        what: "page batch",
    };
    let round = b.u32()?;
    let n = b.count("pages in batch", max_batch_pages(ps))?;
    let pages = b.take(n * 8)?;
    let flags = b.take(n)?;
    let pad = b.take(pad8(n))?;
    if pad.iter().any(|x| *x != 0) {
        return Err(ProtocolError::Malformed("page batch padding"));
    }
    for p in pages.chunks_exact(8) {
        let mut a = [0u8; 8];
        a.copy_from_slice(p);
        check_page(u64::from_le_bytes(a))?;
    }
    let mut nonzero = 0usize;
    for f in flags {
        if f & !PAGE_FLAG_ZERO != 0 {
            return Err(ProtocolError::Malformed("page flags"));
        }
        if f & PAGE_FLAG_ZERO == 0 {
            nonzero += 1;
        }
    }
    let data = b.take(nonzero * ps.get())?;
    let covered = body.len() - b.buf.len();
    let expected = b.u64()?;
    if !b.buf.is_empty() {
        return Err(ProtocolError::TrailingBytes {
            record: RecordType::PageBatch,
            extra: b.buf.len(),
        });
    }
    let computed = xxh3_64(&body[..covered]);
    if computed != expected {
        return Err(ProtocolError::ChecksumMismatch { expected, computed });
    }
    Ok(PageBatch {
        round,
        page_size: ps,
        pages,
        flags,
        data,
    })
}

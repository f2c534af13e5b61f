//! The record types: their codes and bounds, the decoded records, and the
//! errors a frame can have.

use super::*;

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
    /// The migration session this stream belongs to; on a new connection,
    /// a request to resume a post-copy whose connection broke.
    Session = 15,
    /// Recovery: pages the destination holds, as a bitmap.
    ReceivedBitmap = 16,
    /// Recovery: the destination's bitmap is complete.
    Recovered = 17,
    /// What the sender can decode (capability bits).
    Capabilities = 18,
    /// A page batch, compressed.
    CompressedBatch = 19,
    /// Post-copy: pages the destination asked for, on the preempt
    /// connection and numbered on their own (see [`Record::RequestedPages`]).
    RequestedPages = 20,
    /// The pages that will arrive with data, sent before the first round
    /// (the destination may populate them ahead of their data).
    Populated = 21,
    /// Post-copy: the destination asks for pages on the preempt
    /// connection, numbered on their own (see [`Record::PreemptRequest`]).
    PreemptRequest = 22,
    /// The destination has received a pre-copy round up to its marker
    /// (sent only to a source that asked, see
    /// [`Capabilities::ROUND_RECEIVED`](super::Capabilities::ROUND_RECEIVED)).
    RoundReceived = 23,
    /// A batch of page models (see [`ModelBatch`]): the simulator's fast
    /// path, never sent by a real backend.
    ModelBatch = 0x40,
}

impl RecordType {
    pub(super) fn from_u8(v: u8) -> Option<Self> {
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
            15 => Session,
            16 => ReceivedBitmap,
            17 => Recovered,
            18 => Capabilities,
            19 => CompressedBatch,
            20 => RequestedPages,
            21 => Populated,
            22 => PreemptRequest,
            23 => RoundReceived,
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
            PageBatch | RequestedPages => MAX_PAGE_BATCH_BODY,
            RoundEnd => 16,
            DeviceState => MAX_DEVICE_STATE_BODY,
            SwitchOver => 8,
            PageRequest | PreemptRequest => 8 + MAX_REQUEST_PAGES * 8,
            Complete => 24,
            Abort => 8 + MAX_TEXT,
            Ready => 0,
            Resumed => 32,
            Discard | Populated => 8 + MAX_DISCARD_RANGES * 16,
            Verified => 48,
            DiscardBitmap | ReceivedBitmap => 16 + MAX_DISCARD_WORDS * 8,
            Session => 24,
            Recovered => 8,
            RoundReceived => 8,
            Capabilities => 8,
            // Sent only when smaller than the page batch it stands for.
            CompressedBatch => 8 + MAX_PAGE_BATCH_BODY,
            ModelBatch => 16 + MAX_BATCH_PAGES * 16,
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
    /// An invalid memory layout.
    #[error("invalid memory layout: {0}")]
    Layout(#[from] LayoutError),
    /// A frame whose CRC32C does not match its header and body: it was
    /// altered or cut on the way.
    #[error("frame checksum mismatch (expected {expected:08x}, computed {computed:08x})")]
    FrameChecksum {
        /// The CRC in the frame.
        expected: u32,
        /// The CRC of the bytes received.
        computed: u32,
    },
    /// A compressed batch in a codec this decoder did not announce.
    #[error("a batch compressed with a codec this side did not announce (capability {0:#x})")]
    NotAnnounced(u32),
    /// A frame whose sequence number is not the next one: a frame was
    /// lost, repeated or reordered.
    #[error("frame out of sequence: expected number {expected}, got {got}")]
    OutOfSequence {
        /// The number the next frame must carry.
        expected: u32,
        /// The number it carried.
        got: u32,
    },
}

/// A batch of pages as it lies in a received frame (no copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageBatch<'a> {
    /// The round the pages belong to.
    pub round: u32,
    pub(super) page_size: PageSize,
    pub(super) pages: &'a [u8],
    pub(super) flags: &'a [u8],
    pub(super) data: &'a [u8],
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

    pub(super) fn raw(&self) -> (&'a [u8], &'a [u8]) {
        (self.pages, self.tokens)
    }
}

/// What the destination reports when it has resumed the guest: how long
/// each of its steps took, on its own clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// Post-copy: pages the destination asked for, sent on the preempt
    /// connection ahead of the push (a page batch's body). Their frames
    /// are numbered from 0 on their own, apart from the stream's other
    /// frames, and are read by a decoder of their own
    /// ([`Decoder::preempt`](super::Decoder::preempt)).
    RequestedPages(PageBatch<'a>),
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
    /// Post-copy: the destination asks for these pages on the preempt
    /// connection (a page request's body). Their frames are numbered
    /// from 0 on their own, apart from the stream's other frames, and are
    /// read by a decoder of their own
    /// ([`Decoder::preempt`](super::Decoder::preempt)); the source answers
    /// with [`Record::RequestedPages`] on the same connection.
    PreemptRequest(Vec<PageNum>),
    /// The migration session this stream belongs to. Sent by the source
    /// right after its header: on the first connection (`resume: false`)
    /// it names the session and says the source can resume a post-copy
    /// over a new connection; on a new connection (`resume: true`) it asks
    /// the destination to resume that session's post-copy.
    Session {
        /// The session's id, drawn at random by the source.
        id: u128,
        /// Whether this connection resumes a broken post-copy.
        resume: bool,
    },
    /// Recovery: pages the destination holds, as a bitmap: bit `i` of
    /// word `w` is page `first_page + 64 * w + i`. Pages outside every
    /// bitmap are missing.
    ReceivedBitmap {
        /// The page of bit 0 of word 0.
        first_page: PageNum,
        /// The bits.
        words: Vec<u64>,
    },
    /// Recovery: every [`Record::ReceivedBitmap`] was sent; the
    /// destination holds this many pages.
    Recovered {
        /// Pages held.
        held: u64,
    },
    /// Everything has been sent.
    Complete {
        /// Guest pages in the layout.
        total_pages: u64,
        /// Digest of all guest memory on the source after pause, bound to
        /// the device state sent
        /// ([`crate::digest::completion_digest`]).
        digest: MemoryDigest,
    },
    /// The sender gives up.
    Abort {
        /// Why.
        reason: String,
    },
    /// Destination accepted the layout and is ready for pages.
    Ready,
    /// What the sender can decode: the peer may use these codecs toward
    /// it (the destination sends it after its header).
    Capabilities(Capabilities),
    /// A compressed page batch (see [`BatchExpander`]).
    CompressedBatch(CompressedBatch<'a>),
    /// Destination has resumed the guest.
    Resumed(ResumeReport),
    /// Pages (as `(first, count)` ranges, ascending) that may hold data on
    /// the source, sent after [`Record::Ready`] and before the first page
    /// batch, only to a destination that announced
    /// [`Capabilities::POPULATED`]; every other page is zero. Several
    /// records follow one another when the ranges do not fit in one.
    Populated(Vec<(PageNum, u64)>),
    /// The destination has handled every frame of pre-copy round `round`
    /// up to and including its [`Record::RoundEnd`]. Sent only to a
    /// source whose [`Record::Capabilities`] carry
    /// [`Capabilities::ROUND_RECEIVED`](super::Capabilities::ROUND_RECEIVED):
    /// the source times the round until the destination had all of it,
    /// not until its last frame was handed to the transport.
    RoundReceived {
        /// The round.
        round: u32,
    },
}

impl Record<'_> {
    /// The record's type code.
    pub fn record_type(&self) -> RecordType {
        match self {
            Record::Header { .. } => RecordType::Header,
            Record::Layout(_) => RecordType::Layout,
            Record::PageBatch(_) => RecordType::PageBatch,
            Record::RequestedPages(_) => RecordType::RequestedPages,
            Record::ModelBatch(_) => RecordType::ModelBatch,
            Record::RoundEnd { .. } => RecordType::RoundEnd,
            Record::DeviceState(_) => RecordType::DeviceState,
            Record::SwitchOver { .. } => RecordType::SwitchOver,
            Record::PageRequest(_) => RecordType::PageRequest,
            Record::PreemptRequest(_) => RecordType::PreemptRequest,
            Record::Complete { .. } => RecordType::Complete,
            Record::Abort { .. } => RecordType::Abort,
            Record::Ready => RecordType::Ready,
            Record::Capabilities(_) => RecordType::Capabilities,
            Record::CompressedBatch(_) => RecordType::CompressedBatch,
            Record::Resumed(_) => RecordType::Resumed,
            Record::Discard(_) => RecordType::Discard,
            Record::Populated(_) => RecordType::Populated,
            Record::RoundReceived { .. } => RecordType::RoundReceived,
            Record::Verified(_) => RecordType::Verified,
            Record::DiscardBitmap { .. } => RecordType::DiscardBitmap,
            Record::Session { .. } => RecordType::Session,
            Record::ReceivedBitmap { .. } => RecordType::ReceivedBitmap,
            Record::Recovered { .. } => RecordType::Recovered,
        }
    }
}

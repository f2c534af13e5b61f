//! Writing frames: the record encoders, page batches, and sealing a frame
//! with its sequence number and CRC.

use super::*;

fn begin(out: &mut Vec<u8>, ty: RecordType) -> usize {
    let start = out.len();
    out.put_u8(ty as u8);
    out.put_u8(0);
    out.put_u16_le(0);
    out.put_u32_le(0);
    out.put_u32_le(0);
    out.put_u32_le(0);
    start
}

fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start - RECORD_HEADER_LEN) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    reseal(&mut out[start..]);
}

/// Appends one frame of type `ty` whose body is `body`.
pub(super) fn encode_raw(ty: RecordType, body: &[u8], out: &mut Vec<u8>) {
    let start = begin(out, ty);
    out.put_slice(body);
    finish(out, start);
}

/// Stamps `frame` (one whole frame as the encoders make it) with sequence
/// number `seq` and updates its CRC to match, without reading the body:
/// a frame whose CRC was right stays right, one whose CRC was wrong stays
/// wrong. Shorter input is left alone.
pub fn seal(frame: &mut [u8], seq: u32) {
    if frame.len() < RECORD_HEADER_LEN {
        return;
    }
    let old = u32::from_le_bytes([
        frame[CRC_AT],
        frame[CRC_AT + 1],
        frame[CRC_AT + 2],
        frame[CRC_AT + 3],
    ]);
    let body = crc::unappend(old, &frame[..CRC_AT]);
    frame[SEQ_AT..SEQ_AT + 4].copy_from_slice(&seq.to_le_bytes());
    let crc = crc::with_header(body, frame);
    frame[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the CRC of `frame` (one whole frame) after its bytes were
/// changed, keeping its sequence number. Shorter input is left alone.
pub fn reseal(frame: &mut [u8]) {
    if frame.len() < RECORD_HEADER_LEN {
        return;
    }
    let crc = crc::frame_crc(frame);
    frame[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The sequence number of a frame, if it is long enough to have one.
pub fn frame_sequence(frame: &[u8]) -> Option<u32> {
    let b = frame.get(SEQ_AT..SEQ_AT + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Numbers the frames of one direction as they leave: 0 for the first
/// (the header), then one more for each frame.
#[derive(Clone, Debug, Default)]
pub struct Sequencer {
    next: u32,
}

impl Sequencer {
    /// A sequencer whose next frame is number 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stamps `frame` with the next number (see [`seal`]).
    pub fn seal(&mut self, frame: &mut [u8]) {
        seal(frame, self.next);
        self.next = self.next.wrapping_add(1);
    }

    /// The number the next frame will carry.
    pub fn next(&self) -> u32 {
        self.next
    }
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
        Record::PageBatch(b) | Record::RequestedPages(b) => {
            put_batch_body(out, b.round, b.pages, b.flags, b.data);
        }
        Record::ModelBatch(b) => {
            let (pages, tokens) = b.raw();
            put_model_body(out, b.round, b.nominal_len, pages, tokens);
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
        Record::DiscardBitmap { first_page, words }
        | Record::ReceivedBitmap { first_page, words } => {
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
        Record::Session { id, resume } => {
            out.put_u128_le(*id);
            out.put_u32_le(u32::from(*resume));
            out.put_u32_le(0);
        }
        Record::Recovered { held } => out.put_u64_le(*held),
        Record::Ready => {}
        Record::Capabilities(c) => {
            out.put_u32_le(c.0);
            out.put_u32_le(0);
        }
        Record::CompressedBatch(b) => {
            out.put_u8(b.code);
            out.put_slice(&[0, 0, 0]);
            out.put_u32_le(b.raw_len as u32);
            out.put_slice(b.data);
        }
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
    out.put_u32_le(round);
    out.put_u32_le(flags.len() as u32);
    out.put_slice(pages);
    out.put_slice(flags);
    out.resize(out.len() + pad8(flags.len()), 0);
    out.put_slice(data);
}

pub(super) fn pad8(n: usize) -> usize {
    (8 - n % 8) % 8
}

/// The largest number of pages of `page_size` one batch may hold.
pub fn max_batch_pages(page_size: PageSize) -> usize {
    (MAX_BATCH_DATA / page_size.get()).clamp(1, MAX_BATCH_PAGES)
}

/// Bytes the page-batch encoder checksums and then copies at a time: two
/// 4 KiB pages, which the CRC reads into the first-level cache and the
/// copy reads from there (measured best among 4 to 64 KiB).
const FUSED_PIECE: usize = 8 << 10;

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
/// Each page is read once for the copy and the CRC together: a page is
/// first classified (a non-zero page usually in its first bytes), then
/// its CRC is taken while it is in the nearest cache and it is copied
/// from there into the frame. `out` only grows; reusing it between
/// batches allocates nothing.
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
    encode_batch(round, page_size, pages, None, contents, out)
}

/// [`encode_page_batch`] for a batch some of whose pages are known to be
/// zero: `known_zero[i]` marks `pages[i]` as a zero page, which has no
/// entry in `contents`; `contents` holds the other pages, in order.
pub(crate) fn encode_page_batch_known(
    round: u32,
    page_size: PageSize,
    pages: &[PageNum],
    known_zero: &[bool],
    contents: &[u8],
    out: &mut Vec<u8>,
) -> BatchSummary {
    debug_assert_eq!(known_zero.len(), pages.len());
    encode_batch(round, page_size, pages, Some(known_zero), contents, out)
}

fn encode_batch(
    round: u32,
    page_size: PageSize,
    pages: &[PageNum],
    known_zero: Option<&[bool]>,
    contents: &[u8],
    out: &mut Vec<u8>,
) -> BatchSummary {
    let ps = page_size.get();
    let n = pages.len();
    let known = |i: usize| known_zero.is_some_and(|k| k[i]);
    debug_assert!(n <= max_batch_pages(page_size));
    debug_assert_eq!(contents.len(), (0..n).filter(|i| !known(*i)).count() * ps);
    let before = out.len();
    out.reserve(RECORD_HEADER_LEN + 8 + n * 9 + pad8(n));
    let start = begin(out, RecordType::PageBatch);
    out.put_u32_le(round);
    out.put_u32_le(n as u32);
    for p in pages {
        out.put_u64_le(*p);
    }
    let flags_at = out.len();
    let mut nonzero = 0usize;
    let mut chunks = contents.chunks_exact(ps);
    for i in 0..n {
        let zero = known(i) || chunks.next().is_some_and(is_zero_page);
        nonzero += usize::from(!zero);
        out.put_u8(if zero { PAGE_FLAG_ZERO } else { 0 });
    }
    out.resize(out.len() + pad8(n), 0);
    out.reserve(nonzero * ps);
    let mut crc = crc::BodyCrc::new();
    crc.update(&out[start + RECORD_HEADER_LEN..]);
    // Runs of non-zero pages adjacent in `contents` (a known zero page
    // has no place there, so it does not end a run), in pieces small
    // enough to stay in the first-level cache between the CRC and the
    // copy.
    let mut at = 0; // the page of `contents` the next read page is
    let mut run = 0; // where the current run of non-zero pages began
    for i in 0..=n {
        if i < n && known(i) {
            continue;
        }
        if i == n || out[flags_at + i] != 0 {
            for piece in contents[run * ps..at * ps].chunks(FUSED_PIECE) {
                crc.update(piece);
                out.extend_from_slice(piece);
            }
            run = at + 1;
        }
        at += 1;
    }
    let len = (out.len() - start - RECORD_HEADER_LEN) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let crc = crc::with_header(crc.finish(), &out[start..]);
    out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    BatchSummary {
        pages: n,
        zero_pages: n - nonzero,
        frame_bytes: out.len() - before,
    }
}

/// Length of the [`RecordType::PageBatch`] frame that [`encode_page_batch`]
/// builds for `pages` pages of `page_size`, `zero_pages` of them zero.
pub fn page_batch_len(page_size: PageSize, pages: usize, zero_pages: usize) -> usize {
    RECORD_HEADER_LEN + 8 + pages * 9 + pad8(pages) + (pages - zero_pages) * page_size.get()
}

fn put_model_body(out: &mut Vec<u8>, round: u32, nominal: u64, pages: &[u8], tokens: &[u8]) {
    out.put_u32_le(round);
    out.put_u32_le((pages.len() / 8) as u32);
    out.put_u64_le(nominal);
    out.put_slice(pages);
    out.put_slice(tokens);
}

/// Appends one model-batch frame to `out` (see [`ModelBatch`]): page
/// `pages[i]` has content token `tokens[i]`, 0 for a zero page. Like every
/// frame it carries a sequence number (0 here; see [`Sequencer`]) and a
/// CRC32C. The summary's `frame_bytes` is the length of the page batch the
/// frame stands for, not of the frame.
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
    out.reserve(RECORD_HEADER_LEN + 16 + n * 16);
    let start = begin(out, RecordType::ModelBatch);
    out.put_u32_le(round);
    out.put_u32_le(n as u32);
    out.put_u64_le(nominal as u64);
    for p in pages {
        out.put_u64_le(*p);
    }
    for t in tokens {
        out.put_u64_le(*t);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch with pages known to be zero (and so absent from the
    /// contents) encodes to the same frame as the whole batch read, the
    /// known pages zero, whatever the mix of known zero, found zero and
    /// data pages around them.
    #[test]
    fn known_zero_pages_encode_as_if_read() {
        let ps = PageSize::DEFAULT;
        let n = 64;
        let pages: Vec<PageNum> = (0..n as u64).map(|i| 1000 + 3 * i).collect();
        for pattern in 0u64..40 {
            // Per page: 0 known zero, 1 zero read, 2 data.
            let kind = |i: usize| (pattern.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 60)) % 3;
            let mut whole = vec![0u8; n * ps.get()];
            let mut known = vec![false; n];
            let mut read = Vec::new();
            for i in 0..n {
                let page = &mut whole[i * ps.get()..][..ps.get()];
                match kind(i) {
                    0 => known[i] = true,
                    1 => read.extend_from_slice(page),
                    _ => {
                        page.iter_mut()
                            .enumerate()
                            .for_each(|(j, b)| *b = (i * 7 + j) as u8 | 1);
                        read.extend_from_slice(page);
                    }
                }
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let sa = encode_page_batch(5, ps, &pages, &whole, &mut a);
            let sb = encode_page_batch_known(5, ps, &pages, &known, &read, &mut b);
            assert_eq!(sa, sb, "pattern {pattern}");
            assert!(a == b, "pattern {pattern}: frames differ");
        }
    }
}

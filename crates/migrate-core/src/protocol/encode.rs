//! Writing frames: the record encoders, page batches, and sealing a frame
//! with its sequence number and CRC.

use super::*;
use crate::copy::extend_bytes;

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
        Record::RoundReceived { round } => {
            out.put_u32_le(*round);
            out.put_u32_le(0);
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
        Record::Discard(ranges) | Record::Populated(ranges) => {
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
        Record::PageRequest(pages) | Record::PreemptRequest(pages) => {
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
pub(super) const FUSED_PIECE: usize = 8 << 10;

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
    encode_batch(round, page_size, pages, contents, out)
}

/// Starts a page-batch frame at the end of `out`: header, round, page
/// count and page numbers. Where the frame and its flags begin.
fn begin_batch(out: &mut Vec<u8>, round: u32, pages: &[PageNum]) -> (usize, usize) {
    let start = begin(out, RecordType::PageBatch);
    out.put_u32_le(round);
    out.put_u32_le(pages.len() as u32);
    for p in pages {
        out.put_u64_le(*p);
    }
    (start, out.len())
}

/// Ends the page-batch frame that begins at `start` and runs to the end
/// of `out`: its body length, and its CRC from `body_crc`, the CRC of
/// its body.
fn end_batch(out: &mut [u8], start: usize, body_crc: u32) {
    let len = (out.len() - start - RECORD_HEADER_LEN) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let crc = crc::with_header(body_crc, &out[start..]);
    out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

fn encode_batch(
    round: u32,
    page_size: PageSize,
    pages: &[PageNum],
    contents: &[u8],
    out: &mut Vec<u8>,
) -> BatchSummary {
    let ps = page_size.get();
    let n = pages.len();
    debug_assert!(n <= max_batch_pages(page_size));
    debug_assert_eq!(contents.len(), n * ps);
    let before = out.len();
    out.reserve(RECORD_HEADER_LEN + 8 + n * 9 + pad8(n));
    let (start, flags_at) = begin_batch(out, round, pages);
    let mut nonzero = 0usize;
    for page in contents.chunks_exact(ps) {
        let zero = is_zero_page(page);
        nonzero += usize::from(!zero);
        out.put_u8(if zero { PAGE_FLAG_ZERO } else { 0 });
    }
    out.resize(out.len() + pad8(n), 0);
    out.reserve(nonzero * ps);
    let mut crc = crc::BodyCrc::new();
    crc.update(&out[start + RECORD_HEADER_LEN..]);
    // Runs of non-zero pages, in pieces small enough to stay in the
    // first-level cache between the CRC and the copy.
    let mut run = 0; // where the current run of non-zero pages began
    for i in 0..=n {
        if i == n || out[flags_at + i] != 0 {
            for piece in contents[run * ps..i * ps].chunks(FUSED_PIECE) {
                crc.update(piece);
                extend_bytes(out, piece);
            }
            run = i + 1;
        }
    }
    end_batch(out, start, crc.finish());
    BatchSummary {
        pages: n,
        zero_pages: n - nonzero,
        frame_bytes: out.len() - before,
    }
}

/// Appends one page-batch frame to `out`, reading the pages straight
/// into the frame: `read(pages, buf)` must fill `buf` with the contents of
/// `pages`, one page after another, as [`crate::PageSource::read_pages`]
/// does. `known_zero[i]` (if not empty, one entry per page) marks
/// `pages[i]` as known to be zero: it is neither read nor checked. The
/// other pages are asked for in order, each once.
///
/// The pages are read a few at a time (8 KiB, or one page where pages are
/// larger) into their slots in the frame; each is then checked for zeros
/// and its CRC taken while it is still in the first-level cache, and a
/// zero page's slot is given to the next page. So guest memory is read
/// once and the frame's bytes are a snapshot: the CRC covers exactly the
/// bytes that were read, however the guest writes meanwhile.
///
/// If `read` fails, `out` is left as it was and its error is returned.
pub fn encode_page_batch_from<E>(
    round: u32,
    page_size: PageSize,
    pages: &[PageNum],
    known_zero: &[bool],
    mut read: impl FnMut(&[PageNum], &mut [u8]) -> Result<(), E>,
    out: &mut Vec<u8>,
) -> Result<BatchSummary, E> {
    let ps = page_size.get();
    let n = pages.len();
    debug_assert!(n <= max_batch_pages(page_size));
    debug_assert!(known_zero.is_empty() || known_zero.len() == n);
    let known = |i: usize| known_zero.get(i).copied().unwrap_or(false);
    let before = out.len();
    out.reserve(RECORD_HEADER_LEN + 8 + n * 9 + pad8(n) + n * ps);
    let (start, flags_at) = begin_batch(out, round, pages);
    for i in 0..n {
        out.put_u8(if known(i) { PAGE_FLAG_ZERO } else { 0 });
    }
    out.resize(out.len() + pad8(n), 0);
    let data_at = out.len();
    let per_read = (FUSED_PIECE / ps).max(1);
    let mut data_crc = crc::BodyCrc::new();
    let mut i = 0;
    while i < n {
        if known(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && j - i < per_read && !known(j) {
            j += 1;
        }
        let at = out.len();
        out.resize(at + (j - i) * ps, 0);
        if let Err(e) = read(&pages[i..j], &mut out[at..]) {
            out.truncate(before);
            return Err(e);
        }
        let mut keep = at;
        for k in i..j {
            let slot = at + (k - i) * ps;
            if is_zero_page(&out[slot..slot + ps]) {
                out[flags_at + k] = PAGE_FLAG_ZERO;
                continue;
            }
            if keep != slot {
                out.copy_within(slot..slot + ps, keep);
            }
            keep += ps;
        }
        out.truncate(keep);
        data_crc.update(&out[at..]);
        i = j;
    }
    let zero_pages = out[flags_at..flags_at + n]
        .iter()
        .filter(|f| **f != 0)
        .count();
    let mut prefix = crc::BodyCrc::new();
    prefix.update(&out[start + RECORD_HEADER_LEN..data_at]);
    let body_crc = crc::combine(
        prefix.finish(),
        data_crc.finish(),
        (out.len() - data_at) as u64,
    );
    end_batch(out, start, body_crc);
    Ok(BatchSummary {
        pages: n,
        zero_pages,
        frame_bytes: out.len() - before,
    })
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

    /// A batch read straight into its frame, some pages known to be zero
    /// (and so not read), encodes to the same frame as the whole batch
    /// encoded from a buffer, whatever the mix of known zero, found zero
    /// and data pages around them.
    #[test]
    fn read_into_the_frame_encodes_as_from_a_buffer() {
        let ps = PageSize::DEFAULT;
        let n = 64;
        let pages: Vec<PageNum> = (0..n as u64).map(|i| 1000 + 3 * i).collect();
        for pattern in 0u64..40 {
            // Per page: 0 known zero, 1 zero read, 2 data.
            let kind = |i: usize| (pattern.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 60)) % 3;
            let mut whole = vec![0u8; n * ps.get()];
            let mut known = vec![false; n];
            for i in 0..n {
                let page = &mut whole[i * ps.get()..][..ps.get()];
                match kind(i) {
                    0 => known[i] = true,
                    1 => {}
                    _ => page
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = (i * 7 + j) as u8 | 1),
                }
            }
            let mut a = Vec::new();
            let sa = encode_page_batch(5, ps, &pages, &whole, &mut a);
            // Read straight into the frame, a few pages per call, with
            // and without being told which pages are zero.
            for told in [&known[..], &[]] {
                let mut c = vec![9u8; 3];
                let sc = encode_page_batch_from(
                    5,
                    ps,
                    &pages,
                    told,
                    |ask: &[PageNum], buf: &mut [u8]| {
                        assert_eq!(buf.len(), ask.len() * ps.get());
                        for (p, slot) in ask.iter().zip(buf.chunks_exact_mut(ps.get())) {
                            let i = pages.iter().position(|q| q == p).unwrap();
                            assert!(!told.get(i).copied().unwrap_or(false), "read a known page");
                            slot.copy_from_slice(&whole[i * ps.get()..][..ps.get()]);
                        }
                        Ok::<(), ()>(())
                    },
                    &mut c,
                )
                .unwrap();
                assert_eq!(sa, sc, "pattern {pattern}");
                assert!(
                    c[3..] == a[..] && c[..3] == [9; 3],
                    "pattern {pattern}: frames differ"
                );
            }
        }
    }

    /// A read that fails leaves the output as it was.
    #[test]
    fn failed_read_leaves_output_alone() {
        let ps = PageSize::DEFAULT;
        let pages: Vec<PageNum> = (0..10).collect();
        let mut out = vec![1u8, 2, 3];
        let mut calls = 0;
        let r = encode_page_batch_from(
            0,
            ps,
            &pages,
            &[],
            |_: &[PageNum], buf: &mut [u8]| {
                calls += 1;
                buf.fill(7);
                if calls == 3 {
                    Err("gone")
                } else {
                    Ok(())
                }
            },
            &mut out,
        );
        assert_eq!(r, Err("gone"));
        assert_eq!(out, [1, 2, 3]);
    }
}

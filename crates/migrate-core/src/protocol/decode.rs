//! Reading frames: the decoder of one direction of a stream, which checks
//! each frame's CRC, bounds, order and sequence and never panics.

use super::encode::FUSED_PIECE;
use super::*;

/// What [`Decoder::decode_placing`] made of a frame.
#[derive(Debug)]
pub enum Placed<'a> {
    /// A page batch: its pages were placed and its CRC matched.
    Batch {
        /// The round the pages belong to.
        round: u32,
        /// Pages in the batch.
        pages: usize,
        /// Of those, zero pages.
        zero_pages: usize,
    },
    /// Any other record, decoded; nothing was placed.
    Record(Record<'a>),
}

/// Why [`Decoder::decode_placing`] failed.
#[derive(Debug)]
pub enum PlaceError<E> {
    /// The frame was refused (for a page batch, possibly after some of
    /// its pages were placed).
    Protocol(ProtocolError),
    /// The placing function failed; the pages before it were placed.
    Place(E),
}

impl<E> From<ProtocolError> for PlaceError<E> {
    fn from(e: ProtocolError) -> Self {
        PlaceError::Protocol(e)
    }
}

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
///
/// Every frame's CRC32C is checked. A decoder made with
/// [`Decoder::sequenced`] (as the engines' are) also checks that the
/// frames are numbered 0, 1, 2, … (aborts excepted); one made with
/// [`Decoder::new`] checks each frame on its own.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    header_seen: bool,
    page_size: Option<PageSize>,
    sequenced: bool,
    next_seq: u32,
    in_sequence: bool,
    accepted: Capabilities,
    capabilities_seen: bool,
}

impl Decoder {
    /// A decoder at the start of a stream that checks each frame on its
    /// own (structure and CRC, not the sequence number).
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder at the start of a stream that also checks the sequence
    /// number of every frame but aborts: frame `n` must carry number `n`.
    pub fn sequenced() -> Self {
        Decoder {
            sequenced: true,
            ..Self::default()
        }
    }

    /// A sequenced decoder for a new connection that resumes a stream
    /// whose layout was given on an earlier one (post-copy recovery): it
    /// checks the new connection's numbering from 0 and its header, and
    /// takes page batches of `page_size` without a layout (a layout is
    /// refused as a second one).
    pub fn resuming(page_size: PageSize) -> Self {
        Decoder {
            sequenced: true,
            page_size: Some(page_size),
            ..Self::default()
        }
    }

    /// A sequenced decoder for the frames of one direction of a post-copy
    /// preempt connection ([`Record::RequestedPages`] from the source,
    /// [`Record::PreemptRequest`] from the destination) numbered from 0,
    /// with no header or layout of their own (the stream's gave the page
    /// size). Whoever holds it takes nothing else from it.
    pub fn preempt(page_size: PageSize) -> Self {
        Decoder {
            sequenced: true,
            header_seen: true,
            page_size: Some(page_size),
            ..Self::default()
        }
    }

    /// Whether the last frame that passed its CRC carried the number the
    /// next frame was due to carry. For an abort (which is accepted with
    /// any number) this says whether every frame before it arrived.
    pub fn last_in_sequence(&self) -> bool {
        self.in_sequence
    }

    /// Accepts compressed batches in the codecs of `caps` (what this side
    /// announced to its peer); by default none is accepted.
    pub fn accept(&mut self, caps: Capabilities) {
        self.accepted = caps;
    }

    /// The page size announced by the stream's layout, once seen.
    pub fn page_size(&self) -> Option<PageSize> {
        self.page_size
    }

    /// Decodes one frame. Any input gives a record or an error, never a panic.
    pub fn decode<'a>(&mut self, frame: &'a [u8]) -> Result<Record<'a>, ProtocolError> {
        let (ty, seq, crc, body) = frame_parts(frame)?;
        let computed = crc::frame_crc(frame);
        if computed != crc {
            return Err(ProtocolError::FrameChecksum {
                expected: crc,
                computed,
            });
        }
        self.accept_order(ty, seq)?;
        self.decode_body(ty, body)
    }

    /// Decodes one frame and, if it is a page batch, hands each of its
    /// pages in order to `place` (its number and its data, `None` for a
    /// zero page) while checking the frame's CRC in the same pass: each
    /// piece of page data is checked and then placed while it is still in
    /// the first-level cache. Any other frame is decoded as
    /// [`Decoder::decode`] does and returned, nothing placed.
    ///
    /// The CRC verdict comes after the pages: a damaged page batch fails
    /// with [`ProtocolError::FrameChecksum`] once some or all of its pages
    /// (damaged ones among them) were placed. Use this only where a frame
    /// that fails makes the whole migration fail before the guest runs
    /// on what was placed: a destination before it resumes, whose memory
    /// the failed migration leaves unused. Where the guest already runs
    /// (post-copy), check the frame first ([`Decoder::decode`]) and place
    /// afterwards. The frame's structure (lengths, page numbers, flags) is
    /// checked before anything is placed.
    pub fn decode_placing<'a, E>(
        &mut self,
        frame: &'a [u8],
        mut place: impl FnMut(PageNum, Option<&'a [u8]>) -> Result<(), E>,
    ) -> Result<Placed<'a>, PlaceError<E>> {
        let (ty, seq, crc, body) = frame_parts(frame)?;
        let ps = match (ty, self.page_size) {
            (RecordType::PageBatch, Some(ps)) => ps,
            _ => return Ok(Placed::Record(self.decode(frame)?)),
        };
        self.accept_order(ty, seq)?;
        let batch = decode_batch(body, ps)?;
        let data = batch.data;
        let mut sum = crc::BodyCrc::new();
        sum.update(&body[..body.len() - data.len()]);
        let (mut checked, mut next) = (0, 0);
        for (page, bytes) in batch.iter() {
            if bytes.is_some() {
                next += ps.get();
                if checked < next {
                    let end = (checked + FUSED_PIECE).clamp(next, data.len());
                    sum.update(&data[checked..end]);
                    checked = end;
                }
            }
            place(page, bytes).map_err(PlaceError::Place)?;
        }
        let computed = crc::with_header(sum.finish(), frame);
        if computed != crc {
            return Err(PlaceError::Protocol(ProtocolError::FrameChecksum {
                expected: crc,
                computed,
            }));
        }
        Ok(Placed::Batch {
            round: batch.round,
            pages: batch.len(),
            zero_pages: batch.zero_pages(),
        })
    }

    /// Checks a frame's number and place in the stream, counting it.
    fn accept_order(&mut self, ty: RecordType, seq: u32) -> Result<(), ProtocolError> {
        self.in_sequence = seq == self.next_seq;
        if self.sequenced && ty != RecordType::Abort {
            if seq != self.next_seq {
                return Err(ProtocolError::OutOfSequence {
                    expected: self.next_seq,
                    got: seq,
                });
            }
            self.next_seq = self.next_seq.wrapping_add(1);
        }
        if !self.header_seen && ty != RecordType::Header {
            return Err(ProtocolError::UnexpectedRecord {
                got: ty,
                why: "a stream must begin with a header",
            });
        }
        Ok(())
    }

    /// Decodes the body of a frame of type `ty` whose CRC was checked.
    fn decode_body<'a>(
        &mut self,
        ty: RecordType,
        body: &'a [u8],
    ) -> Result<Record<'a>, ProtocolError> {
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
            RecordType::PageBatch | RecordType::RequestedPages => {
                let ps = self.page_size.ok_or(ProtocolError::UnexpectedRecord {
                    got: ty,
                    why: "pages before the memory layout",
                })?;
                let batch = decode_batch(body, ps)?;
                b.buf = &[];
                if ty == RecordType::PageBatch {
                    Record::PageBatch(batch)
                } else {
                    Record::RequestedPages(batch)
                }
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
            RecordType::RoundReceived => {
                let round = b.u32()?;
                b.zero_u32("round received reserved field")?;
                Record::RoundReceived { round }
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
            RecordType::Discard | RecordType::Populated => {
                let discard = ty == RecordType::Discard;
                let what = |d: &'static str, p: &'static str| if discard { d } else { p };
                let n = b.count(
                    what("discard range count", "populated range count"),
                    MAX_DISCARD_RANGES,
                )?;
                b.zero_u32(what("discard reserved field", "populated reserved field"))?;
                let mut ranges = Vec::with_capacity(n.min(b.buf.len() / 16));
                for _ in 0..n {
                    let first = check_page(b.u64()?)?;
                    let count = b.u64()?;
                    if count == 0 || count > MAX_PAGE_END - first {
                        return Err(ProtocolError::OutOfRange {
                            what: what("discard range length", "populated range length"),
                            value: count,
                        });
                    }
                    ranges.push((first, count));
                }
                if discard {
                    Record::Discard(ranges)
                } else {
                    Record::Populated(ranges)
                }
            }
            RecordType::DiscardBitmap | RecordType::ReceivedBitmap => {
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
                if ty == RecordType::DiscardBitmap {
                    Record::DiscardBitmap { first_page, words }
                } else {
                    Record::ReceivedBitmap { first_page, words }
                }
            }
            RecordType::Session => {
                let id = b.u128()?;
                let resume = match b.u32()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(ProtocolError::OutOfRange {
                            what: "session mode",
                            value: other as u64,
                        })
                    }
                };
                b.zero_u32("session reserved field")?;
                Record::Session { id, resume }
            }
            RecordType::Recovered => {
                let held = b.u64()?;
                if held > MAX_PAGE_END {
                    return Err(ProtocolError::OutOfRange {
                        what: "pages held",
                        value: held,
                    });
                }
                Record::Recovered { held }
            }
            RecordType::Verified => Record::Verified(PostcopyReport {
                faults: b.u64()?,
                duplicates: b.u64()?,
                latency_p50_ns: b.u64()?,
                latency_p99_ns: b.u64()?,
                latency_max_ns: b.u64()?,
                stall_ns: b.u64()?,
            }),
            RecordType::PageRequest | RecordType::PreemptRequest => {
                let n = b.count("requested page count", MAX_REQUEST_PAGES)?;
                b.zero_u32("page request reserved field")?;
                let mut pages = Vec::with_capacity(n.min(b.buf.len() / 8));
                for _ in 0..n {
                    pages.push(check_page(b.u64()?)?);
                }
                if ty == RecordType::PreemptRequest {
                    Record::PreemptRequest(pages)
                } else {
                    Record::PageRequest(pages)
                }
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
            RecordType::Capabilities => {
                if self.capabilities_seen {
                    return Err(ProtocolError::UnexpectedRecord {
                        got: ty,
                        why: "second capabilities record",
                    });
                }
                let caps = Capabilities(b.u32()?);
                b.zero_u32("capabilities reserved field")?;
                self.capabilities_seen = true;
                Record::Capabilities(caps)
            }
            RecordType::CompressedBatch => {
                if self.page_size.is_none() {
                    return Err(ProtocolError::UnexpectedRecord {
                        got: ty,
                        why: "pages before the memory layout",
                    });
                }
                let batch = compress::decode_compressed(body, self.accepted)?;
                b.buf = &[];
                Record::CompressedBatch(batch)
            }
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

/// A frame's type, sequence number, CRC and body, its header and length
/// checked (not its CRC).
fn frame_parts(frame: &[u8]) -> Result<(RecordType, u32, u32, &[u8]), ProtocolError> {
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
    let seq = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let crc = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
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
    Ok((ty, seq, crc, body))
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
        RecordType::PreemptRequest => "page request on the preempt connection",
        RecordType::Complete => "completion",
        RecordType::Abort => "abort",
        RecordType::Ready => "ready",
        RecordType::Resumed => "resumed",
        RecordType::Discard => "discard",
        RecordType::Verified => "verified",
        RecordType::DiscardBitmap => "discard bitmap",
        RecordType::Session => "session",
        RecordType::ReceivedBitmap => "received bitmap",
        RecordType::Recovered => "recovered",
        RecordType::Capabilities => "capabilities",
        RecordType::CompressedBatch => "compressed batch",
        RecordType::RequestedPages => "requested pages",
        RecordType::Populated => "populated ranges",
        RecordType::RoundReceived => "round received",
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
    if !b.buf.is_empty() {
        return Err(ProtocolError::TrailingBytes {
            record: RecordType::ModelBatch,
            extra: b.buf.len(),
        });
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

/// The page batch `frame` holds (one whole page-batch frame of pages of
/// `ps`), its structure checked, not its CRC: for a frame this side just
/// built.
pub(crate) fn page_batch_of(frame: &[u8], ps: PageSize) -> Result<PageBatch<'_>, ProtocolError> {
    let (ty, _, _, body) = frame_parts(frame)?;
    if ty != RecordType::PageBatch && ty != RecordType::RequestedPages {
        return Err(ProtocolError::UnexpectedRecord {
            got: ty,
            why: "not a page batch",
        });
    }
    decode_batch(body, ps)
}

pub(super) fn decode_batch(body: &[u8], ps: PageSize) -> Result<PageBatch<'_>, ProtocolError> {
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
    if !b.buf.is_empty() {
        return Err(ProtocolError::TrailingBytes {
            record: RecordType::PageBatch,
            extra: b.buf.len(),
        });
    }
    Ok(PageBatch {
        round,
        page_size: ps,
        pages,
        flags,
        data,
    })
}

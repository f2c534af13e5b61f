//! Page-batch compression: the codecs, the capability bits that announce
//! them, and the compressor and expander of batches.
//!
//! A compressed batch is a [`RecordType::CompressedBatch`] frame whose
//! body is
//!
//! ```text
//!  0        1          4              8
//!  +--------+----------+--------------+------------------------------+
//!  | codec  | 0 0 0    | raw length   | compressed page-batch body   |
//!  +--------+----------+--------------+------------------------------+
//!    u8       reserved   u32 LE
//! ```
//!
//! The compressed bytes expand to exactly `raw length` bytes, the body of
//! the [`RecordType::PageBatch`] frame the batch would otherwise have been
//! (round, count, page numbers, flags, padding and the data of the
//! non-zero pages), which is then checked as any page batch is. The
//! frame's CRC covers the compressed bytes; the codecs' decoders refuse
//! malformed input and never write past `raw length`.
//!
//! A codec is used only toward a peer that announced it in its
//! [`Record::Capabilities`]; a decoder that did not announce it refuses
//! such a frame ([`ProtocolError::NotAnnounced`]). A batch whose
//! compressed form would not save an eighth of its body is sent as a
//! plain page batch.

use super::*;
use std::time::{Duration, Instant};

/// A compression codec for page batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// LZ4 block format (`lz4_flex`): fast, modest ratios.
    Lz4,
    /// Zstandard at a level (`zstd`; 1 is its fastest level, higher
    /// levels compress more and cost more).
    Zstd {
        /// The compression level (negative levels are faster still).
        level: i32,
    },
}

impl Codec {
    /// The codec's code on the wire.
    fn code(self) -> u8 {
        match self {
            Codec::Lz4 => 1,
            Codec::Zstd { .. } => 2,
        }
    }

    /// The capability bit that announces the codec.
    pub fn capability(self) -> Capabilities {
        match self {
            Codec::Lz4 => Capabilities::LZ4,
            Codec::Zstd { .. } => Capabilities::ZSTD,
        }
    }

    /// The codec's name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd { .. } => "zstd",
        }
    }
}

/// What a peer can decode, announced in its [`Record::Capabilities`].
/// Bits this library does not know are kept and ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// Page batches compressed with LZ4 ([`Codec::Lz4`]).
    pub const LZ4: Capabilities = Capabilities(1 << 0);
    /// Page batches compressed with Zstandard ([`Codec::Zstd`]).
    pub const ZSTD: Capabilities = Capabilities(1 << 1);
    /// Post-copy pages asked for by a fault, as
    /// [`Record::RequestedPages`] on a preempt connection, numbered apart
    /// from the rest of the stream.
    pub const PREEMPT: Capabilities = Capabilities(1 << 2);
    /// [`Record::Populated`](super::Record::Populated) ranges before the
    /// first round (the bit of its record type, 21).
    pub const POPULATED: Capabilities = Capabilities(1 << 21);
    /// Round acknowledgements (the bit of [`Record::RoundReceived`]'s
    /// type, 23). From a destination: it takes a source's
    /// [`Record::Capabilities`] and, if they carry this bit, answers each
    /// pre-copy [`Record::RoundEnd`] with [`Record::RoundReceived`] once it
    /// has handled every frame before it. From a source (sent only to a
    /// destination that announced it): it decodes those answers and asks
    /// for them.
    ///
    /// [`Record::RoundReceived`]: super::Record::RoundReceived
    /// [`Record::RoundEnd`]: super::Record::RoundEnd
    /// [`Record::Capabilities`]: super::Record::Capabilities
    pub const ROUND_RECEIVED: Capabilities = Capabilities(1 << 23);
    /// Everything this library can decode.
    pub const ALL: Capabilities = Capabilities(
        Self::LZ4.0 | Self::ZSTD.0 | Self::PREEMPT.0 | Self::POPULATED.0 | Self::ROUND_RECEIVED.0,
    );

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A compressed batch as it lies in a received frame (no copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedBatch<'a> {
    pub(super) code: u8,
    /// Length of the page-batch body the data expands to.
    pub raw_len: usize,
    /// The compressed bytes.
    pub data: &'a [u8],
}

impl CompressedBatch<'_> {
    /// The codec's name.
    pub fn codec_name(&self) -> &'static str {
        match self.code {
            1 => "lz4",
            _ => "zstd",
        }
    }
}

/// Decodes the body of a compressed-batch frame (not yet expanded).
pub(super) fn decode_compressed(
    body: &[u8],
    accepted: Capabilities,
) -> Result<CompressedBatch<'_>, ProtocolError> {
    if body.len() < 8 {
        return Err(ProtocolError::Truncated {
            what: "compressed batch",
            needed: 8,
            available: body.len(),
        });
    }
    let code = body[0];
    let cap = match code {
        1 => Capabilities::LZ4,
        2 => Capabilities::ZSTD,
        other => {
            return Err(ProtocolError::OutOfRange {
                what: "compression codec",
                value: other as u64,
            })
        }
    };
    if body[1..4] != [0, 0, 0] {
        return Err(ProtocolError::Malformed("compressed batch reserved bytes"));
    }
    if !accepted.contains(cap) {
        return Err(ProtocolError::NotAnnounced(cap.0));
    }
    let raw_len = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
    if raw_len > RecordType::PageBatch.max_body() {
        return Err(ProtocolError::OutOfRange {
            what: "compressed batch raw length",
            value: raw_len as u64,
        });
    }
    Ok(CompressedBatch {
        code,
        raw_len,
        data: &body[8..],
    })
}

/// Figures of a compressor or an expander.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompressionFigures {
    /// Batches sent (or received) compressed.
    pub compressed_batches: u64,
    /// Batches tried and sent as they were, compression not paying.
    pub raw_batches: u64,
    /// Page-batch body bytes given to the compressor (or expanded).
    pub bytes_in: u64,
    /// Bytes those became on the wire (compressed, or as they were).
    pub bytes_out: u64,
    /// Time spent compressing (or expanding), on the thread that did it.
    pub cpu: Duration,
}

/// Compresses page-batch frames with one codec, reusing its buffers and
/// (for Zstandard) its context.
pub struct BatchCompressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    figures: CompressionFigures,
}

impl std::fmt::Debug for BatchCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchCompressor")
            .field("codec", &self.codec)
            .field("figures", &self.figures)
            .finish_non_exhaustive()
    }
}

impl BatchCompressor {
    /// A compressor for `codec`; `None` if the codec cannot be set up (a
    /// Zstandard level out of its range).
    pub fn new(codec: Codec) -> Option<Self> {
        let zstd = match codec {
            Codec::Zstd { level } => {
                if !zstd::compression_level_range().contains(&level) {
                    return None;
                }
                Some(zstd::bulk::Compressor::new(level).ok()?)
            }
            Codec::Lz4 => None,
        };
        Some(BatchCompressor {
            codec,
            zstd,
            scratch: Vec::new(),
            figures: CompressionFigures::default(),
        })
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// What the compressor has done so far.
    pub fn figures(&self) -> CompressionFigures {
        self.figures
    }

    /// Replaces `frame`, one page-batch frame as [`encode_page_batch`]
    /// makes it, with its compressed form if that saves at least an eighth
    /// of the body; otherwise leaves it as it is. Returns whether it
    /// replaced it. The sequence number is left for the caller to stamp.
    pub fn compress(&mut self, frame: &mut Vec<u8>) -> bool {
        if frame.first() != Some(&(RecordType::PageBatch as u8)) {
            return false;
        }
        let started = Instant::now();
        let body = &frame[RECORD_HEADER_LEN..];
        let budget = body.len() - body.len() / 8;
        self.scratch.clear();
        self.scratch.resize(8, 0);
        self.scratch[0] = self.codec.code();
        self.scratch[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
        let packed = match &mut self.zstd {
            Some(z) => {
                // A bounded output: what would not fit does not pay.
                self.scratch.resize(8 + budget, 0);
                match z.compress_to_buffer(body, &mut self.scratch[8..]) {
                    Ok(n) if n < budget => {
                        self.scratch.truncate(8 + n);
                        true
                    }
                    _ => false,
                }
            }
            None => {
                let max = lz4_flex::block::get_maximum_output_size(body.len());
                self.scratch.resize(8 + max, 0);
                match lz4_flex::block::compress_into(body, &mut self.scratch[8..]) {
                    Ok(n) if n < budget => {
                        self.scratch.truncate(8 + n);
                        true
                    }
                    _ => false,
                }
            }
        };
        let f = &mut self.figures;
        f.bytes_in += body.len() as u64;
        if packed {
            frame.clear();
            encode::encode_raw(RecordType::CompressedBatch, &self.scratch, frame);
            f.compressed_batches += 1;
            f.bytes_out += self.scratch.len() as u64;
        } else {
            f.raw_batches += 1;
            f.bytes_out += body.len() as u64;
        }
        f.cpu += started.elapsed();
        packed
    }
}

/// Expands compressed batches into a buffer of its own, reusing it and
/// (for Zstandard) a decompression context.
#[derive(Default)]
pub struct BatchExpander {
    buf: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    figures: CompressionFigures,
}

impl std::fmt::Debug for BatchExpander {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchExpander")
            .field("figures", &self.figures)
            .finish_non_exhaustive()
    }
}

impl BatchExpander {
    /// An expander with no buffer yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the expander has done so far.
    pub fn figures(&self) -> CompressionFigures {
        self.figures
    }

    /// Expands `batch` and decodes it as a page batch of `page_size`
    /// pages (the stream's, [`Decoder::page_size`]). The data must expand
    /// to exactly its announced length.
    pub fn expand(
        &mut self,
        batch: &CompressedBatch<'_>,
        page_size: PageSize,
    ) -> Result<PageBatch<'_>, ProtocolError> {
        let started = Instant::now();
        let n = batch.raw_len;
        if self.buf.len() < n {
            // Zero-filled once; later batches reuse it as it is.
            self.buf.resize(n, 0);
        }
        let out = &mut self.buf[..n];
        let got = match batch.code {
            1 => lz4_flex::block::decompress_into(batch.data, out).ok(),
            _ => {
                if self.zstd.is_none() {
                    self.zstd = zstd::bulk::Decompressor::new().ok();
                }
                match self.zstd.as_mut() {
                    Some(z) => z.decompress_to_buffer(batch.data, out).ok(),
                    None => None,
                }
            }
        };
        if got != Some(n) {
            return Err(ProtocolError::Malformed("compressed batch data"));
        }
        let f = &mut self.figures;
        f.compressed_batches += 1;
        f.bytes_in += n as u64;
        f.bytes_out += batch.data.len() as u64 + 8;
        f.cpu += started.elapsed();
        decode::decode_batch(&self.buf[..n], page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(contents: &[u8]) -> Vec<u8> {
        let pages: Vec<PageNum> = (0..(contents.len() / 4096) as u64).collect();
        let mut f = Vec::new();
        encode_page_batch(3, PageSize::DEFAULT, &pages, contents, &mut f);
        f
    }

    fn primed(accept: Capabilities) -> Decoder {
        let mut d = Decoder::new();
        d.accept(accept);
        let layout = MemoryLayout::flat(PageSize::DEFAULT, 1 << 30).unwrap();
        d.decode(&encode_to_vec(&Record::Header { version: VERSION }))
            .unwrap();
        d.decode(&encode_to_vec(&Record::Layout(layout))).unwrap();
        d
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| b"the quick brown fox "[(i * 7 / 3) % 20])
            .collect()
    }

    /// A compressible batch shrinks and expands to the same pages; an
    /// incompressible one is left as it was.
    #[test]
    fn batches_round_trip_through_each_codec() {
        for codec in [
            Codec::Lz4,
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: 9 },
        ] {
            let mut c = BatchCompressor::new(codec).unwrap();
            let contents = text(64 * 4096);
            let plain = frame_of(&contents);
            let mut f = plain.clone();
            assert!(c.compress(&mut f), "{codec:?}");
            assert!(f.len() < plain.len() / 2, "{codec:?}: {} bytes", f.len());
            let mut d = primed(Capabilities::ALL);
            let Ok(Record::CompressedBatch(cb)) = d.decode(&f) else {
                panic!("{codec:?}: not a compressed batch");
            };
            let mut x = BatchExpander::new();
            let batch = x.expand(&cb, PageSize::DEFAULT).unwrap();
            let mut d2 = primed(Capabilities::default());
            let Ok(Record::PageBatch(want)) = d2.decode(&plain) else {
                panic!("plain frame");
            };
            assert_eq!(batch, want, "{codec:?}");

            let mut noise = vec![0u8; 16 * 4096];
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for b in noise.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let plain = frame_of(&noise);
            let mut f = plain.clone();
            assert!(!c.compress(&mut f), "{codec:?} compressed noise");
            assert_eq!(f, plain);
            let fig = c.figures();
            assert_eq!((fig.compressed_batches, fig.raw_batches), (1, 1));
        }
    }

    /// A decoder that did not announce a codec refuses its batches, and
    /// data that does not expand to its announced length is refused.
    #[test]
    fn unannounced_codecs_and_bad_data_are_refused() {
        let mut c = BatchCompressor::new(Codec::Zstd { level: 3 }).unwrap();
        let mut f = frame_of(&text(8 * 4096));
        assert!(c.compress(&mut f));
        let mut d = primed(Capabilities::LZ4);
        assert_eq!(
            d.decode(&f),
            Err(ProtocolError::NotAnnounced(Capabilities::ZSTD.0))
        );
        for codec in [Codec::Lz4, Codec::Zstd { level: 1 }] {
            let mut c = BatchCompressor::new(codec).unwrap();
            let mut f = frame_of(&text(8 * 4096));
            assert!(c.compress(&mut f));
            // Claim one byte more than the data holds.
            let raw = u32::from_le_bytes(f[20..24].try_into().unwrap()) + 1;
            f[20..24].copy_from_slice(&raw.to_le_bytes());
            reseal(&mut f);
            let mut d = primed(Capabilities::ALL);
            let Ok(Record::CompressedBatch(cb)) = d.decode(&f) else {
                panic!("not a compressed batch");
            };
            let mut x = BatchExpander::new();
            assert_eq!(
                x.expand(&cb, PageSize::DEFAULT),
                Err(ProtocolError::Malformed("compressed batch data")),
                "{codec:?}"
            );
        }
        assert!(BatchCompressor::new(Codec::Zstd { level: 1000 }).is_none());
    }
}

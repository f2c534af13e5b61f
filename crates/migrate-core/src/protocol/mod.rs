//! The wire protocol: a stream of typed, length-bounded records.
//!
//! Each transport frame carries exactly one record:
//!
//! ```text
//!  0      1      2      4              8              12             16
//!  +------+------+------+--------------+--------------+--------------+-----------+
//!  | type | 0    | 0    | body length  | sequence     | CRC32C       | body      |
//!  +------+------+------+--------------+--------------+--------------+-----------+
//!    u8     u8     u16    u32 LE         u32 LE         u32 LE
//! ```
//!
//! The CRC32C covers the body and then the first 12 bytes of the header,
//! so a flipped or truncated frame is refused
//! ([`ProtocolError::FrameChecksum`]). It is the one integrity check of a
//! frame: page batches carry no checksum of their own, so each page is
//! read once to be sent and once to be received.
//! The sequence number counts the frames of one direction from 0 (the
//! header); an engine's decoder ([`Decoder::sequenced`]) refuses a frame
//! whose number is not the next one ([`ProtocolError::OutOfSequence`]),
//! so a lost, repeated or reordered frame is detected. [`Record::Abort`]
//! frames are the exception: they end a stream, may be sent by a driver
//! outside the engine's numbering, and are accepted with any number
//! (their CRC is still checked). The free encoders write sequence 0;
//! [`Sequencer`] stamps each frame with its number as it leaves.
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
//! against the bytes present, every frame carries a CRC32C, and the
//! [`Decoder`] returns a [`ProtocolError`] for any input it cannot accept:
//! it never panics and never allocates more than the record's bound.

use crate::backend::DeviceState;
use crate::digest::{is_zero_page, MemoryDigest};
use crate::page::{LayoutError, MemoryLayout, PageNum, PageSize, Region, MAX_PAGE_END};
use bytes::BufMut;

/// The 8 bytes that open every stream.
pub const MAGIC: [u8; 8] = *b"LVMIGRAT";
/// The protocol version this library speaks.
///
/// Version 2 added the sequence number and the CRC32C to every frame, and
/// made the completion digest cover the device state
/// ([`crate::digest::completion_digest`]). Version 3 computes the CRC over
/// the body before the header (so a frame can be renumbered without
/// reading its body again) and drops the XXH3 checksum that page and
/// model batches carried besides the CRC.
pub const VERSION: u32 = 3;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Offset of the sequence number in a frame.
const SEQ_AT: usize = 8;
/// Offset of the CRC32C in a frame.
const CRC_AT: usize = 12;
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

const MAX_PAGE_BATCH_BODY: usize = 8 + MAX_BATCH_PAGES * 9 + MAX_BATCH_DATA;
const MAX_DEVICE_STATE_BODY: usize = 12 + MAX_TEXT + MAX_DEVICE_STATE;

/// Page flag: the page is all zeros and carries no data.
pub const PAGE_FLAG_ZERO: u8 = 1;

mod compress;
mod crc;
mod decode;
mod encode;
mod record;

pub use compress::{
    BatchCompressor, BatchExpander, Capabilities, Codec, CompressedBatch, CompressionFigures,
};
pub(crate) use decode::page_batch_of;
pub use decode::{Decoder, PlaceError, Placed};
use encode::pad8;
pub use encode::{
    abort_frame, encode, encode_model_batch, encode_page_batch, encode_page_batch_from,
    encode_to_vec, frame_sequence, max_batch_pages, page_batch_len, reseal, seal, wire_len,
    BatchSummary, Sequencer,
};
pub use record::{
    ModelBatch, PageBatch, PostcopyReport, ProtocolError, Record, RecordType, ResumeReport,
};

//! The frame CRC: CRC32C (Castagnoli) of a frame's body followed by the
//! first 12 bytes of its header.
//!
//! The body goes first so that the header's sequence number can be
//! restamped ([`super::seal`]) without reading the body again: the CRC of
//! the body alone is recovered from the frame's CRC by running the CRC
//! backwards over the 12 header bytes ([`unappend`]), then the new header
//! is appended. The body, which may be megabytes of pages, is read once,
//! by [`BodyCrc`] as the encoder writes it or by [`frame_crc`] as the
//! decoder checks it.
//!
//! The bulk of the work is done by `crc-fast`, which folds with the CPU's
//! carry-less multiply (VPCLMULQDQ on AVX-512 machines, PCLMULQDQ
//! elsewhere) and picks its kernel at run time; the short header appends
//! use the `crc32c` crate, which costs less to set up.

use super::{CRC_AT, RECORD_HEADER_LEN};
use crc_fast::{CrcAlgorithm, Digest};

/// CRC32C's polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// The CRC of a whole frame (at least a record header long) as its CRC
/// field must hold it.
pub(super) fn frame_crc(frame: &[u8]) -> u32 {
    let body = crc_fast::crc32_iscsi(&frame[RECORD_HEADER_LEN..]);
    with_header(body, frame)
}

/// Continues the CRC of a body over the frame's first 12 header bytes.
pub(super) fn with_header(body_crc: u32, frame: &[u8]) -> u32 {
    crc32c::crc32c_append(body_crc, &frame[..CRC_AT])
}

/// Undoes [`crc32c::crc32c_append`]: given the CRC of `a ‖ data` and
/// `data`, the CRC of `a`. Each step of the CRC register is a bijection,
/// so it can be run backwards, bit by bit.
pub(super) fn unappend(crc: u32, data: &[u8]) -> u32 {
    let mut state = !crc;
    for byte in data.iter().rev() {
        for _ in 0..8 {
            // A forward step shifts right and, when the bit shifted out
            // was 1, XORs the polynomial (whose top bit is set); so the
            // top bit tells which it was.
            state = if state & 0x8000_0000 != 0 {
                ((state ^ POLY) << 1) | 1
            } else {
                state << 1
            };
        }
        state ^= u32::from(*byte);
    }
    !state
}

/// `a · b` modulo CRC32C's polynomial, both in the CRC's bit-reflected
/// form (the top bit is x⁰).
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `x^(2^k)` modulo the polynomial, for k = 0..64.
const X_POW_2K: [u32; 64] = {
    let mut t = [0u32; 64];
    let mut p = 1u32 << 30; // x¹
    let mut k = 0;
    while k < 64 {
        t[k] = p;
        p = mul_mod(p, p);
        k += 1;
    }
    t
};

/// The CRC of `a ‖ b` from the CRC of `a`, the CRC of `b` and the length
/// of `b`: `crc_a` is carried over `len_b` bytes by multiplying it by
/// `x^(8·len_b)` (a product per set bit of the length, from a table of
/// squares), then `crc_b` is added. The initial and final inversions of
/// the two CRCs cancel out.
pub(super) fn combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    let mut shift = 1u32 << 31; // x⁰
    let mut n = len_b;
    let mut k = 3; // x^(8·len) = x^(len · 2³)
    while n != 0 {
        if n & 1 != 0 {
            shift = mul_mod(X_POW_2K[k & 63], shift);
        }
        n >>= 1;
        k += 1;
    }
    mul_mod(shift, crc_a) ^ crc_b
}

/// The CRC of a body built piece by piece, each piece read once.
pub(super) struct BodyCrc(Digest);

impl BodyCrc {
    pub(super) fn new() -> Self {
        BodyCrc(Digest::new(CrcAlgorithm::Crc32Iscsi))
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(super) fn finish(&self) -> u32 {
        // A 32-bit CRC: the upper half is always zero.
        self.0.finalize() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 7) as u8).collect()
    }

    #[test]
    fn frame_crc_is_crc32c_of_body_then_header() {
        let f = sample(RECORD_HEADER_LEN + 5000);
        let mut joined = f[RECORD_HEADER_LEN..].to_vec();
        joined.extend_from_slice(&f[..CRC_AT]);
        assert_eq!(frame_crc(&f), crc32c::crc32c(&joined));
        // The check value of the CRC-32C catalogue entry.
        assert_eq!(crc_fast::crc32_iscsi(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn unappend_inverts_append() {
        let data = sample(300);
        for split in [0, 1, 12, 299, 300] {
            let (a, b) = data.split_at(split);
            let whole = crc32c::crc32c(&data);
            assert_eq!(unappend(whole, b), crc32c::crc32c(a), "split {split}");
        }
    }

    #[test]
    fn body_crc_in_pieces_is_the_crc_of_the_whole() {
        let data = sample(70_000);
        let mut c = BodyCrc::new();
        for piece in data.chunks(4093) {
            c.update(piece);
        }
        assert_eq!(c.finish(), crc32c::crc32c(&data));
        assert_eq!(BodyCrc::new().finish(), crc32c::crc32c(&[]));
    }

    #[test]
    fn combine_joins_two_crcs() {
        let data = sample(70_000);
        for split in [0, 1, 12, 1234, 4096, 69_999, 70_000] {
            let (a, b) = data.split_at(split);
            let joined = combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64);
            assert_eq!(joined, crc32c::crc32c(&data), "split {split}");
        }
    }
}

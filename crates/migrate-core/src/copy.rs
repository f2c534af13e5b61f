//! Copying page bytes at full speed whatever the relative alignment of
//! source and destination.
//!
//! `copy_from_slice` calls the C library's `memcpy`, which for a 4 KiB
//! copy uses the CPU's `rep movsb` on machines that advertise fast string
//! moves. On some of them (AMD EPYC here: 45 GB/s when source and
//! destination share their offset in a 4 KiB page) `rep movsb` drops to
//! 2–3 GB/s when the destination lies 1 to 15 bytes past the source
//! modulo 4096. A received page sits in its frame at an offset set by the
//! batch's length, so some batch sizes put every page of a batch at such
//! an offset from its place in guest memory. At such offsets
//! [`copy_bytes`] copies in blocks small enough that `memcpy` moves them
//! with vector registers, which keep their speed at every offset (44–48
//! GB/s on the same machine); elsewhere it is one `memcpy`.

/// Bytes copied per `memcpy` call where a whole copy would be slow:
/// below the size at which the C library switches to `rep movsb`.
const BLOCK: usize = 256;

/// Whether a copy from `src` to `dst` is one `rep movsb` runs slowly:
/// the destination 1 to 63 bytes past the source modulo 4096 (1 to 15 is
/// the 15-fold case; up to 63 still costs a quarter).
fn slow_alignment(dst: *const u8, src: *const u8) -> bool {
    let past = (dst as usize).wrapping_sub(src as usize) % 4096;
    (1..64).contains(&past)
}

/// Copies `src` into `dst` (of equal length) at full speed wherever the
/// two lie: with one `memcpy` where that is fast, in blocks where the
/// relative alignment would slow `rep movsb` down (see the module's
/// text).
///
/// # Panics
/// If the lengths differ, like `copy_from_slice`.
#[inline]
pub fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    if !slow_alignment(dst.as_ptr(), src.as_ptr()) {
        dst.copy_from_slice(src);
        return;
    }
    assert_eq!(dst.len(), src.len(), "copy_bytes: lengths differ");
    let mut d = dst.chunks_exact_mut(BLOCK);
    let mut s = src.chunks_exact(BLOCK);
    for (a, b) in (&mut d).zip(&mut s) {
        // Opaque to the optimiser, which would otherwise merge the blocks
        // back into one `memcpy` of the whole.
        a.copy_from_slice(std::hint::black_box(b));
    }
    d.into_remainder().copy_from_slice(s.remainder());
}

/// Appends `src` to `out` as [`copy_bytes`] copies (no zero-filling of
/// the new bytes first).
#[inline]
pub fn extend_bytes(out: &mut Vec<u8>, src: &[u8]) {
    out.reserve(src.len());
    let end = out.as_ptr().wrapping_add(out.len());
    if !slow_alignment(end, src.as_ptr()) {
        out.extend_from_slice(src);
        return;
    }
    for b in src.chunks(BLOCK) {
        out.extend_from_slice(std::hint::black_box(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_at_every_relative_alignment() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let from = &src[3..];
        for len in [0, 1, 255, 256, 257, 4096, 8191] {
            // The destination `past` bytes past the source modulo 4096,
            // slow for `rep movsb` or not.
            for past in [0, 1, 8, 15, 16, 63, 64, 2048] {
                let mut dst = vec![0xEEu8; len + 8192];
                let base = dst.as_ptr() as usize;
                let off = (from.as_ptr() as usize + past).wrapping_sub(base) % 4096;
                assert_eq!(
                    slow_alignment(dst[off..].as_ptr(), from.as_ptr()),
                    (1..64).contains(&past)
                );
                copy_bytes(&mut dst[off..off + len], &from[..len]);
                assert_eq!(&dst[off..off + len], &from[..len]);
                assert!(dst[..off].iter().all(|b| *b == 0xEE));
                assert!(dst[off + len..].iter().all(|b| *b == 0xEE));
                let mut v = vec![1u8; off];
                v.reserve(len + 4096);
                extend_bytes(&mut v, &from[..len]);
                assert_eq!(&v[..off], &vec![1u8; off][..]);
                assert_eq!(&v[off..], &from[..len]);
            }
        }
    }
}

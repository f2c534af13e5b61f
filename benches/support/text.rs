//! Text-like bytes: words of a 16-letter alphabet between spaces, about 4
//! bits of entropy a byte, so they compress (Zstandard) but not by much.

use super::splitmix::SplitMix64;

/// Fills `buf` with text-like bytes drawn from `rng`.
pub fn fill(rng: &mut SplitMix64, buf: &mut [u8]) {
    const ALPHABET: &[u8; 16] = b"etaoinshrdlucmfw";
    let mut w = 0u64;
    for (i, b) in buf.iter_mut().enumerate() {
        if i % 16 == 0 {
            w = rng.next_u64();
        }
        let nibble = (w >> ((i % 16) * 4)) as usize & 15;
        *b = if nibble == 15 { b' ' } else { ALPHABET[nibble] };
    }
}

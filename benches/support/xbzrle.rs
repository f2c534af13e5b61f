//! A delta encoding for a page sent again: the new page is compared with
//! the copy sent before, and only the bytes that changed travel.
//!
//! The format is a sequence of pairs. Each pair is a skip length (bytes
//! that are the same as in the old copy) and a literal length followed by
//! that many bytes of the new page, both lengths as LEB128 varints (7 bits
//! a byte, high bit set on all but the last byte). A pair may have a zero
//! skip (the first one, when the page changes at its first byte) but never
//! a zero literal; bytes left after the last pair are unchanged. A page
//! that did not change encodes to nothing.
//!
//! Changed runs are found 8 bytes at a time: a word of the new page equal
//! to the old word is skipped without looking at its bytes. Within a word
//! that differs the run is trimmed to the bytes that differ, and two
//! changed runs separated by at most `MERGE_GAP` equal bytes are joined
//! (a literal of a few equal bytes is cheaper than a pair).
//!
//! The encoder gives up (`None`) as soon as its output would exceed the
//! limit it is given; the sender then sends the page whole.

/// The most equal bytes between two changed runs that still joins them:
/// a new pair costs at least two length bytes.
const MERGE_GAP: usize = 3;

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Option<usize> {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let b = *data.get(*at)?;
        *at += 1;
        if shift > 28 {
            return None;
        }
        v |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
    }
}

fn word(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_ne_bytes(w)
}

/// The end (exclusive) of the changed run that starts at `start`, a byte
/// known to differ: the run goes on until more than `MERGE_GAP` equal bytes in a row
/// or the end of the page, or is cut at `stop` (the encoder gives up on a
/// run that long, so the rest need not be looked at).
fn run_end(old: &[u8], new: &[u8], start: usize, stop: usize) -> usize {
    let n = new.len().min(stop);
    let mut i = start;
    let mut last_diff = start;
    while i < n {
        // A whole equal word is more than MERGE_GAP equal bytes: the run
        // ends at its last changed byte.
        if i.is_multiple_of(8) && i + 8 <= n {
            let x = word(old, i) ^ word(new, i);
            if x == 0 {
                break;
            }
            // No zero byte in x: all eight bytes changed, the run goes on.
            const LOW: u64 = 0x0101_0101_0101_0101;
            if x.wrapping_sub(LOW) & !x & (LOW << 7) == 0 {
                last_diff = i + 7;
                i += 8;
                continue;
            }
        }
        if old[i] != new[i] {
            last_diff = i;
        } else if i - last_diff > MERGE_GAP {
            break;
        }
        i += 1;
    }
    last_diff + 1
}

/// Encodes `new` against `old` (both the same length) into `out`, which is
/// cleared first. Returns the encoded length, or `None` (with `out` in an
/// unspecified state) when the encoding would be longer than `limit`.
pub fn encode(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> Option<usize> {
    assert_eq!(old.len(), new.len(), "delta of pages of different sizes");
    out.clear();
    let n = new.len();
    let mut pos = 0; // first byte not yet covered by a pair
    let mut i = 0;
    while i < n {
        // Skip equal words, then equal bytes, to the first changed byte.
        if i.is_multiple_of(8) && i + 8 <= n && word(old, i) == word(new, i) {
            i += 8;
            continue;
        }
        if old[i] == new[i] {
            i += 1;
            continue;
        }
        // Room left for literal bytes; a longer run means giving up.
        let room = limit.saturating_sub(out.len());
        let end = run_end(old, new, i, i.saturating_add(room).saturating_add(1));
        if end - i > room {
            return None;
        }
        put_varint(out, i - pos);
        put_varint(out, end - i);
        out.extend_from_slice(&new[i..end]);
        if out.len() > limit {
            return None;
        }
        pos = end;
        i = end;
    }
    Some(out.len())
}

/// Why a delta could not be applied.
#[derive(Debug, PartialEq, Eq)]
pub enum DeltaError {
    /// The delta ends inside a length or a literal.
    Truncated,
    /// A skip or literal reaches past the end of the page, or a literal is
    /// empty.
    OutOfPage,
}

/// Applies `delta` to `page`, which holds the old copy and receives the
/// new one in place.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<(), DeltaError> {
    let mut at = 0;
    let mut pos: usize = 0;
    while at < delta.len() {
        let skip = get_varint(delta, &mut at).ok_or(DeltaError::Truncated)?;
        let len = get_varint(delta, &mut at).ok_or(DeltaError::Truncated)?;
        if len == 0 {
            return Err(DeltaError::OutOfPage);
        }
        let start = pos.checked_add(skip).ok_or(DeltaError::OutOfPage)?;
        let end = start.checked_add(len).ok_or(DeltaError::OutOfPage)?;
        if end > page.len() {
            return Err(DeltaError::OutOfPage);
        }
        let lit = delta.get(at..at + len).ok_or(DeltaError::Truncated)?;
        page[start..end].copy_from_slice(lit);
        at += len;
        pos = end;
    }
    Ok(())
}

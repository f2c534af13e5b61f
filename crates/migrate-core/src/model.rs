//! Page models: moving tokens that name pages' contents instead of bytes.
//!
//! A simulated guest need not hold its pages' bytes: a page's content can
//! be named by a 64-bit token (0: all zeros), such as a per-page version
//! counter. With [`Payload::Model`] the source engine reads tokens
//! ([`PageSource::read_tokens`]) and sends them in
//! [`crate::protocol::ModelBatch`] records, each standing for the page
//! batch it replaces: links and statistics count the page batch's length
//! ([`crate::protocol::wire_len`]), so a migration makes the same
//! decisions and reports the same figures as with bytes, at a cost per
//! page of a few words instead of a page copy and hashes. The destination
//! places tokens with [`PageSink::write_tokens`].
//!
//! What is verified: the completion digest in this mode is
//! [`TokenDigest`], an order-independent sum over every page of a mix of
//! its GFN and token. The source sums its memory's tokens after the pause
//! (or the tokens as sent, with [`crate::SourceVerify::SentContent`]); the
//! destination keeps the sum of the tokens that arrived, updated as pages
//! are replaced or discarded, so it holds no per-page table. It proves
//! every page arrived in its latest version as far as tokens tell;
//! nothing about bytes (there are none).
//!
//! [`PageSource::read_tokens`]: crate::PageSource::read_tokens
//! [`PageSink::write_tokens`]: crate::PageSink::write_tokens

use crate::backend::{BackendError, PageSource};
use crate::digest::MemoryDigest;
use crate::page::{MemoryLayout, PageNum};

/// What page-batch records carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// Page bytes, in [`crate::protocol::PageBatch`] records (every real
    /// backend).
    #[default]
    Bytes,
    /// Content tokens, in [`crate::protocol::ModelBatch`] records: the
    /// simulator's fast path for guests too large to copy page by page.
    Model,
}

/// An order-independent digest of `(page, token)` pairs: a wrapping sum of
/// a 128-bit mix of each pair, so a pair can be added and taken out again
/// in any order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenDigest(u128);

#[inline]
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[inline]
fn mix(page: PageNum, token: u64) -> u128 {
    let a = splitmix(page ^ splitmix(token ^ 0x6c76_6d69_6772_6174));
    let b = splitmix(a ^ token.rotate_left(29) ^ page.rotate_left(41));
    (u128::from(a) << 64) | u128::from(b)
}

impl TokenDigest {
    /// The digest of nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds page `page` with content token `token`.
    #[inline]
    pub fn add(&mut self, page: PageNum, token: u64) {
        self.0 = self.0.wrapping_add(mix(page, token));
    }

    /// Takes out page `page` with content token `token`, added before.
    #[inline]
    pub fn remove(&mut self, page: PageNum, token: u64) {
        self.0 = self.0.wrapping_sub(mix(page, token));
    }

    /// The digest, as the completion record carries it.
    pub fn finish(&self) -> MemoryDigest {
        MemoryDigest(self.0)
    }
}

/// Pages read per call when digesting tokens through a [`PageSource`].
const TOKEN_BATCH: usize = 4096;

/// Reads every page's token of `layout` from `memory` and digests them.
pub fn token_digest_memory<S: PageSource + ?Sized>(
    memory: &mut S,
    layout: &MemoryLayout,
) -> Result<MemoryDigest, BackendError> {
    let mut d = TokenDigest::new();
    let mut pages = Vec::with_capacity(TOKEN_BATCH);
    let mut tokens = vec![0u64; TOKEN_BATCH];
    let mut flush = |pages: &mut Vec<PageNum>| -> Result<(), BackendError> {
        let t = &mut tokens[..pages.len()];
        memory.read_tokens(pages, t)?;
        for (p, t) in pages.iter().zip(t.iter()) {
            d.add(*p, *t);
        }
        pages.clear();
        Ok(())
    };
    for page in layout.pages() {
        pages.push(page);
        if pages.len() == TOKEN_BATCH {
            flush(&mut pages)?;
        }
    }
    if !pages.is_empty() {
        flush(&mut pages)?;
    }
    Ok(d.finish())
}

/// The digest of a table of tokens by dense index.
pub fn token_digest_table(layout: &MemoryLayout, tokens: &[u64]) -> MemoryDigest {
    let mut d = TokenDigest::new();
    for (page, t) in layout.pages().zip(tokens) {
        d.add(page, *t);
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageSize;
    use crate::protocol::{
        encode, encode_model_batch, encode_page_batch, page_batch_len, reseal, seal, wire_len,
        Decoder, ModelBatch, ProtocolError, Record, RECORD_HEADER_LEN, VERSION,
    };

    fn decoder(ps: PageSize) -> Decoder {
        let mut d = Decoder::new();
        let mut f = Vec::new();
        encode(&Record::Header { version: VERSION }, &mut f);
        d.decode(&f).unwrap();
        f.clear();
        encode(
            &Record::Layout(MemoryLayout::flat(ps, 1 << 30).unwrap()),
            &mut f,
        );
        d.decode(&f).unwrap();
        d
    }

    #[test]
    fn a_model_batch_stands_for_the_page_batch_it_replaces() {
        let ps = PageSize::DEFAULT;
        for n in [1usize, 7, 8, 9, 256] {
            let pages: Vec<PageNum> = (0..n as u64).map(|i| i * 3 + 1).collect();
            let tokens: Vec<u64> = (0..n as u64).map(|i| i % 3).collect();
            let mut contents = vec![0u8; n * ps.get()];
            for (i, t) in tokens.iter().enumerate() {
                if *t != 0 {
                    contents[i * ps.get()] = *t as u8;
                }
            }
            let (mut bytes, mut model) = (Vec::new(), Vec::new());
            let b = encode_page_batch(4, ps, &pages, &contents, &mut bytes);
            let m = encode_model_batch(4, ps, &pages, &tokens, &mut model);
            assert_eq!(b, m);
            assert_eq!(bytes.len(), page_batch_len(ps, n, b.zero_pages));
            assert_eq!(wire_len(&bytes), bytes.len());
            assert_eq!(wire_len(&model), bytes.len());
            if b.zero_pages < n {
                assert!(model.len() < bytes.len());
            }
            match decoder(ps).decode(&model).unwrap() {
                Record::ModelBatch(got) => {
                    assert_eq!(got.round, 4);
                    assert_eq!(got.len(), n);
                    let back: Vec<(PageNum, u64)> = got.iter().collect();
                    let want: Vec<(PageNum, u64)> =
                        pages.iter().copied().zip(tokens.iter().copied()).collect();
                    assert_eq!(back, want);
                    let mut again = Vec::new();
                    encode(&Record::ModelBatch(got), &mut again);
                    assert_eq!(again, model);
                }
                other => panic!("decoded {other:?}"),
            }
        }
    }

    #[test]
    fn a_model_batch_that_lies_about_its_length_or_is_damaged_is_refused() {
        let ps = PageSize::DEFAULT;
        let pages: Vec<u8> = [5u64, 6].iter().flat_map(|p| p.to_le_bytes()).collect();
        let tokens: Vec<u8> = [0u64, 9].iter().flat_map(|p| p.to_le_bytes()).collect();
        let honest = page_batch_len(ps, 2, 1) as u64;
        let mut f = Vec::new();
        encode(
            &Record::ModelBatch(ModelBatch::new(1, honest + 4096, &pages, &tokens)),
            &mut f,
        );
        assert!(matches!(
            decoder(ps).decode(&f),
            Err(ProtocolError::OutOfRange { .. })
        ));
        // A length past any frame's is not believed even before decoding.
        let mut huge = f.clone();
        huge[RECORD_HEADER_LEN + 8..RECORD_HEADER_LEN + 16]
            .copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(wire_len(&huge), huge.len());
        f.clear();
        encode(
            &Record::ModelBatch(ModelBatch::new(1, honest, &pages, &tokens)),
            &mut f,
        );
        assert!(decoder(ps).decode(&f).is_ok());
        let last = f.len() - 1;
        f[last] ^= 1;
        // Like every frame, a model batch carries a CRC32C: a flipped
        // byte is refused by it.
        assert!(matches!(
            decoder(ps).decode(&f),
            Err(ProtocolError::FrameChecksum { .. })
        ));
        // Before the layout there is no page size to check against.
        let mut d = Decoder::new();
        let mut h = Vec::new();
        encode(&Record::Header { version: VERSION }, &mut h);
        d.decode(&h).unwrap();
        f[last] ^= 1;
        reseal(&mut f);
        assert!(matches!(
            d.decode(&f),
            Err(ProtocolError::UnexpectedRecord { .. })
        ));
    }

    /// A sequenced decoder that took the header (frame 0) and the layout
    /// (frame 1).
    fn sequenced_decoder(ps: PageSize) -> Decoder {
        let mut d = Decoder::sequenced();
        let records = [
            Record::Header { version: VERSION },
            Record::Layout(MemoryLayout::flat(ps, 1 << 30).unwrap()),
        ];
        for (seq, r) in records.iter().enumerate() {
            let mut f = Vec::new();
            encode(r, &mut f);
            seal(&mut f, seq as u32);
            d.decode(&f).unwrap();
        }
        d
    }

    #[test]
    fn a_model_batch_is_sequenced_like_every_frame() {
        let ps = PageSize::DEFAULT;
        let mut m = Vec::new();
        encode_model_batch(1, ps, &[3, 4], &[0, 7], &mut m);
        // Frame 2 lost: frame 3 is refused.
        seal(&mut m, 3);
        assert!(matches!(
            sequenced_decoder(ps).decode(&m),
            Err(ProtocolError::OutOfSequence {
                expected: 2,
                got: 3
            })
        ));
        let mut d = sequenced_decoder(ps);
        seal(&mut m, 2);
        assert!(matches!(d.decode(&m), Ok(Record::ModelBatch(_))));
        // The same frame again is refused.
        assert!(matches!(
            d.decode(&m),
            Err(ProtocolError::OutOfSequence { .. })
        ));
    }

    #[test]
    fn token_digest_ignores_order_and_undoes_removal() {
        let mut a = TokenDigest::new();
        a.add(1, 5);
        a.add(2, 0);
        let mut b = TokenDigest::new();
        b.add(2, 0);
        b.add(7, 9);
        b.add(1, 5);
        assert_ne!(a, b);
        b.remove(7, 9);
        assert_eq!(a.finish(), b.finish());
        let mut c = TokenDigest::new();
        c.add(1, 6);
        c.add(2, 0);
        assert_ne!(a.finish(), c.finish());
        let mut d = TokenDigest::new();
        d.add(2, 5);
        d.add(1, 0);
        assert_ne!(a.finish(), d.finish());
    }
}

//! Round trips.

use super::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_record_round_trips(record in owned_record()) {
        let frame = encode_to_vec(&record);
        let mut d = decoder_for(&record);
        let decoded = d.decode(&frame);
        prop_assert_eq!(decoded.as_ref(), Ok(&record));
        prop_assert!(frame.len() <= MAX_FRAME_LEN);
        prop_assert!(frame.len() - RECORD_HEADER_LEN <= record.record_type().max_body());
        if let Record::Layout(l) = &record {
            prop_assert_eq!(d.page_size(), Some(l.page_size()));
        }
    }

    #[test]
    fn page_batches_round_trip(input in batch()) {
        let (frame, summary) = input.encode();
        let ps = input.page_size.get();
        let expected_zero = input
            .contents
            .chunks_exact(ps)
            .filter(|c| c.iter().all(|b| *b == 0))
            .count();
        prop_assert_eq!(summary.pages, input.pages.len());
        prop_assert_eq!(summary.zero_pages, expected_zero);
        prop_assert_eq!(summary.frame_bytes, frame.len());
        prop_assert!(frame.len() <= MAX_FRAME_LEN);

        let mut d = decoder_after_layout(input.page_size);
        let decoded = d.decode(&frame);
        let Ok(Record::PageBatch(b)) = decoded else {
            return Err(TestCaseError::fail(format!("expected a page batch, got {decoded:?}")));
        };
        prop_assert_eq!(b.round, input.round);
        prop_assert_eq!(b.len(), input.pages.len());
        prop_assert_eq!(b.is_empty(), input.pages.is_empty());
        prop_assert_eq!(b.zero_pages(), expected_zero);
        let mut seen = 0;
        for ((page, data), (want_page, want)) in
            b.iter().zip(input.pages.iter().zip(input.contents.chunks_exact(ps)))
        {
            prop_assert_eq!(page, *want_page);
            match data {
                None => prop_assert!(want.iter().all(|x| *x == 0), "page {} came back as zero", page),
                Some(got) => {
                    prop_assert!(want.iter().any(|x| *x != 0), "zero page {} sent as data", page);
                    prop_assert!(got == want, "content of page {} differs", page);
                }
            }
            seen += 1;
        }
        prop_assert_eq!(seen, input.pages.len());
        // Encoding the decoded batch again gives the same frame.
        prop_assert_eq!(encode_to_vec(&Record::PageBatch(b)), frame);
    }

    // --------------------------------------------------- arbitrary input

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        ps in small_page_size(),
    ) {
        let _ = decode_checked(&mut Decoder::new(), &bytes);
        let _ = decode_checked(&mut decoder_after_header(), &bytes);
        let _ = decode_checked(&mut decoder_after_layout(ps), &bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_a_record_header_never_panic(
        frame in framed_garbage(),
        ps in small_page_size(),
    ) {
        let _ = decode_checked(&mut Decoder::new(), &frame);
        let _ = decode_checked(&mut decoder_after_header(), &frame);
        let _ = decode_checked(&mut decoder_after_layout(ps), &frame);
    }

    #[test]
    fn frames_of_another_stream_state_never_panic(record in owned_record(), ps in small_page_size()) {
        // A valid frame fed to a decoder in every state either decodes to
        // the same record or is refused.
        let frame = encode_to_vec(&record);
        for mut d in [Decoder::new(), decoder_after_header(), decoder_after_layout(ps)] {
            if let Ok(r) = d.decode(&frame) {
                prop_assert_eq!(r, record.clone());
            }
        }
    }

    // ------------------------------------------------------- mutations

    #[test]
    fn cut_frames_are_truncated(record in owned_record()) {
        let frame = encode_to_vec(&record);
        for cut in 0..frame.len() {
            let r = decoder_for(&record).decode(&frame[..cut]);
            prop_assert!(
                matches!(r, Err(ProtocolError::Truncated { .. })),
                "frame cut to {} of {} bytes gave {:?}", cut, frame.len(), r
            );
        }
    }

    #[test]
    fn cut_page_batches_are_truncated(input in batch_with(small_page_size())) {
        let (frame, _) = input.encode();
        let mut d = decoder_after_layout(input.page_size);
        for cut in 0..frame.len() {
            let r = d.decode(&frame[..cut]);
            prop_assert!(
                matches!(r, Err(ProtocolError::Truncated { .. })),
                "batch cut to {} of {} bytes gave {:?}", cut, frame.len(), r
            );
        }
        prop_assert!(d.decode(&frame).is_ok());
    }

    #[test]
    fn extended_frames_have_trailing_bytes(
        record in owned_record(),
        extra in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut frame = encode_to_vec(&record);
        frame.extend_from_slice(&extra);
        prop_assert_eq!(
            decoder_for(&record).decode(&frame),
            Err(ProtocolError::TrailingBytes { record: record.record_type(), extra: extra.len() })
        );
    }

    #[test]
    fn extended_page_batches_have_trailing_bytes(
        input in batch_with(small_page_size()),
        extra in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let (mut frame, _) = input.encode();
        frame.extend_from_slice(&extra);
        prop_assert_eq!(
            decoder_after_layout(input.page_size).decode(&frame),
            Err(ProtocolError::TrailingBytes { record: RecordType::PageBatch, extra: extra.len() })
        );
    }

    #[test]
    fn flipped_bytes_never_panic_and_never_decode_to_the_original(
        record in owned_record(),
        mask in 1u8..=255,
    ) {
        let frame = encode_to_vec(&record);
        for i in 0..frame.len() {
            let bad = flipped(&frame, i, mask);
            // Fields no check covers (a round number, a digest) may flip
            // into another valid record, but never into the same one.
            let mut d = decoder_for(&record);
            let _ = decode_checked(&mut d, &bad);
            if let Ok(r) = decoder_for(&record).decode(&bad) {
                prop_assert_ne!(r, record.clone(), "byte {} flipped by {:#x}", i, mask);
            }
            // Bytes 1..4 are reserved, bytes 4..8 are the length.
            if (1..RECORD_HEADER_LEN).contains(&i) {
                prop_assert!(decoder_for(&record).decode(&bad).is_err(), "byte {} flipped", i);
            }
        }
    }

    #[test]
    fn any_flip_in_a_page_batch_is_an_error(
        input in batch_with(small_page_size()),
        mask in 1u8..=255,
    ) {
        let (frame, _) = input.encode();
        let mut d = decoder_after_layout(input.page_size);
        prop_assert!(d.decode(&frame).is_ok());
        // The type code: another record type may happen to parse, but
        // the decoder must not panic and must stay canonical.
        let _ = decode_checked(&mut d.clone(), &flipped(&frame, 0, mask));
        for i in 1..frame.len() {
            let bad = flipped(&frame, i, mask);
            let r = d.decode(&bad);
            prop_assert!(r.is_err(), "byte {} of {} flipped by {:#x} was accepted: {:?}", i, frame.len(), mask, r);
        }
    }

    #[test]
    fn flips_in_page_data_are_frame_checksum_errors(
        input in batch_with(small_page_size()),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        // The frame's CRC32C is a page batch's only checksum: a byte of
        // page data changed on the way is refused by it, with the CRC the
        // sender computed and the one of the bytes received.
        let (frame, _) = input.encode();
        let n = input.pages.len();
        let data = batch_data_offset(n);
        prop_assume!(data < frame.len());
        let i = data + at.index(frame.len() - data);
        let bad = flipped(&frame, i, mask);
        let r = decoder_after_layout(input.page_size).decode(&bad);
        let stored = u32::from_le_bytes(frame[12..16].try_into().unwrap());
        prop_assert!(
            matches!(r, Err(ProtocolError::FrameChecksum { expected, computed })
                if expected == stored && computed != stored),
            "{:?}", r
        );
    }

    #[test]
    fn decode_placing_places_what_decode_returns(input in batch()) {
        // The fused path hands over the same pages, in the same order, as
        // the checked decode; other records come back decoded.
        let (frame, summary) = input.encode();
        let mut d = decoder_after_layout(input.page_size);
        let Ok(Record::PageBatch(b)) = d.clone().decode(&frame) else {
            return Err(TestCaseError::fail("expected a page batch"));
        };
        let want: Vec<(PageNum, Option<&[u8]>)> = b.iter().collect();
        let mut got = Vec::new();
        let r = d.decode_placing(&frame, |p, data| {
            got.push((p, data));
            Ok::<(), ()>(())
        });
        let Ok(protocol::Placed::Batch { round, pages, zero_pages }) = r else {
            return Err(TestCaseError::fail(format!("{r:?}")));
        };
        prop_assert_eq!((round, pages, zero_pages), (input.round, summary.pages, summary.zero_pages));
        prop_assert!(got == want);
        let end = encode_to_vec(&Record::RoundEnd { round: 1, pages_sent: 0 });
        let r = d.decode_placing(&end, |_, _| Err(()));
        prop_assert!(matches!(r, Ok(protocol::Placed::Record(Record::RoundEnd { .. }))), "{:?}", r);
    }

    #[test]
    fn decode_placing_refuses_any_flip_in_a_page_batch(
        input in batch_with(small_page_size()),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let (frame, _) = input.encode();
        let i = 1 + at.index(frame.len() - 1);
        let bad = flipped(&frame, i, mask);
        let r = decoder_after_layout(input.page_size).decode_placing(&bad, |_, _| Ok::<(), ()>(()));
        prop_assert!(r.is_err(), "byte {} flipped by {:#x} was accepted: {:?}", i, mask, r);
        if i >= batch_data_offset(input.pages.len()) {
            prop_assert!(
                matches!(r, Err(protocol::PlaceError::Protocol(ProtocolError::FrameChecksum { .. }))),
                "{:?}", r
            );
        }
    }
}

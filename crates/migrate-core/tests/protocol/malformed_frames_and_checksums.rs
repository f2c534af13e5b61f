//! Malformed frames and checksums.

use super::*;

#[test]
fn malformed_reserved_bytes() {
    // The record header's reserved bytes.
    for i in 1..4 {
        let mut f = encode_to_vec(&Record::Ready);
        f[i] = 1;
        assert_eq!(
            decoder_after_header().decode(&f),
            Err(ProtocolError::Malformed("record header reserved bytes"))
        );
    }
    // Reserved fields in bodies: the last 4 bytes of a header, the second
    // 4 of a round marker, discard, page request and abort.
    let cases: [(Record<'static>, usize, &str); 5] = [
        (Record::Header { version: VERSION }, 12, "header flags"),
        (
            Record::RoundEnd {
                round: 1,
                pages_sent: 1,
            },
            4,
            "round marker reserved field",
        ),
        (Record::Discard(vec![(1, 2)]), 4, "discard reserved field"),
        (
            Record::PageRequest(vec![1]),
            4,
            "page request reserved field",
        ),
        (
            Record::Abort { reason: "r".into() },
            4,
            "abort reserved field",
        ),
    ];
    for (record, at, what) in cases {
        let mut f = encode_to_vec(&record);
        f[RECORD_HEADER_LEN + at] = 0x10;
        protocol::reseal(&mut f);
        assert_eq!(
            decoder_for(&record).decode(&f),
            Err(ProtocolError::Malformed(what)),
            "{record:?}"
        );
    }
    // The padding after a batch's flags.
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2, 3], &[0, 1, 0]);
    let mut bad = flipped(&f, batch_flags_offset(3) + 3, 1);
    protocol::reseal(&mut bad);
    assert_eq!(
        decoder_after_layout(PageSize::DEFAULT).decode(&bad),
        Err(ProtocolError::Malformed("page batch padding"))
    );
}

#[test]
fn malformed_page_flags() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2], &[0, 7]);
    let flags = batch_flags_offset(2);
    assert_eq!(f[flags], PAGE_FLAG_ZERO);
    assert_eq!(f[flags + 1], 0);
    for (at, value) in [
        (flags, 2),
        (flags, PAGE_FLAG_ZERO | 0x80),
        (flags + 1, 0x40),
    ] {
        let mut bad = f.clone();
        bad[at] = value;
        protocol::reseal(&mut bad);
        assert_eq!(
            decoder_after_layout(PageSize::DEFAULT).decode(&bad),
            Err(ProtocolError::Malformed("page flags"))
        );
    }
}

#[test]
fn malformed_text() {
    let mut f = encode_to_vec(&Record::Abort {
        reason: "abc".into(),
    });
    let at = f.len() - 2;
    f[at] = 0xff;
    protocol::reseal(&mut f);
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Malformed("abort reason"))
    );
    // A multi-byte character cut in half.
    let mut f = encode_to_vec(&Record::Abort {
        reason: "é".into()
    });
    let mut body = f.split_off(RECORD_HEADER_LEN);
    body.pop();
    body[0] = 1;
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Abort as u8, &body)),
        Err(ProtocolError::Malformed("abort reason"))
    );
    let mut f = encode_to_vec(&Record::DeviceState(DeviceState {
        format: "kvm".into(),
        version: 1,
        data: vec![0xff; 4],
    }));
    f[RECORD_HEADER_LEN + 12] = 0xc3;
    protocol::reseal(&mut f);
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Malformed("device state format name"))
    );
}

/// Finding 1: a flipped byte anywhere in any record (control records
/// included) is refused by the frame's CRC, and a frame cut short is
/// refused as truncated.
#[test]
fn any_flipped_byte_in_any_record_fails_the_frame_checksum() {
    let records = [
        Record::Discard(vec![(1, 2), (9, 4)]),
        Record::DiscardBitmap {
            first_page: 64,
            words: vec![0xf0f0, 1],
        },
        Record::DeviceState(DeviceState {
            format: "sim".into(),
            version: 1,
            data: vec![1, 2, 3, 4, 5, 6, 7, 8],
        }),
        Record::SwitchOver {
            round: 4,
            postcopy: true,
        },
        Record::RoundEnd {
            round: 2,
            pages_sent: 7,
        },
        Record::Complete {
            total_pages: 12,
            digest: migrate_core::MemoryDigest(0x1234_5678),
        },
    ];
    for record in records {
        let f = encode_to_vec(&record);
        for at in 0..f.len() {
            for mask in [0x01u8, 0x80] {
                let bad = flipped(&f, at, mask);
                let r = decoder_for(&record).decode(&bad);
                assert!(r.is_err(), "{record:?}: flip at {at} accepted: {r:?}");
                if (RECORD_HEADER_LEN..f.len()).contains(&at) || (8..16).contains(&at) {
                    assert!(
                        matches!(r, Err(ProtocolError::FrameChecksum { .. })),
                        "{record:?}: flip at {at}: {r:?}"
                    );
                }
            }
        }
        for cut in 0..f.len() {
            assert!(decoder_for(&record).decode(&f[..cut]).is_err());
        }
    }
}

/// Finding 1: a sequenced decoder refuses a lost, repeated or reordered
/// frame; aborts are accepted whatever their number.
#[test]
fn sequenced_decoder_refuses_lost_repeated_and_reordered_frames() {
    let layout = MemoryLayout::new(PageSize::DEFAULT, vec![region(0, 16)]).unwrap();
    let frames = |n: u32| -> Vec<Vec<u8>> {
        let mut seq = protocol::Sequencer::new();
        let mut v = vec![
            header_frame(),
            layout_frame(&layout),
            encode_to_vec(&Record::Discard(vec![(1, 2)])),
            encode_to_vec(&Record::RoundEnd {
                round: 1,
                pages_sent: 0,
            }),
        ];
        v.truncate(n as usize);
        for f in &mut v {
            seq.seal(f);
        }
        v
    };
    let all = frames(4);
    // In order: accepted.
    let mut d = Decoder::sequenced();
    for f in &all {
        d.decode(f).unwrap();
    }
    // Lost (frame 2 skipped), repeated (frame 1 twice), reordered.
    for order in [[0, 1, 3], [0, 1, 1], [0, 2, 1]] {
        let mut d = Decoder::sequenced();
        let mut result = Ok(());
        for i in order {
            if let Err(e) = d.decode(&all[i]) {
                result = Err(e);
                break;
            }
        }
        assert!(
            matches!(result, Err(ProtocolError::OutOfSequence { .. })),
            "{order:?}: {result:?}"
        );
    }
    // An abort with any number is taken.
    let mut d = Decoder::sequenced();
    d.decode(&all[0]).unwrap();
    let mut abort = protocol::abort_frame("gone");
    protocol::seal(&mut abort, 77);
    assert!(matches!(d.decode(&abort), Ok(Record::Abort { .. })));
    // A plain decoder does not look at numbers.
    let mut d = Decoder::new();
    for f in [&all[0], &all[1], &all[1]] {
        assert!(d.decode(f).is_ok() || f == &all[1]);
    }
}

#[test]
fn flips_anywhere_in_a_batch_are_frame_checksum_errors() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2, 3], &[4, 0, 6]);
    let stored = u32::from_le_bytes(f[12..16].try_into().unwrap());
    // A flipped data byte (first page, second page, last byte), a flipped
    // round, a flipped page number, a flipped sequence number.
    let data = batch_data_offset(3);
    for at in [
        data,
        data + 4096 + 17,
        f.len() - 1,
        RECORD_HEADER_LEN,
        RECORD_HEADER_LEN + 8,
        8,
    ] {
        let bad = flipped(&f, at, 0x01);
        match decoder_after_layout(PageSize::DEFAULT).decode(&bad) {
            Err(ProtocolError::FrameChecksum { expected, computed }) => {
                assert_eq!(expected, stored, "byte {at}");
                assert_ne!(computed, expected, "byte {at}");
            }
            other => panic!("byte {at} flipped: {other:?}"),
        }
    }
    // A flipped CRC: the bytes are intact, the CRC received is not.
    let bad = flipped(&f, 12, 0x01);
    match decoder_after_layout(PageSize::DEFAULT).decode(&bad) {
        Err(ProtocolError::FrameChecksum { expected, computed }) => {
            assert_eq!(computed, stored);
            assert_ne!(expected, stored);
        }
        other => panic!("CRC flipped: {other:?}"),
    }
    // Flipping a zero page's flag changes how much data the batch has,
    // so it is caught before the checksum.
    let bad = flipped(&f, batch_flags_offset(3) + 1, PAGE_FLAG_ZERO);
    assert!(decoder_after_layout(PageSize::DEFAULT)
        .decode(&bad)
        .is_err());
}

#[test]
fn layout_bad_page_size() {
    for size in [3000u32, 0, 256, 4 << 20, 4097] {
        let mut body = Vec::new();
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
            Err(ProtocolError::Layout(LayoutError::BadPageSize(size)))
        );
    }
}

#[test]
fn layout_overlapping_regions() {
    let cases: [(&[(u64, u64)], LayoutError); 5] = [
        (&[(0, 10), (5, 10)], LayoutError::Unordered { index: 1 }),
        (
            &[(0, 10), (20, 1), (19, 3)],
            LayoutError::Unordered { index: 2 },
        ),
        (&[(8, 1), (0, 1)], LayoutError::Unordered { index: 1 }),
        (&[(0, 4), (4, 0)], LayoutError::EmptyRegion { index: 1 }),
        (&[(MAX_PAGE_END - 1, 2)], LayoutError::TooLarge),
    ];
    for (regions, err) in cases {
        let f = raw_frame(RecordType::Layout as u8, &raw_layout_body(4096, regions));
        let mut d = decoder_after_header();
        assert_eq!(d.decode(&f), Err(ProtocolError::Layout(err)), "{regions:?}");
        // A refused layout does not count as the stream's layout.
        assert_eq!(d.page_size(), None);
    }
    // Adjacent regions are fine, and so is one ending at the largest page.
    let f = raw_frame(
        RecordType::Layout as u8,
        &raw_layout_body(4096, &[(0, 4), (4, 4), (MAX_PAGE_END - 1, 1)]),
    );
    assert!(decoder_after_header().decode(&f).is_ok());
    let f = raw_frame(
        RecordType::Layout as u8,
        &raw_layout_body(4096, &[(u64::MAX, u64::MAX)]),
    );
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Layout(LayoutError::TooLarge))
    );
}

#[test]
fn discard_bitmap_bounds_are_checked() {
    let mut d = decoder_after_header();
    // Ends past the largest page number.
    let f = encode_to_vec(&Record::DiscardBitmap {
        first_page: (1 << 52) - 64,
        words: vec![0, 0],
    });
    assert!(matches!(
        d.decode(&f),
        Err(ProtocolError::OutOfRange { .. })
    ));
    // More words than a record may hold.
    let mut body = Vec::new();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(MAX_DISCARD_WORDS as u32 + 1).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    let f = raw_frame(RecordType::DiscardBitmap as u8, &body);
    assert!(matches!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::OutOfRange { .. })
    ));
    // Words announced but not present.
    let mut body = Vec::new();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 8]);
    let f = raw_frame(RecordType::DiscardBitmap as u8, &body);
    assert!(matches!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn seal_renumbers_without_reading_the_body_and_keeps_a_bad_crc_bad() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2, 3], &[4, 0, 6]);
    for seq in [0u32, 1, 2, 0x8000_0000, u32::MAX] {
        // The same frame renumbered by seal and by writing the number and
        // recomputing the CRC over every byte.
        let mut sealed = f.clone();
        protocol::seal(&mut sealed, seq);
        let mut full = f.clone();
        full[8..12].copy_from_slice(&seq.to_le_bytes());
        protocol::reseal(&mut full);
        assert_eq!(sealed, full, "seq {seq}");
        assert_eq!(protocol::frame_sequence(&sealed), Some(seq));
        let mut d = decoder_after_layout(PageSize::DEFAULT);
        assert!(d.decode(&sealed).is_ok(), "seq {seq}");
    }
    // A frame damaged before it is numbered stays refused: seal does not
    // vouch for bytes it did not read.
    let mut bad = flipped(&f, batch_data_offset(3) + 5, 0x40);
    protocol::seal(&mut bad, 9);
    assert!(matches!(
        decoder_after_layout(PageSize::DEFAULT).decode(&bad),
        Err(ProtocolError::FrameChecksum { .. })
    ));
}

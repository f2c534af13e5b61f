//! Bad records.

use super::*;

#[test]
fn page_in_a_hole_is_out_of_range() {
    let src = source();
    assert!(!src.layout.contains(HOLE));
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    // A batch with a good page, then the hole.
    let mut f = Vec::new();
    encode_page_batch(1, PageSize::DEFAULT, &[2, HOLE], &[7u8; 8192], &mut f);
    stream.push(f);
    let (err, _, _) = fails_on_last(&stream);
    assert!(
        matches!(err, MigrationError::PageOutOfRange(HOLE)),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
}

#[test]
fn page_past_the_end_is_out_of_range() {
    let src = source();
    let end = src.layout.page_end();
    for page in [end, end + 1000, (1 << 52) - 1] {
        let mut f = Vec::new();
        encode_page_batch(1, PageSize::DEFAULT, &[page], &[0u8; 4096], &mut f);
        let stream = vec![header(), layout_frame(&src.layout), f];
        let (err, _, _) = fails_on_last(&stream);
        assert!(
            matches!(err, MigrationError::PageOutOfRange(p) if p == page),
            "{err:?}"
        );
    }
}

#[test]
fn layout_differing_from_the_destinations() {
    let r = |first_page, pages| Region { first_page, pages };
    let cases = [
        // More memory.
        (
            MemoryLayout::new(PageSize::DEFAULT, vec![r(0, 6), r(10, 7)]).unwrap(),
            13,
        ),
        // The same number of pages, without the hole.
        (
            MemoryLayout::flat(PageSize::DEFAULT, 12 * 4096).unwrap(),
            12,
        ),
        // The same regions with 2 MiB pages.
        (
            MemoryLayout::new(PageSize::new(2 << 20).unwrap(), vec![r(0, 6), r(10, 6)]).unwrap(),
            12,
        ),
    ];
    for (other, pages) in cases {
        let (err, _, _) = fails_on_last(&[header(), layout_frame(&other)]);
        match err {
            MigrationError::LayoutMismatch {
                source_pages,
                dest_pages,
            } => {
                assert_eq!(source_pages, pages);
                assert_eq!(dest_pages, 12);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn abort_from_the_source() {
    let src = source();
    let stream = good_stream(&src);
    let abort = encode_to_vec(&Record::Abort {
        reason: "source guest crashed".into(),
    });
    // After the header, during pre-copy, after switch-over, after the
    // device state: all the same.
    for at in [1, 2, 6, stream.len() - 1] {
        let mut s = stream[..at].to_vec();
        s.push(abort.clone());
        let (err, _, guest) = fails_on_last(&s);
        match &err {
            MigrationError::PeerAborted(why) => assert_eq!(why, "source guest crashed"),
            other => panic!("abort after {at} frames: {other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::Abort);
        assert!(guest.restored.is_none());
    }
}

#[test]
fn records_of_the_wrong_kind() {
    let src = source();
    let mut receiving = vec![header(), layout_frame(&src.layout)];
    receiving.extend(all_pages(&src, 1));
    let cases: Vec<(Vec<Vec<u8>>, RecordType)> = vec![
        // Records only a destination sends.
        (
            [
                receiving.clone(),
                vec![encode_to_vec(&Record::PageRequest(vec![1, 2]))],
            ]
            .concat(),
            RecordType::PageRequest,
        ),
        (
            [receiving.clone(), vec![encode_to_vec(&Record::Ready)]].concat(),
            RecordType::Ready,
        ),
        (
            [
                receiving.clone(),
                vec![encode_to_vec(&Record::Resumed(Default::default()))],
            ]
            .concat(),
            RecordType::Resumed,
        ),
        // Something other than the layout after the header.
        (vec![header(), round_end(1, 0)], RecordType::RoundEnd),
        (vec![header(), switch_over(1)], RecordType::SwitchOver),
        (
            vec![header(), complete(12, src.digest())],
            RecordType::Complete,
        ),
        // A second switch-over.
        (
            [receiving.clone(), vec![switch_over(2), switch_over(3)]].concat(),
            RecordType::SwitchOver,
        ),
        // A second device state.
        (
            [
                receiving.clone(),
                vec![switch_over(2), state_frame(), state_frame()],
            ]
            .concat(),
            RecordType::DeviceState,
        ),
    ];
    for (stream, want) in cases {
        let (err, _, _) = fails_on_last(&stream);
        assert!(
            matches!(err, MigrationError::UnexpectedRecord { got, .. } if got == want),
            "{want:?}: {err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
    }
}

#[test]
fn garbled_frames_are_protocol_errors() {
    let src = source();
    let mut prefix = vec![header(), layout_frame(&src.layout)];
    let batch = pages(&src, 1, &[1, 2]);
    prefix.push(batch.clone());

    // A flipped byte in the page data: caught by the frame's CRC (in
    // pre-copy after the pages were placed; see the next test).
    let mut bad = pages(&src, 1, &[4, 5]);
    let at = bad.len() - 20;
    bad[at] ^= 1;
    let (err, _, _) = fails_on_last(&[prefix.clone(), vec![bad]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::FrameChecksum { .. })
        ),
        "{err:?}"
    );

    // A cut frame.
    let (err, _, _) =
        fails_on_last(&[prefix.clone(), vec![batch[..batch.len() - 1].to_vec()]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::Truncated { .. })
        ),
        "{err:?}"
    );

    // Not a record at all.
    let (err, _, _) =
        fails_on_last(&[prefix.clone(), vec![b"GET / HTTP/1.1\r\n".to_vec()]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnknownRecordType(b'G'))
        ),
        "{err:?}"
    );

    // Not a migration stream.
    let mut h = header();
    h[RECORD_HEADER_LEN] = b'X';
    migrate_core::protocol::reseal(&mut h);
    let (err, _, _) = fails_on_last(&[h]);
    assert!(
        matches!(err, MigrationError::Protocol(ProtocolError::BadMagic)),
        "{err:?}"
    );

    // A record before the header.
    let (err, _, _) = fails_on_last(&[layout_frame(&src.layout)]);
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnexpectedRecord {
                got: RecordType::Layout,
                ..
            })
        ),
        "{err:?}"
    );

    // A second layout.
    let (err, _, _) = fails_on_last(&[prefix.clone(), vec![layout_frame(&src.layout)]].concat());
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnexpectedRecord {
                got: RecordType::Layout,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);

    // A protocol version from the future.
    let (err, _, _) = fails_on_last(&[encode_to_vec(&Record::Header {
        version: VERSION + 1,
    })]);
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::UnsupportedVersion(v)) if v == VERSION + 1
        ),
        "{err:?}"
    );
}

/// Before the guest runs here, a page batch is placed as its CRC is
/// checked: a batch damaged in its last page has its first pages placed
/// before the CRC fails. The migration then fails with the CRC error and
/// the guest is never resumed, so what was placed is never used.
#[test]
fn a_damaged_batch_placed_in_part_fails_without_resuming() {
    // Page 1 differs between the two; the damage is in the last page.
    let (before, after) = postcopy_source();
    let all: Vec<PageNum> = after.layout.pages().collect();
    let damaged = |round| {
        let mut bad = pages(&after, round, &all);
        let at = bad.len() - 20;
        bad[at] ^= 1;
        bad
    };
    for stream in [
        // A pre-copy round.
        vec![header(), layout_frame(&after.layout), damaged(1)],
        // The stop-and-copy round, the guest paused on both sides.
        [
            vec![header(), layout_frame(&before.layout)],
            all_pages(&before, 1),
            vec![round_end(1, all.len() as u64), switch_over(2), damaged(2)],
        ]
        .concat(),
    ] {
        let (err, memory, guest) = fails_on_last(&stream);
        assert!(
            matches!(
                err,
                MigrationError::Protocol(ProtocolError::FrameChecksum { .. })
            ),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
        // Placed before the verdict.
        assert_eq!(memory.page(DIRTIED[0]), after.page(DIRTIED[0]));
        assert!(guest.restored.is_none() && !guest.resumed);
    }
}

/// Once the guest runs here (post-copy), a page batch is checked before
/// any of its pages is placed: a damaged one places nothing.
#[test]
fn a_damaged_batch_in_postcopy_places_nothing() {
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        assert_eq!(e.handle_frame(&f).unwrap(), DestStatus::Continue);
    }
    assert_eq!(e.handle_frame(&state_frame()).unwrap(), DestStatus::Resumed);
    let mut bad = pages(&after, 2, &DIRTIED);
    let at = bad.len() - 20;
    bad[at] ^= 1;
    let err = e.handle_frame(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::FrameChecksum { .. })
        ),
        "{err:?}"
    );
    for p in DIRTIED {
        assert!(!e.has_page(p), "page {p} counted as here");
    }
    let (memory, _) = e.into_parts();
    for p in DIRTIED {
        assert!(memory.page(p).iter().all(|b| *b == 0), "page {p} written");
    }
}

#[test]
fn frames_after_a_failure_are_invalid_use() {
    let src = source();
    let stream = good_stream(&src);
    // Header, layout and the first half of the pages arrive.
    let mut e = engine();
    for f in &stream[..3] {
        e.handle_frame(f).unwrap();
    }
    // A bad frame fails the engine...
    assert!(matches!(
        e.handle_frame(&encode_to_vec(&Record::Ready)),
        Err(MigrationError::UnexpectedRecord {
            got: RecordType::Ready,
            ..
        })
    ));
    // ...and the rest of a perfectly good stream is refused.
    for f in &stream[3..] {
        assert!(matches!(
            e.handle_frame(f),
            Err(MigrationError::InvalidUse(_))
        ));
    }
    assert!(!e.resumed());
    let (memory, guest) = e.into_parts();
    assert!(!guest.resumed);
    assert!(guest.restored.is_none());
    // What arrived before the failure stays written; nothing after it is.
    let all: Vec<PageNum> = src.layout.pages().collect();
    let (first, second) = all.split_at(all.len() / 2);
    for p in first {
        assert_eq!(memory.page(*p), src.page(*p), "page {p}");
    }
    for p in second {
        assert!(memory.page(*p).iter().all(|b| *b == 0), "page {p}");
    }
    assert!(second.iter().any(|p| src.page(*p).iter().any(|b| *b != 0)));
}

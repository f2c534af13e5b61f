//! Post-copy.

use super::*;

#[test]
fn a_postcopy_stream_resumes_on_device_state_and_completes() {
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        assert_eq!(e.handle_frame(&f).unwrap(), DestStatus::Continue);
    }
    assert!(!e.resumed());
    assert_eq!(e.handle_frame(&state_frame()).unwrap(), DestStatus::Resumed);
    assert!(e.resumed() && e.in_postcopy() && !e.completed());
    for p in DIRTIED {
        assert!(!e.has_page(p));
    }
    assert_eq!(
        e.handle_frame(&pages(&after, 2, &DIRTIED)).unwrap(),
        DestStatus::Continue
    );
    let total = after.layout.total_pages();
    assert_eq!(
        e.handle_frame(&complete(total, after.digest())).unwrap(),
        DestStatus::Completed
    );
    assert!(e.completed());
    let mut d = Decoder::new();
    let replies: Vec<RecordType> = std::iter::from_fn(|| e.poll_transmit())
        .map(|f| d.decode(&f).unwrap().record_type())
        .collect();
    assert_eq!(
        replies,
        vec![
            RecordType::Header,
            RecordType::Capabilities,
            RecordType::Ready,
            RecordType::Resumed,
            RecordType::Verified
        ]
    );
    assert_eq!(e.report().digest, Some(after.digest()));
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(guest.restored, Some(device_state()));
    assert_eq!(memory.bytes, after.bytes);
}

#[test]
fn discard_in_a_precopy_stream_is_unexpected() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(switch_over(2));
    stream.push(discard(&[(1, 1)]));
    let (err, _, _) = fails_on_last(&stream);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::Discard,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn discard_before_switch_over_is_unexpected() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(discard(&[(1, 1)]));
    let (err, memory, _) = fails_on_last(&stream);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::Discard,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(memory.page(1), src.page(1));
}

#[test]
fn discard_into_a_hole_is_out_of_range() {
    let src = source();
    for (ranges, bad) in [
        (vec![(HOLE, 1)], HOLE),
        // From guest memory into the hole after page 5.
        (vec![(2, 1), (4, 4)], 6),
        // Past the end, and as far as the protocol allows.
        (vec![(15, 2)], 16),
        (vec![(10, (1 << 52) - 10)], 16),
    ] {
        let mut stream = vec![header(), layout_frame(&src.layout)];
        stream.extend(all_pages(&src, 1));
        stream.push(postcopy_switch_over(2));
        stream.push(discard(&ranges));
        let (err, _, _) = fails_on_last(&stream);
        assert!(
            matches!(err, MigrationError::PageOutOfRange(p) if p == bad),
            "{ranges:?}: {err:?}"
        );
    }
}

#[test]
fn postcopy_completion_with_missing_pages() {
    // The guest already runs here (post-copy resumes on the device state),
    // but a discarded page never came back: the migration cannot complete.
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        e.handle_frame(&f).unwrap();
    }
    assert_eq!(e.handle_frame(&state_frame()).unwrap(), DestStatus::Resumed);
    e.handle_frame(&pages(&after, 2, &[1])).unwrap();
    let total = after.layout.total_pages();
    let err = e
        .handle_frame(&complete(total, after.digest()))
        .unwrap_err();
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("1 of 12"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!e.completed());
    assert!(!e.has_page(14));
    assert!(matches!(
        e.handle_frame(&pages(&after, 2, &[14])),
        Err(MigrationError::InvalidUse(_))
    ));
    let replies: Vec<Vec<u8>> = std::iter::from_fn(|| e.poll_transmit()).collect();
    let mut d = Decoder::new();
    assert!(replies
        .iter()
        .all(|f| d.decode(f).unwrap().record_type() != RecordType::Verified));
}

#[test]
fn postcopy_completion_whose_digest_does_not_match() {
    // The source pushed stale content for a discarded page.
    let (before, after) = postcopy_source();
    let mut e = engine();
    for f in postcopy_prefix(&before) {
        e.handle_frame(&f).unwrap();
    }
    e.handle_frame(&state_frame()).unwrap();
    e.handle_frame(&pages(&after, 2, &[1])).unwrap();
    e.handle_frame(&pages(&before, 2, &[14])).unwrap();
    let total = after.layout.total_pages();
    let err = e
        .handle_frame(&complete(total, after.digest()))
        .unwrap_err();
    let mut arrived = after.clone();
    arrived.page_mut(14).copy_from_slice(before.page(14));
    match err {
        MigrationError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, completion_digest(after.digest(), &device_state()));
            assert_eq!(actual, completion_digest(arrived.digest(), &device_state()));
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.completed());
}

//! Incomplete streams.

use super::*;

#[test]
fn completion_without_switch_over() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(round_end(1, src.layout.total_pages()));
    stream.push(complete(src.layout.total_pages(), src.digest()));
    let (err, _, guest) = fails_on_last(&stream);
    assert!(matches!(err, MigrationError::Incomplete(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
    assert!(guest.restored.is_none());
}

#[test]
fn device_state_before_switch_over_is_unexpected() {
    let src = source();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(state_frame());
    let (err, _, _) = fails_on_last(&stream);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::DeviceState,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn completion_with_missing_pages() {
    let src = source();
    let total = src.layout.total_pages();
    // Every page but one (page 12), in one batch.
    let some: Vec<PageNum> = src.layout.pages().filter(|p| *p != 12).collect();
    let stream = vec![
        header(),
        layout_frame(&src.layout),
        pages(&src, 1, &some),
        switch_over(2),
        state_frame(),
        complete(total, src.digest()),
    ];
    let (err, memory, guest) = fails_on_last(&stream);
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("1 of 12"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(guest.restored.is_none());
    // The pages that did arrive were written.
    for p in some {
        assert_eq!(memory.page(p), src.page(p));
    }
}

#[test]
fn completion_that_miscounts_the_pages() {
    let src = source();
    let mut stream = good_stream(&src);
    let last = stream.len() - 1;
    stream[last] = complete(src.layout.total_pages() + 1, src.digest());
    let (err, _, _) = fails_on_last(&stream);
    assert!(matches!(err, MigrationError::Incomplete(_)), "{err:?}");
}

#[test]
fn completion_without_device_state() {
    let src = source();
    let mut stream = good_stream(&src);
    let state = stream.len() - 2;
    assert_eq!(stream[state], state_frame());
    stream.remove(state);
    let (err, _, guest) = fails_on_last(&stream);
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("device state"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(guest.restored.is_none());
}

#[test]
fn completion_whose_digest_does_not_match() {
    let src = source();
    // The source claims memory other than what it sent: one byte differs.
    let mut claimed = src.clone();
    claimed.page_mut(13)[100] ^= 0x40;
    let mut stream = good_stream(&src);
    let last = stream.len() - 1;
    stream[last] = complete(src.layout.total_pages(), claimed.digest());
    let (err, memory, guest) = fails_on_last(&stream);
    match err {
        MigrationError::DigestMismatch { expected, actual } => {
            assert_eq!(
                expected,
                completion_digest(claimed.digest(), &device_state())
            );
            assert_eq!(actual, completion_digest(src.digest(), &device_state()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(memory.bytes, src.bytes);
    assert!(
        guest.restored.is_none(),
        "state restored before verification"
    );
}

#[test]
fn pages_corrupted_in_a_valid_frame_fail_the_digest() {
    // A page batch that is well formed but carries wrong content (a
    // corrupt source read) is caught by the digest.
    let src = source();
    let mut wrong = src.clone();
    wrong.page_mut(4).fill(0xee);
    let mut stream = good_stream(&src);
    let final_batch = stream.len() - 4;
    stream.insert(final_batch + 1, pages(&wrong, 2, &[4]));
    let (err, memory, _) = fails_on_last(&stream);
    match err {
        MigrationError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, completion_digest(src.digest(), &device_state()));
            assert_eq!(actual, completion_digest(wrong.digest(), &device_state()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(memory.page(4), wrong.page(4));
}

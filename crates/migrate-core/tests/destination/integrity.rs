//! Integrity: what the destination checks before it resumes.

use super::*;

/// Finding 1: a post-copy resume with a page that was neither received
/// nor discarded (a lost batch or a lost discard) is refused: the guest
/// would see memory that is not the source's.
#[test]
fn postcopy_resume_with_a_page_neither_received_nor_discarded_is_refused() {
    let (before, _) = postcopy_source();
    let all: Vec<PageNum> = before.layout.pages().collect();
    // Every page but 12 arrives; pages 1 and 14 are discarded.
    let sent: Vec<PageNum> = all.iter().copied().filter(|p| *p != 12).collect();
    let frames = vec![
        header(),
        layout_frame(&before.layout),
        pages(&before, 1, &sent),
        round_end(1, sent.len() as u64),
        postcopy_switch_over(2),
        discard(&[(1, 1), (14, 1)]),
        state_frame(),
    ];
    let (err, _, guest) = fails_on_last(&frames);
    match &err {
        MigrationError::Incomplete(why) => assert!(why.contains("1 of 12"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::PeerMisbehaved);
    assert!(guest.restored.is_none(), "state restored");
}

/// Finding 1: the completion check covers memory as the destination
/// holds it: a sink that stores a page wrongly fails it, although every
/// page arrived intact.
#[test]
fn completion_checks_memory_as_the_destination_holds_it() {
    let src = source();
    let mut e = engine();
    e.inner = DestinationEngine::new(
        TestMemory {
            corrupt_page: Some(13),
            ..TestMemory::zeroed(&layout())
        },
        TestGuest::default(),
        Arc::new(VirtualClock::new()),
    );
    let stream = good_stream(&src);
    let (last, init) = stream.split_last().unwrap();
    for f in init {
        assert_eq!(e.handle_frame(f).unwrap(), DestStatus::Continue);
    }
    let err = e.handle_frame(last).unwrap_err();
    assert!(
        matches!(err, MigrationError::DigestMismatch { .. }),
        "{err}"
    );
    assert!(!e.resumed());
    let (_, guest) = e.into_parts();
    assert!(guest.restored.is_none() && !guest.resumed);
}

/// Finding 1: the completion digest covers the device state: a state
/// other than the one the source saved (altered, or from another run) is
/// refused before it is restored.
#[test]
fn completion_checks_the_device_state() {
    let src = source();
    let mut stream = good_stream(&src);
    let state_at = stream.len() - 2;
    let mut other = device_state();
    other.data[3] ^= 1;
    stream[state_at] = encode_to_vec(&Record::DeviceState(other));
    let (err, memory, guest) = fails_on_last(&stream);
    assert!(
        matches!(err, MigrationError::DigestMismatch { .. }),
        "{err}"
    );
    assert_eq!(memory.bytes, src.bytes, "memory itself was whole");
    assert!(guest.restored.is_none());
}

/// Finding 1: a lost, repeated or altered frame anywhere in a good
/// stream never lets the guest resume.
#[test]
fn no_lost_repeated_or_altered_frame_lets_the_guest_resume() {
    let src = source();
    let stream = sealed(good_stream(&src));
    for k in 0..stream.len() {
        let mut variants: Vec<Vec<Vec<u8>>> = Vec::new();
        // Lost.
        let mut lost = stream.clone();
        lost.remove(k);
        variants.push(lost);
        // Repeated.
        let mut repeated = stream.clone();
        repeated.insert(k, stream[k].clone());
        variants.push(repeated);
        // Altered: one byte flipped in the middle.
        let mut altered = stream.clone();
        let mid = altered[k].len() / 2;
        altered[k][mid] ^= 0x04;
        variants.push(altered);
        for (v, frames) in variants.into_iter().enumerate() {
            let mut e = engine();
            let mut resumed_at = None;
            for (i, f) in frames.iter().enumerate() {
                match e.inner.handle_frame(f) {
                    Ok(DestStatus::Continue) => {}
                    Ok(_) => {
                        resumed_at = Some(i);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Only a repeat of the completion itself, after the whole
            // stream arrived intact, comes after the resume.
            let fine = v == 1 && resumed_at.is_some_and(|i| i <= k);
            assert!(
                resumed_at.is_none() || fine,
                "frame {k}, variant {v}: resumed at {resumed_at:?}"
            );
        }
    }
}

/// Finding 4: the kinds a caller acts on.
#[test]
fn error_kinds_for_unknown_outcomes() {
    assert_eq!(
        MigrationError::OutcomeUnknown("cut".into()).kind(),
        ErrorKind::Settle
    );
    assert_eq!(
        MigrationError::SourceLost("cut".into()).kind(),
        ErrorKind::Settle
    );
    assert_eq!(
        MigrationError::Transport(TransportError::Closed).kind(),
        ErrorKind::Retry
    );
    assert_eq!(
        MigrationError::Incomplete("short".into()).kind(),
        ErrorKind::PeerMisbehaved
    );
}

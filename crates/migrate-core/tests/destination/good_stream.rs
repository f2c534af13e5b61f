//! The good stream.

use super::*;

#[test]
fn a_complete_stream_resumes_the_guest() {
    let src = source();
    let stream = good_stream(&src);
    let mut e = engine();
    let (last, init) = stream.split_last().unwrap();
    for f in init {
        assert_eq!(e.handle_frame(f).unwrap(), DestStatus::Continue);
        assert!(!e.resumed());
    }
    assert_eq!(e.handle_frame(last).unwrap(), DestStatus::Completed);
    assert!(e.resumed());
    assert!(e.completed());
    assert!(!e.in_postcopy());

    // Replies: our header, the codecs we take, ready, resumed.
    let mut d = Decoder::new();
    let replies: Vec<Vec<u8>> = std::iter::from_fn(|| e.poll_transmit()).collect();
    assert_eq!(replies.len(), 4);
    assert_eq!(
        d.decode(&replies[0]),
        Ok(Record::Header { version: VERSION })
    );
    assert_eq!(
        d.decode(&replies[1]),
        Ok(Record::Capabilities(Capabilities::ALL))
    );
    assert_eq!(d.decode(&replies[2]), Ok(Record::Ready));
    assert_eq!(
        d.decode(&replies[3]),
        Ok(Record::Resumed(e.report().resume))
    );

    let report = e.report().clone();
    let zero = src
        .layout
        .pages()
        .filter(|p| src.page(*p).iter().all(|b| *b == 0))
        .count() as u64;
    assert!(zero > 0);
    assert_eq!(report.pages_received, src.layout.total_pages() + 2);
    assert_eq!(report.zero_pages, zero);
    assert_eq!(report.rounds, 2);
    assert_eq!(report.digest, Some(src.digest()));
    assert_eq!(
        report.bytes_received,
        stream.iter().map(|f| f.len() as u64).sum::<u64>()
    );

    // Nothing is taken after the resume.
    assert!(matches!(
        e.handle_frame(&round_end(3, 0)),
        Err(MigrationError::InvalidUse(_))
    ));
    assert!(e.resumed());

    let (mut memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(guest.restored, Some(device_state()));
    assert_eq!(memory.bytes, src.bytes);
    // The digest the test computes is the library's.
    let mut src = src;
    assert_eq!(digest_memory(&mut src, &layout()).unwrap(), memory.digest());
    assert_eq!(
        digest_memory(&mut memory, &layout()).unwrap(),
        report.digest.unwrap()
    );
}

#[test]
fn a_stream_that_stops_early_never_resumes() {
    let src = source();
    let stream = good_stream(&src);
    // Every prefix of the stream short of completion.
    for cut in 0..stream.len() {
        let mut e = engine();
        for f in &stream[..cut] {
            assert_eq!(e.handle_frame(f).unwrap(), DestStatus::Continue);
        }
        assert!(!e.resumed(), "resumed after {cut} frames");
        assert!(!e.completed());
        // The driver gives up on a stream that ended; the guest stays put.
        e.fail();
        assert!(!e.resumed());
        assert!(matches!(
            e.handle_frame(&stream[cut]),
            Err(MigrationError::InvalidUse(_))
        ));
        let (_, guest) = e.into_parts();
        assert!(!guest.resumed);
        assert!(guest.restored.is_none());
    }
}

/// A source that asks for round acknowledgements (a capabilities record
/// of its own after the layout) is sent `RoundReceived` for each pre-copy
/// round marker, once the round's pages are placed; the final copy's
/// marker is not answered. A source that does not ask is never sent one
/// (the good stream above has four replies).
#[test]
fn pre_copy_round_markers_are_answered_when_the_source_asks() {
    let src = source();
    let total = src.layout.total_pages();
    let mut stream = vec![
        header(),
        layout_frame(&src.layout),
        encode_to_vec(&Record::Capabilities(Capabilities::ROUND_RECEIVED)),
    ];
    stream.extend(all_pages(&src, 1));
    stream.push(round_end(1, total));
    stream.push(pages(&src, 2, &[3]));
    stream.push(round_end(2, 1));
    stream.push(switch_over(3));
    stream.push(pages(&src, 3, &[1, 14]));
    stream.push(round_end(3, 2));
    stream.push(state_frame());
    stream.push(complete(total, src.digest()));
    let mut e = engine();
    let mut d = Decoder::new();
    let mut answered = Vec::new();
    for f in &stream {
        e.handle_frame(f).unwrap();
        while let Some(r) = e.poll_transmit() {
            if let Ok(Record::RoundReceived { round }) = d.decode(&r) {
                answered.push((round, e.report().pages_received));
            }
        }
    }
    assert!(e.completed() && e.resumed());
    assert_eq!(e.report().digest, Some(src.digest()));
    assert_eq!(answered, [(1, total), (2, total + 1)]);
}

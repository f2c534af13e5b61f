//! The blocking driver over a destination engine.

use super::*;

#[test]
fn driver_reports_a_closed_stream_and_does_not_resume() {
    let src = source();
    let stream = sealed(good_stream(&src));
    let half = stream.len() / 2;
    assert!(half > 2);
    let (mut source_end, mut dest_end) = channel_pair(stream.len());
    let sender = std::thread::spawn(move || {
        for f in &stream[..half] {
            source_end.send(f).unwrap();
        }
        // Take the destination's replies, so only the end of the stream
        // can fail it, then go away.
        let mut d = Decoder::new();
        let mut replies = Vec::new();
        for _ in 0..3 {
            let f = source_end
                .recv(Some(Duration::from_secs(30)))
                .unwrap()
                .expect("reply in time");
            replies.push(d.decode(&f).unwrap().record_type());
        }
        drop(source_end);
        replies
    });
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut dest_end, None, Duration::from_secs(30));
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert_eq!(
        sender.join().unwrap(),
        vec![
            RecordType::Header,
            RecordType::Capabilities,
            RecordType::Ready
        ]
    );
    assert!(!e.resumed());
    // The half that arrived was applied; the engine takes nothing more.
    assert_eq!(e.report().pages_received, src.layout.total_pages());
    assert!(matches!(
        e.handle_frame(&switch_over(2)),
        Err(MigrationError::InvalidUse(_))
    ));
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
    assert!(guest.restored.is_none());
}

#[test]
fn driver_reports_a_source_gone_before_reading_replies() {
    let src = source();
    let stream = sealed(good_stream(&src));
    let (mut source_end, mut dest_end) = channel_pair(stream.len());
    for f in &stream[..stream.len() - 1] {
        source_end.send(f).unwrap();
    }
    drop(source_end);
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut dest_end, None, Duration::from_secs(30));
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert!(!e.resumed());
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
}

#[test]
fn driver_sends_an_abort_back_on_a_bad_stream() {
    let src = source();
    let (mut source_end, mut dest_end) = channel_pair(16);
    for f in sealed(vec![
        header(),
        layout_frame(&src.layout),
        encode_to_vec(&Record::PageRequest(vec![1])),
    ]) {
        source_end.send(&f).unwrap();
    }
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut dest_end, None, Duration::from_secs(30));
    assert!(
        matches!(
            r,
            Err(MigrationError::UnexpectedRecord {
                got: RecordType::PageRequest,
                ..
            })
        ),
        "{r:?}"
    );
    // The source hears header, ready, then why the destination gave up.
    let mut d = Decoder::new();
    let mut got = Vec::new();
    while let Some(f) = source_end.recv(Some(Duration::ZERO)).unwrap() {
        got.push(d.decode(&f).unwrap().record_type());
    }
    assert_eq!(
        got,
        vec![
            RecordType::Header,
            RecordType::Capabilities,
            RecordType::Ready,
            RecordType::Abort
        ]
    );
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
}

#[test]
fn driver_runs_a_good_stream_to_resume() {
    let src = source();
    let stream = sealed(good_stream(&src));
    let (mut source_end, mut dest_end) = channel_pair(stream.len());
    for f in &stream {
        source_end.send(f).unwrap();
    }
    let mut e = engine();
    let report =
        run_destination(&mut e.inner, &mut dest_end, None, Duration::from_secs(30)).unwrap();
    assert_eq!(report.digest, Some(src.digest()));
    assert!(report.resume_confirmed);
    assert!(e.resumed());
    let mut d = Decoder::new();
    let mut got = Vec::new();
    while let Some(f) = source_end.recv(Some(Duration::ZERO)).unwrap() {
        got.push(d.decode(&f).unwrap().record_type());
    }
    assert_eq!(
        got,
        vec![
            RecordType::Header,
            RecordType::Capabilities,
            RecordType::Ready,
            RecordType::Resumed
        ]
    );
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(memory.bytes, src.bytes);
}

/// A transport that hands out a fixed list of frames, then reports the
/// source gone, and whose sends fail once `sends_ok` frames went out.
struct Scripted {
    incoming: std::collections::VecDeque<Vec<u8>>,
    sends_ok: usize,
    decoder: Decoder,
    sent: Vec<RecordType>,
}

impl Scripted {
    fn new(incoming: Vec<Vec<u8>>, sends_ok: usize) -> Self {
        Scripted {
            incoming: incoming.into(),
            sends_ok,
            decoder: Decoder::new(),
            sent: Vec::new(),
        }
    }
}

impl Transport for Scripted {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if self.sent.len() == self.sends_ok {
            return Err(TransportError::Closed);
        }
        let r = self.decoder.decode(frame).expect("replies decode");
        self.sent.push(r.record_type());
        Ok(())
    }

    fn recv(&mut self, _timeout: Option<Duration>) -> Result<Option<bytes::Bytes>, TransportError> {
        match self.incoming.pop_front() {
            Some(f) => Ok(Some(f.into())),
            None => Err(TransportError::Closed),
        }
    }
}

#[test]
fn driver_keeps_a_resumed_guest_when_the_confirmation_is_lost() {
    // The whole stream arrives, but the source is gone before the
    // resume confirmation can go back: the guest runs here, so this is a
    // success whose confirmation is missing, not a failure.
    let src = source();
    let mut t = Scripted::new(sealed(good_stream(&src)), 3);
    let mut e = engine();
    let report = run_destination(&mut e.inner, &mut t, None, Duration::from_secs(1)).unwrap();
    assert!(!report.resume_confirmed);
    assert_eq!(report.digest, Some(src.digest()));
    assert_eq!(
        t.sent,
        vec![
            RecordType::Header,
            RecordType::Capabilities,
            RecordType::Ready
        ]
    );
    assert!(e.completed());
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(memory.bytes, src.bytes);
}

#[test]
fn driver_does_not_resume_when_replies_cannot_be_sent() {
    // The source stops listening after our header: the layout's Ready
    // cannot go back, and the engine is failed.
    let src = source();
    let mut t = Scripted::new(sealed(good_stream(&src)), 1);
    let mut e = engine();
    let r = run_destination(&mut e.inner, &mut t, None, Duration::from_secs(1));
    assert!(
        matches!(r, Err(MigrationError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert_eq!(t.sent, vec![RecordType::Header]);
    assert!(!e.resumed());
    assert!(matches!(
        e.handle_frame(&t.incoming[0]),
        Err(MigrationError::InvalidUse(_))
    ));
    let (_, guest) = e.into_parts();
    assert!(!guest.resumed);
    assert!(guest.restored.is_none());
}

fn discard_bitmap(first_page: PageNum, words: Vec<u64>) -> Vec<u8> {
    encode_to_vec(&Record::DiscardBitmap { first_page, words })
}

#[test]
fn discards_must_ascend_across_the_stream() {
    // Twice over the same pages: a source could otherwise make the
    // destination walk guest memory once per record.
    let src = source();
    for second in [discard(&[(1, 2)]), discard_bitmap(0, vec![0b10])] {
        let mut stream = vec![header(), layout_frame(&src.layout)];
        stream.extend(all_pages(&src, 1));
        stream.push(postcopy_switch_over(2));
        stream.push(discard(&[(1, 3)]));
        stream.push(second);
        let (err, _, guest) = fails_on_last(&stream);
        assert!(
            matches!(
                err,
                MigrationError::Protocol(ProtocolError::OutOfRange { .. })
            ),
            "{err:?}"
        );
        assert!(!guest.resumed);
    }
}

#[test]
fn discard_bitmap_marks_pages_absent_and_rejects_holes() {
    let src = source();
    // Pages 1 and 3 absent, then the completion says pages never arrived.
    let mut e = engine();
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(postcopy_switch_over(2));
    stream.push(discard_bitmap(0, vec![0b1010]));
    for f in &stream {
        e.handle_frame(f).unwrap();
    }
    assert!(!e.has_page(1) && !e.has_page(3) && e.has_page(2));
    // Bit 6 is page 6, in the hole.
    let mut stream = vec![header(), layout_frame(&src.layout)];
    stream.extend(all_pages(&src, 1));
    stream.push(postcopy_switch_over(2));
    stream.push(discard_bitmap(0, vec![1 << 6]));
    let (err, _, _) = fails_on_last(&stream);
    assert!(matches!(err, MigrationError::PageOutOfRange(6)), "{err:?}");
}

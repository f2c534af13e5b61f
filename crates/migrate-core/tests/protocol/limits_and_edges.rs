//! Limits and edges.

use super::*;

#[test]
fn largest_records_round_trip() {
    let d = decoder_after_header;

    let regions: Vec<Region> = (0..MAX_REGIONS as u64).map(|i| region(i * 3, 2)).collect();
    let layout = Record::Layout(MemoryLayout::new(PageSize::DEFAULT, regions).unwrap());
    let f = encode_to_vec(&layout);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(f.len() - RECORD_HEADER_LEN, RecordType::Layout.max_body());
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(d().decode(&f), Ok(layout));

    let request = Record::PageRequest((0..MAX_REQUEST_PAGES as u64).collect());
    let f = encode_to_vec(&request);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(
        f.len() - RECORD_HEADER_LEN,
        RecordType::PageRequest.max_body()
    );
    assert_eq!(d().decode(&f), Ok(request));

    let request = Record::PreemptRequest((0..MAX_REQUEST_PAGES as u64).collect());
    let f = encode_to_vec(&request);
    assert_eq!(
        f.len() - RECORD_HEADER_LEN,
        RecordType::PreemptRequest.max_body()
    );
    assert_eq!(d().decode(&f), Ok(request));

    let discard = Record::Discard(
        (0..MAX_DISCARD_RANGES as u64)
            .map(|i| (i * 1000, 999))
            .chain(std::iter::once((MAX_PAGE_END - 1, 1)))
            .skip(1)
            .collect(),
    );
    let f = encode_to_vec(&discard);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(f.len() - RECORD_HEADER_LEN, RecordType::Discard.max_body());
    assert_eq!(d().decode(&f), Ok(discard));

    let abort = Record::Abort {
        reason: "x".repeat(MAX_TEXT),
    };
    let f = encode_to_vec(&abort);
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(f.len() - RECORD_HEADER_LEN, RecordType::Abort.max_body());
    assert_eq!(d().decode(&f), Ok(abort));

    let state = Record::DeviceState(DeviceState {
        format: "f".repeat(MAX_TEXT),
        version: 7,
        data: vec![0xa5; MAX_DEVICE_STATE],
    });
    let f = encode_to_vec(&state);
    assert_eq!(
        f.len() - RECORD_HEADER_LEN,
        RecordType::DeviceState.max_body()
    );
    assert!(f.len() <= MAX_FRAME_LEN);
    assert_eq!(d().decode(&f), Ok(state));
}

#[test]
fn largest_device_state_crosses_a_stream_transport() {
    // The stream transport refuses frames above MAX_FRAME_LEN, so the
    // largest record the protocol allows must still get through.
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = StreamTransport::new(a).unwrap();
    let mut rx = StreamTransport::new(b).unwrap();
    let state = DeviceState {
        format: "f".repeat(MAX_TEXT),
        version: 3,
        data: (0..MAX_DEVICE_STATE).map(|i| (i % 253) as u8).collect(),
    };
    let frame = encode_to_vec(&Record::DeviceState(state.clone()));
    let sender = std::thread::spawn(move || tx.send(&frame).map(|()| tx));
    let got = rx
        .recv(Some(Duration::from_secs(60)))
        .expect("frame received")
        .expect("frame arrived in time");
    let _tx = sender.join().unwrap().expect("largest device state sent");
    assert_eq!(
        decoder_after_header().decode(&got),
        Ok(Record::DeviceState(state))
    );
}

#[test]
fn full_page_batches_round_trip() {
    for page_size in [ps(512), PageSize::DEFAULT, ps(2 << 20)] {
        let n = max_batch_pages(page_size);
        assert_eq!(n, (MAX_BATCH_DATA / page_size.get()).min(MAX_BATCH_PAGES));
        let pages: Vec<PageNum> = (0..n as u64).map(|i| MAX_PAGE_END - 1 - i).collect();
        let fill: Vec<u8> = (0..n).map(|i| (i % 251) as u8 + 1).collect();
        let frame = batch_frame(page_size, u32::MAX, &pages, &fill);
        assert!(frame.len() <= MAX_FRAME_LEN);
        let mut d = decoder_after_layout(page_size);
        let Ok(Record::PageBatch(b)) = d.decode(&frame) else {
            panic!("full batch of {page_size} pages refused");
        };
        assert_eq!(b.len(), n);
        assert_eq!(b.zero_pages(), 0);
        for ((p, data), (want_p, want_fill)) in b.iter().zip(pages.iter().zip(&fill)) {
            assert_eq!(p, *want_p);
            let data = data.expect("non-zero page has data");
            assert_eq!(data.len(), page_size.get());
            assert!(data.iter().all(|x| x == want_fill));
        }
    }
}

#[test]
fn long_abort_reasons_are_cut_at_a_char_boundary() {
    // 'é' is two bytes; MAX_TEXT + 1 bytes of them cut mid-character.
    let reason = format!("a{}", "é".repeat(MAX_TEXT / 2));
    assert_eq!(reason.len(), MAX_TEXT + 1);
    let f = encode_to_vec(&Record::Abort {
        reason: reason.clone(),
    });
    let Ok(Record::Abort { reason: got }) = decoder_after_header().decode(&f) else {
        panic!("long abort reason refused");
    };
    assert_eq!(got.len(), MAX_TEXT - 1);
    assert!(reason.starts_with(&got));
    assert_eq!(protocol::abort_frame(&reason), f);
}

#[test]
fn empty_layout_body_is_truncated_not_a_panic() {
    // Layouts must have at least one region.
    let mut body = Vec::new();
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
        Err(ProtocolError::Layout(LayoutError::NoRegions))
    );
}

//! Truncated and oversized.

use super::*;

#[test]
fn truncated() {
    // The frame is shorter than its record header.
    let f = header_frame();
    assert_eq!(
        Decoder::new().decode(&f[..5]),
        Err(ProtocolError::Truncated {
            what: "record header",
            needed: RECORD_HEADER_LEN,
            available: 5
        })
    );
    // The body is shorter than the header says.
    let f = encode_to_vec(&Record::RoundEnd {
        round: 1,
        pages_sent: 2,
    });
    assert_eq!(
        decoder_after_header().decode(&f[..f.len() - 1]),
        Err(ProtocolError::Truncated {
            what: "record body",
            needed: 16,
            available: 15
        })
    );
    // The body is shorter than its own fields say: two regions announced,
    // one present.
    let mut body = Vec::new();
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&8u64.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
        Err(ProtocolError::Truncated {
            what: "layout",
            needed: 8,
            available: 0
        })
    );
    // A page batch whose data stops short of its non-zero pages.
    let f = batch_frame(PageSize::DEFAULT, 1, &[1, 2], &[1, 0]);
    let mut short = f[RECORD_HEADER_LEN..batch_data_offset(2)].to_vec();
    short.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decoder_after_layout(PageSize::DEFAULT).decode(&raw_frame(3, &short)),
        Err(ProtocolError::Truncated {
            what: "page batch",
            needed: 4096,
            available: 8
        })
    ));
    // A device state whose data is shorter than announced.
    let f = encode_to_vec(&Record::DeviceState(DeviceState {
        format: "sim".into(),
        version: 1,
        data: vec![1, 2, 3],
    }));
    let mut body = f[RECORD_HEADER_LEN..].to_vec();
    body.pop();
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::DeviceState as u8, &body)),
        Err(ProtocolError::Truncated {
            what: "device state",
            needed: 3,
            available: 2
        })
    );
}

#[test]
fn counts_beyond_the_body_are_truncated_without_allocating() {
    // Counts at their limits, with almost no bytes behind them: the
    // decoder must not reserve room for what the count claims.
    let mut layout = raw_layout_body(4096, &[(0, 1)]);
    layout[4..8].copy_from_slice(&(MAX_REGIONS as u32).to_le_bytes());
    let mut request = Vec::new();
    request.extend_from_slice(&(MAX_REQUEST_PAGES as u32).to_le_bytes());
    request.extend_from_slice(&[0; 4]);
    request.extend_from_slice(&1u64.to_le_bytes());
    let mut state = Vec::new();
    state.extend_from_slice(&1u32.to_le_bytes());
    state.extend_from_slice(&0u32.to_le_bytes());
    state.extend_from_slice(&(MAX_DEVICE_STATE as u32).to_le_bytes());
    state.extend_from_slice(&[1; 16]);
    let mut batch = Vec::new();
    batch.extend_from_slice(&1u32.to_le_bytes());
    batch.extend_from_slice(&(MAX_BATCH_PAGES as u32).to_le_bytes());
    batch.extend_from_slice(&[0; 24]);
    let mut discard = Vec::new();
    discard.extend_from_slice(&(MAX_DISCARD_RANGES as u32).to_le_bytes());
    discard.extend_from_slice(&[0; 4]);
    discard.extend_from_slice(&1u64.to_le_bytes());
    discard.extend_from_slice(&1u64.to_le_bytes());
    for (code, body) in [
        (2u8, layout),
        (7, request),
        (5, state),
        (3, batch),
        (12, discard),
    ] {
        let f = raw_frame(code, &body);
        let mut d = decoder_after_layout(PageSize::DEFAULT);
        if code == 2 {
            d = decoder_after_header();
        }
        let (r, largest) = largest_allocation(|| d.decode(&f));
        assert!(
            matches!(r, Err(ProtocolError::Truncated { .. })),
            "type {code}: {r:?}"
        );
        assert!(
            largest <= f.len(),
            "type {code}: a {}-byte frame made a {largest}-byte allocation",
            f.len()
        );
    }
}

#[test]
fn oversized() {
    // A ready record has no body at all.
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Ready as u8, &[0])),
        Err(ProtocolError::Oversized {
            record: RecordType::Ready,
            len: 1,
            max: 0
        })
    );
    // A page batch claiming the whole largest frame as its body.
    assert_eq!(
        decoder_after_layout(PageSize::DEFAULT).decode(&raw_frame_len(
            RecordType::PageBatch as u8,
            MAX_FRAME_LEN as u32,
            &[]
        )),
        Err(ProtocolError::Oversized {
            record: RecordType::PageBatch,
            len: MAX_FRAME_LEN,
            max: RecordType::PageBatch.max_body()
        })
    );
    // One byte over each type's limit; exactly at the limit is not
    // oversized (merely truncated here, as no body follows).
    for (code, ty) in ALL_TYPES {
        let max = ty.max_body();
        assert_eq!(
            Decoder::new().decode(&raw_frame_len(code, max as u32 + 1, &[])),
            Err(ProtocolError::Oversized {
                record: ty,
                len: max + 1,
                max
            })
        );
        if max > 0 {
            assert!(matches!(
                Decoder::new().decode(&raw_frame_len(code, max as u32, &[])),
                Err(ProtocolError::Truncated { .. })
            ));
        }
    }
}

#[test]
fn every_record_fits_in_the_largest_frame() {
    // The transports refuse frames above MAX_FRAME_LEN, so every record
    // the decoder accepts must fit in one.
    for (_, ty) in ALL_TYPES {
        assert!(
            RECORD_HEADER_LEN + ty.max_body() <= MAX_FRAME_LEN,
            "a {ty:?} record may need {} bytes, more than MAX_FRAME_LEN {MAX_FRAME_LEN}",
            RECORD_HEADER_LEN + ty.max_body()
        );
    }
    assert!(ALL_TYPES
        .iter()
        .any(|(_, ty)| RECORD_HEADER_LEN + ty.max_body() == MAX_FRAME_LEN));
}

#[test]
fn huge_length_is_refused_without_allocating() {
    let started = Instant::now();
    for code in 1..=11u8 {
        for len in [u32::MAX, MAX_FRAME_LEN as u32, 1 << 31] {
            let f = raw_frame_len(code, len, &[]);
            for mut d in [
                Decoder::new(),
                decoder_after_header(),
                decoder_after_layout(PageSize::DEFAULT),
            ] {
                let (r, largest) = largest_allocation(|| d.decode(&f));
                assert!(
                    matches!(r, Err(ProtocolError::Oversized { len: l, .. }) if l == len as usize),
                    "type {code}, length {len}: {r:?}"
                );
                assert_eq!(
                    largest, 0,
                    "type {code}, length {len}: allocated {largest} bytes"
                );
            }
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn trailing_bytes() {
    // Bytes after the body the header announced.
    let mut f = encode_to_vec(&Record::SwitchOver {
        round: 3,
        postcopy: false,
    });
    f.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::SwitchOver,
            extra: 3
        })
    );
    // Bytes inside the body after the last field: a layout of one region
    // with room for two.
    let l = MemoryLayout::new(PageSize::DEFAULT, vec![region(0, 4)]).unwrap();
    let mut body = layout_frame(&l)[RECORD_HEADER_LEN..].to_vec();
    body.extend_from_slice(&[0; 16]);
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::Layout,
            extra: 16
        })
    );
    // An abort whose reason is shorter than its body.
    let mut body = encode_to_vec(&Record::Abort {
        reason: "no".into(),
    })[RECORD_HEADER_LEN..]
        .to_vec();
    body.push(b'!');
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Abort as u8, &body)),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::Abort,
            extra: 1
        })
    );
    // A page batch with bytes after its checksum.
    let f = batch_frame(PageSize::DEFAULT, 1, &[5], &[9]);
    let mut body = f[RECORD_HEADER_LEN..].to_vec();
    body.extend_from_slice(&[0; 5]);
    assert_eq!(
        decoder_after_layout(PageSize::DEFAULT).decode(&raw_frame(3, &body)),
        Err(ProtocolError::TrailingBytes {
            record: RecordType::PageBatch,
            extra: 5
        })
    );
}

#[test]
fn bad_magic() {
    let mut f = header_frame();
    assert_eq!(&f[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 8], &MAGIC);
    f[RECORD_HEADER_LEN + 7] = b'X';
    protocol::reseal(&mut f);
    assert_eq!(Decoder::new().decode(&f), Err(ProtocolError::BadMagic));
    // A refused header leaves the decoder waiting for one.
    let mut d = Decoder::new();
    assert_eq!(d.decode(&f), Err(ProtocolError::BadMagic));
    assert!(matches!(
        d.decode(&encode_to_vec(&Record::Ready)),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Ready,
            ..
        })
    ));
}

//! Out of range.

use super::*;

#[test]
fn out_of_range_page_number_in_batch() {
    let mut d = decoder_after_layout(PageSize::DEFAULT);
    let ok = batch_frame(PageSize::DEFAULT, 1, &[MAX_PAGE_END - 1], &[1]);
    assert!(d.decode(&ok).is_ok());
    for page in [MAX_PAGE_END, u64::MAX] {
        let f = batch_frame(PageSize::DEFAULT, 1, &[3, page], &[1, 0]);
        assert_eq!(
            d.decode(&f),
            Err(ProtocolError::OutOfRange {
                what: "page number",
                value: page
            })
        );
    }
}

#[test]
fn out_of_range_page_number_in_request() {
    let mut d = decoder_after_header();
    let ok = Record::PageRequest(vec![MAX_PAGE_END - 1]);
    assert_eq!(d.decode(&encode_to_vec(&ok)), Ok(ok));
    let f = encode_to_vec(&Record::PageRequest(vec![1, MAX_PAGE_END]));
    assert_eq!(
        d.decode(&f),
        Err(ProtocolError::OutOfRange {
            what: "page number",
            value: MAX_PAGE_END
        })
    );
    // More pages than one request may hold.
    let f = encode_to_vec(&Record::PageRequest(vec![0; MAX_REQUEST_PAGES + 1]));
    assert!(matches!(
        d.decode(&f),
        Err(ProtocolError::Oversized {
            record: RecordType::PageRequest,
            ..
        })
    ));
    let mut body = Vec::new();
    body.extend_from_slice(&(MAX_REQUEST_PAGES as u32 + 1).to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    assert_eq!(
        d.decode(&raw_frame(RecordType::PageRequest as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "requested page count",
            value: MAX_REQUEST_PAGES as u64 + 1
        })
    );
}

#[test]
fn out_of_range_region_count() {
    for count in [MAX_REGIONS as u32 + 1, u32::MAX] {
        let mut body = Vec::new();
        body.extend_from_slice(&4096u32.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::Layout as u8, &body)),
            Err(ProtocolError::OutOfRange {
                what: "region count",
                value: u64::from(count)
            })
        );
    }
}

#[test]
fn out_of_range_pages_in_batch() {
    for (page_size, most) in [(PageSize::DEFAULT, MAX_BATCH_PAGES), (ps(2 << 20), 4)] {
        assert_eq!(max_batch_pages(page_size), most);
        for n in [most as u32 + 1, u32::MAX] {
            let mut body = Vec::new();
            body.extend_from_slice(&1u32.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&[0; 64]);
            assert_eq!(
                decoder_after_layout(page_size).decode(&raw_frame(3, &body)),
                Err(ProtocolError::OutOfRange {
                    what: "pages in batch",
                    value: u64::from(n)
                })
            );
        }
    }
}

#[test]
fn out_of_range_other_fields() {
    let f = encode_to_vec(&Record::Complete {
        total_pages: MAX_PAGE_END + 1,
        digest: MemoryDigest(1),
    });
    assert_eq!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::OutOfRange {
            what: "total pages",
            value: MAX_PAGE_END + 1
        })
    );
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&(MAX_TEXT as u32 + 1).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::DeviceState as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "device state format length",
            value: MAX_TEXT as u64 + 1
        })
    );
    let mut body = Vec::new();
    body.extend_from_slice(&(MAX_TEXT as u32 + 1).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Abort as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "abort reason length",
            value: MAX_TEXT as u64 + 1
        })
    );
}

/// A discard body from raw ranges, unchecked.
fn raw_discard_body(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    for (first, count) in ranges {
        body.extend_from_slice(&first.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
    }
    body
}

#[test]
fn out_of_range_discard_ranges() {
    let frame =
        |ranges: &[(u64, u64)]| raw_frame(RecordType::Discard as u8, &raw_discard_body(ranges));
    let decode = |frame: &[u8]| -> Result<(), ProtocolError> {
        decoder_after_header().decode(frame).map(|_| ())
    };
    let ok: &[(u64, u64)] = &[(0, 1), (MAX_PAGE_END - 1, 1), (0, MAX_PAGE_END)];
    assert_eq!(
        decoder_after_header().decode(&frame(ok)),
        Ok(Record::Discard(ok.to_vec()))
    );
    assert_eq!(
        decode(&frame(&[(0, 1), (MAX_PAGE_END, 1)])),
        Err(ProtocolError::OutOfRange {
            what: "page number",
            value: MAX_PAGE_END
        })
    );
    for (first, count) in [
        (5, 0),
        (1, MAX_PAGE_END),
        (MAX_PAGE_END - 1, 2),
        (0, u64::MAX),
    ] {
        assert_eq!(
            decode(&frame(&[(first, count)])),
            Err(ProtocolError::OutOfRange {
                what: "discard range length",
                value: count
            }),
            "({first}, {count})"
        );
    }
    let mut body = Vec::new();
    body.extend_from_slice(&(MAX_DISCARD_RANGES as u32 + 1).to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Discard as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "discard range count",
            value: MAX_DISCARD_RANGES as u64 + 1
        })
    );
}

#[test]
fn out_of_range_switch_over_mode() {
    for (mode, postcopy) in [(0u32, false), (1, true)] {
        let mut body = 9u32.to_le_bytes().to_vec();
        body.extend_from_slice(&mode.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::SwitchOver as u8, &body)),
            Ok(Record::SwitchOver { round: 9, postcopy })
        );
    }
    for mode in [2u32, 0x100, u32::MAX] {
        let mut body = 9u32.to_le_bytes().to_vec();
        body.extend_from_slice(&mode.to_le_bytes());
        assert_eq!(
            decoder_after_header().decode(&raw_frame(RecordType::SwitchOver as u8, &body)),
            Err(ProtocolError::OutOfRange {
                what: "switch-over mode",
                value: u64::from(mode)
            })
        );
    }
}

/// `Populated` ranges share the discard body: they round-trip, and bad
/// ranges are refused under their own name.
#[test]
fn populated_ranges_round_trip_and_are_checked() {
    let ranges = vec![(0, 512), (1024, 1), (MAX_PAGE_END - 1, 1)];
    let rec = Record::Populated(ranges.clone());
    let f = encode_to_vec(&rec);
    assert_eq!(f[0], 21);
    assert_eq!(decoder_after_header().decode(&f), Ok(rec));
    let frame = raw_frame(
        RecordType::Populated as u8,
        &raw_discard_body(&[(0, 1), (MAX_PAGE_END - 1, 2)]),
    );
    assert_eq!(
        decoder_after_header().decode(&frame),
        Err(ProtocolError::OutOfRange {
            what: "populated range length",
            value: 2
        })
    );
    let frame = raw_frame(RecordType::Populated as u8, &raw_discard_body(&[(5, 0)]));
    assert_eq!(
        decoder_after_header().decode(&frame),
        Err(ProtocolError::OutOfRange {
            what: "populated range length",
            value: 0
        })
    );
}

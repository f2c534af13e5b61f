//! Versions and record order.

use super::*;

#[test]
fn unsupported_version() {
    for version in [0, VERSION + 1, u32::MAX] {
        let f = encode_to_vec(&Record::Header { version });
        assert_eq!(
            Decoder::new().decode(&f),
            Err(ProtocolError::UnsupportedVersion(version))
        );
    }
}

#[test]
fn unknown_record_type() {
    for code in [0u8, 23, 0x80, 255] {
        for mut d in [
            Decoder::new(),
            decoder_after_header(),
            decoder_after_layout(PageSize::DEFAULT),
        ] {
            assert_eq!(
                d.decode(&raw_frame(code, &[])),
                Err(ProtocolError::UnknownRecordType(code))
            );
        }
    }
}

#[test]
fn unexpected_page_batch_before_layout() {
    let f = batch_frame(PageSize::DEFAULT, 1, &[0], &[1]);
    assert!(matches!(
        decoder_after_header().decode(&f),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::PageBatch,
            ..
        })
    ));
}

#[test]
fn unexpected_record_before_header() {
    let layout = MemoryLayout::flat(PageSize::DEFAULT, 1 << 20).unwrap();
    let records = [
        Record::Layout(layout),
        Record::Ready,
        Record::Abort {
            reason: "early".into(),
        },
        Record::SwitchOver {
            round: 1,
            postcopy: true,
        },
    ];
    for r in records {
        let got = r.record_type();
        assert!(
            matches!(
                Decoder::new().decode(&encode_to_vec(&r)),
                Err(ProtocolError::UnexpectedRecord { got: g, .. }) if g == got
            ),
            "{got:?} accepted before the header"
        );
    }
    let f = batch_frame(PageSize::DEFAULT, 1, &[0], &[1]);
    assert!(matches!(
        Decoder::new().decode(&f),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::PageBatch,
            ..
        })
    ));
}

#[test]
fn unexpected_second_header() {
    let mut d = decoder_after_header();
    assert!(matches!(
        d.decode(&header_frame()),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Header,
            ..
        })
    ));
    let mut d = decoder_after_layout(PageSize::DEFAULT);
    assert!(matches!(
        d.decode(&header_frame()),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Header,
            ..
        })
    ));
}

#[test]
fn unexpected_second_layout() {
    let mut d = decoder_after_layout(ps(512));
    let other = MemoryLayout::flat(PageSize::DEFAULT, 1 << 20).unwrap();
    assert!(matches!(
        d.decode(&layout_frame(&other)),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Layout,
            ..
        })
    ));
    // The first layout's page size still applies.
    assert_eq!(d.page_size(), Some(ps(512)));
}

#[test]
fn session_records_refuse_bad_fields() {
    let mut body = 7u128.to_le_bytes().to_vec();
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Session as u8, &body)),
        Err(ProtocolError::OutOfRange {
            what: "session mode",
            value: 2
        })
    );
    body[16..20].copy_from_slice(&1u32.to_le_bytes());
    body[20] = 1;
    assert_eq!(
        decoder_after_header().decode(&raw_frame(RecordType::Session as u8, &body)),
        Err(ProtocolError::Malformed("session reserved field"))
    );
    let held = (MAX_PAGE_END + 1).to_le_bytes();
    assert!(matches!(
        decoder_after_header().decode(&raw_frame(RecordType::Recovered as u8, &held)),
        Err(ProtocolError::OutOfRange {
            what: "pages held",
            ..
        })
    ));
}

#[test]
fn a_resuming_decoder_takes_pages_without_a_layout_and_refuses_one() {
    let mut d = Decoder::resuming(PageSize::DEFAULT);
    let mut header = header_frame();
    protocol::seal(&mut header, 0);
    d.decode(&header).expect("the new connection's header");
    let mut batch = batch_frame(PageSize::DEFAULT, 1, &[0], &[1]);
    protocol::seal(&mut batch, 1);
    assert!(matches!(d.decode(&batch), Ok(Record::PageBatch(_))));
    let layout = MemoryLayout::new(PageSize::DEFAULT, vec![region(0, 16)]).unwrap();
    let mut again = layout_frame(&layout);
    protocol::seal(&mut again, 2);
    assert!(matches!(
        d.decode(&again),
        Err(ProtocolError::UnexpectedRecord {
            got: RecordType::Layout,
            ..
        })
    ));
}

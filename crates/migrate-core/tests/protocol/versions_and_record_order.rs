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
    for code in [0u8, 17, 18, 0x80, 255] {
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

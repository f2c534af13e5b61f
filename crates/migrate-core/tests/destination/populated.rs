//! `Populated` ranges: handed to the sink before the pages arrive, checked
//! against the layout, and taken only before the switch-over.

use super::*;

fn populated(ranges: &[(PageNum, u64)]) -> Vec<u8> {
    encode_to_vec(&Record::Populated(ranges.to_vec()))
}

/// The ranges reach the sink in order, the stream completes, and memory
/// is the source's.
#[test]
fn populated_ranges_reach_the_sink_before_the_pages() {
    let src = source();
    let mut stream = good_stream(&src);
    let ranges = [(1, 5), (10, 2), (13, 3)];
    // After the layout: two records, as a source sends more ranges than
    // fit in one.
    stream.insert(2, populated(&ranges[..1]));
    stream.insert(3, populated(&ranges[1..]));
    let mut e = engine();
    for (i, f) in stream.iter().enumerate() {
        let status = e.handle_frame(f).unwrap();
        if i == 3 {
            assert_eq!(e.inner.report().pages_received, 0);
        }
        assert_eq!(status == DestStatus::Completed, i == stream.len() - 1);
    }
    let (memory, guest) = e.into_parts();
    assert!(guest.resumed);
    assert_eq!(memory.expected, ranges);
    assert_eq!(memory.bytes, src.bytes);
}

/// A range outside the layout (into its hole, or past its end) is refused
/// with the page it reaches, and the guest never resumes.
#[test]
fn populated_ranges_outside_the_layout_are_refused() {
    for bad in [(4, 4), (HOLE, 1), (15, 2), (16, 1)] {
        let frames = vec![header(), layout_frame(&layout()), populated(&[(0, 2), bad])];
        let (err, memory, _) = fails_on_last(&frames);
        assert!(
            matches!(err, MigrationError::PageOutOfRange(_)),
            "{bad:?}: {err}"
        );
        assert!(memory.expected.is_empty(), "{bad:?}");
    }
}

/// After the switch-over the ranges come too late: refused.
#[test]
fn populated_ranges_after_the_switch_over_are_refused() {
    let src = source();
    let total = src.layout.total_pages();
    let mut frames = vec![header(), layout_frame(&src.layout)];
    frames.extend(all_pages(&src, 1));
    frames.push(round_end(1, total));
    frames.push(switch_over(2));
    frames.push(populated(&[(0, 2)]));
    let (err, _, _) = fails_on_last(&frames);
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedRecord {
                got: RecordType::Populated,
                ..
            }
        ),
        "{err}"
    );
}

//! The source announces its populated pages (`Record::Populated`) only to
//! a destination that said it takes them, after `Ready` and before the
//! first page batch, in as many records as the ranges need.

use backend_sim::{MemoryMode, SimGuest, SimPages, WorkloadKind, WorkloadSpec};
use migrate_core::protocol::{encode_to_vec, Capabilities, Decoder, Record, Sequencer, VERSION};
use migrate_core::{
    BackendError, Clock, EngineConfig, MemoryLayout, PageNum, PageSource, Precopy, SourceEngine,
    SourceStep, VirtualClock, MAX_PAGE_END,
};
use std::sync::Arc;

/// Simulated memory that says every other 2-page run is populated.
struct Announcing {
    inner: SimPages,
    ranges: Vec<(PageNum, u64)>,
}

impl PageSource for Announcing {
    fn layout(&self) -> &MemoryLayout {
        self.inner.layout()
    }
    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read_pages(pages, out)
    }
    fn populated_ranges(&mut self) -> Result<Option<Vec<(PageNum, u64)>>, BackendError> {
        Ok(Some(self.ranges.clone()))
    }
}

/// Runs a source to its first page batch against a destination that
/// announces `caps`; returns the records it sent, in order.
fn records_until_first_batch(caps: Capabilities) -> (Vec<String>, Vec<(PageNum, u64)>) {
    let pages = 20_000u64;
    let layout = MemoryLayout::flat(migrate_core::PageSize::DEFAULT, pages * 4096).unwrap();
    let c: Arc<dyn Clock> = Arc::new(VirtualClock::new());
    let w = WorkloadSpec::new(WorkloadKind::Uniform, 64, 1000.0, 3);
    let src = SimGuest::source(layout, MemoryMode::Bytes, w, c.clone()).unwrap();
    // 5,000 runs: more than one record holds (4,096).
    let ranges: Vec<(PageNum, u64)> = (0..5_000).map(|i| (i * 4, 2)).collect();
    let memory = Announcing {
        inner: src.pages(),
        ranges: ranges.clone(),
    };
    let mut e = SourceEngine::new(
        src.tracker(),
        memory,
        src.control(),
        Precopy::default(),
        c,
        EngineConfig::default(),
    );
    let mut seq = Sequencer::new();
    let mut reply = |e: &mut SourceEngine<_, _, _, _>, r: Record<'_>| {
        let mut f = encode_to_vec(&r);
        seq.seal(&mut f);
        e.handle_frame(&f).expect("reply taken");
    };
    let mut seen = Vec::new();
    let mut announced = Vec::new();
    let mut d = Decoder::new();
    for _ in 0..100 {
        let SourceStep::Send(f) = e.poll().expect("poll") else {
            // Waiting for the destination's answer to the layout.
            reply(&mut e, Record::Header { version: VERSION });
            reply(&mut e, Record::Capabilities(caps));
            reply(&mut e, Record::Ready);
            continue;
        };
        let rec = d.decode(&f).expect("the source's frames decode");
        seen.push(format!("{:?}", rec.record_type()));
        if let Record::Populated(r) = &rec {
            announced.extend_from_slice(r);
        }
        if matches!(rec, Record::PageBatch(_)) {
            return (seen, announced);
        }
    }
    panic!("no page batch: {seen:?}");
}

#[test]
fn a_destination_that_takes_them_is_told_the_populated_pages() {
    let (seen, announced) = records_until_first_batch(Capabilities::ALL);
    // The capabilities record asks for round acknowledgements (the
    // destination announced those too).
    assert_eq!(
        seen[..6],
        [
            "Header",
            "Layout",
            "Capabilities",
            "Populated",
            "Populated",
            "PageBatch"
        ],
        "{seen:?}"
    );
    let expect: Vec<(PageNum, u64)> = (0..5_000).map(|i| (i * 4, 2)).collect();
    assert_eq!(announced, expect);
    assert!(announced.iter().all(|(f, n)| f + n < MAX_PAGE_END));
}

#[test]
fn a_destination_that_did_not_announce_them_is_not_sent_them() {
    let (seen, announced) =
        records_until_first_batch(Capabilities(Capabilities::LZ4.0 | Capabilities::ZSTD.0));
    assert_eq!(seen[..3], ["Header", "Layout", "PageBatch"], "{seen:?}");
    assert!(announced.is_empty());
}

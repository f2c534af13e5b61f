//! The destination's two checks of the completion digest
//! ([`DestinationVerify`]): the digest folded from the per-page hashes
//! kept as pages were placed equals the digest of the sink's memory read
//! back, across policies, compression and zero pages; and a sink that
//! stores a wrong byte is caught by the read-back and, by design, not by
//! the check of what was received. Every migration here verifies memory
//! (the engine's digest, and a byte compare or a digest of both sides).

mod common;

use backend_sim::{
    simulate, Link, MemoryMode, SimConfig, SimGuest, SimPages, SimReport, WorkloadKind,
    WorkloadSpec,
};
use common::{guests, source_engine, TIMEOUT};
use migrate_core::digest::digest_memory;
use migrate_core::driver::{run_destination, run_source};
use migrate_core::protocol::Codec;
use migrate_core::transport::channel_pair;
use migrate_core::{
    BackendError, DestinationEngine, DestinationVerify, EngineConfig, Hybrid, HybridConfig,
    MemoryLayout, MigrationError, PageNum, PageSink, PageSize, PageSource, Policy, Precopy,
    PrecopyConfig, SourceVerify, StopAndCopy,
};
use std::time::Duration;

const MEM: u64 = 64 << 20;

/// Makes a policy for one run.
type NewPolicy = fn() -> Box<dyn Policy>;

/// A simulated migration of a `MEM` guest doing `workload` over a
/// 1 Gbit/s link, the destination checking with `verify`.
fn run(
    mode: MemoryMode,
    workload: WorkloadSpec,
    policy: Box<dyn Policy>,
    engine: EngineConfig,
    verify: DestinationVerify,
) -> SimReport {
    let mut c = SimConfig::new(
        MemoryLayout::flat(PageSize::DEFAULT, MEM).unwrap(),
        workload,
        Link::new(1e9, Duration::from_millis(1)),
        policy,
    );
    c.mode = mode;
    c.engine = engine;
    c.dest_verify = verify;
    let r = simulate(c).expect("simulated migration");
    assert!(r.stats.memory_verified, "the digests did not match");
    assert!(
        r.memory_equal,
        "destination memory differs from the source's"
    );
    r
}

/// A guest writing 20,000 pages a second over a quarter of memory, a
/// quarter of whose pages start out zero (and the rest of memory was
/// never written: zero too).
fn busy(seed: u64) -> WorkloadSpec {
    let mut w = WorkloadSpec::new(WorkloadKind::Uniform, MEM / 4096 / 4, 20_000.0, seed);
    w.zero_fraction = 0.25;
    w
}

/// A pre-copied guest's check of what was received gave the digest of
/// the source's memory at the pause (the source stays paused), and the
/// destination's memory at resume equals it byte for byte
/// (`memory_equal`, asserted by `run`): the folded table equals the
/// digest a read-back of the sink at resume would give. (The simulated
/// guest runs on after its resume, so its memory is not read back here;
/// `received_table_equals_the_sink_read_back` does that on a guest that
/// does not write.)
fn assert_received_is_read_back(r: &SimReport) {
    assert!(r.memory_equal);
    let folded = r.dest.digest.expect("the destination's digest");
    assert_eq!(folded, r.source.digest(), "against the source's memory");
}

#[test]
fn received_table_equals_read_back_after_precopy_and_stop_and_copy() {
    let policies: [(&str, NewPolicy); 2] = [
        ("precopy", || Box::new(Precopy::default())),
        ("stop-and-copy", || Box::new(StopAndCopy)),
    ];
    for (name, policy) in policies {
        for mode in [MemoryMode::Bytes, MemoryMode::Compact] {
            let r = run(
                mode,
                busy(11),
                policy(),
                EngineConfig::default(),
                DestinationVerify::Received,
            );
            assert!(r.dest.zero_pages > 0, "{name}: zero pages were sent");
            if name == "precopy" {
                assert!(
                    r.stats.rounds.len() >= 2,
                    "{name}: pages were sent again in later rounds"
                );
            }
            assert_received_is_read_back(&r);
        }
    }
}

#[test]
fn received_table_equals_read_back_with_compression() {
    for codec in [Codec::Lz4, Codec::Zstd { level: 1 }] {
        let mut engine = EngineConfig::default();
        engine.compression = Some(codec);
        // Compact pages (a page number, a version, then zeros) compress.
        let r = run(
            MemoryMode::Compact,
            busy(12),
            Box::new(Precopy::default()),
            engine,
            DestinationVerify::Received,
        );
        assert!(
            r.dest.compression.compressed_batches > 0,
            "{codec:?}: no batch arrived compressed"
        );
        assert_received_is_read_back(&r);
    }
}

#[test]
fn received_table_of_an_idle_guest_is_the_zero_pages() {
    // Nothing written: every page goes as a zero page, placed in runs
    // (`write_zero_pages`), each with the zero page's hash.
    let mut idle = WorkloadSpec::idle(13);
    idle.zero_fraction = 1.0;
    let r = run(
        MemoryMode::Bytes,
        idle,
        Box::new(StopAndCopy),
        EngineConfig::default(),
        DestinationVerify::Received,
    );
    assert_eq!(r.dest.zero_pages, MEM / 4096);
    assert_received_is_read_back(&r);
}

#[test]
fn received_check_with_the_source_checking_what_it_sent() {
    // The cheap check on both sides, as `--verify sent` gives.
    let mut engine = EngineConfig::default();
    engine.verify = SourceVerify::SentContent;
    let r = run(
        MemoryMode::Bytes,
        busy(14),
        Box::new(Precopy::default()),
        engine,
        DestinationVerify::from(SourceVerify::SentContent),
    );
    assert_received_is_read_back(&r);
}

#[test]
fn hybrid_and_model_memory_verify_with_either_check() {
    for verify in [DestinationVerify::ReadBack, DestinationVerify::Received] {
        // Hybrid: pre-copy rounds, then post-copy, whose check is always
        // of what arrived (the guest has been writing here since).
        let hybrid = Hybrid::new({
            let mut v = HybridConfig::default();
            v.precopy = {
                let mut v = PrecopyConfig::default();
                v.downtime_target = Duration::ZERO;
                v.max_rounds = 2;
                v
            };
            v
        });
        let r = run(
            MemoryMode::Bytes,
            busy(15),
            Box::new(hybrid),
            EngineConfig::default(),
            verify,
        );
        assert!(
            r.stats.postcopy.is_some(),
            "{verify}: switched to post-copy"
        );
        // Page models: read-back digests the sink's tokens, received the
        // tokens as they arrived.
        let r = run(
            MemoryMode::Model,
            busy(16),
            Box::new(Precopy::default()),
            EngineConfig::default(),
            verify,
        );
        assert!(r.dest.digest.is_some(), "{verify}");
    }
}

/// Migrates an idle guest (a quarter of its pages zero) from `src` to
/// `dst` over an in-process channel, the source compressing with `codec`
/// and the destination checking with `verify`.
fn migrate_idle(
    codec: Option<Codec>,
    verify: DestinationVerify,
) -> (SimGuest, SimGuest, migrate_core::DestinationReport) {
    let (src, dst, clock) = guests(16 << 20, 0.0);
    let (a, b) = channel_pair(8);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        e.set_verify(verify);
        let mut t = b;
        run_destination(&mut e, &mut t, None, TIMEOUT)
    });
    let mut config = EngineConfig::default();
    config.compression = codec;
    let mut e = migrate_core::SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        StopAndCopy,
        clock,
        config,
    );
    let mut t = a;
    let stats = run_source(&mut e, &mut t, TIMEOUT).expect("source");
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified && report.resume_confirmed);
    (src, dst, report)
}

#[test]
fn received_table_equals_the_sink_read_back() {
    // A guest that does not write: its memory after the resume is what
    // was placed, so it can be read back here and digested.
    for codec in [None, Some(Codec::Lz4)] {
        let (src, dst, report) = migrate_idle(codec, DestinationVerify::Received);
        assert!(report.zero_pages > 0, "{codec:?}: zero pages were sent");
        let layout = dst.layout().clone();
        let read_back = digest_memory(&mut dst.pages(), &layout).unwrap();
        assert_eq!(report.digest, Some(read_back), "{codec:?}");
        assert_eq!(read_back, src.digest(), "{codec:?}");
        assert!(src.same_memory(&dst), "{codec:?}");
    }
}

/// A sink that stores one byte of one page wrong, every time that page
/// is written.
struct Corrupting {
    inner: SimPages,
    page: PageNum,
}

impl PageSink for Corrupting {
    fn layout(&self) -> &MemoryLayout {
        PageSink::layout(&self.inner)
    }

    fn write_page(&mut self, page: PageNum, data: &[u8]) -> Result<(), BackendError> {
        if page != self.page {
            return self.inner.write_page(page, data);
        }
        let mut wrong = data.to_vec();
        wrong[100] ^= 0x5a;
        self.inner.write_page(page, &wrong)
    }

    fn write_zero_page(&mut self, page: PageNum) -> Result<(), BackendError> {
        self.inner.write_zero_page(page)
    }

    fn discard_pages(&mut self, pages: &[PageNum]) -> Result<(), BackendError> {
        self.inner.discard_pages(pages)
    }
}

impl PageSource for Corrupting {
    fn layout(&self) -> &MemoryLayout {
        PageSource::layout(&self.inner)
    }

    fn read_pages(&mut self, pages: &[PageNum], out: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read_pages(pages, out)
    }
}

/// The first page of `guest` that is not zero.
fn first_nonzero_page(guest: &SimGuest) -> PageNum {
    let mut pages = guest.pages();
    let mut buf = vec![0u8; 4096];
    guest
        .layout()
        .pages()
        .find(|p| {
            pages.read_pages(&[*p], &mut buf).unwrap();
            buf.iter().any(|b| *b != 0)
        })
        .expect("a page with data")
}

/// What a migration into a corrupting sink left.
struct Corrupted {
    src: SimGuest,
    dst: SimGuest,
    /// The page the sink stored wrong.
    page: PageNum,
    dest: Result<migrate_core::DestinationReport, MigrationError>,
    resumed: bool,
    source: Result<migrate_core::MigrationStats, MigrationError>,
}

/// Migrates an idle guest into a sink that corrupts one page, the
/// destination checking with `verify`.
fn migrate_into_corrupting_sink(verify: DestinationVerify) -> Corrupted {
    // No writes while migrating: the source's memory is what it sent.
    let (src, dst, clock) = guests(16 << 20, 0.0);
    let page = first_nonzero_page(&src);
    let (a, b) = channel_pair(8);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        let sink = Corrupting {
            inner: d.pages(),
            page,
        };
        let mut e = DestinationEngine::new(sink, d.control(), c);
        e.set_verify(verify);
        let mut t = b;
        let r = run_destination(&mut e, &mut t, None, TIMEOUT);
        (r, e.resumed())
    });
    let mut t = a;
    let mut e = source_engine(&src, Precopy::default(), clock);
    let source = run_source(&mut e, &mut t, TIMEOUT);
    let (dest, resumed) = dest.join().unwrap();
    Corrupted {
        src,
        dst,
        page,
        dest,
        resumed,
        source,
    }
}

#[test]
fn a_sink_storing_a_wrong_byte_is_caught_by_read_back() {
    let c = migrate_into_corrupting_sink(DestinationVerify::ReadBack);
    let err = c.dest.expect_err("the read-back must catch the wrong byte");
    assert!(
        matches!(err, MigrationError::DigestMismatch { .. }),
        "{err}"
    );
    assert!(
        !c.resumed,
        "a guest whose memory did not verify never resumes"
    );
    assert!(c.source.is_err(), "the source is told the migration failed");
    assert!(!c.src.is_paused(), "the source guest runs on");
    assert_eq!(c.src.differing_pages(&c.dst), vec![c.page]);
}

#[test]
fn a_sink_storing_a_wrong_byte_is_not_caught_by_the_received_check() {
    // By design: the received check proves every page arrived as the
    // source sent it and trusts the sink to store what it was given.
    let c = migrate_into_corrupting_sink(DestinationVerify::Received);
    let report = c.dest.expect("the received check passes");
    let stats = c.source.expect("source");
    assert!(stats.memory_verified && c.resumed);
    // What arrived is the source's memory...
    assert_eq!(report.digest, Some(c.src.digest()));
    // ... and what the sink holds is not.
    assert_ne!(c.dst.digest(), c.src.digest());
    assert_eq!(c.src.differing_pages(&c.dst), vec![c.page]);
}

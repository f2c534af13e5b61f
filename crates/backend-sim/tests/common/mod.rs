//! What the transport and TLS tests share: a pair of simulated guests on
//! the host clock, a source engine and a destination thread over them, and
//! how long a test waits for a peer.

#![allow(dead_code)] // each test file uses its own part

use backend_sim::{
    MemoryMode, SimControl, SimGuest, SimPages, SimTracker, WorkloadKind, WorkloadSpec,
};
use migrate_core::driver::run_destination;
use migrate_core::transport::Transport;
use migrate_core::{
    Clock, DestinationEngine, EngineConfig, MemoryLayout, MigrationError, PageSize, Policy,
    SourceEngine, SystemClock,
};
use std::sync::Arc;
use std::time::Duration;

/// How long a test waits for its peer.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A source guest writing `writes_per_sec` pages a second over a quarter
/// of `mem`, an empty destination of the same layout, and their clock.
pub fn guests(mem: u64, writes_per_sec: f64) -> (SimGuest, SimGuest, Arc<dyn Clock>) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let layout = MemoryLayout::flat(PageSize::DEFAULT, mem).unwrap();
    let w = {
        let mut c = WorkloadSpec::new(WorkloadKind::Uniform, mem / 4096 / 4, writes_per_sec, 42);
        c.zero_fraction = 0.25;
        c
    };
    let src =
        SimGuest::source(layout.clone(), MemoryMode::Bytes, w.clone(), clock.clone()).unwrap();
    let dst = SimGuest::destination(layout, MemoryMode::Bytes, w, clock.clone()).unwrap();
    (src, dst, clock)
}

/// A source engine over `src` with `policy` and the default settings.
pub fn source_engine<P: Policy>(
    src: &SimGuest,
    policy: P,
    clock: Arc<dyn Clock>,
) -> SourceEngine<SimTracker, SimPages, SimControl, P> {
    SourceEngine::new(
        src.tracker(),
        src.pages(),
        src.control(),
        policy,
        clock,
        EngineConfig::default(),
    )
}

/// Runs a destination engine for `dst` over `t` on its own thread.
pub fn spawn_destination<T: Transport + 'static>(
    dst: &SimGuest,
    clock: &Arc<dyn Clock>,
    mut t: T,
) -> std::thread::JoinHandle<Result<migrate_core::DestinationReport, MigrationError>> {
    let (d, c) = (dst.clone(), clock.clone());
    std::thread::spawn(move || {
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        run_destination(&mut e, &mut t, None, TIMEOUT)
    })
}

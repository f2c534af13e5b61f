//! The receiving end of a Xen migration: preparing a domain for what the
//! source announced, and running the destination engine into it, with
//! post-copy served by Xen's memory paging.
//!
//! ```text
//!  source announces SourceFrames ─▶ prepare_destination ─▶ XenDomain
//!                                                            │
//!  protocol stream ─▶ receive ─▶ DestinationEngine ─▶ XenPages / XenControl
//!                        └─ post-copy: Pager pages frames out, and back in
//!                           as they arrive; the guest's touches are faults
//! ```

use crate::domain::{common_layout, SourceFrames, StopMode, XenDomain};
use crate::frame::Gfn;
use crate::paging::Pager;
use crate::xc::{Xen, XenError};
use migrate_core::driver::{run_destination, FaultSource, Faults};
use migrate_core::MemoryLayout;
use migrate_core::{
    Clock, DestinationEngine, DestinationReport, DestinationVerify, MigrationError, Transport,
};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a Xen destination failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The domain could not be prepared or paged.
    #[error("domain {domid}: {what}")]
    Xen {
        /// The destination domain.
        domid: u32,
        /// What was being done.
        what: &'static str,
        /// Xen's error.
        #[source]
        source: XenError,
    },
    /// The domain does not fit what the source announced.
    #[error("domain {domid}: {why}")]
    Mismatch {
        /// The destination domain.
        domid: u32,
        /// What does not fit.
        why: String,
    },
    /// The migration itself failed. After a post-copy resume the domain
    /// has been paused again, and `missing` of its frames are still paged
    /// out.
    #[error("{source} ({missing} pages still paged out)")]
    Migration {
        /// The engine's error.
        #[source]
        source: MigrationError,
        /// Frames that never arrived (0 without post-copy).
        missing: usize,
    },
}

/// A destination domain made ready for a source, with what was done to
/// it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Prepared {
    /// The domain, with the frames both ends will move as its layout.
    pub domain: XenDomain,
    /// The frames the source announced.
    pub source_layout: MemoryLayout,
    /// The destination's own frames before they were narrowed to the
    /// common ones (equal to the agreed layout for PV).
    pub own_layout: MemoryLayout,
}

/// Makes domain `domid` ready for a source that announced `frames`.
///
/// A PV destination is given memory at exactly the source's frames (its
/// vCPUs brought down and page tables unpinned first, see
/// [`XenDomain::attach_pv_destination`]). An HVM/PVH destination must be
/// paused, not PV, and migrates the frames both domains have
/// ([`common_layout`]).
pub fn prepare_destination(
    xen: &Arc<Xen>,
    domid: u32,
    frames: &SourceFrames,
) -> Result<Prepared, DestinationError> {
    let err = |what| {
        move |source| DestinationError::Xen {
            domid,
            what,
            source,
        }
    };
    if frames.pv {
        let domain = XenDomain::attach_pv_destination(xen.clone(), domid, frames)
            .map_err(err("preparing a PV destination"))?;
        return Ok(Prepared {
            own_layout: domain.layout().clone(),
            source_layout: frames.layout.clone(),
            domain,
        });
    }
    let mismatch = |why: String| DestinationError::Mismatch { domid, why };
    let domain = XenDomain::attach(xen.clone(), domid).map_err(err("attaching"))?;
    if domain.is_pv() {
        return Err(mismatch("it is PV and the source is not".into()));
    }
    if !domain.info().map_err(err("reading its state"))?.paused {
        return Err(mismatch(
            "it is running; create it paused (xl create -p)".into(),
        ));
    }
    let common = common_layout(&frames.layout, domain.layout())
        .map_err(err("finding the frames both domains have"))?;
    let own_layout = domain.layout().clone();
    let domain = domain
        .with_layout(common)
        .map_err(err("narrowing to the common frames"))?;
    Ok(Prepared {
        domain,
        source_layout: frames.layout.clone(),
        own_layout,
    })
}

/// How [`receive`] takes a migration in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiveOptions {
    /// The source moves the guest by post-copy (or a policy that may
    /// switch to it): memory paging is turned on first (see [`receive`]).
    pub postcopy: bool,
    /// What a pre-copied guest's completion digest is checked against
    /// ([`DestinationEngine::set_verify`]).
    pub verify: DestinationVerify,
}

/// Receives a migration into `dst` over `transport` and resumes it there
/// (`stop` is how the source stops its guest, which decides how the
/// destination resumes).
///
/// With `options.postcopy`, Xen's memory paging is turned on and every
/// frame of the layout paged out before the stream starts (while the
/// guest still runs on the source); each frame that arrives is paged back in, and a
/// guest touch of one that has not is a fault the source is asked to
/// serve first. If the source is lost after the guest resumed here, the
/// domain is paused and its missing frames stay paged out.
pub fn receive<X: Transport + ?Sized>(
    xen: &Arc<Xen>,
    dst: &XenDomain,
    stop: StopMode,
    transport: &mut X,
    options: ReceiveOptions,
    clock: Arc<dyn Clock>,
    peer_timeout: Duration,
) -> Result<DestinationReport, DestinationError> {
    let failed = |source, missing| DestinationError::Migration { source, missing };
    if !options.postcopy {
        let mut e = DestinationEngine::new(dst.pages(), dst.control(stop), clock);
        e.set_verify(options.verify);
        return run_destination(&mut e, transport, None, peer_timeout).map_err(|e| failed(e, 0));
    }
    let domid = dst.domid();
    if dst.is_pv() {
        return Err(DestinationError::Mismatch {
            domid,
            why: "post-copy on Xen needs memory paging, which serves HVM and PVH guests, not PV"
                .into(),
        });
    }
    let xen_err = |what| {
        move |source| DestinationError::Xen {
            domid,
            what,
            source,
        }
    };
    let (pager, faults) = Pager::enable(xen.clone(), domid, clock.clone())
        .map_err(xen_err("enabling memory paging"))?;
    let pager = Arc::new(pager);
    let t0 = Instant::now();
    for p in dst.layout().pages() {
        pager
            .page_out(Gfn(p))
            .map_err(xen_err("paging a frame out"))?;
    }
    tracing::info!(
        domid,
        frames = dst.layout().total_pages(),
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "frames paged out, ready for post-copy"
    );
    let d = dst.clone().with_pager(pager.clone());
    let mut e = DestinationEngine::new(d.pages(), d.control(stop), clock);
    e.set_verify(options.verify);
    let mut source = XenFaults {
        xen,
        domid,
        pager: &pager,
        faults,
    };
    run_destination(&mut e, transport, Some(&mut source), peer_timeout)
        .map_err(|err| failed(err, pager.missing()))
}

/// A Xen destination's post-copy faults: its memory pager's.
struct XenFaults<'a> {
    xen: &'a Arc<Xen>,
    domid: u32,
    pager: &'a Pager,
    faults: Receiver<Faults>,
}

impl FaultSource for XenFaults<'_> {
    fn faults(&self) -> &Receiver<Faults> {
        &self.faults
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        self.pager.finish().map_err(|e| MigrationError::Backend {
            op: "end memory paging",
            source: crate::domain::be(e),
        })
    }

    fn abandon(&mut self) {
        if let Err(p) = self.xen.pause(self.domid) {
            tracing::error!(domid = self.domid, error = %p, "could not pause a guest left without its source");
        }
    }
}

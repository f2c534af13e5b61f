//! Fault injection: a [`Transport`] wrapper that breaks one frame.
//!
//! [`FaultyTransport`] passes frames through to the transport it wraps
//! until the frame its [`FaultPlan`] names, and does one of six things to
//! it ([`Fault`]): cuts the connection, flips a byte, drops the frame,
//! sends it twice, holds it past the peer's timeout, or sends only its
//! first half. Wrapping the source's end breaks a frame going to the
//! destination; wrapping the destination's end breaks a reply. The fault
//! matrix test runs every policy with every fault at every frame index
//! this way and checks the failure semantics on each run.

use bytes::Bytes;
use migrate_core::transport::{PreemptLink, PreemptServe, Transport, TransportError};
use std::time::Duration;

/// What happens to the chosen frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// The connection is cut instead of sending the frame: this send and
    /// every later one fail, and the peer sees the connection close.
    Cut,
    /// One byte of the frame (the middle one) is flipped.
    Flip,
    /// The frame is silently not sent.
    Drop,
    /// The frame is sent twice.
    Duplicate,
    /// The frame is sent after a pause (longer than the peer's timeout).
    Delay(Duration),
    /// Only the first half of the frame is sent.
    Truncate,
}

impl Fault {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::Flip => "flip byte",
            Fault::Drop => "drop",
            Fault::Duplicate => "duplicate",
            Fault::Delay(_) => "delay",
            Fault::Truncate => "truncate",
        }
    }
}

/// Which frame to break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAt {
    /// The frame with this index among those sent through the wrapper
    /// (0 is the first).
    Index(usize),
    /// The first frame whose record type code is this.
    FirstOfType(u8),
    /// The `nth` frame (from 1) of record type `ty` sent after the first
    /// frame of type `after`: say, the 300th page batch of a post-copy
    /// push (after the device state).
    NthOfTypeAfter {
        /// The record type that starts the count.
        after: u8,
        /// The record type counted.
        ty: u8,
        /// Which one, from 1.
        nth: usize,
    },
}

/// A fault and the frame it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultPlan {
    /// What happens.
    pub fault: Fault,
    /// To which frame.
    pub at: FaultAt,
}

impl FaultPlan {
    /// `fault` at the frame `at` names.
    pub fn new(fault: Fault, at: FaultAt) -> Self {
        FaultPlan { fault, at }
    }
}

/// A transport that breaks one frame as its plan says (or none, with no
/// plan) and counts the frames sent through it.
#[derive(Debug)]
pub struct FaultyTransport<T: Transport> {
    inner: Option<T>,
    plan: Option<FaultPlan>,
    sent: usize,
    fired: bool,
    /// For [`FaultAt::NthOfTypeAfter`]: frames of the counted type since
    /// the one that starts the count (`None` before it).
    counted: Option<usize>,
}

impl<T: Transport> FaultyTransport<T> {
    /// Wraps `inner`; `plan` `None` passes every frame through.
    pub fn new(inner: T, plan: Option<FaultPlan>) -> Self {
        FaultyTransport {
            inner: Some(inner),
            plan,
            sent: 0,
            fired: false,
            counted: None,
        }
    }

    /// Frames handed to `send` so far.
    pub fn frames_sent(&self) -> usize {
        self.sent
    }

    /// Whether the fault has happened.
    pub fn fired(&self) -> bool {
        self.fired
    }

    fn hits(&mut self, frame: &[u8]) -> Option<Fault> {
        let plan = self.plan?;
        if self.fired {
            return None;
        }
        let ty = frame.first().copied();
        let hit = match plan.at {
            FaultAt::Index(i) => i == self.sent,
            FaultAt::FirstOfType(t) => ty == Some(t),
            FaultAt::NthOfTypeAfter { after, ty: t, nth } => match self.counted.as_mut() {
                Some(n) if ty == Some(t) => {
                    *n += 1;
                    *n == nth
                }
                Some(_) => false,
                None => {
                    if ty == Some(after) {
                        self.counted = Some(0);
                    }
                    false
                }
            },
        };
        hit.then_some(plan.fault)
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let fault = self.hits(frame);
        self.sent += 1;
        let Some(inner) = self.inner.as_mut() else {
            return Err(TransportError::Closed);
        };
        let Some(fault) = fault else {
            return inner.send(frame);
        };
        self.fired = true;
        match fault {
            Fault::Cut => {
                self.inner = None;
                Err(TransportError::Closed)
            }
            Fault::Flip => {
                let mut f = frame.to_vec();
                let at = f.len() / 2;
                if let Some(b) = f.get_mut(at) {
                    *b ^= 0x01;
                }
                inner.send(&f)
            }
            Fault::Drop => Ok(()),
            Fault::Duplicate => {
                inner.send(frame)?;
                inner.send(frame)
            }
            Fault::Delay(d) => {
                std::thread::sleep(d);
                inner.send(frame)
            }
            Fault::Truncate => inner.send(&frame[..frame.len() / 2]),
        }
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Bytes>, TransportError> {
        match self.inner.as_mut() {
            Some(t) => t.recv(timeout),
            None => Err(TransportError::Closed),
        }
    }

    fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        if let Some(t) = self.inner.as_mut() {
            t.set_send_timeout(timeout);
        }
    }

    fn close(&mut self) {
        self.inner = None;
    }

    /// Passed on once the plan has fired (or with none); before, each
    /// frame goes through `send`, so that the plan counts it once.
    fn try_send(&mut self, frame: Vec<u8>) -> Result<Option<Vec<u8>>, TransportError> {
        if self.plan.is_some() && !self.fired {
            self.send(&frame)?;
            return Ok(None);
        }
        let Some(inner) = self.inner.as_mut() else {
            return Err(TransportError::Closed);
        };
        let back = inner.try_send(frame)?;
        if back.is_none() {
            self.sent += 1;
        }
        Ok(back)
    }
    /// Only without a plan: frames sent on the preempt connection from
    /// another thread would bypass `send`, and the plan counts every
    /// frame.
    fn preempt_link(&self) -> Option<PreemptLink> {
        if self.plan.is_some() {
            return None;
        }
        self.inner.as_ref()?.preempt_link()
    }

    /// Only without a plan (see [`FaultyTransport::preempt_link`]).
    fn serve_preempt(&mut self, serve: PreemptServe) -> bool {
        match self.inner.as_mut() {
            Some(t) if self.plan.is_none() => t.serve_preempt(serve),
            _ => false,
        }
    }
}

//! The migration error type.

use crate::backend::BackendError;
use crate::digest::MemoryDigest;
use crate::page::PageNum;
use crate::protocol::{ProtocolError, RecordType};
use crate::transport::TransportError;

/// What a caller can do about an error.
///
/// On the source, every kind but [`ErrorKind::Settle`] means the failure
/// came before the point of no return: the source guest is running again
/// (resumed if the engine had paused it) and the destination has not
/// resumed, and never will, from this stream. On the destination, every
/// kind but [`ErrorKind::Settle`] means its guest was not resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A transient fault (a cut connection, a timeout): nothing happened
    /// to either guest, and the migration may succeed if tried again.
    Retry,
    /// The peer sent something it must not: a broken, altered or hostile
    /// stream. Nothing happened to either guest; look at the link or the
    /// peer before trying again.
    PeerMisbehaved,
    /// The migration cannot succeed as configured (incompatible guests,
    /// a backend failure, a policy abort). The source guest runs.
    Abort,
    /// The point of no return was passed and the outcome is not known:
    /// the guest may be running on the destination, or nowhere. The
    /// source guest stays paused. Do not retry and do not resume the
    /// source until the outcome is settled: ask the destination (its
    /// VMM knows whether its guest was resumed, see
    /// [`crate::engine::DestinationReport::resume_confirmed`]) or an
    /// operator. If the destination runs the guest, discard the source;
    /// if it did not resume and never will (its process is gone, or it
    /// reports failure), resume the source. Retrying or resuming without
    /// that answer can run two copies of the guest.
    Settle,
    /// The migration was cancelled through its
    /// [`crate::MigrationHandle`] before the point of no return: the
    /// source guest runs on with dirty tracking stopped, the
    /// destination's guest was never resumed.
    Cancelled,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The peer's stream could not be decoded.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A backend operation failed.
    #[error("backend failed to {op}: {source}")]
    Backend {
        /// What the engine was doing.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// A well-formed record at a point where the protocol does not allow it.
    #[error("unexpected {got:?} record while {state}")]
    UnexpectedRecord {
        /// What arrived.
        got: RecordType,
        /// What the receiver was doing.
        state: &'static str,
    },
    /// The source's layout is not the destination's.
    #[error("memory layout mismatch: source has {source_pages} pages, destination {dest_pages}")]
    LayoutMismatch {
        /// Pages on the source.
        source_pages: u64,
        /// Pages on the destination.
        dest_pages: u64,
    },
    /// A page the guest does not have.
    #[error("page {0:#x} is not in the guest's memory layout")]
    PageOutOfRange(PageNum),
    /// The stream ended (or completed) without everything a resume needs.
    #[error("incomplete migration: {0}")]
    Incomplete(String),
    /// The destination's memory does not match the source's.
    #[error("memory digest mismatch: source {expected}, destination {actual}")]
    DigestMismatch {
        /// The source's digest.
        expected: MemoryDigest,
        /// The destination's.
        actual: MemoryDigest,
    },
    /// The peer sent an abort record.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// The policy chose to abort.
    #[error("policy aborted: {0}")]
    PolicyAborted(String),
    /// The record past which the destination may resume (the completion
    /// in pre-copy, the device state in post-copy) was handed to the
    /// transport, and then the migration failed: the guest may be running
    /// there, so the source stays paused and the outcome must be settled
    /// ([`ErrorKind::Settle`]).
    #[error("outcome unknown: the point of no return was passed ({0})")]
    OutcomeUnknown(String),
    /// The engine was used wrongly (for example polled after it finished).
    #[error("invalid use: {0}")]
    InvalidUse(&'static str),
    /// A post-copy destination lost its source after it resumed the
    /// guest, with pages still missing: the guest runs here without all
    /// of its memory, and the rest is on the paused source.
    #[error("source lost during post-copy: {0}")]
    SourceLost(String),
    /// The migration was cancelled through its
    /// [`crate::MigrationHandle`] before the point of no return.
    #[error("cancelled")]
    Cancelled,
    /// A connection that asked to resume a post-copy named another
    /// migration session: it was refused, and the migration waits on.
    #[error("the connection names another migration session")]
    SessionMismatch,
}

impl MigrationError {
    /// What a caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::OutcomeUnknown(_) | MigrationError::SourceLost(_) => ErrorKind::Settle,
            MigrationError::Transport(_) => ErrorKind::Retry,
            MigrationError::Cancelled => ErrorKind::Cancelled,
            MigrationError::Protocol(_)
            | MigrationError::UnexpectedRecord { .. }
            | MigrationError::PageOutOfRange(_)
            | MigrationError::DigestMismatch { .. }
            | MigrationError::Incomplete(_)
            | MigrationError::SessionMismatch => ErrorKind::PeerMisbehaved,
            _ => ErrorKind::Abort,
        }
    }

    /// Whether the error says the link broke (the connection failed or
    /// timed out, or a frame on it was cut, altered, lost or repeated)
    /// rather than that the peer refused or the migration cannot go on:
    /// a post-copy may resume over a new connection after it.
    pub(crate) fn is_link_failure(&self) -> bool {
        match self {
            MigrationError::Transport(_) => true,
            MigrationError::Protocol(p) => matches!(
                p,
                ProtocolError::FrameChecksum { .. }
                    | ProtocolError::OutOfSequence { .. }
                    | ProtocolError::Truncated { .. }
            ),
            _ => false,
        }
    }

    pub(crate) fn backend(op: &'static str) -> impl FnOnce(BackendError) -> MigrationError {
        move |source| MigrationError::Backend { op, source }
    }
}

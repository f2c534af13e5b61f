//! The migration error type.

use crate::backend::BackendError;
use crate::digest::MemoryDigest;
use crate::page::PageNum;
use crate::protocol::{ProtocolError, RecordType};
use crate::transport::TransportError;

/// What a caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A transient fault (a cut connection, a timeout): the migration
    /// failed but may succeed if tried again.
    Retry,
    /// The peer sent something it must not: a broken or hostile stream.
    PeerMisbehaved,
    /// The migration cannot succeed as configured (incompatible guests,
    /// a backend failure, a policy abort).
    Abort,
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
    /// The completion record was sent but the destination never confirmed
    /// it resumed: the guest may be running there, so the source stays
    /// paused and the operator must decide.
    #[error("outcome unknown: completion sent but no resume confirmation ({0})")]
    OutcomeUnknown(String),
    /// The engine was used wrongly (for example polled after it finished).
    #[error("invalid use: {0}")]
    InvalidUse(&'static str),
}

impl MigrationError {
    /// What a caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::Transport(_) | MigrationError::OutcomeUnknown(_) => ErrorKind::Retry,
            MigrationError::Protocol(_)
            | MigrationError::UnexpectedRecord { .. }
            | MigrationError::PageOutOfRange(_)
            | MigrationError::DigestMismatch { .. }
            | MigrationError::Incomplete(_) => ErrorKind::PeerMisbehaved,
            _ => ErrorKind::Abort,
        }
    }

    pub(crate) fn backend(op: &'static str) -> impl FnOnce(BackendError) -> MigrationError {
        move |source| MigrationError::Backend { op, source }
    }
}

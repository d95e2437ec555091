//! What can go wrong in a capture: one error type for every module.

use std::path::PathBuf;

use crate::qga::AgentError;
use crate::qmp;

/// What can go wrong during a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Talking to QEMU failed.
    #[error("QMP: {0}")]
    Qmp(#[from] qmp::Error),
    /// The archive could not be written.
    #[error("archive: {0}")]
    Archive(#[from] vma_core::Error),
    /// Local I/O (the NBD socket, for example).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A drive or option that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A backup job failed.
    #[error("backup job of drive {drive} failed: {error}")]
    Job {
        /// Drive name.
        drive: String,
        /// QEMU's message.
        error: String,
    },
    /// The guest agent could not freeze or thaw the guest.
    #[error("{0}")]
    Agent(#[from] AgentError),
    /// Interrupted (Ctrl-C).
    #[error("cancelled")]
    Cancelled,
    /// The capture failed, and what was copied was kept for a retry.
    #[error("{cause}; what was copied is kept in {}: capture again with --incremental-from {} to copy only the rest", partial.display(), partial.display())]
    KeptForRetry {
        /// Why the capture failed.
        cause: Box<CaptureError>,
        /// The partial archive.
        partial: PathBuf,
    },
}

/// Result of capture operations.
pub type Result<T> = std::result::Result<T, CaptureError>;

/// A local I/O error while doing `what`.
pub(crate) fn io_err(what: &str, source: std::io::Error) -> CaptureError {
    CaptureError::Io {
        what: what.into(),
        source,
    }
}

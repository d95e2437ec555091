//! Back up drives of a running QEMU into an archive: the entry point and
//! the types callers use.
//!
//! [`capture`] checks the target and picks one of two ways: backup jobs
//! that QEMU runs into our NBD server (module `backup`, with or without
//! fleecing), or comparing point-in-time views with an earlier archive
//! ([`crate::live_diff`], `--diff-against`).
//!
//! Checkpoints live in the archives: the [`CAPTURE_BLOB`] config blob
//! names each drive's node, its checkpoint bitmap and whether the drive was
//! backed up in full or incrementally (and why it was not incremental).

use std::sync::atomic::AtomicBool;

pub use crate::error::{CaptureError, Result};
pub use crate::options::{
    partial_name, BitmapMode, CaptureOptions, CaptureSummary, DriveSpec, DriveStats, JobProgress,
};
pub use crate::record::{capture_record, CaptureRecord, DriveCheckpoint, CAPTURE_BLOB};

/// Capture the drives of the QEMU at `options.qmp` into `options.archive`.
/// `cancel` is polled: once set, the jobs are cancelled and nothing is
/// kept. `progress` is called a few times a second.
pub fn capture(
    options: &CaptureOptions,
    cancel: &AtomicBool,
    progress: impl FnMut(JobProgress),
) -> Result<CaptureSummary> {
    if options.archive.exists() && !options.force {
        return Err(CaptureError::Invalid(format!(
            "{} exists (use --force to replace it)",
            options.archive.display()
        )));
    }
    if vma_core::storage::is_remote(&options.archive) && options.bitmap_mode == BitmapMode::Always {
        return Err(CaptureError::Invalid(format!(
            "--bitmap-mode always keeps what a failed capture copied under a second name, which an upload to {} cannot take: write to a local file, or use on-success",
            options.archive.display()
        )));
    }
    if options.diff_against.is_some() {
        return crate::live_diff::capture_by_diff(options, cancel, progress);
    }
    crate::backup::capture_by_backup(options, cancel, progress)
}

//! What a capture is asked to do and what it reports.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vma_core::write::writer::WriteSummary;
use vma_core::{ConfigBlob, WriterOptions};

use crate::qmp::BitmapSyncMode;
use crate::record::DriveCheckpoint;

/// What QEMU does with the bitmap an incremental backup reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    /// Consumed only if the backup succeeds; after a failure or cancel it
    /// still holds everything since the parent, so the next incremental
    /// from the same parent copies all of it again.
    OnSuccess,
    /// Never changed by the backup: the parent's checkpoint stays usable
    /// for more backups against the same parent (differential backups).
    Never,
    /// Synchronised even when the backup fails: what was copied is kept in
    /// `ARCHIVE.partial` (marked interrupted), and the drive's checkpoint
    /// then holds exactly what was not copied plus what the guest wrote
    /// since, so a retry from the partial archive copies only the rest.
    Always,
}

impl From<BitmapMode> for BitmapSyncMode {
    fn from(mode: BitmapMode) -> BitmapSyncMode {
        match mode {
            BitmapMode::OnSuccess => BitmapSyncMode::OnSuccess,
            BitmapMode::Never => BitmapSyncMode::Never,
            BitmapMode::Always => BitmapSyncMode::Always,
        }
    }
}

/// A drive to capture: a block node (or a device's id) and the drive's name
/// in the archive.
#[derive(Clone, Debug)]
pub struct DriveSpec {
    /// Node name, or the device/qdev id `query-block` lists.
    pub node: String,
    /// Name in the archive (default: the device id, else the node name).
    pub name: Option<String>,
}

/// Everything a capture needs.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// QMP unix socket of the running QEMU.
    pub qmp: PathBuf,
    /// Archive to write (atomically).
    pub archive: PathBuf,
    /// Replace an existing archive.
    pub force: bool,
    /// Drives (empty: every device with a medium that `query-block` lists).
    pub drives: Vec<DriveSpec>,
    /// Config blobs stored with the drives (empty with a parent: the VM
    /// configs of the parent's point in time).
    pub configs: Vec<ConfigBlob>,
    /// The archive whose checkpoints an incremental backup starts from.
    pub parent: Option<PathBuf>,
    /// Bitmap policy of incremental backups.
    pub bitmap_mode: BitmapMode,
    /// Job speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Archive compression and threads.
    pub writer: WriterOptions,
    /// Directory for the NBD socket (default: the system temp dir).
    pub socket_dir: Option<PathBuf>,
    /// Guest agent socket: freeze the guest's file systems for the moment
    /// the jobs start (the transaction), then thaw them.
    pub fsfreeze: Option<PathBuf>,
    /// Fleece through scratch images in this directory: guest writes copy
    /// old data into them, not into the archive (see [`crate::fleece`]).
    pub fleecing: Option<PathBuf>,
    /// Instead of a backup job, compare a point-in-time view of each drive
    /// with this archive (the newest of a chain) and store what differs
    /// (see [`crate::live_diff`]).
    pub diff_against: Option<PathBuf>,
    /// Where the ancestors of `diff_against` (or of `parent`) are, besides
    /// beside it.
    pub chain_parents: Vec<PathBuf>,
    /// QEMU's NBD server socket, if QEMU already runs one (`diff_against`
    /// exports its views there instead of starting the server).
    pub qemu_nbd_socket: Option<PathBuf>,
}

/// Job progress over all drives.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobProgress {
    /// Bytes the jobs have processed.
    pub done: u64,
    /// Bytes the jobs will process in total (grows while they run).
    pub total: u64,
}

/// Outcome of a capture.
#[derive(Debug)]
pub struct CaptureSummary {
    /// Per drive: how it was captured.
    pub drives: Vec<DriveCheckpoint>,
    /// The archive writer's summary.
    pub write: WriteSummary,
    /// Per drive: clusters that arrived as data or zeros (the rest is
    /// unchanged from the parent) and how many of them arrived behind a
    /// cluster with a higher number (copy-before-write at work).
    pub clusters_stored: Vec<DriveStats>,
    /// With fleecing: the most the scratch images took on disk at once
    /// (sampled a few times a second).
    pub scratch_peak: Option<u64>,
    /// What could not be cleaned up after the archive was complete.
    pub warnings: Vec<String>,
    /// What an earlier capture that could not clean up (killed) had left
    /// in QEMU, removed before this one started.
    pub cleared: Vec<String>,
}

/// What arrived for one drive.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriveStats {
    /// Clusters stored (data or zero).
    pub clusters: u64,
    /// Of those, clusters that arrived out of order.
    pub out_of_order: u64,
    /// Clusters stored as unchanged from the parent.
    pub unchanged: u64,
}

/// Where an interrupted `always` capture keeps what it copied.
pub fn partial_name(archive: &Path) -> PathBuf {
    let mut name = archive.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

//! What QEMU answers: the typed replies of the commands in `commands`.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// The reply of a command that answers only that it ran (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

/// QEMU version from the greeting, comparable: `v >= QemuVersion::new(9, 1, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl QemuVersion {
    /// Builds a version to compare against.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// QEMU's version and package (QAPI `VersionInfo`): the reply to
/// `query-version` and the version in the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionInfo {
    /// The version.
    pub qemu: QemuVersion,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2`.
    #[serde(default)]
    pub package: String,
}

/// Whether the guest runs (QAPI `StatusInfo`), the reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the guest's CPUs run.
    pub running: bool,
    /// Run state, e.g. `running`, `paused`.
    pub status: String,
}

/// Status of a job (QAPI `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Erroneous default state.
    Undefined,
    /// Created, not yet started.
    Created,
    /// Running.
    Running,
    /// Running but paused.
    Paused,
    /// Ready for the user to signal completion (mirror).
    Ready,
    /// Ready but paused.
    Standby,
    /// Waiting for the other jobs of its transaction.
    Waiting,
    /// Work done; waits for `job-finalize` when auto-finalize is off.
    Pending,
    /// Being aborted; will conclude with an error.
    Aborting,
    /// Finished; waits for `job-dismiss` when auto-dismiss is off.
    Concluded,
    /// Being dismantled; gone afterwards.
    Null,
    /// A status this client does not know.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// QAPI name, e.g. `pending`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
            JobStatus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `query-jobs` (QAPI `JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type, e.g. `backup`, `create`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Current status.
    pub status: JobStatus,
    /// Progress so far, in units only meaningful relative to `total_progress`.
    pub current_progress: u64,
    /// Estimated progress value at completion.
    pub total_progress: u64,
    /// Present when the job failed.
    pub error: Option<String>,
}

/// A dirty bitmap on a node (QAPI `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDirtyInfo {
    /// Bitmap name; empty for an anonymous bitmap (QEMU omits the name).
    #[serde(default)]
    pub name: String,
    /// Number of dirty bytes.
    pub count: u64,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Whether it records new writes.
    #[serde(default)]
    pub recording: bool,
    /// Whether an operation (job, NBD export) is using it.
    #[serde(default)]
    pub busy: bool,
    /// Whether it is stored in the image.
    #[serde(default)]
    pub persistent: bool,
    /// A persistent bitmap that was not stored properly and cannot be used.
    #[serde(default)]
    pub inconsistent: bool,
}

/// Image information of a node (QAPI `ImageInfo`, the fields capture uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// File name, or a `json:{...}` description for nodes without one.
    pub filename: String,
    /// Format (driver) name.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host.
    pub actual_size: Option<u64>,
    /// Cluster size of formats that have one.
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty.
    pub dirty_flag: Option<bool>,
    /// Backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// Format-specific details, raw.
    pub format_specific: Option<Value>,
}

/// A block node (QAPI `BlockDeviceInfo`): an entry of
/// `query-named-block-nodes` and the `inserted` medium of `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// Node name; empty if QEMU did not report one.
    #[serde(default)]
    pub node_name: String,
    /// Driver, e.g. `qcow2`, `file`, `null-co`.
    pub drv: String,
    /// File name of the node.
    pub file: String,
    /// Whether the node is read-only.
    #[serde(default)]
    pub ro: bool,
    /// Backing file name.
    #[serde(rename = "backing_file")]
    pub backing_file: Option<String>,
    /// Number of files in the backing chain.
    #[serde(rename = "backing_file_depth", default)]
    pub backing_file_depth: u64,
    /// Image information.
    pub image: ImageInfo,
    /// Dirty bitmaps on this node.
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// A guest block device (QAPI `BlockInfo`), an entry of `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// Device (BlockBackend) name; may be empty for `-blockdev` setups.
    pub device: String,
    /// qdev id or QOM path of the guest device.
    pub qdev: Option<String>,
    /// Whether the device supports removable media.
    #[serde(default)]
    pub removable: bool,
    /// Whether the guest locked the media.
    #[serde(default)]
    pub locked: bool,
    /// Whether the tray is open (only devices with a tray).
    #[serde(rename = "tray_open")]
    pub tray_open: Option<bool>,
    /// I/O status, e.g. `ok`, `failed`, `nospace`.
    pub io_status: Option<String>,
    /// The medium, if one is inserted.
    pub inserted: Option<BlockDeviceInfo>,
    /// Dirty bitmaps at device level (QEMU before 6.0; newer ones report
    /// them in `inserted`).
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// An NBD export QEMU serves (QAPI `BlockExportInfo`), an entry of
/// `query-block-exports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Export type, e.g. `nbd`.
    #[serde(rename = "type")]
    pub export_type: String,
    /// Node exported.
    pub node_name: String,
    /// Whether the export is being removed.
    #[serde(default)]
    pub shutting_down: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_query_replies() {
        // Shapes as QEMU 10.0 sends them.
        let nodes = json!([{"iops_rd": 0, "detect_zeroes": "off", "active": true,
            "image": {"virtual-size": 67108864, "filename": "/tmp/a.qcow2", "cluster-size": 65536,
                      "format": "qcow2", "actual-size": 200704,
                      "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}, "dirty-flag": false},
            "iops_wr": 0, "ro": false, "node-name": "q0", "backing_file_depth": 0, "drv": "qcow2",
            "iops": 0, "bps_wr": 0, "write_threshold": 0,
            "dirty-bitmaps": [{"name": "b0", "recording": true, "persistent": false, "busy": false,
                               "granularity": 65536, "count": 0}],
            "encrypted": false, "bps": 0, "bps_rd": 0,
            "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/tmp/a.qcow2"}]);
        let nodes: Vec<BlockDeviceInfo> = serde_json::from_value(nodes).unwrap();
        assert_eq!(nodes[0].node_name, "q0");
        assert_eq!(nodes[0].drv, "qcow2");
        assert_eq!(nodes[0].image.virtual_size, 64 << 20);
        assert_eq!(nodes[0].image.cluster_size, Some(65536));
        let bitmaps = nodes[0].dirty_bitmaps.as_ref().unwrap();
        assert_eq!(bitmaps[0].name, "b0");
        assert!(bitmaps[0].recording && !bitmaps[0].persistent && !bitmaps[0].inconsistent);

        let block = json!([{"io-status": "ok", "device": "ide0-hd0", "locked": false, "removable": false,
            "qdev": "/machine/unattached/device[23]", "type": "unknown",
            "inserted": {"ro": false, "drv": "qcow2", "encrypted": false, "file": "disks/test.qcow2",
                         "node-name": "disk0", "backing_file_depth": 1, "backing_file": "base.qcow2",
                         "image": {"filename": "disks/test.qcow2", "format": "qcow2", "virtual-size": 2048000,
                                   "backing-filename": "base.qcow2"}}},
            {"device": "cd0", "locked": false, "removable": true, "tray_open": true, "type": "unknown"}]);
        let block: Vec<BlockInfo> = serde_json::from_value(block).unwrap();
        let inserted = block[0].inserted.as_ref().unwrap();
        assert_eq!(inserted.node_name, "disk0");
        assert_eq!(inserted.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(inserted.backing_file_depth, 1);
        assert_eq!(
            inserted.image.backing_filename.as_deref(),
            Some("base.qcow2")
        );
        assert_eq!(block[0].io_status.as_deref(), Some("ok"));
        assert_eq!(block[1].inserted, None);
        assert_eq!(block[1].tray_open, Some(true));

        let jobs = json!([{"current-progress": 1048576, "status": "running", "total-progress": 67108864,
                           "type": "backup", "id": "j1"},
                          {"current-progress": 0, "status": "some-future-state", "total-progress": 0,
                           "type": "backup", "id": "j2", "error": "boom"}]);
        let jobs: Vec<JobInfo> = serde_json::from_value(jobs).unwrap();
        assert_eq!(jobs[0].status, JobStatus::Running);
        assert_eq!(jobs[0].job_type, "backup");
        assert_eq!(jobs[0].current_progress, 1 << 20);
        assert_eq!(jobs[1].status, JobStatus::Unknown);
        assert_eq!(jobs[1].error.as_deref(), Some("boom"));
    }
}

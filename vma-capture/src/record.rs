//! The capture record: how each drive of an archive was captured (its
//! node and checkpoint bitmap), stored in the archive as the
//! [`CAPTURE_BLOB`] config and read back from a parent archive.

use std::path::Path;

use serde::{Deserialize, Serialize};
use vma_core::format::ParentRef;
use vma_core::{ArchiveMeta, ConfigBlob, Reader};

use crate::error::{CaptureError, Result};

/// Name of the config blob that records how an archive was captured.
pub const CAPTURE_BLOB: &str = vma_core::chain::configs::CAPTURE_RECORD;

/// How one drive was captured; stored in [`CAPTURE_BLOB`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveCheckpoint {
    /// Drive name in the archive.
    pub name: String,
    /// QEMU block node the drive was read from.
    pub node: String,
    /// Size in bytes.
    pub size: u64,
    /// Dirty bitmap started with this archive (the next incremental's base).
    pub bitmap: String,
    /// `full` or `incremental`.
    pub backup: String,
    /// Why an incremental capture backed this drive up in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Content of [`CAPTURE_BLOB`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRecord {
    /// One entry per drive, in archive order.
    pub drives: Vec<DriveCheckpoint>,
}

/// Store `record` in `meta` as the [`CAPTURE_BLOB`] config.
pub(crate) fn add_record(meta: &mut ArchiveMeta, record: &CaptureRecord) -> Result<()> {
    if meta.configs.iter().any(|c| c.name == CAPTURE_BLOB) {
        return Err(CaptureError::Invalid(format!(
            "the config name {CAPTURE_BLOB} is reserved for the capture record"
        )));
    }
    meta.configs.push(ConfigBlob {
        name: CAPTURE_BLOB.into(),
        data: serde_json::to_vec_pretty(&record).expect("serializable"),
    });
    Ok(())
}

/// The parent's reference (uuid, archive digest and state digest: only a
/// 3.0 archive can be a parent) and capture record.
pub(crate) fn read_parent(path: &Path) -> Result<(ParentRef, CaptureRecord)> {
    let reader = Reader::open(path)?;
    let identity = reader.identity()?;
    let header = reader.header();
    let blob = header
        .configs
        .iter()
        .find(|c| c.name == CAPTURE_BLOB)
        .ok_or_else(|| {
            CaptureError::Invalid(format!(
                "{} was not made by vma capture (it has no {CAPTURE_BLOB}), so it has no checkpoints",
                path.display()
            ))
        })?;
    let record: CaptureRecord = serde_json::from_slice(&blob.data).map_err(|e| {
        CaptureError::Invalid(format!(
            "{}: unreadable {CAPTURE_BLOB}: {e}",
            path.display()
        ))
    })?;
    Ok((identity, record))
}

/// Value helper for tests and callers that want the record of an archive.
pub fn capture_record(header: &vma_core::Header) -> Option<CaptureRecord> {
    header
        .configs
        .iter()
        .find(|c| c.name == CAPTURE_BLOB)
        .and_then(|c| serde_json::from_slice(&c.data).ok())
}

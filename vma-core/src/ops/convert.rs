//! Writing either archive format through one type, and copying decoded
//! extents from any reader into any writer (`convert`).

use std::io::Write;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::extent::{ClusterData, DecodedExtent};
use crate::format::{DriveInfo, RunKind, CLUSTER_SIZE};
use crate::types::{cluster_len, ClusterNo, DriveId};
use crate::write::v1::V1Writer;
use crate::write::writer::{ArchiveMeta, ClusterWriter, WriteSummary, Writer, WriterOptions};

/// A writer of either format, chosen at run time.
pub enum AnyWriter<W: Write> {
    /// The native format (3.0).
    Native(Box<Writer<W>>),
    /// Proxmox VMA v1.
    V1(V1Writer<W>),
}

impl<W: Write> AnyWriter<W> {
    /// Start an archive in the native format, or in VMA v1 when `vma1`
    /// (which ignores `options`' compression: v1 stores blocks as they are).
    pub fn new(out: W, meta: ArchiveMeta, vma1: bool, options: &WriterOptions) -> Result<Self> {
        if vma1 {
            if meta.parent.is_some() {
                return Err(Error::Invalid(
                    "VMA v1 cannot hold an incremental archive".into(),
                ));
            }
            let ctime = u64::try_from(meta.ctime).unwrap_or(0);
            Ok(AnyWriter::V1(V1Writer::new(
                out,
                meta.uuid,
                ctime,
                meta.drives,
                meta.configs,
            )?))
        } else {
            Ok(AnyWriter::Native(Box::new(Writer::new(
                out, meta, options,
            )?)))
        }
    }

    /// Finish the archive; the summary exists for the native format.
    pub fn finish(self) -> Result<(W, Option<WriteSummary>)> {
        match self {
            AnyWriter::Native(w) => w.finish().map(|(o, s)| (o, Some(s))),
            AnyWriter::V1(w) => w.finish().map(|o| (o, None)),
        }
    }
}

impl<W: Write> ClusterWriter for AnyWriter<W> {
    fn write_cluster(&mut self, drive: DriveId, cluster: ClusterNo, data: &[u8]) -> Result<()> {
        match self {
            AnyWriter::Native(w) => w.write_cluster(drive, cluster, data),
            AnyWriter::V1(w) => w.write_cluster(drive, cluster, data),
        }
    }
    fn write_zeros(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        match self {
            AnyWriter::Native(w) => w.write_zeros(drive, clusters),
            AnyWriter::V1(w) => w.write_zeros(drive, clusters),
        }
    }
    fn write_unchanged(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        match self {
            AnyWriter::Native(w) => w.write_unchanged(drive, clusters),
            AnyWriter::V1(w) => w.write_unchanged(drive, clusters),
        }
    }
}

/// Re-emit every cluster of a decoded extent into `out`, in the same order:
/// zero runs stay zero runs, data clusters are expanded and written.
pub fn copy_extent(
    ext: &DecodedExtent,
    drives: &[DriveInfo],
    out: &mut dyn ClusterWriter,
) -> Result<()> {
    let mut buf = vec![0u8; CLUSTER_SIZE];
    for e in &ext.entries {
        let size = drives
            .iter()
            .find(|d| d.id == e.drive)
            .map(|d| d.size)
            .ok_or_else(|| Error::Invalid(format!("extent names unknown drive {}", e.drive)))?;
        let clusters = e.start..e.start + e.count as u64;
        match e.kind {
            RunKind::Zero => out.write_zeros(e.drive, clusters)?,
            RunKind::Unchanged => out.write_unchanged(e.drive, clusters)?,
            RunKind::Data => {
                for c in clusters {
                    let cluster = ClusterNo(c);
                    let len = cluster_len(size, cluster);
                    match ext.cluster(e.drive, cluster) {
                        Some(data @ ClusterData::Data { .. }) => {
                            data.expand_into(&mut buf[..len]);
                            out.write_cluster(e.drive, cluster, &buf[..len])?;
                        }
                        _ => {
                            return Err(Error::Invalid(format!(
                                "extent lost cluster {c} of drive {}",
                                e.drive
                            )))
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

//! Writing either archive format through one type, copying decoded
//! extents from any reader into any writer, and `convert` itself
//! ([`convert_archive`]).

use std::io::{Read, Write};
use std::ops::Range;
use std::sync::Arc;

use crate::atomic::StaleTemporary;
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::extent::{ClusterData, DecodedExtent};
use crate::format::{DriveInfo, RunKind, CLUSTER_SIZE};
use crate::format::{Header, ParentRef};
use crate::index::LeafSource;
use crate::ops::output::{write_archive, ArchiveOutput};
use crate::read::stream::{ArchiveFormat, ArchiveStream, HashDrives, PassOptions, PassReport};
use crate::types::{cluster_len, ClusterNo, DriveId};
use crate::util::ProgressFn;
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

/// How [`convert_archive`] writes.
#[derive(Clone, Default)]
pub struct ConvertOptions {
    /// Write Proxmox VMA v1 rather than the native format.
    pub vma1: bool,
    /// The native writer's options (compression, threads).
    pub writer: WriterOptions,
    /// Decoder threads of the pass (0: one per core).
    pub threads: usize,
    /// Go on past damage, and write what was lost as zero clusters so
    /// that the output is complete (the report says what).
    pub salvage: bool,
    /// Progress of the pass's and the writer's steps.
    pub progress: Option<ProgressFn>,
    /// Decode and write every extent anew even where a 3.0 extent could be
    /// copied as stored (another extent size was asked for).
    pub reencode: bool,
}

/// The metadata of the conversion of an archive with `header`: its uuid,
/// time, drives, configs, parent and stand-ins, this crate as creator.
pub fn converted_meta(header: &Header) -> ArchiveMeta {
    ArchiveMeta {
        uuid: header.uuid,
        ctime: header.ctime,
        creator: format!("vma {}", env!("CARGO_PKG_VERSION")),
        drives: header.drives.clone(),
        configs: header.configs.clone(),
        parent: header.parent,
        // 2.0 references have no state digest: zeros say so (see `vma merge`).
        stands_for: header
            .stands_for
            .iter()
            .map(|s| ParentRef {
                state: Some(s.state.unwrap_or([0; 32])),
                ..*s
            })
            .collect(),
    }
}

/// Convert the archive `stream` reads into `output` (see
/// [`crate::ops::output::write_archive`]), in one sequential pass. A 3.0
/// incremental archive becomes one with the same parent: `ancestors` (its
/// parent chain) give the leaves of its unchanged clusters. 3.0 extents
/// already encoded as asked are copied as they are stored; every drive
/// digest a 3.0 input records is checked against what was written (end to
/// end), and 2.0's plain SHA-256 on the way. `position` hears the input
/// offset reached. Returns the pass's report and the bytes written.
pub fn convert_archive<R: Read>(
    stream: ArchiveStream<R>,
    ancestors: Option<&Arc<Chain>>,
    output: &ArchiveOutput<'_>,
    options: &ConvertOptions,
    on_stale: &mut dyn FnMut(&StaleTemporary),
    position: &dyn Fn(u64),
) -> Result<(PassReport, u64)> {
    let header = stream.header().clone();
    let source_format = stream.format();
    let meta = converted_meta(&header);
    let pass_options = PassOptions {
        threads: options.threads,
        keep_going: options.salvage,
        // 2.0 records a plain SHA-256 per drive: checked on the way (in order).
        hash_drives: if source_format == ArchiveFormat::V2 {
            HashDrives::All
        } else {
            HashDrives::None
        },
        progress: options.progress.clone(),
        ..Default::default()
    };
    write_any_archive(
        output,
        on_stale,
        meta,
        options.vma1,
        &options.writer,
        options.progress.clone(),
        |writer| {
            if let (AnyWriter::Native(w), Some(chain)) = (&mut *writer, ancestors) {
                w.set_leaf_source(chain.leaf_source());
            }
            // 3.0 extents already encoded as asked are copied as they are
            // stored (the writer decodes them once for their leaves).
            let mut source = ancestors.map(|c| c.leaf_source());
            let report = match &mut *writer {
                AnyWriter::Native(w)
                    if source_format == ArchiveFormat::V3
                        && w.header().compression == header.compression
                        && !options.reencode =>
                {
                    stream.pass_stored(&pass_options, |ext| {
                        position(ext.offset() + ext.stored_len());
                        w.append_stored(ext)
                    })?
                }
                _ => stream.pass_with(
                    &pass_options,
                    source.as_mut().map(|s| &mut **s as &mut dyn LeafSource),
                    |ext| {
                        position(ext.offset + ext.stored_len);
                        copy_extent(ext, &header.drives, &mut *writer)
                    },
                )?,
            };
            if options.salvage {
                fill_lost(&report, &mut *writer)?;
            }
            let lost = !(report.damaged.is_empty() && report.missing.is_empty());
            if let AnyWriter::Native(w) = &mut *writer {
                for r in report.records.iter().flatten() {
                    if r.interrupted {
                        w.mark_interrupted(r.drive)?;
                    } else if let (ArchiveFormat::V3, Some(digest), false) =
                        (source_format, r.digest, lost)
                    {
                        // End to end: the new archive holds what the old one recorded.
                        w.expect_drive_digest(r.drive, digest)?;
                    }
                }
            }
            Ok(report)
        },
    )
}

/// Write an archive of `meta` into `output` (see [`write_archive`]; its
/// drives' sizes, plus 64 MiB, bound its size) through `body`, with an
/// [`AnyWriter`] of the format `vma1` chooses that reports the steps of a
/// native archive's finish to `progress`. The archive is finished after
/// `body`. Returns the body's result and the bytes written.
pub(crate) fn write_any_archive<T>(
    output: &ArchiveOutput<'_>,
    on_stale: &mut dyn FnMut(&StaleTemporary),
    meta: ArchiveMeta,
    vma1: bool,
    options: &WriterOptions,
    progress: Option<ProgressFn>,
    body: impl FnOnce(&mut AnyWriter<&mut dyn Write>) -> Result<T>,
) -> Result<(T, u64)> {
    let expected = meta.drives.iter().map(|d| d.size).sum::<u64>() + (64 << 20);
    write_archive(
        &output.expecting(expected),
        on_stale,
        |out| {
            let mut writer = AnyWriter::new(out, meta, vma1, options)?;
            if let AnyWriter::Native(w) = &mut writer {
                w.set_progress(progress);
            }
            let result = body(&mut writer)?;
            writer.finish()?;
            Ok(result)
        },
        |_| Ok(()),
    )
}

/// Write every byte range `report` lists as lost (held only by damaged
/// extents, or by none) as zero clusters, so the output is complete.
fn fill_lost(report: &PassReport, writer: &mut dyn ClusterWriter) -> Result<()> {
    let cs = CLUSTER_SIZE as u64;
    for r in report.damaged.iter().chain(&report.missing) {
        writer.write_zeros(r.drive, r.bytes.start / cs..r.bytes.end.div_ceil(cs))?;
    }
    Ok(())
}

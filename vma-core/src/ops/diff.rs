//! Incremental archives made by comparison: a current disk image against
//! an earlier point in time (an archive chain), storing only the clusters
//! that differ. It starts an incremental chain after the fact, where no
//! dirty bitmap recorded the changes.

use std::io::Write;
use std::ops::Range;

use crate::error::Result;
use crate::format::CLUSTER_SIZE;
use crate::image::source::{copy_image, next_data_run, DiskImage, Stretch};
use crate::types::{cluster_len, clusters_for, ClusterNo, DriveId};
use crate::write::writer::Writer;

/// Clusters compared per read.
const CHUNK_CLUSTERS: u64 = 32;

/// What a comparison found for one drive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Clusters stored because they differ (data or zeros).
    pub changed: u64,
    /// Clusters equal to the base, stored as unchanged.
    pub unchanged: u64,
}

/// Store in `drive` of `writer` (an archive whose parent is `base`'s point
/// in time) every cluster of `image` that differs from `base`, and mark the
/// rest unchanged. Both have the same size. Zero stretches of `image` are
/// not read; those of `base` are not read either. `progress` gets the bytes
/// of the drive done.
pub fn diff_image<W: Write>(
    writer: &mut Writer<W>,
    drive: DriveId,
    image: &dyn DiskImage,
    base: &dyn DiskImage,
    progress: &mut dyn FnMut(u64),
) -> Result<DiffStats> {
    let size = image.size();
    let total = clusters_for(size);
    let mut out = Recorder {
        writer,
        drive,
        unchanged_from: None,
        stats: DiffStats::default(),
    };
    let mut new = vec![0u8; CHUNK_CLUSTERS as usize * CLUSTER_SIZE];
    let mut old = vec![0u8; CHUNK_CLUSTERS as usize * CLUSTER_SIZE];
    let cs = CLUSTER_SIZE as u64;
    let mut c = 0;
    while c < total {
        let run = next_data_run(image, c)?;
        let zero_end = run.as_ref().map_or(total, |r| r.start);
        // The image reads as zeros here: unchanged where the base does too.
        let mut z = c;
        while z < zero_end {
            let n = (zero_end - z).min(CHUNK_CLUSTERS);
            if base_is_zero(base, z * cs, ((z + n) * cs).min(size))? {
                out.unchanged(z..z + n)?;
            } else {
                let len = (((z + n) * cs).min(size) - z * cs) as usize;
                base.read_at(&mut old[..len], z * cs)?;
                for k in 0..n {
                    let piece = cluster_slice(&old, k, z + k, size);
                    if piece.iter().all(|&b| b == 0) {
                        out.unchanged(z + k..z + k + 1)?;
                    } else {
                        out.zeros(z + k)?;
                    }
                }
            }
            z += n;
            progress((z * cs).min(size));
        }
        let Some(run) = run else { break };
        let mut d = run.start;
        while d < run.end {
            let n = (run.end - d).min(CHUNK_CLUSTERS);
            let len = (((d + n) * cs).min(size) - d * cs) as usize;
            image.read_at(&mut new[..len], d * cs)?;
            if base_is_zero(base, d * cs, d * cs + len as u64)? {
                old[..len].fill(0);
            } else {
                base.read_at(&mut old[..len], d * cs)?;
            }
            for k in 0..n {
                let now = cluster_slice(&new, k, d + k, size);
                if now == cluster_slice(&old, k, d + k, size) {
                    out.unchanged(d + k..d + k + 1)?;
                } else {
                    out.changed(d + k, now)?;
                }
            }
            d += n;
            progress((d * cs).min(size));
        }
        c = run.end;
    }
    out.flush()?;
    Ok(out.stats)
}

/// Store `image` as drive `drive` of `writer`: only the clusters that
/// differ from `base` when there is one ([`diff_image`]), else all of it,
/// in order ([`copy_image`]). Returns the comparison's figures when there
/// was a base.
pub fn diff_or_copy<W: Write>(
    writer: &mut Writer<W>,
    drive: DriveId,
    image: &dyn DiskImage,
    base: Option<&dyn DiskImage>,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<DiffStats>> {
    match base {
        Some(base) => diff_image(writer, drive, image, base, progress).map(Some),
        None => {
            copy_image(writer, drive, image, progress)?;
            Ok(None)
        }
    }
}

/// Cluster `k` of a chunk buffer holding cluster `cluster` at index `k`.
fn cluster_slice(buf: &[u8], k: u64, cluster: u64, size: u64) -> &[u8] {
    let start = k as usize * CLUSTER_SIZE;
    &buf[start..start + cluster_len(size, ClusterNo(cluster))]
}

/// Whether `base` is known to read as zeros over `start..end`.
fn base_is_zero(base: &dyn DiskImage, start: u64, end: u64) -> Result<bool> {
    let mut pos = start;
    while pos < end {
        match base.status(pos)? {
            Stretch::Zero(len) => pos += len,
            Stretch::Data(_) => return Ok(false),
        }
    }
    Ok(true)
}

/// Writes the outcome cluster by cluster, joining unchanged clusters into runs.
struct Recorder<'a, W: Write> {
    writer: &'a mut Writer<W>,
    drive: DriveId,
    unchanged_from: Option<Range<u64>>,
    stats: DiffStats,
}

impl<W: Write> Recorder<'_, W> {
    fn unchanged(&mut self, r: Range<u64>) -> Result<()> {
        self.stats.unchanged += r.end - r.start;
        match &mut self.unchanged_from {
            Some(open) if open.end == r.start => open.end = r.end,
            _ => {
                self.flush()?;
                self.unchanged_from = Some(r);
            }
        }
        Ok(())
    }

    fn changed(&mut self, cluster: u64, data: &[u8]) -> Result<()> {
        self.flush()?;
        self.stats.changed += 1;
        self.writer
            .write_cluster(self.drive, ClusterNo(cluster), data)
    }

    fn zeros(&mut self, cluster: u64) -> Result<()> {
        self.flush()?;
        self.stats.changed += 1;
        self.writer.write_zeros(self.drive, cluster..cluster + 1)
    }

    fn flush(&mut self) -> Result<()> {
        match self.unchanged_from.take() {
            Some(r) => self.writer.write_unchanged(self.drive, r),
            None => Ok(()),
        }
    }
}

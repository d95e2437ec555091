//! Small value types whose mix-ups would be bugs: drive ids, cluster numbers,
//! archive offsets and byte ranges of drives; and the cluster geometry every
//! layer counts in. This module sits below `format`: of the crate it uses
//! only the error type.

use std::fmt;
use std::ops::Range;

/// Image data is addressed in clusters of this many bytes. Part of every
/// on-disk format (`format-spec.md`): never change.
pub const CLUSTER_SIZE: usize = 64 * 1024;
/// Clusters are split into blocks of this size; all-zero blocks are not
/// stored. Never change.
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per cluster (one bit each in a block mask).
pub const BLOCKS_PER_CLUSTER: usize = CLUSTER_SIZE / BLOCK_SIZE;

/// A drive's id inside one archive (1..=255 in v2; 0 is never a drive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriveId(pub u8);

impl fmt::Display for DriveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The number of a 64 KiB cluster within one drive (byte offset / 65536).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterNo(pub u64);

impl ClusterNo {
    /// Byte offset of the cluster's first byte within its drive.
    pub fn byte_offset(self) -> u64 {
        self.0 * CLUSTER_SIZE as u64
    }

    /// The cluster holding drive byte `offset`.
    pub fn containing(offset: u64) -> Self {
        ClusterNo(offset / CLUSTER_SIZE as u64)
    }
}

impl fmt::Display for ClusterNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A position in an archive file: bytes from its first byte (what the
/// extent table and the footer store). Kept apart from drive byte offsets
/// and cluster numbers, which count within one drive: a drive offset
/// where an archive offset is expected does not compile.
///
/// ```compile_fail
/// use vma_core::types::{ArchiveOffset, ClusterNo};
/// fn extent_at(_: ArchiveOffset) {}
/// extent_at(ClusterNo(3).byte_offset());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArchiveOffset(pub u64);

impl ArchiveOffset {
    /// The offset as a plain number of bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The offset `len` bytes further on, unless that overflows.
    pub fn checked_add(self, len: u64) -> Option<ArchiveOffset> {
        self.0.checked_add(len).map(ArchiveOffset)
    }
}

impl std::ops::Add<u64> for ArchiveOffset {
    type Output = ArchiveOffset;
    fn add(self, len: u64) -> ArchiveOffset {
        ArchiveOffset(self.0 + len)
    }
}

impl fmt::Display for ArchiveOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How an index run names the extent holding its data: the extent's
/// sequence number in a 3.0 archive, its file offset in 2.0 and VMA v1, and
/// [`ExtentRef::NONE`] in zero and unchanged runs. It is not a file
/// position: only the index that made it resolves it to one (the reader's
/// extent lookup returns an [`ArchiveOffset`]), so using it as an offset
/// does not compile.
///
/// ```compile_fail
/// use vma_core::types::{ArchiveOffset, ExtentRef};
/// fn extent_at(_: ArchiveOffset) {}
/// extent_at(ExtentRef::NONE);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct ExtentRef(u64);

impl ExtentRef {
    /// The reference of zero and unchanged runs, which name no extent.
    pub const NONE: ExtentRef = ExtentRef(0);

    /// The reference a 3.0 index gives the extent with sequence number `seq`.
    pub const fn seq(seq: u64) -> Self {
        ExtentRef(seq)
    }

    /// The reference a 2.0 or VMA v1 index gives the extent at `offset`.
    pub const fn at(offset: ArchiveOffset) -> Self {
        ExtentRef(offset.0)
    }

    /// The value as an index run stores it on disk.
    pub const fn from_raw(raw: u64) -> Self {
        ExtentRef(raw)
    }

    /// The value an index run stores on disk; only the format code that
    /// writes runs and the index or reader that resolves them read it.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// Number of clusters a drive of `size` bytes spans (the last may be partial).
pub fn clusters_for(size: u64) -> u64 {
    size.div_ceil(CLUSTER_SIZE as u64)
}

/// Number of bytes of cluster `cluster` that lie inside a drive of `size` bytes.
pub fn cluster_len(size: u64, cluster: ClusterNo) -> usize {
    let start = cluster.byte_offset();
    size.saturating_sub(start).min(CLUSTER_SIZE as u64) as usize
}

/// Which 4 KiB blocks of a cluster hold any non-zero byte (bit i = block i).
pub fn block_mask(data: &[u8]) -> u16 {
    static ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    let mut mask = 0u16;
    for (i, block) in data.chunks(BLOCK_SIZE).enumerate().take(BLOCKS_PER_CLUSTER) {
        if block != &ZERO[..block.len()] {
            mask |= 1 << i;
        }
    }
    mask
}

/// True when every byte is zero (fast path through memcmp).
pub fn is_zero(data: &[u8]) -> bool {
    static ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    data.chunks(BLOCK_SIZE).all(|c| c == &ZERO[..c.len()])
}

/// A byte range of one named drive, used to say where damage or gaps are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveRange {
    /// The drive's id.
    pub drive: DriveId,
    /// The drive's name as stored in the archive.
    pub drive_name: String,
    /// Byte range within the drive (end exclusive, clipped to the drive size).
    pub bytes: Range<u64>,
}

impl fmt::Display for DriveRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drive {} ({}) bytes {}..{}",
            self.drive_name, self.drive, self.bytes.start, self.bytes.end
        )
    }
}

/// Format a list of ranges briefly, at most `max` of them, for one-line messages.
pub fn describe_ranges(ranges: &[DriveRange], max: usize) -> String {
    let mut parts: Vec<String> = ranges.iter().take(max).map(|r| r.to_string()).collect();
    if ranges.len() > max {
        parts.push(format!("and {} more ranges", ranges.len() - max));
    }
    parts.join(", ")
}

/// Byte range of a cluster range within a drive of `size` bytes.
pub fn cluster_range_bytes(size: u64, clusters: Range<u64>) -> Range<u64> {
    let start = (clusters.start * CLUSTER_SIZE as u64).min(size);
    let end = (clusters.end * CLUSTER_SIZE as u64).min(size);
    start..end
}

/// A uuid in its usual 8-4-4-4-12 hex form.
pub fn uuid_text(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

/// Anything that takes clusters of drives in any order: the native
/// [`crate::Writer`] and the VMA v1 writer. Sources feed archives through it.
pub trait ClusterWriter {
    /// Store one cluster (`data` is the cluster's exact length).
    fn write_cluster(
        &mut self,
        drive: DriveId,
        cluster: ClusterNo,
        data: &[u8],
    ) -> crate::Result<()>;
    /// Record clusters as all zero.
    fn write_zeros(&mut self, drive: DriveId, clusters: Range<u64>) -> crate::Result<()>;
    /// Record clusters as unchanged from the parent, where the format has
    /// incremental archives.
    fn write_unchanged(&mut self, _drive: DriveId, _clusters: Range<u64>) -> crate::Result<()> {
        Err(crate::Error::Invalid(
            "this archive format cannot hold an incremental archive (unchanged clusters)".into(),
        ))
    }
}

/// Sees the clusters a [`ClusterWriter`] is given, without changing them:
/// for tallies a caller prints as it goes (Proxmox's `create -v` counts
/// zero bytes per drive). `()` observes nothing.
pub trait ClusterObserver {
    /// One cluster stored with these bytes.
    fn cluster(&mut self, _drive: DriveId, _cluster: ClusterNo, _data: &[u8]) {}
    /// Clusters recorded as all zero.
    fn zeros(&mut self, _drive: DriveId, _clusters: Range<u64>) {}
}

impl ClusterObserver for () {}

/// A [`ClusterWriter`] that shows each cluster to an observer once the
/// inner writer took it.
pub struct Observed<'a> {
    /// Where the clusters go.
    pub inner: &'a mut dyn ClusterWriter,
    /// Who sees them.
    pub observer: &'a mut dyn ClusterObserver,
}

impl ClusterWriter for Observed<'_> {
    fn write_cluster(
        &mut self,
        drive: DriveId,
        cluster: ClusterNo,
        data: &[u8],
    ) -> crate::Result<()> {
        self.inner.write_cluster(drive, cluster, data)?;
        self.observer.cluster(drive, cluster, data);
        Ok(())
    }

    fn write_zeros(&mut self, drive: DriveId, clusters: Range<u64>) -> crate::Result<()> {
        self.inner.write_zeros(drive, clusters.clone())?;
        self.observer.zeros(drive, clusters);
        Ok(())
    }

    fn write_unchanged(&mut self, drive: DriveId, clusters: Range<u64>) -> crate::Result<()> {
        self.inner.write_unchanged(drive, clusters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_arithmetic() {
        assert_eq!(clusters_for(0), 0);
        assert_eq!(clusters_for(1), 1);
        assert_eq!(clusters_for(65536), 1);
        assert_eq!(clusters_for(65537), 2);
        assert_eq!(cluster_len(65537, ClusterNo(1)), 1);
        assert_eq!(cluster_len(65537, ClusterNo(0)), 65536);
        assert_eq!(cluster_len(65537, ClusterNo(2)), 0);
    }

    #[test]
    fn masks() {
        let mut c = vec![0u8; CLUSTER_SIZE];
        assert_eq!(block_mask(&c), 0);
        c[4096 * 3 + 17] = 1;
        c[65535] = 9;
        assert_eq!(block_mask(&c), (1 << 3) | (1 << 15));
        assert_eq!(block_mask(&c[..5000]), 0);
        assert_eq!(block_mask(&[1u8; 100]), 1);
    }
}

//! Holes and salvaging reads at the newest point in time of a chain: what a
//! file system over a chain (`mount`) needs besides plain reads, answered
//! from the indexes so that no caller has to know the byte layout.

use std::ops::Range;

use super::Chain;
use crate::error::{Error, Result};
use crate::format::CLUSTER_SIZE;
use crate::image::source::Stretch;
use crate::types::DriveId;

/// What [`Chain::seek`] looks for (`SEEK_DATA` or `SEEK_HOLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// The first byte that may hold data.
    Data,
    /// The first byte known to read as zeros (the drive's end counts).
    Hole,
}

/// A range of a drive that a salvaging read answered with zeros, and why.
#[derive(Debug)]
pub struct ZeroFilled {
    /// Bytes of the drive (end exclusive).
    pub bytes: Range<u64>,
    /// The damage that made them unreadable.
    pub error: Error,
}

impl Chain {
    /// `SEEK_DATA` / `SEEK_HOLE` at the newest point in time: the first
    /// offset at or after `offset` of drive `drive` (newest ids) in data or
    /// in a hole; `None` for "no more data" (and for any offset at or past
    /// the drive's end). Unchanged runs are followed into the ancestors.
    pub fn seek(&self, drive: DriveId, offset: u64, what: Seek) -> Result<Option<u64>> {
        let size = self
            .header()
            .drive(drive)
            .ok_or_else(|| Error::Invalid(format!("no drive with id {drive}")))?
            .size;
        if offset >= size {
            return Ok(None);
        }
        let mut pos = offset;
        while pos < size {
            let (is_data, len) = match self.status(drive, pos)? {
                Stretch::Data(n) => (true, n),
                Stretch::Zero(n) => (false, n),
            };
            if is_data == (what == Seek::Data) {
                return Ok(Some(pos));
            }
            pos += len.max(1);
        }
        Ok(match what {
            Seek::Data => None,
            Seek::Hole => Some(size),
        })
    }

    /// Fill `buf` from `offset` of drive `drive` like [`Chain::read_at`],
    /// answering each cluster that cannot be read because of damage with
    /// zeros (`--salvage`); every range so answered is returned with its
    /// error. Errors that are not damage (I/O, usage) still fail the read.
    pub fn read_salvaging(
        &self,
        drive: DriveId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Vec<ZeroFilled>> {
        let mut lost = Vec::new();
        if let Err(e) = self.read_at(drive, offset, buf) {
            if !e.is_damage() {
                return Err(e);
            }
        } else {
            return Ok(lost);
        }
        let cs = CLUSTER_SIZE as u64;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let next = ((pos / cs + 1) * cs).min(end);
            let part = &mut buf[(pos - offset) as usize..(next - offset) as usize];
            match self.read_at(drive, pos, part) {
                Ok(()) => {}
                Err(e) if e.is_damage() => {
                    part.fill(0);
                    lost.push(ZeroFilled {
                        bytes: pos..next,
                        error: e,
                    });
                }
                Err(e) => return Err(e),
            }
            pos = next;
        }
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::DriveInfo;
    use crate::read::reader::Reader;
    use crate::types::ClusterNo;
    use crate::write::writer::{ArchiveMeta, Writer, WriterOptions};

    #[test]
    fn seeking_data_and_holes() {
        let cs = CLUSTER_SIZE as u64;
        let size = 9 * cs + 100;
        // Data in clusters 0, 1 and 5; zeros elsewhere.
        let drive = DriveInfo {
            id: DriveId(1),
            name: "disk".into(),
            size,
        };
        let mut w = Writer::new(
            Vec::new(),
            ArchiveMeta::new(vec![drive], vec![]),
            &WriterOptions::default(),
        )
        .unwrap();
        let data = vec![7u8; CLUSTER_SIZE];
        for c in [0u64, 1, 5] {
            w.write_cluster(DriveId(1), ClusterNo(c), &data).unwrap();
        }
        w.write_zeros(DriveId(1), 2..5).unwrap();
        w.write_zeros(DriveId(1), 6..10).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        std::fs::write(&path, bytes).unwrap();
        let chain = Chain::with_newest(Reader::open(&path).unwrap(), &[]).unwrap();
        let seek = |offset, what| chain.seek(DriveId(1), offset, what).unwrap();
        assert_eq!(seek(0, Seek::Data), Some(0));
        assert_eq!(seek(10, Seek::Hole), Some(2 * cs));
        assert_eq!(seek(2 * cs + 7, Seek::Data), Some(5 * cs));
        assert_eq!(seek(5 * cs + 7, Seek::Data), Some(5 * cs + 7));
        assert_eq!(seek(5 * cs + 7, Seek::Hole), Some(6 * cs));
        assert_eq!(seek(6 * cs, Seek::Data), None);
        assert_eq!(seek(7 * cs, Seek::Hole), Some(7 * cs));
        assert_eq!(seek(size, Seek::Hole), None);
        let mut buf = vec![1u8; 3 * CLUSTER_SIZE];
        let lost = chain.read_salvaging(DriveId(1), 4 * cs, &mut buf).unwrap();
        assert!(lost.is_empty());
        assert_eq!(&buf[..CLUSTER_SIZE], &[0u8; CLUSTER_SIZE][..]);
        assert_eq!(&buf[CLUSTER_SIZE..2 * CLUSTER_SIZE], &data[..]);
    }
}

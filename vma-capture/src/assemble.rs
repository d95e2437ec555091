//! From byte-range writes (what an NBD client sends) to whole clusters
//! (what the archive Writer takes).
//!
//! QEMU's backup job writes whole 64 KiB clusters almost always, but a
//! drive's last cluster may be shorter and nothing in NBD forbids a write
//! of any length at any offset. A cluster is passed on once every byte of
//! it has been written; until then its bytes wait here. The archive is
//! append-only, so a cluster written again after it was passed on is an
//! error, never silently dropped.

use std::collections::BTreeMap;
use std::ops::Range;

use vma_core::format::CLUSTER_SIZE;
use vma_core::types::{cluster_len, clusters_for, ClusterNo};
use vma_core::util::ranges::RangeSet;
use vma_core::DriveId;

/// A complete piece of a drive, ready for the archive Writer.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// One whole cluster (shorter only for a drive's last cluster).
    Data {
        /// Drive.
        drive: DriveId,
        /// Cluster number.
        cluster: ClusterNo,
        /// The cluster's bytes.
        bytes: Vec<u8>,
    },
    /// Whole clusters that are all zero.
    Zeros {
        /// Drive.
        drive: DriveId,
        /// Cluster numbers.
        clusters: Range<u64>,
    },
}

/// A write the assembler cannot accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    /// The write reaches past the end of the drive.
    #[error("write of bytes {start}..{end} goes past the end of the drive ({size} bytes)")]
    OutOfRange {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Drive size.
        size: u64,
    },
    /// The write touches a cluster already passed on to the archive.
    #[error("bytes {start}..{end} were already stored in the archive; it cannot take them again")]
    Rewrite {
        /// First byte of the cluster range concerned.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
}

/// A cluster some of whose bytes have arrived.
struct Partial {
    bytes: Vec<u8>,
    /// Byte ranges (within the cluster) written so far, disjoint.
    written: RangeSet,
}

/// Collects one drive's writes into whole clusters.
pub struct ClusterAssembler {
    drive: DriveId,
    size: u64,
    partial: BTreeMap<u64, Partial>,
    /// Clusters passed on.
    done: RangeSet,
    /// One past the highest cluster passed on.
    high_water: u64,
    /// Clusters passed on behind one with a higher number.
    out_of_order: u64,
}

impl ClusterAssembler {
    /// An assembler for `drive` of `size` bytes.
    pub fn new(drive: DriveId, size: u64) -> Self {
        ClusterAssembler {
            drive,
            size,
            partial: BTreeMap::new(),
            done: RangeSet::new(),
            high_water: 0,
            out_of_order: 0,
        }
    }

    /// Take `data` written at byte `offset`; returns the pieces it completes.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Vec<Piece>, AssembleError> {
        self.take(offset, data.len() as u64, Some(data))
    }

    /// Take `len` zero bytes at byte `offset`; returns the pieces it completes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<Vec<Piece>, AssembleError> {
        self.take(offset, len, None)
    }

    /// Clusters passed on so far.
    pub fn done(&self) -> &RangeSet {
        &self.done
    }

    /// Clusters passed on after a cluster with a higher number (what
    /// copy-before-write sends ahead of the job's sequential copy).
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// Byte ranges of clusters that were started but never completed.
    pub fn incomplete(&self) -> Vec<Range<u64>> {
        self.partial
            .keys()
            .map(|&c| {
                let start = c * CLUSTER_SIZE as u64;
                start..start + cluster_len(self.size, ClusterNo(c)) as u64
            })
            .collect()
    }

    /// `data` is None for zeros.
    fn take(
        &mut self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<Vec<Piece>, AssembleError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.size).ok_or(
            AssembleError::OutOfRange {
                start: offset,
                end: offset.saturating_add(len),
                size: self.size,
            },
        )?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let cs = CLUSTER_SIZE as u64;
        let clusters = offset / cs..clusters_for(end);
        if let Some(c) = clusters.clone().find(|&c| self.done.contains(c..c + 1)) {
            return Err(AssembleError::Rewrite {
                start: c * cs,
                end: ((c + 1) * cs).min(self.size),
            });
        }
        let mut pieces = Vec::new();
        for c in clusters {
            let c_start = c * cs;
            let c_len = cluster_len(self.size, ClusterNo(c)) as u64;
            let from = offset.max(c_start);
            let to = end.min(c_start + c_len);
            let whole = from == c_start && to == c_start + c_len;
            let slice = data.map(|d| &d[(from - offset) as usize..(to - offset) as usize]);
            if whole && !self.partial.contains_key(&c) {
                pieces.push(match slice {
                    Some(s) => Piece::Data {
                        drive: self.drive,
                        cluster: ClusterNo(c),
                        bytes: s.to_vec(),
                    },
                    None => Piece::Zeros {
                        drive: self.drive,
                        clusters: c..c + 1,
                    },
                });
            } else {
                let p = self.partial.entry(c).or_insert_with(|| Partial {
                    bytes: vec![0; c_len as usize],
                    written: RangeSet::new(),
                });
                let at = (from - c_start) as usize..(to - c_start) as usize;
                match slice {
                    Some(s) => p.bytes[at.clone()].copy_from_slice(s),
                    None => p.bytes[at.clone()].fill(0),
                }
                add_range(&mut p.written, at.start as u64..at.end as u64);
                if !p.written.contains(0..c_len) {
                    continue;
                }
                let p = self.partial.remove(&c).expect("present");
                pieces.push(Piece::Data {
                    drive: self.drive,
                    cluster: ClusterNo(c),
                    bytes: p.bytes,
                });
            }
            // Cannot overlap: checked against `done` above, and each cluster
            // of this write is visited once.
            let _ = self.done.insert(c..c + 1);
            if c < self.high_water {
                self.out_of_order += 1;
            }
            self.high_water = self.high_water.max(c + 1);
        }
        Ok(merge_zero_pieces(pieces))
    }
}

/// Add `r` to `set`, allowing overlap with what is there (a rewrite of
/// bytes not yet passed on simply replaces them).
fn add_range(set: &mut RangeSet, r: Range<u64>) {
    let mut pos = r.start;
    for gap in set.gaps(r.end) {
        let from = gap.start.max(pos);
        if from < gap.end {
            let _ = set.insert(from..gap.end);
        }
        pos = pos.max(gap.end);
    }
}

/// Join adjacent zero pieces into one run.
fn merge_zero_pieces(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        if let (
            Some(Piece::Zeros {
                drive: d0,
                clusters: r0,
            }),
            Piece::Zeros { drive, clusters },
        ) = (out.last_mut(), &p)
        {
            if *d0 == *drive && r0.end == clusters.start {
                r0.end = clusters.end;
                continue;
            }
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: u64 = CLUSTER_SIZE as u64;

    /// Apply pieces to an image of `size` bytes that starts as `fill`.
    fn apply(img: &mut [u8], pieces: &[Piece]) {
        for p in pieces {
            match p {
                Piece::Data { cluster, bytes, .. } => {
                    let s = (cluster.0 * CS) as usize;
                    img[s..s + bytes.len()].copy_from_slice(bytes);
                }
                Piece::Zeros { clusters, .. } => {
                    let s = (clusters.start * CS) as usize;
                    let e = ((clusters.end * CS) as usize).min(img.len());
                    img[s..e].fill(0);
                }
            }
        }
    }

    #[test]
    fn whole_clusters_pass_straight_through() {
        let mut a = ClusterAssembler::new(DriveId(1), 3 * CS + 512);
        let data = vec![7u8; 2 * CS as usize];
        let pieces = a.write(CS, &data).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(a.write_zeroes(0, CS).unwrap().len(), 1);
        // The 512-byte last cluster is whole by itself.
        let tail = a.write(3 * CS, &[9u8; 512]).unwrap();
        assert_eq!(
            tail,
            vec![Piece::Data {
                drive: DriveId(1),
                cluster: ClusterNo(3),
                bytes: vec![9u8; 512]
            }]
        );
        assert!(a.incomplete().is_empty());
        assert_eq!(a.done().len(), 4);
        // Clusters 1, 2, then 0 (behind 2), then 3.
        assert_eq!(a.out_of_order(), 1);
    }

    #[test]
    fn partial_writes_wait_for_the_rest_of_the_cluster() {
        let mut a = ClusterAssembler::new(DriveId(2), 2 * CS);
        assert!(a.write(1536, &[1u8; 4096]).unwrap().is_empty());
        assert_eq!(a.incomplete(), vec![0..CS]);
        assert!(a.write_zeroes(0, 1536).unwrap().is_empty());
        let done = a
            .write(1536 + 4096, &vec![2u8; (CS - 1536 - 4096) as usize])
            .unwrap();
        assert_eq!(done.len(), 1);
        assert!(a.incomplete().is_empty());
    }

    #[test]
    fn rewrites_and_out_of_range_writes_are_refused() {
        let mut a = ClusterAssembler::new(DriveId(1), 2 * CS);
        a.write(0, &vec![1u8; CS as usize]).unwrap();
        assert_eq!(
            a.write(100, &[1u8; 10]),
            Err(AssembleError::Rewrite { start: 0, end: CS })
        );
        // Nothing of a refused write is kept.
        assert!(a.incomplete().is_empty());
        assert!(matches!(
            a.write(2 * CS - 1, &[0u8; 2]),
            Err(AssembleError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.write_zeroes(u64::MAX, 2),
            Err(AssembleError::OutOfRange { .. })
        ));
    }

    proptest! {
        /// Any set of writes that covers the drive exactly once, in any order
        /// and split at any byte boundaries, reassembles the image exactly.
        #[test]
        fn any_split_and_order_reassembles(
            size in 1u64..(5 * CS),
            cuts in proptest::collection::vec(any::<u64>(), 0..12),
            zero_mask in any::<u16>(),
            order_seed in any::<u64>(),
        ) {
            let img: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8 + 1).collect();
            let mut points: Vec<u64> = cuts.iter().map(|c| c % size).collect();
            points.push(0);
            points.push(size);
            points.sort_unstable();
            points.dedup();
            let mut writes: Vec<(usize, Range<u64>)> =
                points.windows(2).map(|w| w[0]..w[1]).enumerate().collect();
            // Shuffle deterministically.
            let mut s = order_seed | 1;
            for i in (1..writes.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                writes.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut want = img.clone();
            let mut a = ClusterAssembler::new(DriveId(1), size);
            let mut got = vec![0xEEu8; size as usize];
            for (i, r) in &writes {
                let pieces = if zero_mask & (1 << (i % 16)) != 0 {
                    want[r.start as usize..r.end as usize].fill(0);
                    a.write_zeroes(r.start, r.end - r.start).unwrap()
                } else {
                    a.write(r.start, &img[r.start as usize..r.end as usize]).unwrap()
                };
                apply(&mut got, &pieces);
            }
            prop_assert!(a.incomplete().is_empty());
            prop_assert_eq!(a.done().len(), clusters_for(size));
            prop_assert!(got == want);
        }
    }
}

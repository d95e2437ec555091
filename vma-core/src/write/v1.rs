//! A writer of Proxmox VMA v1 archives, for `create --format vma1` and
//! `convert`: clusters in any order, straight to any `Write`, laid out as
//! Proxmox's writer (`vma-writer.c`) lays them out: the header as
//! [`V1Header::encode`] gives it, 58 clusters to an extent (the last one
//! fewer), and one empty extent when there are no clusters at all (a
//! config-only archive). A drive whose size is not a whole number of
//! 512-byte sectors is stored rounded up ([`v1::stored_size`]),
//! with a zero tail, as QEMU presents it. The `vmstate` device must be
//! written in order, as Proxmox's reader requires.

use std::io::Write;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::format::v1::{
    self, Slot, V1ExtentHeader, V1Header, CLUSTERS_PER_WRITTEN_EXTENT, VMSTATE_DEVICE,
};
use crate::format::{ConfigBlob, DriveInfo, BLOCK_SIZE};
use crate::types::{
    block_mask, cluster_len, cluster_range_bytes, clusters_for, ClusterNo, DriveId,
};
use crate::util::ranges::RangeSet;
use crate::write::writer::ClusterWriter;

/// Writes one VMA v1 archive.
pub struct V1Writer<W: Write> {
    out: W,
    pos: u64,
    uuid: [u8; 16],
    /// The drives as given (sizes as the caller's clusters are cut).
    drives: Vec<DriveInfo>,
    /// The next cluster of the `vmstate` device (index in `drives`, and
    /// the cluster), which must come in order.
    vmstate: Option<(usize, u64)>,
    written: Vec<RangeSet>,
    slots: Vec<Slot>,
    data: Vec<u8>,
    extents: u64,
}

impl<W: Write> V1Writer<W> {
    /// Write the header for `drives` and `configs` and get ready for
    /// clusters. Clusters are cut by the sizes given; the header records
    /// them rounded up to whole sectors ([`v1::stored_size`]).
    pub fn new(
        mut out: W,
        uuid: [u8; 16],
        ctime: u64,
        drives: Vec<DriveInfo>,
        configs: Vec<ConfigBlob>,
    ) -> Result<Self> {
        let stored = drives
            .iter()
            .map(|d| DriveInfo {
                size: v1::stored_size(d.size),
                ..d.clone()
            })
            .collect();
        let header = V1Header {
            uuid,
            ctime,
            drives: stored,
            configs,
        }
        .encode()?;
        out.write_all(&header)
            .map_err(|e| Error::io("writing the VMA header", e))?;
        Ok(V1Writer {
            out,
            pos: header.len() as u64,
            uuid,
            written: vec![RangeSet::new(); drives.len()],
            vmstate: drives
                .iter()
                .position(|d| d.name == VMSTATE_DEVICE)
                .map(|i| (i, 0)),
            drives,
            slots: Vec::with_capacity(CLUSTERS_PER_WRITTEN_EXTENT),
            data: Vec::with_capacity(CLUSTERS_PER_WRITTEN_EXTENT * 16 * BLOCK_SIZE),
            extents: 0,
        })
    }

    fn slot_of(&self, drive: DriveId) -> Result<usize> {
        self.drives
            .iter()
            .position(|d| d.id == drive)
            .ok_or_else(|| Error::Invalid(format!("drive id {drive} is not in this archive")))
    }

    fn claim(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<usize> {
        let i = self.slot_of(drive)?;
        let d = &self.drives[i];
        if clusters.end > clusters_for(d.size) {
            return Err(Error::Invalid(format!(
                "drive {}: cluster {} is beyond its end",
                d.name,
                clusters.end - 1
            )));
        }
        if let Some((v, next)) = &mut self.vmstate {
            if *v == i {
                if clusters.start != *next {
                    return Err(Error::Invalid(format!(
                        "drive {VMSTATE_DEVICE}: cluster {} comes before cluster {next}, but Proxmox's reader takes the {VMSTATE_DEVICE} device only in order; rename the drive",
                        clusters.start
                    )));
                }
                *next = clusters.end;
            }
        }
        if let Err(dup) = self.written[i].insert(clusters) {
            return Err(Error::Invalid(format!(
                "drive {}: bytes {:?} were already written to this archive",
                d.name,
                cluster_range_bytes(d.size, dup)
            )));
        }
        Ok(i)
    }

    fn push(&mut self, slot: Slot) -> Result<()> {
        self.slots.push(slot);
        if self.slots.len() == CLUSTERS_PER_WRITTEN_EXTENT {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the extent of the slots so far; with none, only when
    /// `empty_too` (the single empty extent of an archive without clusters).
    fn flush(&mut self) -> Result<()> {
        self.flush_extent(false)
    }

    fn flush_extent(&mut self, empty_too: bool) -> Result<()> {
        if self.slots.is_empty() && !empty_too {
            return Ok(());
        }
        let header = V1ExtentHeader {
            block_count: (self.data.len() / BLOCK_SIZE) as u16,
            slots: std::mem::take(&mut self.slots),
        };
        let at = self.pos;
        self.out
            .write_all(&header.encode(&self.uuid))
            .and_then(|_| self.out.write_all(&self.data))
            .map_err(|e| Error::io(format!("writing the VMA archive at offset {at}"), e))?;
        self.pos += (crate::format::v1::EXTENT_HEADER_LEN + self.data.len()) as u64;
        self.data.clear();
        self.slots = header.slots;
        self.slots.clear();
        self.extents += 1;
        Ok(())
    }

    /// Write the last extent, check every cluster was given, flush. Returns the output.
    pub fn finish(mut self) -> Result<W> {
        // Proxmox's writer flushes its buffer once at the end, so an archive
        // without clusters ends with one empty extent.
        let none_yet = self.extents == 0;
        self.flush_extent(none_yet)?;
        for (d, w) in self.drives.iter().zip(&self.written) {
            if let Some(gap) = w.gaps(clusters_for(d.size)).first() {
                let b = cluster_range_bytes(d.size, gap.clone());
                return Err(Error::Invalid(format!(
                    "cannot finish the archive: drive {} bytes {}..{} were never written",
                    d.name, b.start, b.end
                )));
            }
        }
        self.out
            .flush()
            .map_err(|e| Error::io("flushing the VMA archive", e))?;
        Ok(self.out)
    }
}

impl<W: Write> ClusterWriter for V1Writer<W> {
    fn write_cluster(&mut self, drive: DriveId, cluster: ClusterNo, data: &[u8]) -> Result<()> {
        let i = self.slot_of(drive)?;
        let expected = cluster_len(self.drives[i].size, cluster);
        if data.len() != expected || expected == 0 {
            return Err(Error::Invalid(format!(
                "drive {}: cluster {cluster} takes {expected} bytes, {} given",
                self.drives[i].name,
                data.len()
            )));
        }
        self.claim(drive, cluster.0..cluster.0 + 1)?;
        let mask = block_mask(data);
        for (b, block) in data.chunks(BLOCK_SIZE).enumerate() {
            if mask & (1 << b) != 0 {
                self.data.extend_from_slice(block);
                self.data
                    .resize(self.data.len() + BLOCK_SIZE - block.len(), 0);
            }
        }
        self.push(Slot {
            mask,
            drive,
            cluster: cluster.0 as u32,
        })
    }

    fn write_zeros(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        self.claim(drive, clusters.clone())?;
        for c in clusters {
            self.push(Slot {
                mask: 0,
                drive,
                cluster: c as u32,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::CLUSTER_SIZE;

    fn drive(name: &str, size: u64) -> DriveInfo {
        DriveInfo {
            id: DriveId(1),
            name: name.into(),
            size,
        }
    }

    /// Proxmox's reader takes the vmstate device only in order.
    #[test]
    fn vmstate_must_come_in_order() {
        let size = 3 * CLUSTER_SIZE as u64;
        let mut w =
            V1Writer::new(Vec::new(), [1; 16], 0, vec![drive("vmstate", size)], vec![]).unwrap();
        let e = w
            .write_cluster(DriveId(1), ClusterNo(1), &[7; CLUSTER_SIZE])
            .unwrap_err();
        assert!(e.to_string().contains("only in order"), "{e}");
        w.write_cluster(DriveId(1), ClusterNo(0), &[7; CLUSTER_SIZE])
            .unwrap();
        w.write_zeros(DriveId(1), 1..3).unwrap();
        w.finish().unwrap();
        // Any other drive may come in any order.
        let mut w =
            V1Writer::new(Vec::new(), [1; 16], 0, vec![drive("disk", size)], vec![]).unwrap();
        w.write_zeros(DriveId(1), 2..3).unwrap();
        w.write_zeros(DriveId(1), 0..2).unwrap();
        w.finish().unwrap();
    }

    /// Sizes are stored in whole sectors; clusters are cut by the size given.
    #[test]
    fn odd_sizes_are_stored_in_whole_sectors() {
        let mut w = V1Writer::new(Vec::new(), [1; 16], 0, vec![drive("d", 1000)], vec![]).unwrap();
        w.write_cluster(DriveId(1), ClusterNo(0), &[9; 1000])
            .unwrap();
        let out = w.finish().unwrap();
        let len = crate::format::v1::header_len(&out).unwrap();
        let h = V1Header::decode(&out[..len]).unwrap();
        assert_eq!(h.drives[0].size, 1024);
        // One extent: one 4 KiB block, its bytes past 1000 zero.
        let data = &out[len + 512..];
        assert_eq!(data.len(), 4096);
        assert!(data[..1000].iter().all(|&b| b == 9));
        assert!(data[1000..].iter().all(|&b| b == 0));
    }
}

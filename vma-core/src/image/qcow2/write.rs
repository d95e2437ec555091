//! Writing qcow2 version 3 images: 64 KiB clusters, 16-bit refcounts,
//! clusters accepted in any order, only non-zero clusters allocated,
//! optionally zstd-compressed clusters (QEMU 5.1 and later read them).
//!
//! Host clusters are only ever appended: cluster 0 holds the header, then
//! data clusters and L2 tables in arrival order, and at the end the L1
//! table, the refcount table and the last refcount blocks. Memory stays
//! bounded: a few L2 tables are cached (the rest live in the file), and
//! refcounts are kept only for the refcount block not yet written, because
//! appending never touches a refcount block's range again once the end of
//! the file has moved past it.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;

use crate::atomic::AtomicFile;
use crate::error::{Error, Result};
use crate::format::qcow2::{
    decode_table, encode_compressed, encode_refcounts16, encode_table, l1_entries_for,
    CompressionType, Qcow2Header, FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO,
    INCOMPAT_COMPRESSION_TYPE, OFFSET_MASK, WRITE_CLUSTER_BITS, WRITE_REFCOUNT_ORDER,
};

/// Bytes per cluster of the images written.
pub const QCOW2_CLUSTER: u64 = 1 << WRITE_CLUSTER_BITS;
const ENTRIES_PER_TABLE: u64 = QCOW2_CLUSTER / 8;
/// Host clusters whose refcounts one refcount block holds (16-bit entries).
const REFCOUNTS_PER_BLOCK: u64 = QCOW2_CLUSTER * 8 / (1 << WRITE_REFCOUNT_ORDER);
/// L2 tables kept in memory (each maps 512 MiB of the disk).
const L2_CACHE_TABLES: usize = 32;
/// zstd level of compressed clusters (QEMU's default).
const ZSTD_LEVEL: i32 = 3;

/// Host cluster numbers and their arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HostCluster(u64);

impl HostCluster {
    fn offset(self) -> u64 {
        self.0 * QCOW2_CLUSTER
    }
}

/// The virtual size of a qcow2 image holding a drive of `size` bytes:
/// qcow2 sizes are whole 512-byte sectors, so an odd tail is zero-padded.
pub fn qcow2_size_for(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

/// Compress one cluster for a compressed qcow2 image; `None` when that
/// would not save space (the cluster is then stored as it is).
pub fn compress_cluster(
    data: &[u8],
    zstd: &mut zstd::bulk::Compressor<'_>,
) -> Result<Option<Vec<u8>>> {
    let mut full;
    let input = if data.len() == QCOW2_CLUSTER as usize {
        data
    } else {
        full = vec![0u8; QCOW2_CLUSTER as usize];
        full[..data.len()].copy_from_slice(data);
        &full[..]
    };
    let out = zstd
        .compress(input)
        .map_err(|e| Error::io("zstd compression of a qcow2 cluster", e))?;
    Ok(((out.len() as u64) < QCOW2_CLUSTER - 512).then_some(out))
}

/// A new zstd context for [`compress_cluster`].
pub fn cluster_compressor() -> Result<zstd::bulk::Compressor<'static>> {
    zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| Error::io("creating a zstd context", e))
}

struct CachedL2 {
    index: u64,
    host: HostCluster,
    entries: Vec<u64>,
    dirty: bool,
}

/// Refcounts of the host clusters from `first` on (only the not yet
/// written refcount blocks), and where the written blocks went.
struct Refcounts {
    first: u64,
    counts: Vec<u16>,
    blocks: Vec<u64>,
}

impl Refcounts {
    fn add(&mut self, cluster: u64) -> Result<()> {
        let i = (cluster - self.first) as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].checked_add(1).ok_or_else(|| {
            Error::Invalid(format!("qcow2 refcount overflow at host cluster {cluster}"))
        })?;
        Ok(())
    }
}

/// Writes one qcow2 image, clusters in any order.
pub struct Qcow2Writer {
    out: AtomicFile,
    size: u64,
    compression: bool,
    l1: Vec<u64>,
    l2_cache: VecDeque<CachedL2>,
    /// Next host cluster to allocate.
    next_free: u64,
    /// Where the next compressed cluster may start, while the host cluster
    /// it lies in is the last one allocated.
    compressed_at: Option<u64>,
    refcounts: Refcounts,
    /// Uncompressed data clusters not yet written, contiguous on the host
    /// from `pending_at`: one write per run of clusters, not per cluster.
    pending: Vec<u8>,
    pending_at: u64,
}

/// Bytes of uncompressed clusters gathered before they are written.
const PENDING_MAX: usize = 1 << 20;

impl Qcow2Writer {
    /// Start an image of `size` guest bytes (rounded up to whole sectors)
    /// in `out`. With `compression`, callers hand in clusters compressed by
    /// [`compress_cluster`] through [`Qcow2Writer::write_compressed`].
    pub fn new(out: AtomicFile, size: u64, compression: bool) -> Result<Qcow2Writer> {
        let size = qcow2_size_for(size);
        let l1_len = l1_entries_for(size, WRITE_CLUSTER_BITS);
        if l1_len * 8 > 32 << 20 {
            return Err(Error::Limit(format!(
                "a qcow2 image of {size} bytes needs an L1 table above 32 MiB"
            )));
        }
        let mut w = Qcow2Writer {
            out,
            size,
            compression,
            l1: vec![0; l1_len as usize],
            l2_cache: VecDeque::new(),
            next_free: 0,
            compressed_at: None,
            refcounts: Refcounts {
                first: 0,
                counts: Vec::new(),
                blocks: Vec::new(),
            },
            pending: Vec::with_capacity(PENDING_MAX + QCOW2_CLUSTER as usize),
            pending_at: 0,
        };
        // Cluster 0: the header, written by `finish`.
        w.alloc_clusters(1)?;
        Ok(w)
    }

    /// Guest size of the image (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Allocate `n` contiguous new host clusters, each referenced once.
    fn alloc_clusters(&mut self, n: u64) -> Result<HostCluster> {
        let first = self.next_free;
        self.next_free += n;
        self.compressed_at = None;
        for c in first..first + n {
            self.refcounts.add(c)?;
        }
        self.write_finished_blocks()?;
        Ok(HostCluster(first))
    }

    /// Write the refcount blocks whose host range the allocator has left
    /// behind for good; each block itself goes at the end of the file.
    fn write_finished_blocks(&mut self) -> Result<()> {
        loop {
            let limit = match self.compressed_at {
                Some(at) => at / QCOW2_CLUSTER,
                None => self.next_free,
            };
            if limit < self.refcounts.first + REFCOUNTS_PER_BLOCK {
                return Ok(());
            }
            let block = self.next_free;
            self.next_free += 1;
            self.compressed_at = None;
            self.refcounts.add(block)?;
            self.write_refcount_block(block)?;
        }
    }

    /// Write the refcounts of the first pending block's range to host
    /// cluster `block` and drop them from memory.
    fn write_refcount_block(&mut self, block: u64) -> Result<()> {
        let n = (REFCOUNTS_PER_BLOCK as usize).min(self.refcounts.counts.len());
        let mut bytes = Vec::with_capacity(QCOW2_CLUSTER as usize);
        encode_refcounts16(self.refcounts.counts.drain(..n), &mut bytes);
        bytes.resize(QCOW2_CLUSTER as usize, 0);
        self.refcounts.first += REFCOUNTS_PER_BLOCK;
        self.refcounts.blocks.push(HostCluster(block).offset());
        self.out.write_all_at(&bytes, HostCluster(block).offset())
    }

    /// The cached L2 table for L1 index `index`, loading or allocating it.
    fn l2(&mut self, index: u64) -> Result<&mut CachedL2> {
        if let Some(pos) = self.l2_cache.iter().position(|t| t.index == index) {
            let t = self.l2_cache.remove(pos).expect("present");
            self.l2_cache.push_front(t);
        } else {
            if self.l2_cache.len() >= L2_CACHE_TABLES {
                let old = self.l2_cache.pop_back().expect("full cache");
                self.store_l2(&old)?;
            }
            let known = self.l1[index as usize] & OFFSET_MASK;
            let table = if known != 0 {
                let host = HostCluster(known / QCOW2_CLUSTER);
                let mut raw = vec![0u8; QCOW2_CLUSTER as usize];
                self.out
                    .file()
                    .read_exact_at(&mut raw, host.offset())
                    .map_err(|e| Error::io("reading back a qcow2 L2 table", e))?;
                CachedL2 {
                    index,
                    host,
                    entries: decode_table(&raw, host.offset(), "L2 table").map_err(|e| {
                        Error::Image {
                            path: "the qcow2 image being written".into(),
                            what: format!("reading back an L2 table: {e}"),
                        }
                    })?,
                    dirty: false,
                }
            } else {
                let host = self.alloc_clusters(1)?;
                self.l1[index as usize] = host.offset() | FLAG_COPIED;
                CachedL2 {
                    index,
                    host,
                    entries: vec![0; ENTRIES_PER_TABLE as usize],
                    dirty: true,
                }
            };
            self.l2_cache.push_front(table);
        }
        Ok(self.l2_cache.front_mut().expect("just placed"))
    }

    fn store_l2(&self, t: &CachedL2) -> Result<()> {
        if !t.dirty {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(QCOW2_CLUSTER as usize);
        encode_table(&t.entries, &mut bytes);
        self.out.write_all_at(&bytes, t.host.offset())
    }

    fn check_cluster(&self, cluster: u64) -> Result<()> {
        if cluster * QCOW2_CLUSTER >= self.size {
            return Err(Error::Invalid(format!(
                "cluster {cluster} lies beyond the end of a {}-byte qcow2 image",
                self.size
            )));
        }
        Ok(())
    }

    /// Store guest cluster `cluster` uncompressed: the 4 KiB blocks set in
    /// `mask` come from `blocks` (in order), the others are zeros. Clusters
    /// that follow each other on the host are gathered into one write.
    /// Writing a cluster again replaces it.
    pub fn write_blocks(&mut self, cluster: u64, mask: u16, blocks: &[u8]) -> Result<()> {
        self.check_cluster(cluster)?;
        let at = self.data_cluster(cluster)?.offset();
        if at != self.pending_at + self.pending.len() as u64 || self.pending.len() >= PENDING_MAX {
            self.write_pending()?;
            self.pending_at = at;
        }
        let mut stored = 0usize;
        for b in 0..16 {
            if mask & (1 << b) != 0 {
                self.pending
                    .extend_from_slice(&blocks[stored * 4096..(stored + 1) * 4096]);
                stored += 1;
            } else {
                self.pending.resize(self.pending.len() + 4096, 0);
            }
        }
        Ok(())
    }

    /// Write the gathered clusters.
    fn write_pending(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.out.write_all_at(&self.pending, self.pending_at)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The host cluster of an uncompressed guest cluster, allocated on first use.
    fn data_cluster(&mut self, cluster: u64) -> Result<HostCluster> {
        let (index, slot) = (
            cluster / ENTRIES_PER_TABLE,
            (cluster % ENTRIES_PER_TABLE) as usize,
        );
        let existing = self.l2(index)?.entries[slot];
        if existing & FLAG_COMPRESSED != 0 {
            return Err(Error::Invalid(format!(
                "qcow2 cluster {cluster} was already written compressed"
            )));
        }
        if existing & OFFSET_MASK != 0 {
            return Ok(HostCluster((existing & OFFSET_MASK) / QCOW2_CLUSTER));
        }
        let host = self.alloc_clusters(1)?;
        let t = self.l2(index)?;
        t.entries[slot] = host.offset() | FLAG_COPIED;
        t.dirty = true;
        Ok(host)
    }

    /// Make guest cluster `cluster` read as zeros again, whatever was
    /// written to it (salvage: two copies in the archive disagree). An
    /// uncompressed cluster keeps its host cluster (flagged zero); the
    /// bytes of a compressed one are left unreferenced (a leak `qemu-img
    /// check` reports, harmless).
    pub fn zero_cluster(&mut self, cluster: u64) -> Result<()> {
        self.check_cluster(cluster)?;
        self.write_pending()?;
        let (index, slot) = (
            cluster / ENTRIES_PER_TABLE,
            (cluster % ENTRIES_PER_TABLE) as usize,
        );
        let t = self.l2(index)?;
        let e = t.entries[slot];
        t.entries[slot] = if e & FLAG_COMPRESSED != 0 || e & OFFSET_MASK == 0 {
            FLAG_ZERO
        } else {
            (e & OFFSET_MASK) | FLAG_COPIED | FLAG_ZERO
        };
        t.dirty = true;
        Ok(())
    }

    /// Store guest cluster `cluster` as compressed bytes from
    /// [`compress_cluster`]; may be written only once.
    pub fn write_compressed(&mut self, cluster: u64, compressed: &[u8]) -> Result<()> {
        self.check_cluster(cluster)?;
        if !self.compression {
            return Err(Error::Invalid(
                "this qcow2 image was started without compression".into(),
            ));
        }
        let (index, slot) = (
            cluster / ENTRIES_PER_TABLE,
            (cluster % ENTRIES_PER_TABLE) as usize,
        );
        if self.l2(index)?.entries[slot] != 0 {
            return Err(Error::Invalid(format!(
                "qcow2 cluster {cluster} was written twice"
            )));
        }
        let len = compressed.len() as u64;
        let start = match self.compressed_at {
            Some(at) => at,
            None => {
                // A fresh host cluster, referenced by the compressed entries only.
                let c = self.next_free;
                self.next_free += 1;
                c * QCOW2_CLUSTER
            }
        };
        let end = start + len;
        let last = (end - 1) / QCOW2_CLUSTER;
        // Spill into following clusters (contiguous: they are at the end).
        while self.next_free <= last {
            self.next_free += 1;
        }
        for c in start / QCOW2_CLUSTER..=last {
            self.refcounts.add(c)?;
        }
        self.out.write_all_at(compressed, start)?;
        self.compressed_at = (!end.is_multiple_of(QCOW2_CLUSTER)).then_some(end);
        let t = self.l2(index)?;
        t.entries[slot] = encode_compressed(start, len, WRITE_CLUSTER_BITS);
        t.dirty = true;
        self.write_finished_blocks()
    }

    /// Write the L2 tables, L1 table, refcounts and header; returns the
    /// file, ready to be committed.
    pub fn finish(mut self) -> Result<AtomicFile> {
        self.write_pending()?;
        for t in std::mem::take(&mut self.l2_cache) {
            self.store_l2(&t)?;
        }
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(QCOW2_CLUSTER).max(1);
        let l1_at = self.alloc_clusters(l1_clusters)?;
        let mut l1_bytes = Vec::with_capacity(self.l1.len() * 8);
        encode_table(&self.l1, &mut l1_bytes);
        self.out.write_all_at(&l1_bytes, l1_at.offset())?;

        // The refcount table must list every block, including those placed
        // after it; leave room for two more than are needed now.
        let blocks_now = self.refcounts.blocks.len() as u64
            + (self.next_free - self.refcounts.first).div_ceil(REFCOUNTS_PER_BLOCK)
            + 2;
        let table_clusters = (blocks_now * 8).div_ceil(QCOW2_CLUSTER);
        let table_at = self.alloc_clusters(table_clusters)?;
        while self.refcounts.first < self.next_free {
            let block = self.next_free;
            self.next_free += 1;
            self.refcounts.add(block)?;
            self.write_refcount_block(block)?;
        }
        let capacity = (table_clusters * QCOW2_CLUSTER / 8) as usize;
        if self.refcounts.blocks.len() > capacity {
            return Err(Error::Invalid(format!(
                "qcow2 refcount table of {capacity} entries cannot hold {} blocks",
                self.refcounts.blocks.len()
            )));
        }
        let mut table = Vec::with_capacity((table_clusters * QCOW2_CLUSTER) as usize);
        encode_table(&self.refcounts.blocks, &mut table);
        table.resize((table_clusters * QCOW2_CLUSTER) as usize, 0);
        self.out.write_all_at(&table, table_at.offset())?;

        let header = Qcow2Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: WRITE_CLUSTER_BITS,
            size: self.size,
            crypt_method: 0,
            l1_size: self.l1.len() as u32,
            l1_table_offset: l1_at.offset(),
            refcount_table_offset: table_at.offset(),
            refcount_table_clusters: table_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if self.compression {
                INCOMPAT_COMPRESSION_TYPE
            } else {
                0
            },
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: WRITE_REFCOUNT_ORDER,
            header_length: crate::format::qcow2::V3_HEADER_LEN as u32,
            compression_type: if self.compression {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
        };
        let mut first = header.encode_v3();
        first.extend_from_slice(&[0u8; 8]); // end of header extensions
        self.out.write_all_at(&first, 0)?;
        let len = self.next_free * QCOW2_CLUSTER;
        self.out
            .file()
            .set_len(len)
            .map_err(|e| Error::io(format!("sizing {}", self.out.dest().display()), e))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::field::FieldReader;
    use crate::format::qcow2::{decode_l2, L2Entry};
    use crate::image::qcow2::Qcow2Image;
    use crate::image::source::DiskImage;
    use proptest::prelude::*;

    fn be64_at(b: &[u8], at: u64) -> u64 {
        FieldReader::new(&b[at as usize..], at, "table")
            .u64_be()
            .unwrap()
    }

    /// Refcounts recomputed from the image's own tables, independently of
    /// the writer: header, L1, refcount table and blocks, L2 tables, data.
    fn recount(file: &[u8]) -> Vec<u64> {
        let h = Qcow2Header::decode(file).unwrap();
        let cs = QCOW2_CLUSTER;
        let mut counts = vec![0u64; (file.len() as u64 / cs) as usize];
        let add = |from: u64, len: u64, counts: &mut Vec<u64>| {
            for c in from / cs..(from + len).div_ceil(cs) {
                counts[c as usize] += 1;
            }
        };
        add(0, 1, &mut counts);
        add(h.l1_table_offset, h.l1_size as u64 * 8, &mut counts);
        add(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
            &mut counts,
        );
        for i in 0..h.refcount_table_clusters as u64 * cs / 8 {
            let b = be64_at(file, h.refcount_table_offset + i * 8);
            if b != 0 {
                add(b, cs, &mut counts);
            }
        }
        for i in 0..h.l1_size as u64 {
            let l2 = be64_at(file, h.l1_table_offset + i * 8) & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            add(l2, cs, &mut counts);
            for j in 0..cs / 8 {
                match decode_l2(be64_at(file, l2 + j * 8), 16, 3).unwrap() {
                    L2Entry::Data(o) => add(o, cs, &mut counts),
                    L2Entry::Compressed { offset, len } => {
                        // The sector rounding never reaches past the data's last cluster.
                        add(offset, len, &mut counts)
                    }
                    _ => {}
                }
            }
        }
        counts
    }

    /// The refcounts the image stores.
    fn stored(file: &[u8]) -> Vec<u64> {
        let h = Qcow2Header::decode(file).unwrap();
        let cs = QCOW2_CLUSTER;
        (0..file.len() as u64 / cs)
            .map(|c| {
                let block = be64_at(
                    file,
                    h.refcount_table_offset + (c / REFCOUNTS_PER_BLOCK) * 8,
                );
                assert_ne!(block, 0, "host cluster {c} has no refcount block");
                let at = (block + (c % REFCOUNTS_PER_BLOCK) * 2) as usize;
                FieldReader::new(&file[at..], at as u64, "refcount block")
                    .u16_be()
                    .unwrap() as u64
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Random clusters in random order, compressed or not, some written
        /// twice: the image reads back exactly (the last write of each
        /// cluster) and every refcount matches the tables.
        #[test]
        fn images_read_back_and_refcounts_match(
            size in 1u64..(1500 << 20),
            picks in proptest::collection::vec((any::<u64>(), any::<u16>(), 0u8..4), 0..60),
            compress in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.qcow2");
            let mut w = Qcow2Writer::new(AtomicFile::create(&path).unwrap(), size, compress).unwrap();
            let clusters = size.div_ceil(QCOW2_CLUSTER);
            let mut expect: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
            let mut zstd = cluster_compressor().unwrap();
            for (seed, mask, kind) in picks {
                let c = seed % clusters;
                // Uncompressed clusters may be written again (replacing them).
                if (compress && expect.contains_key(&c)) || mask == 0 {
                    continue;
                }
                let len = (size - c * QCOW2_CLUSTER).min(QCOW2_CLUSTER) as usize;
                // kind 0: noise; 1: compressible; others: sparse blocks.
                let mut data: Vec<u8> = match kind {
                    0 => (0..len).map(|i| (seed.wrapping_mul(i as u64 + 7) >> 13) as u8).collect(),
                    _ => (0..len).map(|i| (i / 512) as u8 ^ seed as u8).collect(),
                };
                for (b, chunk) in data.chunks_mut(4096).enumerate() {
                    if kind >= 2 && mask & (1 << b) == 0 {
                        chunk.fill(0);
                    }
                }
                let m = crate::types::block_mask(&data);
                if m == 0 {
                    continue;
                }
                match compress.then(|| compress_cluster(&data, &mut zstd).unwrap()).flatten() {
                    Some(packed) => w.write_compressed(c, &packed).unwrap(),
                    None => {
                        let mut blocks = Vec::new();
                        for (b, chunk) in data.chunks(4096).enumerate() {
                            if m & (1 << b) != 0 {
                                blocks.extend_from_slice(chunk);
                                blocks.resize(blocks.len() + 4096 - chunk.len(), 0);
                            }
                        }
                        w.write_blocks(c, m, &blocks).unwrap();
                    }
                }
                expect.insert(c, data);
            }
            w.finish().unwrap().commit().unwrap();
            let file = std::fs::read(&path).unwrap();
            prop_assert_eq!(recount(&file), stored(&file));
            let img = Qcow2Image::open(&path, 0).unwrap();
            prop_assert_eq!(img.size(), qcow2_size_for(size));
            // Only the clusters written are allocated; they read back exactly.
            let runs: Vec<u64> = crate::image::source::data_runs(&img).unwrap().into_iter().flatten().collect();
            prop_assert_eq!(runs, expect.keys().copied().collect::<Vec<_>>());
            let mut buf = vec![0u8; QCOW2_CLUSTER as usize];
            for (&c, d) in &expect {
                let len = (img.size() - c * QCOW2_CLUSTER).min(QCOW2_CLUSTER) as usize;
                img.read_at(&mut buf[..len], c * QCOW2_CLUSTER).unwrap();
                prop_assert!(buf[..d.len()] == d[..], "cluster {}", c);
                prop_assert!(buf[d.len()..len].iter().all(|&b| b == 0));
            }
        }
    }
}

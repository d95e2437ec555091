//! Forging archives with valid digests: taking a 3.0 archive apart into
//! header, extents and index (runs, extent table, leaves, drive records),
//! changing any part, and putting it back together with every digest
//! recomputed (extent digests, page digests, directory, index digest,
//! archive digest, footer self-check). A forgery made this way gets past
//! every checksum, so only the checks that bind bytes to their archive,
//! their place and their content can catch it.

use std::path::Path;

use vma_core::format::{
    archive_digest, decode_entries, encode_entry, index_digest, masks_len, Codec, CompressionInfo,
    Directory, DriveRecord, Entry, ExtentHeader, ExtentRecord, Footer, Header, HeaderPrefix,
    IndexFixed, IndexRun, RunKind, RunPageKey, CLUSTER_SIZE, DIGEST_LEN, DRIVE_RECORD_LEN,
    EXTENTS_PER_PAGE, EXTENT_HEADER_LEN, FOOTER_LEN, HEADER_FIXED_LEN, INCOMPAT_ZSTD,
    INDEX_FIXED_LEN, LEAVES_PER_PAGE, RUNS_PER_PAGE, VERSION_MAJOR,
};
use vma_core::index::{ExtentKeys, FinishOptions, IndexBuilder};
use vma_core::tree::leaf_of_blocks;
use vma_core::types::{cluster_len, ArchiveOffset, ClusterNo};
use vma_core::{DriveId, DriveInfo};

/// SHA-256 of `b`.
pub fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// A 3.0 header of one drive (id 1, `size` bytes, named `name`), zstd allowed.
pub fn header(size: u64, name: &str, uuid: [u8; 16]) -> Header {
    Header {
        version_major: VERSION_MAJOR,
        version_minor: 0,
        incompat: INCOMPAT_ZSTD,
        compat: 0,
        uuid,
        ctime: 1_700_000_000,
        compression: CompressionInfo {
            codec: Codec::Zstd,
            level: 1,
        },
        creator: "forged".into(),
        parent: None,
        stands_for: vec![],
        drives: vec![DriveInfo {
            id: DriveId(1),
            name: name.into(),
            size,
        }],
        configs: vec![],
    }
}

/// Re-seal a header block after its bytes were changed.
pub fn reseal_header(h: &mut [u8]) {
    let n = h.len();
    let d = sha(&h[..n - 32]);
    h[n - 32..].copy_from_slice(&d);
}

/// A 3.0 extent with the given header fields, entries, masks and stored
/// payload, with a valid self-check and digest.
pub fn extent(h: ExtentHeader, entries: &[Entry], masks: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut b = h.encode().to_vec();
    for e in entries {
        encode_entry(e, &mut b);
    }
    let start = b.len();
    for m in masks {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b.resize(start + masks_len(masks.len()), 0);
    b.extend_from_slice(payload);
    let d = sha(&b);
    b.extend_from_slice(&d);
    b
}

/// The parts of an extent.
#[derive(Clone, Debug)]
pub struct ExtentParts {
    /// Its header.
    pub header: ExtentHeader,
    /// Its entries.
    pub entries: Vec<Entry>,
    /// Its masks.
    pub masks: Vec<u16>,
    /// Its payload, decoded.
    pub payload: Vec<u8>,
}

impl ExtentParts {
    /// Take an extent apart (any codec).
    pub fn parse(bytes: &[u8]) -> ExtentParts {
        let header = ExtentHeader::decode(bytes[..EXTENT_HEADER_LEN].try_into().unwrap(), 0)
            .expect("an extent header");
        let (entries, masks) =
            decode_entries(&header.body_counts(), &bytes[EXTENT_HEADER_LEN..], 0).unwrap();
        let stored = &bytes[header.payload_start()..bytes.len() - DIGEST_LEN];
        let payload = match header.codec {
            Codec::None => stored.to_vec(),
            Codec::Zstd => zstd::decode_all(stored).unwrap(),
        };
        ExtentParts {
            header,
            entries,
            masks,
            payload,
        }
    }

    /// Frame it again (uncompressed) as extent `seq` of archive `uuid`.
    pub fn frame(&self, uuid: [u8; 16], seq: u64) -> Vec<u8> {
        extent(
            ExtentHeader {
                uuid,
                seq,
                entry_count: self.entries.len() as u32,
                mask_count: self.masks.len() as u32,
                stored_len: self.payload.len() as u32,
                raw_len: self.payload.len() as u32,
                codec: Codec::None,
            },
            &self.entries,
            &self.masks,
            &self.payload,
        )
    }

    /// The leaves of its data clusters: (drive, cluster, leaf).
    pub fn leaves(&self, size_of: impl Fn(DriveId) -> u64) -> Vec<(DriveId, u64, [u8; 32])> {
        let mut out = Vec::new();
        let mut m = 0;
        let mut at = 0;
        for e in self.entries.iter().filter(|e| e.kind == RunKind::Data) {
            for k in 0..e.count as u64 {
                let mask = self.masks[m];
                m += 1;
                let n = mask.count_ones() as usize * 4096;
                let len = cluster_len(size_of(e.drive), ClusterNo(e.start + k));
                out.push((
                    e.drive,
                    e.start + k,
                    leaf_of_blocks(mask, &self.payload[at..at + n], len),
                ));
                at += n;
            }
        }
        out
    }
}

/// A 3.0 archive taken apart: every part can be changed, and
/// [`Archive::bytes`] puts it together with valid digests.
#[derive(Clone, Debug)]
pub struct Archive {
    /// The header.
    pub header: Header,
    /// The extents, in file order, as stored.
    pub extents: Vec<Vec<u8>>,
    /// The runs of the index (data runs name extents by sequence number).
    pub runs: Vec<IndexRun>,
    /// The extent table; None: made from the extents as they are placed.
    pub table: Option<Vec<ExtentRecord>>,
    /// The leaf pages' digests.
    pub leaves: Vec<[u8; 32]>,
    /// The drive records.
    pub records: Vec<DriveRecord>,
}

impl Archive {
    /// Take a valid 3.0 archive apart.
    pub fn parse(bytes: &[u8]) -> Archive {
        let fixed: [u8; HEADER_FIXED_LEN] = bytes[..HEADER_FIXED_LEN].try_into().unwrap();
        let hlen = HeaderPrefix::decode(&fixed).unwrap().header_len;
        let header = Header::decode(&bytes[..hlen]).unwrap();
        let footer_at = bytes.len() - FOOTER_LEN;
        let footer =
            Footer::decode(bytes[footer_at..].try_into().unwrap(), footer_at as u64).unwrap();
        let at = footer.index_offset as usize;
        let fixed =
            IndexFixed::decode(bytes[at..at + INDEX_FIXED_LEN].try_into().unwrap(), 0).unwrap();
        let layout = fixed.layout().unwrap();
        let region = |from: u64, n: u64, size: usize| {
            let s = at + from as usize;
            bytes[s..s + n as usize * size].to_vec()
        };
        let runs = region(layout.runs_at, fixed.run_count, 24)
            .chunks_exact(24)
            .map(|b| IndexRun::decode(b, 0).unwrap())
            .collect();
        let table: Vec<ExtentRecord> = region(layout.extents_at, fixed.extent_count, 48)
            .chunks_exact(48)
            .map(ExtentRecord::decode)
            .collect();
        let leaves = region(layout.leaves_at, fixed.leaf_count, 32)
            .chunks_exact(32)
            .map(|b| b.try_into().unwrap())
            .collect();
        let records = region(
            layout.records_at,
            fixed.drive_count as u64,
            DRIVE_RECORD_LEN,
        )
        .chunks_exact(DRIVE_RECORD_LEN)
        .map(|b| DriveRecord::decode(b, 0).unwrap())
        .collect();
        let extents = table
            .iter()
            .map(|r| {
                bytes[r.offset.get() as usize..r.offset.get() as usize + r.len as usize].to_vec()
            })
            .collect();
        Archive {
            header,
            extents,
            runs,
            table: None,
            leaves,
            records,
        }
    }

    /// Read and take apart the archive at `path`.
    pub fn read(path: &Path) -> Archive {
        Archive::parse(&std::fs::read(path).unwrap())
    }

    /// The extent table as the extents lie after the header.
    pub fn placed_table(&self) -> Vec<ExtentRecord> {
        let mut at = self.header.encode().unwrap().len() as u64;
        self.extents
            .iter()
            .map(|e| {
                let r = ExtentRecord {
                    offset: ArchiveOffset(at),
                    len: e.len() as u32,
                    digest: e[e.len() - 32..].try_into().unwrap(),
                };
                at += e.len() as u64;
                r
            })
            .collect()
    }

    /// Make the index honest again for the extents as they are now
    /// (runs, leaves, drive records with their digests), as a writer
    /// would; the drives must be full (no unchanged clusters).
    pub fn reindex(&mut self) {
        let drives = self.header.drives.clone();
        let size_of = |id: DriveId| drives.iter().find(|d| d.id == id).map_or(0, |d| d.size);
        let mut b = IndexBuilder::new(&drives, self.header.parent.is_some(), ExtentKeys::Seq, true);
        for (r, e) in self.placed_table().iter().zip(&self.extents) {
            let parts = ExtentParts::parse(e);
            let seq = parts.header.seq;
            let key = b.add_extent(seq, r.offset, r.len, r.digest).unwrap();
            for en in &parts.entries {
                b.add_entry(en.drive, en.kind, en.start, en.count, key)
                    .unwrap();
            }
            for (d, c, l) in parts.leaves(size_of) {
                b.add_leaf(d, c, key, l).unwrap();
            }
            // Stored bytes: the extent's length shared by stored blocks.
            let mut blocks: Vec<(DriveId, u64)> = Vec::new();
            let mut masks = parts.masks.iter();
            for en in parts.entries.iter().filter(|e| e.kind == RunKind::Data) {
                let n: u64 = masks
                    .by_ref()
                    .take(en.count as usize)
                    .map(|m| m.count_ones() as u64)
                    .sum();
                match blocks.iter_mut().find(|(d, _)| *d == en.drive) {
                    Some((_, k)) => *k += n,
                    None => blocks.push((en.drive, n)),
                }
            }
            let total: u64 = blocks.iter().map(|(_, n)| n).sum();
            for (d, n) in blocks {
                b.add_stored_bytes(d, r.len as u64 * n / total.max(1));
            }
        }
        let interrupted: Vec<DriveId> = self
            .records
            .iter()
            .filter(|r| r.interrupted)
            .map(|r| r.drive)
            .collect();
        for d in interrupted {
            b.set_interrupted(d, true);
        }
        let built = b
            .finish(FinishOptions {
                lenient: true,
                source: None,
                keep_pages: true,
                uuid: self.header.uuid,
                progress: None,
            })
            .unwrap();
        let mut area = Vec::new();
        built.write_to(&mut area).unwrap();
        let fixed = IndexFixed::decode(area[..INDEX_FIXED_LEN].try_into().unwrap(), 0).unwrap();
        let l = fixed.layout().unwrap();
        self.runs = area[l.runs_at as usize..l.extents_at as usize]
            .chunks_exact(24)
            .map(|b| IndexRun::decode(b, 0).unwrap())
            .collect();
        self.leaves = area[l.leaves_at as usize..l.records_at as usize]
            .chunks_exact(32)
            .map(|b| b.try_into().unwrap())
            .collect();
        self.records = built.records.clone();
        self.table = None;
    }

    /// The whole archive, every digest valid for the parts as they are.
    pub fn bytes(&self) -> Vec<u8> {
        let header = self.header.encode().unwrap();
        let header_digest: [u8; 32] = header[header.len() - 32..].try_into().unwrap();
        let mut file = header;
        for e in &self.extents {
            file.extend_from_slice(e);
        }
        let table = self.table.clone().unwrap_or_else(|| self.placed_table());
        let index_offset = file.len() as u64;
        let fixed = IndexFixed {
            uuid: self.header.uuid,
            run_count: self.runs.len() as u64,
            extent_count: table.len() as u64,
            leaf_count: self.leaves.len() as u64,
            drive_count: self.records.len() as u16,
            runs_per_page: RUNS_PER_PAGE,
            extents_per_page: EXTENTS_PER_PAGE,
            leaves_per_page: LEAVES_PER_PAGE,
        };
        let fixed_bytes = fixed.encode();
        file.extend_from_slice(&fixed_bytes);
        let mut dir = Directory::default();
        let mut data_before = 0u64;
        for page in self.runs.chunks(RUNS_PER_PAGE as usize) {
            let mut b = Vec::new();
            for r in page {
                r.encode(&mut b);
            }
            dir.runs.push(RunPageKey {
                drive: page[0].drive,
                start: page[0].start,
                first_leaf: data_before,
                digest: sha(&b),
            });
            data_before += page
                .iter()
                .filter(|r| r.kind == RunKind::Data)
                .map(|r| r.count as u64)
                .sum::<u64>();
            file.extend_from_slice(&b);
        }
        for page in table.chunks(EXTENTS_PER_PAGE as usize) {
            let mut b = Vec::new();
            for r in page {
                r.encode(&mut b);
            }
            dir.extents.push(sha(&b));
            file.extend_from_slice(&b);
        }
        for page in self.leaves.chunks(LEAVES_PER_PAGE as usize) {
            let b: Vec<u8> = page.iter().flatten().copied().collect();
            dir.leaves.push(sha(&b));
            file.extend_from_slice(&b);
        }
        let mut records = Vec::new();
        for r in &self.records {
            r.encode(&mut records);
        }
        let mut directory = Vec::new();
        dir.encode(&mut directory);
        file.extend_from_slice(&records);
        file.extend_from_slice(&directory);
        let idx = index_digest(&fixed_bytes, &records, &directory);
        file.extend_from_slice(&idx);
        let footer = Footer {
            index_offset,
            index_len: file.len() as u64 - index_offset,
            extent_count: table.len() as u64,
            archive_digest: archive_digest(&header_digest, &idx),
        };
        file.extend_from_slice(&footer.encode());
        file
    }

    /// Write [`Archive::bytes`] to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

/// A one-drive archive of `clusters` clusters of `data` (cluster size
/// each), every data cluster in its own uncompressed extent, indexed honestly.
pub fn simple(uuid: [u8; 16], data: &[u8]) -> Archive {
    let size = data.len() as u64;
    let mut a = Archive {
        header: header(size, "disk", uuid),
        extents: Vec::new(),
        runs: Vec::new(),
        table: None,
        leaves: Vec::new(),
        records: vec![DriveRecord::empty(DriveId(1))],
    };
    for (c, chunk) in data.chunks(CLUSTER_SIZE).enumerate() {
        let mut payload = chunk.to_vec();
        payload.resize(CLUSTER_SIZE, 0);
        let parts = ExtentParts {
            header: ExtentHeader {
                uuid,
                seq: c as u64,
                entry_count: 1,
                mask_count: 1,
                stored_len: 0,
                raw_len: 0,
                codec: Codec::None,
            },
            entries: vec![Entry {
                drive: DriveId(1),
                kind: RunKind::Data,
                count: 1,
                start: c as u64,
            }],
            masks: vec![u16::MAX],
            payload,
        };
        a.extents.push(parts.frame(uuid, c as u64));
    }
    a.reindex();
    a
}

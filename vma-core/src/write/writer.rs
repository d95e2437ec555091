//! The archive Writer: accepts clusters of any drive in any order, groups
//! them into extents, compresses them and hashes their leaves on worker
//! threads, and appends them to any `Write` (a file or a pipe) in
//! submission order; then writes the paged index (built with bounded
//! memory, see [`crate::index`]) and the footer.

use std::io::Write;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::extent::{
    drive_sizes, encode_extent, reframe_stored, DriveSizes, EncodedExtent, RawExtent, StoredExtent,
};
use crate::format::{
    archive_digest, limits, Codec, CompressionInfo, ConfigBlob, DriveInfo, Footer, Header,
    ParentRef, RunKind, BLOCK_SIZE, COMPAT_STANDS_FOR, INCOMPAT_PARENT, INCOMPAT_ZSTD,
    VERSION_MAJOR, VERSION_MINOR,
};
use crate::index::{ExtentKeys, FinishOptions, IndexBuilder, LeafSource};
use crate::tree::Digest;
use crate::types::{block_mask, cluster_len, ArchiveOffset, ClusterNo, DriveId};
use crate::util::pipeline::OrderedPool;
use crate::util::Counting;

pub use crate::types::ClusterWriter;

impl<W: Write> ClusterWriter for Writer<W> {
    fn write_cluster(&mut self, drive: DriveId, cluster: ClusterNo, data: &[u8]) -> Result<()> {
        Writer::write_cluster(self, drive, cluster, data)
    }
    fn write_zeros(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        Writer::write_zeros(self, drive, clusters)
    }
    fn write_unchanged(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        Writer::write_unchanged(self, drive, clusters)
    }
}

/// How extent payloads are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Store payloads as they are.
    None,
    /// zstd at the given level (negative levels are the fast modes).
    Zstd(i32),
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd(DEFAULT_ZSTD_LEVEL)
    }
}

/// zstd level used when none is given.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Default decoded payload per extent: large enough for zstd to reach its
/// stream ratio, small enough that a random read decodes little.
pub const DEFAULT_EXTENT_PAYLOAD: usize = 256 << 10;

/// An extent is closed once it has this many run entries.
const MAX_WRITER_ENTRIES: usize = 4096;

/// Tuning of a [`Writer`].
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Payload compression.
    pub compression: Compression,
    /// Worker threads for compression and hashing (0: one per core).
    pub threads: usize,
    /// Target decoded payload bytes per extent.
    pub extent_payload: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            compression: Compression::default(),
            threads: 0,
            extent_payload: DEFAULT_EXTENT_PAYLOAD,
        }
    }
}

pub use crate::util::{effective_threads, MAX_THREADS};

/// What goes into an archive's header.
#[derive(Clone, Debug)]
pub struct ArchiveMeta {
    /// Archive uuid (random for a new archive).
    pub uuid: [u8; 16],
    /// Creation time, seconds since the Unix epoch.
    pub ctime: i64,
    /// Program name and version.
    pub creator: String,
    /// Drives with ids ascending from 1.
    pub drives: Vec<DriveInfo>,
    /// Config blobs.
    pub configs: Vec<ConfigBlob>,
    /// Parent, for incremental archives (uuid, archive digest and state
    /// digest: see [`crate::read::reader::Reader::identity`]).
    pub parent: Option<ParentRef>,
    /// The archives whose point in time this one holds (see
    /// [`Header::stands_for`]); empty for a new backup.
    pub stands_for: Vec<ParentRef>,
}

impl ArchiveMeta {
    /// A new archive's metadata: fresh uuid, current time, this crate as creator.
    pub fn new(drives: Vec<DriveInfo>, configs: Vec<ConfigBlob>) -> Self {
        ArchiveMeta {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            ctime: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            creator: format!("vma {}", env!("CARGO_PKG_VERSION")),
            drives,
            configs,
            parent: None,
            stands_for: Vec::new(),
        }
    }
}

/// Facts about a finished archive.
#[derive(Clone, Debug)]
pub struct WriteSummary {
    /// Archive uuid.
    pub uuid: [u8; 16],
    /// The archive digest.
    pub archive_digest: [u8; 32],
    /// The state digest of the archive's point in time (None when a drive
    /// has no digest: an interrupted capture).
    pub state_digest: Option<[u8; 32]>,
    /// Every drive's digest, in header order (None for interrupted drives).
    pub drive_digests: Vec<Option<Digest>>,
    /// Total bytes written.
    pub bytes_written: u64,
    /// Number of extents.
    pub extents: u64,
    /// Clusters submitted out of order (behind an earlier cluster of the same drive).
    pub out_of_order_clusters: u64,
}

struct DriveState {
    info: DriveInfo,
    clusters: u64,
    /// Highest cluster written so far + 1, to count out-of-order arrivals.
    high_water: u64,
    /// The drive digest the caller expects (merge, convert).
    expected: Option<Digest>,
}

/// Where encoded extents go, in order.
struct Output<W: Write> {
    out: W,
    pos: u64,
    builder: IndexBuilder,
    extents: u64,
    spare: Vec<RawExtent>,
}

impl<W: Write> Output<W> {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(format!("writing archive at offset {}", self.pos), e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn append(&mut self, enc: Result<EncodedExtent>) -> Result<()> {
        let enc = enc?;
        let offset = self.pos;
        self.write_all(&enc.bytes)?;
        let len = enc.bytes.len() as u64;
        let key =
            self.builder
                .add_extent(enc.seq, ArchiveOffset(offset), len as u32, enc.digest)?;
        self.extents += 1;
        for e in &enc.entries {
            self.builder
                .add_entry(e.drive, e.kind, e.start, e.count, key)?;
        }
        for &(d, c, l) in &enc.leaves {
            self.builder.add_leaf(d, c, key, l)?;
        }
        let total_blocks: u64 = enc.blocks_per_drive.iter().map(|(_, b)| b).sum();
        for (d, blocks) in &enc.blocks_per_drive {
            self.builder
                .add_stored_bytes(*d, len * blocks / total_blocks.max(1));
        }
        if let Some(raw) = enc.raw {
            self.spare.push(raw);
        }
        Ok(())
    }
}

/// Work for the encoding threads: an extent to compress and frame, or a
/// stored extent to frame again; each with its sequence number.
enum Job {
    Raw(u64, RawExtent),
    Stored(u64, StoredExtent),
}

/// Writes one archive. Feed it clusters with [`Writer::write_cluster`] and
/// [`Writer::write_zeros`] in any order, then call [`Writer::finish`].
pub struct Writer<W: Write> {
    header: Header,
    header_digest: [u8; 32],
    drives: Vec<DriveState>,
    slot_of: [Option<u8>; 256],
    current: RawExtent,
    next_seq: u64,
    target_payload: usize,
    pool: OrderedPool<Job, Result<EncodedExtent>>,
    output: Output<W>,
    out_of_order: u64,
    leaf_source: Option<Box<dyn LeafSource + Send>>,
    progress: Option<crate::util::ProgressFn>,
}

impl<W: Write> Writer<W> {
    /// Validate `meta`, write the header to `out` and start the workers.
    pub fn new(out: W, meta: ArchiveMeta, options: &WriterOptions) -> Result<Self> {
        let (codec, level) = match options.compression {
            Compression::None => (Codec::None, 0),
            Compression::Zstd(l) => {
                let range = zstd::compression_level_range();
                if !range.contains(&l) {
                    return Err(Error::Invalid(format!(
                        "zstd level {l} is outside {}..={}",
                        range.start(),
                        range.end()
                    )));
                }
                (Codec::Zstd, l)
            }
        };
        if options.extent_payload < BLOCK_SIZE
            || options.extent_payload > limits::MAX_EXTENT_RAW / 2
        {
            return Err(Error::Invalid(
                "extent payload must be between 4 KiB and 8 MiB".into(),
            ));
        }
        let header = Header {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            incompat: if codec == Codec::Zstd {
                INCOMPAT_ZSTD
            } else {
                0
            } | if meta.parent.is_some() {
                INCOMPAT_PARENT
            } else {
                0
            },
            compat: if meta.stands_for.is_empty() {
                0
            } else {
                COMPAT_STANDS_FOR
            },
            uuid: meta.uuid,
            ctime: meta.ctime,
            compression: CompressionInfo {
                codec,
                level: level.clamp(i8::MIN as i32, i8::MAX as i32) as i8,
            },
            creator: meta.creator,
            parent: meta.parent,
            drives: meta.drives,
            configs: meta.configs,
            stands_for: meta.stands_for,
        };
        let header_bytes = header.encode()?;
        let header_digest: [u8; 32] = header_bytes[header_bytes.len() - 32..]
            .try_into()
            .expect("32");
        let mut slot_of = [None; 256];
        let drives = header
            .drives
            .iter()
            .enumerate()
            .map(|(i, d)| {
                slot_of[d.id.0 as usize] = Some(i as u8);
                DriveState {
                    info: d.clone(),
                    clusters: d.clusters(),
                    high_water: 0,
                    expected: None,
                }
            })
            .collect();
        let threads = effective_threads(options.threads);
        let compression = options.compression;
        let uuid = header.uuid;
        let sizes: std::sync::Arc<DriveSizes> = drive_sizes(&header.drives).into();
        let pool = OrderedPool::new(threads, threads * 2 + 2, move || {
            let mut compressor = match compression {
                Compression::Zstd(level) => Some(
                    zstd::bulk::Compressor::new(level).expect("zstd context with a checked level"),
                ),
                Compression::None => None,
            };
            let mut decompressor =
                zstd::bulk::Decompressor::new().expect("zstd decompression context");
            let sizes = sizes.clone();
            move |job: Job| match job {
                Job::Raw(seq, raw) => encode_extent(raw, uuid, seq, compressor.as_mut(), &sizes),
                Job::Stored(seq, stored) => {
                    reframe_stored(stored, uuid, seq, &mut decompressor, &sizes)
                }
            }
        });
        let builder = IndexBuilder::new(
            &header.drives,
            header.parent.is_some(),
            ExtentKeys::Seq,
            true,
        );
        let mut output = Output {
            out,
            pos: 0,
            builder,
            extents: 0,
            spare: Vec::new(),
        };
        output.write_all(&header_bytes)?;
        Ok(Writer {
            header,
            header_digest,
            drives,
            slot_of,
            current: RawExtent::default(),
            next_seq: 0,
            target_payload: options.extent_payload,
            pool,
            output,
            out_of_order: 0,
            leaf_source: None,
            progress: None,
        })
    }

    /// Report the steps of [`Writer::finish`] that take time (building
    /// and writing the index of a large archive) to `progress`.
    pub fn set_progress(&mut self, progress: Option<crate::util::ProgressFn>) {
        self.progress = progress;
    }

    /// The header this writer wrote.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes handed to the output so far.
    pub fn bytes_written(&self) -> u64 {
        self.output.pos
    }

    /// Where the leaves of the clusters marked unchanged come from (the
    /// parent chain's leaf pages, see [`crate::chain::Chain::leaf_source`]):
    /// every drive of an incremental archive gets the drive digest of its
    /// whole point in time, so it needs them.
    pub fn set_leaf_source(&mut self, source: Box<dyn LeafSource + Send>) {
        self.leaf_source = Some(source);
    }

    /// Fail [`Writer::finish`] (before the footer is written) unless the
    /// drive digest computed for `drive` is `digest`: how a copy (merge,
    /// convert) proves end to end that it holds the point in time its
    /// source recorded.
    pub fn expect_drive_digest(&mut self, drive: DriveId, digest: Digest) -> Result<()> {
        self.drive_mut(drive)?.expected = Some(digest);
        Ok(())
    }

    fn drive_mut(&mut self, drive: DriveId) -> Result<&mut DriveState> {
        match self.slot_of[drive.0 as usize] {
            Some(i) => Ok(&mut self.drives[i as usize]),
            None => Err(Error::Invalid(format!(
                "drive id {drive} is not in this archive"
            ))),
        }
    }

    /// Check that `clusters` lie within the drive and count out-of-order
    /// arrivals. Clusters given twice or never are found when the index is
    /// built (see [`Writer::finish`]), with no per-cluster state kept.
    fn claim(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        let slot = self.slot_of[drive.0 as usize]
            .ok_or_else(|| Error::Invalid(format!("drive id {drive} is not in this archive")))?;
        let d = &mut self.drives[slot as usize];
        if clusters.end > d.clusters {
            return Err(Error::Invalid(format!(
                "drive {}: cluster {} is beyond its {} clusters",
                d.info.name,
                clusters.end - 1,
                d.clusters
            )));
        }
        if clusters.start < d.high_water {
            self.out_of_order += clusters.end - clusters.start;
        }
        d.high_water = d.high_water.max(clusters.end);
        Ok(())
    }

    /// Store one cluster of `drive`. `data` must be exactly the cluster's
    /// length (64 KiB, or less for a drive's last cluster). All-zero 4 KiB
    /// blocks are dropped; an all-zero cluster costs only an entry.
    pub fn write_cluster(&mut self, drive: DriveId, cluster: ClusterNo, data: &[u8]) -> Result<()> {
        let d = self.drive_mut(drive)?;
        let expected = cluster_len(d.info.size, cluster);
        if data.len() != expected || expected == 0 {
            return Err(Error::Invalid(format!(
                "drive {}: cluster {} takes {} bytes, {} given",
                d.info.name,
                cluster,
                expected,
                data.len()
            )));
        }
        self.claim(drive, cluster.0..cluster.0 + 1)?;
        let mask = block_mask(data);
        if mask == 0 {
            self.current.push_run(drive, RunKind::Zero, cluster.0, 1);
        } else {
            self.current.push_data(drive, cluster, mask, data);
        }
        self.maybe_flush()
    }

    /// Record clusters `clusters` of `drive` as all zero.
    pub fn write_zeros(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        self.write_run(drive, RunKind::Zero, clusters)
    }

    /// Record clusters as unchanged from the parent (incremental archives).
    pub fn write_unchanged(&mut self, drive: DriveId, clusters: Range<u64>) -> Result<()> {
        if self.header.parent.is_none() {
            return Err(Error::Invalid(
                "unchanged clusters need an archive with a parent".into(),
            ));
        }
        self.write_run(drive, RunKind::Unchanged, clusters)
    }

    fn write_run(&mut self, drive: DriveId, kind: RunKind, clusters: Range<u64>) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.claim(drive, clusters.clone())?;
        let mut start = clusters.start;
        while start < clusters.end {
            let count = (clusters.end - start).min(u32::MAX as u64) as u32;
            self.current.push_run(drive, kind, start, count);
            start += count as u64;
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Mark `drive` as captured by an interrupted capture (see
    /// [`crate::format::DriveRecord::interrupted`]): readers refuse to
    /// present it alone, and it has no drive digest.
    pub fn mark_interrupted(&mut self, drive: DriveId) -> Result<()> {
        self.drive_mut(drive)?;
        self.output.builder.set_interrupted(drive, true);
        Ok(())
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.current.payload.len() >= self.target_payload
            || self.current.entries.len() >= MAX_WRITER_ENTRIES
        {
            self.flush_extent()?;
        }
        Ok(())
    }

    fn flush_extent(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let next = self.output.spare.pop().unwrap_or_else(|| RawExtent {
            payload: Vec::with_capacity(self.target_payload + 64 * 1024),
            ..Default::default()
        });
        let raw = std::mem::replace(&mut self.current, next);
        let seq = self.next_seq;
        self.next_seq += 1;
        let output = &mut self.output;
        self.pool
            .submit(Job::Raw(seq, raw), |enc| output.append(enc))
    }

    /// Append an extent of another archive as it is stored (see
    /// [`StoredExtent`]): its payload is not compressed again (it is
    /// decoded once, on a worker, for the leaves of its clusters); it gets
    /// this archive's uuid, next sequence number and a new digest.
    /// Its entries must name drives of this archive (ids as here) and are
    /// checked like any submission: within the drive, unchanged runs only
    /// with a parent. The extent being filled stays open, so clusters
    /// written around stored extents still share extents.
    pub fn append_stored(&mut self, extent: StoredExtent) -> Result<()> {
        if extent.codec() == Codec::Zstd && self.header.incompat & INCOMPAT_ZSTD == 0 {
            return Err(Error::Invalid(format!(
                "the extent at offset {} is zstd-compressed, and this archive is written without compression",
                extent.offset()
            )));
        }
        if extent.entries().is_empty() {
            return Err(Error::Invalid(format!(
                "the extent at offset {} has no entries left to append",
                extent.offset()
            )));
        }
        for e in extent.entries() {
            if e.kind == RunKind::Unchanged && self.header.parent.is_none() {
                return Err(Error::Invalid(
                    "unchanged clusters need an archive with a parent".into(),
                ));
            }
            self.claim(e.drive, e.start..e.start + e.count as u64)?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let output = &mut self.output;
        self.pool
            .submit(Job::Stored(seq, extent), |enc| output.append(enc))
    }

    /// Whether extents of `codec` can be appended as they are.
    pub fn accepts_codec(&self, codec: Codec) -> bool {
        codec == Codec::None || self.header.incompat & INCOMPAT_ZSTD != 0
    }

    /// Write what is buffered, build the index (which finds clusters given
    /// twice or never), compute every drive's digest (checking those the
    /// caller expects), and write the index and footer. Returns the output.
    pub fn finish(mut self) -> Result<(W, WriteSummary)> {
        self.flush_extent()?;
        let output = &mut self.output;
        self.pool.finish(|enc| output.append(enc))?;
        let builder = std::mem::replace(
            &mut self.output.builder,
            IndexBuilder::with_memory(&[], false, ExtentKeys::Seq, false, 0),
        );
        let mut source = self.leaf_source.take();
        let progress = self.progress.take();
        let built = builder
            .finish(FinishOptions {
                lenient: false,
                source: source.as_mut().map(|s| &mut **s as &mut dyn LeafSource),
                keep_pages: true,
                uuid: self.header.uuid,
                progress: Some(&mut |done, total| {
                    if let Some(p) = &progress {
                        let cs = crate::format::CLUSTER_SIZE as u64;
                        p("writing the index", done * cs, total * cs);
                    }
                }),
            })
            .map_err(|e| match e {
                Error::Duplicate { what, .. } => Error::Invalid(format!(
                    "cannot finish the archive: {what} (bytes written to this archive twice)"
                )),
                Error::Incomplete { summary, .. } => Error::Invalid(format!(
                    "cannot finish the archive: never written: {summary}"
                )),
                other => other,
            })?;
        for (slot, d) in self.drives.iter().enumerate() {
            let got = built.roots[slot];
            let interrupted = built.records[slot].interrupted;
            if got.is_none() && !interrupted {
                return Err(Error::Invalid(format!(
                    "cannot finish the archive: drive {} has clusters unchanged from the parent but no leaf source for them (the parent chain is needed for the drive digest)",
                    d.info.name
                )));
            }
            if let (Some(want), Some(got)) = (d.expected, got) {
                if want != got {
                    return Err(Error::DriveDigestMismatch {
                        drive_name: d.info.name.clone(),
                        expected: hex::encode(want),
                        found: hex::encode(got),
                    });
                }
            }
        }
        let index_offset = self.output.pos;
        let mut counted = Counting::new(&mut self.output.out);
        let (index_len, index_digest) = built.write_to(&mut counted)?;
        debug_assert_eq!(counted.count(), index_len);
        self.output.pos += index_len;
        let digest = archive_digest(&self.header_digest, &index_digest);
        let footer = Footer {
            index_offset,
            index_len,
            extent_count: self.output.extents,
            archive_digest: digest,
        };
        self.output.write_all(&footer.encode())?;
        self.output
            .out
            .flush()
            .map_err(|e| Error::io("flushing the archive", e))?;
        let state_digest = (!built.roots.iter().any(Option::is_none)).then(|| {
            crate::tree::state_digest(
                self.header
                    .drives
                    .iter()
                    .zip(&built.roots)
                    .map(|(d, r)| (d.name.as_str(), d.size, *r)),
            )
        });
        let summary = WriteSummary {
            uuid: self.header.uuid,
            archive_digest: digest,
            state_digest,
            drive_digests: built.roots.clone(),
            bytes_written: self.output.pos,
            extents: self.output.extents,
            out_of_order_clusters: self.out_of_order,
        };
        let Writer { output, pool, .. } = self;
        drop(pool);
        Ok((output.out, summary))
    }
}

//! Random access to a complete archive file through its index: read any
//! byte range of any drive, decoding only the extents involved.
//!
//! A 3.0 archive is opened through its footer, fixed index part, drive
//! records and directory (small), with the archive digest recomputed from
//! them; its pages are loaded on demand and checked against the directory,
//! and an extent is loaded only through its extent-table record: offset,
//! length and digest must match, and the extent must name this archive and
//! this sequence number. 2.0 and VMA v1 archives are read as before (their
//! index in memory).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, IoContext, Result};
use crate::extent::{drive_sizes, Binding, ClusterData, DecodedExtent, DriveSizes, StoredExtent};
use crate::format::v1::{self, V1ExtentHeader};
use crate::format::ExtentFrame;
use crate::format::{
    archive_digest, index_digest, v2, Directory, DriveRecord, Footer, Header, HeaderPrefix,
    IndexFixed, IndexRun, ParentRef, RunKind, BLOCK_SIZE, CLUSTER_SIZE, DRIVE_RECORD_LEN,
    EXTENT_HEADER_LEN, FOOTER_LEN, HEADER_FIXED_LEN, INCOMPAT_ZSTD, INDEX_FIXED_LEN,
};
use crate::index::paged::RunCursor;
use crate::index::{ExtentKeys, PageSource, PagedIndex};
use crate::read::detect::{detect, DetectedFormat, DETECT_LEN};
use crate::read::stream::{incomplete_error, ArchiveFormat, ArchiveStream, PassOptions};
use crate::storage::{SeqRead, Source};
use crate::tree::Digest;
use crate::types::{cluster_len, ArchiveOffset, ClusterNo, DriveId, DriveRange, ExtentRef};

/// Default bytes of decoded extents kept in memory.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Most bytes of drive records and directory an index may have (the
/// directory of a 128 TiB drive with every other cluster written is 29 MiB).
const MAX_INDEX_TAIL: u64 = 64 << 20;

/// A 2.0 or VMA v1 index, held in memory.
struct MemIndex {
    runs: Vec<IndexRun>,
    /// Per drive (header order), its runs within `runs`.
    drive_runs: Vec<std::ops::Range<usize>>,
}

enum RunIndex {
    Mem(MemIndex),
    Paged(Box<PagedIndex>),
}

/// A complete archive file opened for random access.
pub struct Reader {
    file: Source,
    path: PathBuf,
    header: Header,
    header_len: u64,
    format: ArchiveFormat,
    index: RunIndex,
    records: Vec<DriveRecord>,
    /// 3.0: recomputed from the header and index read; 2.0: as its footer states.
    archive_digest: Option<[u8; 32]>,
    /// Where extents end (the index, or the end of a VMA v1 file).
    data_end: u64,
    /// The archive uuid of a VMA v1 archive (which repeats it in every extent).
    v1_uuid: Option<[u8; 16]>,
    /// Every data cluster served is checked against its leaf (a stand-in).
    check_leaves: AtomicBool,
    sizes: Box<DriveSizes>,
    cache: Mutex<ExtentCache>,
    decompressors: Mutex<Vec<zstd::bulk::Decompressor<'static>>>,
}

/// Runs of one drive in order, from wherever they are kept.
pub enum Runs<'a> {
    /// A 2.0 or VMA v1 index in memory.
    Mem(std::slice::Iter<'a, IndexRun>),
    /// A 3.0 index, page by page.
    Paged(RunCursor<'a>),
}

impl Iterator for Runs<'_> {
    type Item = Result<IndexRun>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Runs::Mem(it) => it.next().map(|r| Ok(*r)),
            Runs::Paged(c) => c.next(),
        }
    }
}

impl Reader {
    /// Open `path`: a native archive through its footer and index, a VMA v1
    /// archive by walking its extent headers once (one small read per
    /// extent, no data read).
    pub fn open(path: &Path) -> Result<Reader> {
        Reader::open_source(crate::storage::open(path)?, path)
    }

    /// Like [`Reader::open`], for a file already open (`path` names it in
    /// messages), read from its start whatever its current position.
    pub fn open_file(file: File, path: &Path) -> Result<Reader> {
        Reader::open_source(Arc::new(file), path)
    }

    /// Like [`Reader::open`], for any random-access source (`path` names
    /// it in messages).
    pub fn open_source(file: Source, path: &Path) -> Result<Reader> {
        let file_len = file
            .size()
            .ctx(|| format!("reading the size of {}", path.display()))?;
        let name = path.display().to_string();
        let mut magic = [0u8; DETECT_LEN];
        let n = file
            .read_some(&mut magic, 0)
            .ctx(|| format!("reading {name}"))?;
        match detect(&magic[..n]) {
            Some(DetectedFormat::VmaV1) => return Reader::open_v1(file, path, file_len),
            Some(DetectedFormat::Zstd | DetectedFormat::Gzip | DetectedFormat::Lzo) => {
                return Err(Error::UnsupportedFormat {
                    format: format!("{name}, a whole-stream compressed archive,"),
                    hint: "random access needs an uncompressed archive file: read it through a pipe or standard input, or unpack it once with `vma convert`".into(),
                })
            }
            _ => {}
        }
        // Header through the sequential reader's code (one header parser).
        let stream = ArchiveStream::open(SeqRead::new(file.clone(), 0, file_len), &name)?;
        let header = stream.header().clone();
        let header_digest = stream.header_digest().expect("native");
        drop(stream);
        let mut fixed = [0u8; HEADER_FIXED_LEN];
        read_exact_at(&file, &mut fixed, 0, &name)?;
        let prefix = HeaderPrefix::decode(&fixed)?;
        let header_len = prefix.header_len as u64;
        if file_len < header_len + FOOTER_LEN as u64 {
            return Err(Error::truncated(
                file_len,
                "the file ends before a footer could follow the header: the archive is incomplete",
            ));
        }
        if prefix.major == v2::VERSION_MAJOR {
            return Reader::open_v2(file, path, header, header_len, file_len);
        }
        let (footer, footer_at) = read_footer(&file, &name, file_len, header_len, prefix.major)?;
        let at = footer.index_offset;
        let mut fixed_bytes = [0u8; INDEX_FIXED_LEN];
        read_exact_at(&file, &mut fixed_bytes, at, &name)?;
        let fixed = IndexFixed::decode(&fixed_bytes, at)?;
        if fixed.uuid != header.uuid {
            return Err(Error::corrupt(
                at,
                "the index names another archive: the file was spliced or overwritten",
            ));
        }
        let total: u64 = header.drives.iter().map(|d| d.clusters()).sum();
        let layout = fixed
            .layout()
            .filter(|l| l.len == footer.index_len)
            .ok_or_else(|| {
                Error::corrupt(
                    at,
                    format!(
                        "the index's counts do not give the {} bytes the footer says it takes",
                        footer.index_len
                    ),
                )
            })?;
        if fixed.drive_count as usize != header.drives.len()
            || fixed.run_count > total
            || fixed.leaf_count > total
            || fixed.extent_count != footer.extent_count
        {
            return Err(Error::corrupt(
                at,
                format!(
                    "index counts ({} drives, {} runs, {} leaves, {} extents) do not fit the archive's {} drives of {total} clusters",
                    fixed.drive_count,
                    fixed.run_count,
                    fixed.leaf_count,
                    fixed.extent_count,
                    header.drives.len()
                ),
            ));
        }
        if layout.tail_len() > MAX_INDEX_TAIL {
            return Err(Error::Limit(format!(
                "{name}: the index's drive records and directory take {} bytes, more than this build reads ({MAX_INDEX_TAIL})",
                layout.tail_len()
            )));
        }
        let mut tail = vec![0u8; layout.tail_len() as usize];
        read_exact_at(&file, &mut tail, at + layout.records_at, &name)?;
        let records_len = fixed.drive_count as usize * DRIVE_RECORD_LEN;
        let dir_len = (layout.digest_at - layout.directory_at) as usize;
        let (records_bytes, rest) = tail.split_at(records_len);
        let (directory_bytes, stored_digest) = rest.split_at(dir_len);
        let computed = index_digest(&fixed_bytes, records_bytes, directory_bytes);
        if !crate::digest::check_matches(stored_digest, &computed) {
            return Err(Error::corrupt(
                at + layout.digest_at,
                "the index digest does not match the index's records and directory",
            ));
        }
        let digest = archive_digest(&header_digest, &computed);
        if !crate::digest::check_matches(&footer.archive_digest, &digest) {
            return Err(Error::corrupt(
                footer_at + 32,
                "the archive digest in the footer does not match the header and index",
            ));
        }
        let mut records = Vec::with_capacity(header.drives.len());
        for (i, r) in records_bytes.chunks_exact(DRIVE_RECORD_LEN).enumerate() {
            let rec =
                DriveRecord::decode(r, at + layout.records_at + (i * DRIVE_RECORD_LEN) as u64)?;
            if rec.digest.is_none() != rec.interrupted {
                return Err(Error::corrupt(
                    at + layout.records_at,
                    "index: a 3.0 drive record has a drive digest exactly when its drive is not interrupted",
                ));
            }
            records.push(rec);
        }
        let directory = Directory::decode(directory_bytes, &layout);
        let paged = PagedIndex::new(
            layout,
            directory,
            records.clone(),
            &header.drives,
            header.parent.is_some(),
            ExtentKeys::Seq,
            header_len..at,
            PageSource::File {
                file: file.clone(),
                base: at,
            },
            &name,
        )?;
        Ok(Reader::assemble(
            file,
            path,
            header,
            header_len,
            RunIndex::Paged(Box::new(paged)),
            records,
            Some(digest),
            at,
        ))
    }

    /// The reader of an archive opened by one of the `open` paths: its
    /// format (and a VMA v1 archive's uuid, which its extents repeat)
    /// follow from `header`, the caches start empty.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        file: Source,
        path: &Path,
        header: Header,
        header_len: u64,
        index: RunIndex,
        records: Vec<DriveRecord>,
        archive_digest: Option<[u8; 32]>,
        data_end: u64,
    ) -> Reader {
        let format = ArchiveFormat::of_version(header.version_major);
        let v1_uuid = (format == ArchiveFormat::VmaV1).then_some(header.uuid);
        let sizes = drive_sizes(&header.drives);
        Reader {
            file,
            path: path.to_path_buf(),
            header,
            header_len,
            format,
            index,
            records,
            archive_digest,
            data_end,
            v1_uuid,
            check_leaves: AtomicBool::new(false),
            sizes,
            cache: Mutex::new(ExtentCache::new(DEFAULT_CACHE_BYTES)),
            decompressors: Mutex::new(Vec::new()),
        }
    }

    /// A 2.0 archive: footer and index block (whole, in memory).
    fn open_v2(
        file: Source,
        path: &Path,
        header: Header,
        header_len: u64,
        file_len: u64,
    ) -> Result<Reader> {
        let name = path.display().to_string();
        let (footer, _) = read_footer(&file, &name, file_len, header_len, v2::VERSION_MAJOR)?;
        // The index's own counts, checked against the footer and the
        // drives, before its length decides an allocation.
        let mut fixed = [0u8; v2::INDEX_FIXED_LEN];
        read_exact_at(&file, &mut fixed, footer.index_offset, &name)?;
        v2::Index::block_len(&fixed, footer.index_offset, footer.index_len)?;
        let (runs, _) = v2::Index::counts(&fixed);
        let clusters: u64 = header.drives.iter().map(|d| d.clusters()).sum();
        if runs > clusters.max(1) {
            return Err(Error::corrupt(
                footer.index_offset + 8,
                format!(
                    "index claims {runs} runs, more than the {clusters} clusters of the drives"
                ),
            ));
        }
        let mut block = vec![0u8; footer.index_len as usize];
        read_exact_at(&file, &mut block, footer.index_offset, &name)?;
        let mut index = v2::Index::decode(&block, footer.index_offset)?;
        for (r, d) in index.drives.iter_mut().zip(&header.drives) {
            r.unchanged = index
                .runs
                .iter()
                .any(|x| x.drive == d.id && x.kind == RunKind::Unchanged);
        }
        let drive_runs = check_index(
            &header,
            &index.runs,
            &index.drives,
            header_len,
            footer.index_offset,
        )?;
        Ok(Reader::assemble(
            file,
            path,
            header,
            header_len,
            RunIndex::Mem(MemIndex {
                runs: index.runs,
                drive_runs,
            }),
            index.drives,
            Some(footer.archive_digest),
            footer.index_offset,
        ))
    }

    fn open_v1(file: Source, path: &Path, file_len: u64) -> Result<Reader> {
        let name = path.display().to_string();
        let header = ArchiveStream::open(SeqRead::new(file.clone(), 0, file_len), &name)?
            .header()
            .clone();
        let mut prefix = [0u8; 60];
        read_exact_at(&file, &mut prefix, 0, &name)?;
        let header_len = v1::header_len(&prefix)? as u64;
        let uuid = header.uuid;
        let mut runs = Vec::new();
        let mut records: Vec<DriveRecord> = header
            .drives
            .iter()
            .map(|d| DriveRecord::empty(d.id))
            .collect();
        let mut offset = header_len;
        while offset < file_len {
            let mut hb = [0u8; v1::EXTENT_HEADER_LEN];
            read_exact_at(&file, &mut hb, offset, &name)?;
            let h = V1ExtentHeader::decode(&hb, offset, &uuid)?;
            let end = offset + (v1::EXTENT_HEADER_LEN + h.data_len()) as u64;
            if end > file_len {
                return Err(Error::truncated(
                    file_len,
                    format!("the VMA extent at offset {offset} needs {} bytes of data; the file ends first", h.data_len()),
                ));
            }
            for s in &h.slots {
                let data = s.mask != 0;
                runs.push(IndexRun {
                    drive: s.drive,
                    start: s.cluster as u64,
                    count: 1,
                    kind: if data { RunKind::Data } else { RunKind::Zero },
                    extent: if data {
                        ExtentRef::at(ArchiveOffset(offset))
                    } else {
                        ExtentRef::NONE
                    },
                });
                if let Some(r) = records.iter_mut().find(|r| r.drive == s.drive) {
                    r.data_clusters += data as u64;
                    r.stored_bytes += s.mask.count_ones() as u64 * BLOCK_SIZE as u64;
                }
            }
            offset = end;
        }
        let runs = canonical_runs(runs);
        let drive_runs = check_index(&header, &runs, &records, header_len, file_len)?;
        Ok(Reader::assemble(
            file,
            path,
            header,
            header_len,
            RunIndex::Mem(MemIndex { runs, drive_runs }),
            records,
            None,
            file_len,
        ))
    }

    /// Open `path` however damaged or truncated it is, for salvage: one
    /// sequential pass (`threads` decoders) checks and decodes every
    /// extent, and the index is rebuilt from the intact extents alone (a
    /// stored index is never trusted here) into temporary storage and read
    /// paged like a stored one. What no intact extent holds, and clusters
    /// intact extents hold with different bytes, read as zeros and are
    /// listed in the returned [`Salvage`]. Only an unreadable header, or
    /// I/O errors, make it fail.
    pub fn open_salvage(path: &Path, threads: usize) -> Result<(Reader, Salvage)> {
        let file = crate::storage::open(path)?;
        let file_len = file
            .size()
            .ctx(|| format!("reading the size of {}", path.display()))?;
        let name = path.display().to_string();
        let stream = ArchiveStream::open(SeqRead::new(file.clone(), 0, file_len), &name)?;
        let header = stream.header().clone();
        let format = stream.format();
        let mut prefix = [0u8; HEADER_FIXED_LEN];
        read_exact_at(&file, &mut prefix, 0, &name)?;
        let header_len = match format {
            ArchiveFormat::VmaV1 => v1::header_len(&prefix)? as u64,
            _ => HeaderPrefix::decode(&prefix)?.header_len as u64,
        };
        let options = PassOptions {
            threads,
            keep_going: true,
            keep_index: true,
            ..Default::default()
        };
        let mut report = stream.pass(&options, |_| Ok(()))?;
        let built = report.built.take().expect("kept");
        let mut records = built.records.clone();
        // The interrupted flags are the stored index's, where it was read.
        if let Some(stored) = &report.records {
            for (r, s) in records.iter_mut().zip(stored) {
                r.interrupted = s.interrupted;
                if r.digest.is_none() {
                    r.digest = s.digest;
                }
            }
        }
        let keys = if format == ArchiveFormat::V3 {
            ExtentKeys::Seq
        } else {
            ExtentKeys::Offset
        };
        let layout = built.layout();
        let pages = Arc::new(built.pages.expect("kept"));
        let paged = PagedIndex::new(
            layout,
            built.directory,
            built.records,
            &header.drives,
            header.parent.is_some(),
            keys,
            header_len..file_len.max(header_len + 1),
            PageSource::Built(pages),
            &name,
        )?;
        let mut lost: Vec<DriveRange> = report
            .damaged
            .iter()
            .chain(&report.missing)
            .chain(&report.conflicting)
            .cloned()
            .collect();
        lost.sort_by_key(|r| (r.drive, r.bytes.start));
        let mut merged: Vec<DriveRange> = Vec::with_capacity(lost.len());
        for r in lost {
            match merged.last_mut() {
                Some(m) if m.drive == r.drive && m.bytes.end >= r.bytes.start => {
                    m.bytes.end = m.bytes.end.max(r.bytes.end)
                }
                _ => merged.push(r),
            }
        }
        let reader = Reader::assemble(
            file,
            path,
            header,
            header_len,
            RunIndex::Paged(Box::new(paged)),
            records,
            report.archive_digest,
            file_len,
        );
        let salvage = Salvage {
            problems: report.problems,
            damaged: report.damaged,
            missing: report.missing,
            conflicting: report.conflicting,
            lost: merged,
        };
        Ok((reader, salvage))
    }

    /// Change how many bytes of decoded extents are cached.
    pub fn set_cache_bytes(&self, bytes: usize) {
        self.cache.lock().expect("cache lock").capacity = bytes;
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The drive records (header order).
    pub fn drive_records(&self) -> &[DriveRecord] {
        &self.records
    }

    /// The record of drive `drive`.
    pub fn record(&self, drive: DriveId) -> Option<&DriveRecord> {
        self.header.slot(drive).and_then(|s| self.records.get(s))
    }

    /// The archive digest: for 3.0 recomputed from the header and index
    /// read (never taken from a field); for 2.0 as its footer states it;
    /// none for VMA v1.
    pub fn archive_digest(&self) -> Option<[u8; 32]> {
        self.archive_digest
    }

    /// The state digest of the archive's point in time (3.0; None when a
    /// drive is interrupted).
    pub fn state_digest(&self) -> Option<[u8; 32]> {
        if self.format != ArchiveFormat::V3 || self.records.iter().any(|r| r.digest.is_none()) {
            return None;
        }
        Some(crate::tree::state_digest(
            self.header
                .drives
                .iter()
                .zip(&self.records)
                .map(|(d, r)| (d.name.as_str(), d.size, r.digest)),
        ))
    }

    /// How a child names this archive as its parent: uuid, archive digest
    /// (recomputed) and state digest. Only 3.0 archives can be the parent
    /// of a new (3.0) archive.
    pub fn identity(&self) -> Result<ParentRef> {
        match self.format {
            ArchiveFormat::V3 => Ok(ParentRef {
                uuid: self.header.uuid,
                digest: self.archive_digest.expect("3.0 archives have one"),
                state: Some(
                    crate::tree::state_digest(
                        self.header
                            .drives
                            .iter()
                            .zip(&self.records)
                            .map(|(d, r)| (d.name.as_str(), d.size, r.digest)),
                    ),
                ),
            }),
            ArchiveFormat::V2 => Err(Error::Invalid(format!(
                "{} is a version 2.0 archive, which cannot prove its content to an archive made on top of it; convert the parent first: vma convert {} NEW",
                self.path.display(),
                self.path.display()
            ))),
            ArchiveFormat::VmaV1 => Err(Error::Invalid(format!(
                "{}: a VMA v1 archive cannot be a parent",
                self.path.display()
            ))),
        }
    }

    /// Number of extents in a 3.0 archive's extent table (0 otherwise).
    pub fn extent_count(&self) -> u64 {
        match &self.index {
            RunIndex::Paged(p) if self.format == ArchiveFormat::V3 => p.extent_count(),
            _ => 0,
        }
    }

    /// The archive's format.
    pub fn format(&self) -> ArchiveFormat {
        self.format
    }

    /// Length of the header block.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Path the archive was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuse drives (those `selected`) written by an interrupted capture:
    /// their content is no point in time (see [`DriveRecord::interrupted`]).
    pub fn refuse_interrupted(&self, selected: impl Fn(DriveId) -> bool) -> Result<()> {
        refuse_interrupted(&self.header, &self.records, selected)
    }

    /// Runs of one drive (sorted by cluster), from the one holding `cluster`.
    pub fn runs_from(&self, drive: DriveId, cluster: u64) -> Result<Runs<'_>> {
        let Some(slot) = self.header.slot(drive) else {
            return Ok(Runs::Mem([].iter()));
        };
        match &self.index {
            RunIndex::Mem(m) => {
                let runs = &m.runs[m.drive_runs[slot].clone()];
                let i = runs.partition_point(|r| r.end() <= cluster);
                Ok(Runs::Mem(runs[i..].iter()))
            }
            RunIndex::Paged(p) => Ok(Runs::Paged(p.runs_from(slot, cluster)?)),
        }
    }

    /// Every run of one drive, in order.
    pub fn runs(&self, drive: DriveId) -> Result<Runs<'_>> {
        self.runs_from(drive, 0)
    }

    /// The run holding `cluster` of `drive`.
    pub fn run_at(&self, drive: DriveId, cluster: ClusterNo) -> Result<Option<IndexRun>> {
        let Some(slot) = self.header.slot(drive) else {
            return Ok(None);
        };
        match &self.index {
            RunIndex::Mem(m) => {
                let runs = &m.runs[m.drive_runs[slot].clone()];
                let i = runs.partition_point(|r| r.end() <= cluster.0);
                Ok(runs.get(i).filter(|r| r.start <= cluster.0).copied())
            }
            RunIndex::Paged(p) => Ok(p.run_at(slot, cluster.0)?.map(|(r, _)| r)),
        }
    }

    /// The leaf digest of data cluster `cluster` of `drive` (3.0).
    pub fn leaf(&self, drive: DriveId, cluster: u64) -> Result<Digest> {
        match (&self.index, self.header.slot(drive)) {
            (RunIndex::Paged(p), Some(slot)) if p.has_leaves() => p.leaf_of(slot, cluster),
            _ => Err(Error::Invalid(format!(
                "{} has no leaf digests (only 3.0 archives do)",
                self.path.display()
            ))),
        }
    }

    /// Hand the leaves of clusters `clusters` of `drive` to `out` in order
    /// (3.0): leaf pages for data, zero runs as zeros; unchanged stretches
    /// go to `unchanged`.
    pub fn leaves_of(
        &self,
        drive: DriveId,
        clusters: std::ops::Range<u64>,
        out: &mut crate::index::LeafSink<'_>,
        unchanged: &mut crate::index::ResolveUnchanged<'_>,
    ) -> Result<()> {
        match (&self.index, self.header.slot(drive)) {
            (RunIndex::Paged(p), Some(slot)) if p.has_leaves() => {
                p.leaves_of(slot, clusters, out, unchanged)
            }
            _ => Err(Error::Invalid(format!(
                "{} has no leaf digests (only 3.0 archives do)",
                self.path.display()
            ))),
        }
    }

    /// Prove the leaves of a stand-in: recompute every drive digest from
    /// the runs and leaf pages and compare them with the drive records
    /// (whose state digest the child named); from then on every data
    /// cluster served is checked against its leaf.
    pub fn prove_leaves(&self) -> Result<()> {
        match &self.index {
            RunIndex::Paged(p) if self.format == ArchiveFormat::V3 => {
                p.prove_digests().map_err(|e| e.in_archive(&self.path))?;
                self.check_leaves.store(true, Ordering::Relaxed);
                self.cache.lock().expect("cache lock").clear();
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "{} is not a 3.0 archive: its content cannot be proven by leaves",
                self.path.display()
            ))),
        }
    }

    /// Whether data clusters served are checked against their leaves.
    pub fn checks_leaves(&self) -> bool {
        self.check_leaves.load(Ordering::Relaxed)
    }

    /// Drive ranges whose data lives in the extent named `key`, as far as
    /// can be told cheaply: a 2.0 or v1 index is searched; a 3.0 extent's
    /// own entries are read when its header and entries are intact.
    pub fn ranges_in_extent(&self, key: ExtentRef) -> Vec<DriveRange> {
        match &self.index {
            RunIndex::Mem(m) => m
                .runs
                .iter()
                .filter(|r| r.kind == RunKind::Data && r.extent == key)
                .filter_map(|r| self.header.drive_range(r.drive, r.start..r.end()))
                .collect(),
            RunIndex::Paged(_) => self.claimed_ranges(key).unwrap_or_default(),
        }
    }

    /// The data ranges a 3.0 extent's header and entries claim, without
    /// checking its digest (to name what damage loses).
    fn claimed_ranges(&self, key: ExtentRef) -> Option<Vec<DriveRange>> {
        let offset = self.extent_offset(key).ok()?.get();
        let mut hb = [0u8; EXTENT_HEADER_LEN];
        self.file.read_range(&mut hb, offset).ok()?;
        let h = ExtentFrame::decode(&hb, offset, self.header.version_major).ok()?;
        let mut body = vec![0u8; h.payload_start() - EXTENT_HEADER_LEN];
        self.file
            .read_range(&mut body, offset + EXTENT_HEADER_LEN as u64)
            .ok()?;
        let (entries, _) = crate::format::decode_entries(&h.body_counts(), &body, offset).ok()?;
        Some(
            entries
                .iter()
                .filter(|e| e.kind == RunKind::Data)
                .filter_map(|e| {
                    self.header
                        .drive_range(e.drive, e.start..e.start + e.count as u64)
                })
                .collect(),
        )
    }

    /// Where the extent named `key` starts: the one place a run's
    /// [`ExtentRef`] becomes a file position (through the 3.0 extent table,
    /// or as the offset a 2.0 or VMA v1 run stores).
    pub fn extent_offset(&self, key: ExtentRef) -> Result<ArchiveOffset> {
        match (&self.index, self.format) {
            (RunIndex::Paged(p), ArchiveFormat::V3) => Ok(p.extent_record(key)?.offset),
            // 2.0 and VMA v1 runs name their extent by its file offset.
            _ => Ok(ArchiveOffset(key.raw())),
        }
    }

    /// The sequence number of the extent named `key` when the archive's
    /// runs name extents by it (3.0): a dense number below
    /// [`Self::extent_count`], for per-extent tables. None for 2.0 and VMA
    /// v1, whose runs name extents by file offset.
    pub fn extent_number(&self, key: ExtentRef) -> Option<u64> {
        (self.format == ArchiveFormat::V3).then_some(key.raw())
    }

    /// Every extent of a 3.0 archive's extent table, in sequence order
    /// (none for 2.0 and VMA v1, which have no table).
    pub fn extent_refs(&self) -> impl Iterator<Item = ExtentRef> {
        (0..self.extent_count()).map(ExtentRef::seq)
    }

    /// The extent named `key` as a message names it: "extent #seq at
    /// offset N" when both are known (the sequence number of a 2.0 extent
    /// is read from its header), else what is known.
    pub fn extent_label(&self, key: ExtentRef) -> String {
        match (self.extent_seq(key), self.extent_offset(key)) {
            (Some(seq), Ok(at)) => format!("extent #{seq} at offset {at}"),
            (Some(seq), Err(_)) => format!("extent #{seq}"),
            (None, Ok(at)) => format!("the extent at offset {at}"),
            (None, Err(_)) => "an extent the index cannot place".to_string(),
        }
    }

    /// Read, verify and decode the extent named `key` (cached). Concurrent
    /// callers asking for the same extent share one decode: kernel
    /// readahead sends many requests into one extent at once.
    pub fn extent(&self, key: ExtentRef) -> Result<Arc<DecodedExtent>> {
        let slot = {
            let mut cache = self.cache.lock().expect("cache lock");
            if let Some(e) = cache.get(key) {
                return Ok(e);
            }
            cache.loading.entry(key).or_default().clone()
        };
        let mut failure = None;
        let loaded = slot.get_or_init(|| match self.load_extent_named(key) {
            Ok(ext) => {
                let ext = Arc::new(ext);
                let mut cache = self.cache.lock().expect("cache lock");
                cache.insert(key, ext.clone());
                cache.loading.remove(&key);
                Some(ext)
            }
            Err(e) => {
                self.cache.lock().expect("cache lock").loading.remove(&key);
                failure = Some(e);
                None
            }
        });
        match (loaded, failure) {
            (Some(ext), _) => Ok(ext.clone()),
            (None, Some(e)) => Err(e),
            // Another caller's load failed: load again for an error of our own.
            (None, None) => self.load_extent_named(key).map(Arc::new),
        }
    }

    /// Keys of the data extents holding bytes `range` of `drive` that are
    /// neither cached nor being decoded, in drive order: what a reader about
    /// to read that range sequentially can decode ahead of time.
    pub fn extents_to_prefetch(
        &self,
        drive: DriveId,
        range: std::ops::Range<u64>,
    ) -> Vec<ExtentRef> {
        let Some(size) = self.header.drive(drive).map(|d| d.size) else {
            return Vec::new();
        };
        let end = range.end.min(size);
        if range.start >= end {
            return Vec::new();
        }
        let first = ClusterNo::containing(range.start).0;
        let last = ClusterNo::containing(end - 1).0;
        let Ok(runs) = self.runs_from(drive, first) else {
            return Vec::new();
        };
        let mut keys: Vec<ExtentRef> = Vec::new();
        let mut wanted = Vec::new();
        for r in runs {
            let Ok(r) = r else { break };
            if r.start > last {
                break;
            }
            if r.kind == RunKind::Data && !wanted.contains(&r.extent) {
                wanted.push(r.extent);
            }
        }
        let cache = self.cache.lock().expect("cache lock");
        for k in wanted {
            if !cache.map.contains_key(&k) && !cache.loading.contains_key(&k) {
                keys.push(k);
            }
        }
        keys
    }

    /// [`Self::load_extent`], with damage reported as the drive ranges lost.
    fn load_extent_named(&self, key: ExtentRef) -> Result<DecodedExtent> {
        self.load_extent(key).map_err(|e| self.damage_named(key, e))
    }

    /// Damage of the extent named `key` as the drive ranges it loses.
    fn damage_named(&self, key: ExtentRef, e: Error) -> Error {
        match e {
            Error::Corrupt { what, offset } | Error::Truncated { what, offset } => {
                Error::ExtentDamaged {
                    seq: self.extent_seq(key),
                    // Where the extent is, or else where the damage was found
                    // (never the key: in 3.0 it is a sequence number).
                    offset: self.extent_offset(key).map_or(offset, ArchiveOffset::get),
                    what,
                    ranges: self.ranges_in_extent(key),
                }
            }
            other => other,
        }
    }

    /// The sequence number of the extent named `key`, if known.
    fn extent_seq(&self, key: ExtentRef) -> Option<u64> {
        match self.format {
            ArchiveFormat::V3 => self.extent_number(key),
            ArchiveFormat::VmaV1 => None,
            ArchiveFormat::V2 => {
                let at = self.extent_offset(key).ok()?.get();
                let mut hb = [0u8; EXTENT_HEADER_LEN];
                self.file.read_range(&mut hb, at).ok()?;
                v2::ExtentHeader::decode(&hb, at).ok().map(|h| h.seq)
            }
        }
    }

    fn load_extent(&self, key: ExtentRef) -> Result<DecodedExtent> {
        let name = self.path.display().to_string();
        if let Some(uuid) = self.v1_uuid {
            let at = self.extent_offset(key)?.get();
            let mut hb = [0u8; v1::EXTENT_HEADER_LEN];
            read_exact_at(&self.file, &mut hb, at, &name)?;
            let h = V1ExtentHeader::decode(&hb, at, &uuid)?;
            let mut data = vec![0u8; h.data_len()];
            read_exact_at(
                &self.file,
                &mut data,
                at + v1::EXTENT_HEADER_LEN as u64,
                &name,
            )?;
            return Ok(DecodedExtent::from_v1(0, at, &h, data));
        }
        let stored = self.read_stored(key)?;
        let mut ext = self.decompress(&stored, key)?;
        if self.check_leaves.load(Ordering::Relaxed) {
            self.check_extent_leaves(&mut ext)?;
        }
        Ok(ext)
    }

    /// A stand-in's extent: every data cluster it serves must hash to the
    /// leaf its (proven) leaf pages give.
    fn check_extent_leaves(&self, ext: &mut DecodedExtent) -> Result<()> {
        ext.compute_leaves(&self.sizes);
        for &(drive, c, got) in ext.leaves() {
            let Some(run) = self.run_at(drive, ClusterNo(c))? else {
                continue;
            };
            if run.kind != RunKind::Data || run.extent != ext.key {
                continue;
            }
            let want = self.leaf(drive, c)?;
            if want != got {
                let d = self.header.drive(drive).map_or("?", |d| d.name.as_str());
                return Err(Error::corrupt(
                    ext.offset,
                    format!(
                        "drive {d} cluster {c} does not hash to its leaf: this stand-in does not hold the point in time it claims"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Read and check the native extent the index names `key`: for 3.0
    /// through its extent-table record (offset, length, digest) and its
    /// binding (uuid, seq); for 2.0 at the offset `key`.
    fn read_stored(&self, key: ExtentRef) -> Result<StoredExtent> {
        let name = self.path.display().to_string();
        if self.v1_uuid.is_some() {
            return Err(Error::Invalid(format!(
                "{name} is a VMA v1 archive, whose extents have no stored form to copy"
            )));
        }
        let zstd_allowed = self.header.incompat & INCOMPAT_ZSTD != 0;
        let (offset, len, binding) = match (&self.index, self.format) {
            (RunIndex::Paged(p), ArchiveFormat::V3) => {
                let rec = p.extent_record(key)?;
                (
                    rec.offset.get(),
                    rec.len as usize,
                    Binding {
                        major: 3,
                        uuid: self.header.uuid,
                        seq: self.extent_number(key),
                        digest: Some(rec.digest),
                        zstd_allowed,
                    },
                )
            }
            _ => {
                let at = self.extent_offset(key)?.get();
                let mut hb = [0u8; EXTENT_HEADER_LEN];
                read_exact_at(&self.file, &mut hb, at, &name)?;
                let h = ExtentFrame::decode(&hb, at, self.header.version_major)?;
                (
                    at,
                    h.total_len(),
                    Binding {
                        major: self.header.version_major,
                        uuid: self.header.uuid,
                        seq: None,
                        digest: None,
                        zstd_allowed,
                    },
                )
            }
        };
        if offset + len as u64 > self.data_end {
            return Err(Error::corrupt(
                offset,
                "the extent would run past the index",
            ));
        }
        let mut bytes = vec![0u8; len];
        read_exact_at(&self.file, &mut bytes, offset, &name)?;
        StoredExtent::check(bytes, offset, &binding).map_err(|(e, _)| e)
    }

    fn decompress(&self, stored: &StoredExtent, key: ExtentRef) -> Result<DecodedExtent> {
        let mut dec = self
            .decompressors
            .lock()
            .expect("decompressor lock")
            .pop()
            .map_or_else(zstd::bulk::Decompressor::new, Ok)
            .map_err(|e| Error::io("creating a zstd context", e))?;
        let result = stored.decode(key, &mut dec);
        self.decompressors
            .lock()
            .expect("decompressor lock")
            .push(dec);
        result
    }

    /// The native extent named `key` as stored, checked (binding, SHA-256,
    /// entries, masks) but not decoded, for copying into another archive;
    /// damage is reported as the drive ranges lost.
    pub fn stored_extent(&self, key: ExtentRef) -> Result<StoredExtent> {
        self.read_stored(key).map_err(|e| self.damage_named(key, e))
    }

    /// Decode an extent [`Reader::stored_extent`] returned (not cached).
    pub fn decode_stored(&self, stored: &StoredExtent, key: ExtentRef) -> Result<DecodedExtent> {
        let mut ext = self
            .decompress(stored, key)
            .map_err(|e| self.damage_named(key, e))?;
        if self.check_leaves.load(Ordering::Relaxed) {
            self.check_extent_leaves(&mut ext)
                .map_err(|e| self.damage_named(key, e))?;
        }
        Ok(ext)
    }

    /// Fill `buf` with drive bytes starting at `offset`. Fails if the range
    /// goes past the drive's end or touches a damaged extent.
    pub fn read_at(&self, drive: DriveId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let info = self
            .header
            .drive(drive)
            .ok_or_else(|| Error::Invalid(format!("no drive with id {drive}")))?;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= info.size)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "read of {} bytes at {offset} goes past the end of drive {} ({} bytes)",
                    buf.len(),
                    info.name,
                    info.size
                ))
            })?;
        let mut pos = offset;
        let mut cluster_buf = vec![0u8; CLUSTER_SIZE];
        while pos < end {
            let cluster = ClusterNo::containing(pos);
            let run = self.run_at(drive, cluster)?.ok_or_else(|| {
                Error::corrupt(
                    self.data_end,
                    format!("index has no run for drive {} cluster {cluster}", info.name),
                )
            })?;
            let run_end = (run.end() * CLUSTER_SIZE as u64).min(end);
            let out = &mut buf[(pos - offset) as usize..];
            match run.kind {
                RunKind::Zero => {
                    let n = (run_end - pos) as usize;
                    out[..n].fill(0);
                    pos = run_end;
                }
                RunKind::Unchanged => {
                    return Err(Error::Invalid(format!(
                        "drive {} bytes at {pos} are unchanged from the parent archive, which is not open",
                        info.name
                    )))
                }
                RunKind::Data => {
                    let ext = self.extent(run.extent)?;
                    let data = match ext.cluster(drive, cluster) {
                        Some(d @ ClusterData::Data { .. }) => d,
                        _ => {
                            return Err(Error::corrupt(
                                ext.offset,
                                format!(
                                    "extent holds no data for cluster {cluster} of drive {} where the index places it",
                                    info.name
                                ),
                            ))
                        }
                    };
                    let clen = cluster_len(info.size, cluster);
                    data.expand_into(&mut cluster_buf[..clen]);
                    let within = (pos - cluster.byte_offset()) as usize;
                    let n = (clen - within).min((end - pos) as usize);
                    out[..n].copy_from_slice(&cluster_buf[within..within + n]);
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Refuse drives (those `selected`) written by an interrupted capture.
pub(crate) fn refuse_interrupted(
    header: &Header,
    records: &[DriveRecord],
    selected: impl Fn(DriveId) -> bool,
) -> Result<()> {
    match records.iter().find(|r| r.interrupted && selected(r.drive)) {
        None => Ok(()),
        Some(r) => Err(Error::Invalid(format!(
            "drive {} comes from an interrupted capture: it is no point in time, only the parent of the capture that retried it (restore that one)",
            header.drive(r.drive).map_or("?", |d| d.name.as_str())
        ))),
    }
}

/// What [`Reader::open_salvage`] found.
#[derive(Debug)]
pub struct Salvage {
    /// Every problem of the archive, in file order.
    pub problems: Vec<Error>,
    /// Drive ranges held only by damaged extents.
    pub damaged: Vec<DriveRange>,
    /// Drive ranges that no extent holds (lost with a truncated tail, an
    /// unreadable extent header, or never written).
    pub missing: Vec<DriveRange>,
    /// Drive ranges intact extents hold with different bytes.
    pub conflicting: Vec<DriveRange>,
    /// Every drive range the salvaging reader answers with zeros because no
    /// intact extent holds it (or two hold it differently), merged and
    /// sorted by drive and offset.
    pub lost: Vec<DriveRange>,
}

impl Salvage {
    /// True when the archive is intact: nothing lost, nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.lost.is_empty()
    }
}

/// Sort runs and merge neighbours that continue each other (same drive,
/// kind and extent, contiguous clusters). Zero and unchanged runs merge
/// across extents: the canonical form.
pub fn canonical_runs(mut runs: Vec<IndexRun>) -> Vec<IndexRun> {
    runs.sort_unstable_by_key(|r| (r.drive, r.start));
    let mut out: Vec<IndexRun> = Vec::with_capacity(runs.len());
    for r in runs {
        if let Some(last) = out.last_mut() {
            if last.drive == r.drive
                && last.kind == r.kind
                && last.extent == r.extent
                && last.end() == r.start
                && (last.count as u64 + r.count as u64) <= u32::MAX as u64
            {
                last.count += r.count;
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// The footer that ends the native archive `file` (`name`, `file_len`
/// bytes, version `major`), and where it starts; it must point to an index
/// after the header's `header_len` bytes.
fn read_footer(
    file: &Source,
    name: &str,
    file_len: u64,
    header_len: u64,
    major: u16,
) -> Result<(Footer, u64)> {
    let footer_at = file_len - FOOTER_LEN as u64;
    let mut fb = [0u8; FOOTER_LEN];
    read_exact_at(file, &mut fb, footer_at, name)?;
    let footer = if major == v2::VERSION_MAJOR {
        v2::decode_footer(&fb, footer_at)?
    } else {
        Footer::decode(&fb, footer_at)?
    };
    if footer.index_offset < header_len {
        return Err(Error::corrupt(
            footer_at,
            "footer points to an index inside the header",
        ));
    }
    Ok((footer, footer_at))
}

fn read_exact_at(file: &Source, buf: &mut [u8], offset: u64, name: &str) -> Result<()> {
    file.read_range(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::truncated(
                offset,
                format!("{name} ends inside a {}-byte structure", buf.len()),
            )
        } else {
            Error::io(format!("reading {name} at offset {offset}"), e)
        }
    })
}

/// Check that an in-memory index (2.0, VMA v1) covers every cluster of
/// every drive exactly once and points only between header and index;
/// returns each drive's runs.
fn check_index(
    header: &Header,
    runs: &[IndexRun],
    records: &[DriveRecord],
    header_len: u64,
    index_offset: u64,
) -> Result<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::with_capacity(header.drives.len());
    let mut gaps = Vec::new();
    let mut i = 0;
    for d in &header.drives {
        let first = i;
        let mut next = 0u64;
        while i < runs.len() && runs[i].drive == d.id {
            let r = &runs[i];
            if r.start < next || r.count == 0 || r.end() > d.clusters() {
                return Err(Error::corrupt(
                    index_offset,
                    format!(
                        "index: run {i} (clusters {}+{}) of drive {} overlaps another or lies past its end",
                        r.start, r.count, d.name
                    ),
                ));
            }
            // 2.0 and VMA v1 runs name their extent by its file offset.
            let at = r.extent.raw();
            if r.kind == RunKind::Data && (at < header_len || at >= index_offset) {
                return Err(Error::corrupt(
                    index_offset,
                    format!("index: run {i} points to offset {at} outside the extents"),
                ));
            }
            if r.kind != RunKind::Data && r.extent != ExtentRef::NONE {
                return Err(Error::corrupt(
                    index_offset,
                    format!("index: run {i} holds no data but points to an extent"),
                ));
            }
            if r.kind == RunKind::Unchanged && header.parent.is_none() {
                return Err(Error::corrupt(
                    index_offset,
                    "index: unchanged run in an archive without parent",
                ));
            }
            if r.start > next {
                gaps.push((d.id, next..r.start));
            }
            next = r.end();
            i += 1;
        }
        if next < d.clusters() {
            gaps.push((d.id, next..d.clusters()));
        }
        out.push(first..i);
    }
    if i != runs.len() {
        return Err(Error::corrupt(
            index_offset,
            format!("index: run {i} names an unknown drive or is out of order"),
        ));
    }
    if !gaps.is_empty() {
        return Err(incomplete_error(&header.drives, &gaps));
    }
    if records.len() != header.drives.len()
        || records
            .iter()
            .zip(&header.drives)
            .any(|(r, d)| r.drive != d.id)
    {
        return Err(Error::corrupt(
            index_offset,
            "index: drive records do not match the header's drives",
        ));
    }
    Ok(out)
}

/// A small LRU of decoded extents keyed by how the index names them.
struct ExtentCache {
    capacity: usize,
    used: usize,
    map: HashMap<ExtentRef, Arc<DecodedExtent>>,
    order: VecDeque<ExtentRef>,
    /// Extents being decoded right now; later callers wait on the cell.
    loading: HashMap<ExtentRef, Arc<OnceLock<Option<Arc<DecodedExtent>>>>>,
}

impl ExtentCache {
    fn new(capacity: usize) -> Self {
        ExtentCache {
            capacity,
            used: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
            loading: HashMap::new(),
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.used = 0;
    }

    fn get(&mut self, key: ExtentRef) -> Option<Arc<DecodedExtent>> {
        let e = self.map.get(&key)?.clone();
        if let Some(p) = self.order.iter().position(|&o| o == key) {
            self.order.remove(p);
        }
        self.order.push_back(key);
        Some(e)
    }

    fn insert(&mut self, key: ExtentRef, ext: Arc<DecodedExtent>) {
        if self.map.contains_key(&key) {
            return;
        }
        self.used += ext.memory_size();
        self.map.insert(key, ext);
        self.order.push_back(key);
        while self.used > self.capacity && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(e) = self.map.remove(&old) {
                    self.used -= e.memory_size();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::DriveInfo;
    use crate::write::writer::{ArchiveMeta, Writer, WriterOptions};
    use std::os::unix::fs::FileExt;

    /// A one-drive archive followed by a hole, `extra` bytes long, and a
    /// footer saying the index fills everything after the header.
    fn archive_with_footer_claiming_everything(extra: u64) -> (tempfile::TempDir, PathBuf) {
        let meta = ArchiveMeta::new(
            vec![DriveInfo {
                id: DriveId(1),
                name: "d".into(),
                size: 3 * CLUSTER_SIZE as u64,
            }],
            Vec::new(),
        );
        let mut w = Writer::new(Vec::new(), meta, &WriterOptions::default()).unwrap();
        w.write_zeros(DriveId(1), 0..1).unwrap();
        w.write_cluster(DriveId(1), ClusterNo(1), &[9u8; CLUSTER_SIZE])
            .unwrap();
        w.write_zeros(DriveId(1), 2..3).unwrap();
        let (mut bytes, _) = w.finish().unwrap();
        let header_len = HeaderPrefix::decode(bytes[..HEADER_FIXED_LEN].try_into().unwrap())
            .unwrap()
            .header_len as u64;
        let footer_at = bytes.len() - FOOTER_LEN;
        let old = Footer::decode(bytes[footer_at..].try_into().unwrap(), footer_at as u64).unwrap();
        bytes.truncate(footer_at);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        let file = File::create(&path).unwrap();
        file.write_all_at(&bytes, 0).unwrap();
        let new_footer_at = bytes.len() as u64 + extra;
        let footer = Footer {
            index_offset: header_len,
            index_len: new_footer_at - header_len,
            ..old
        };
        file.write_all_at(&footer.encode(), new_footer_at).unwrap();
        (dir, path)
    }

    /// A damaged footer of a large archive, pointing the index at the
    /// first extent, made open allocate the whole file (here 64 GiB, sparse)
    /// for the index; the index's own magic and counts are now checked first.
    #[test]
    fn a_footer_claiming_a_huge_index_is_refused_before_allocating() {
        let (_dir, path) = archive_with_footer_claiming_everything(64 << 30);
        let err = Reader::open(&path).err().expect("a damaged footer");
        assert!(
            matches!(&err, Error::Corrupt { what, .. } if what.contains("expected the index")),
            "{err}"
        );
    }
}

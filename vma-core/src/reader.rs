//! Random access to a complete archive file through its trailing index:
//! read any byte range of any drive, decoding only the extents involved.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::detect::{detect, DetectedFormat, DETECT_LEN};
use crate::error::{Error, IoContext, Result};
use crate::extent::{ClusterData, DecodedExtent, StoredExtent};
use crate::format::{DriveRecord, BLOCK_SIZE};
use crate::format::{
    ExtentHeader, Footer, Header, HeaderPrefix, Index, IndexRun, RunKind, CLUSTER_SIZE,
    EXTENT_HEADER_LEN, FOOTER_LEN, HEADER_FIXED_LEN, INCOMPAT_ZSTD, INDEX_FIXED_LEN,
};
use crate::format_v1::{self, V1ExtentHeader};
use crate::stream::{incomplete_error, ArchiveFormat, ArchiveStream};
use crate::types::{cluster_len, cluster_range_bytes, ClusterNo, DriveId, DriveRange};

/// Default bytes of decoded extents kept in memory.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A complete archive file opened for random access.
pub struct Reader {
    file: File,
    path: PathBuf,
    header: Header,
    header_len: u64,
    index: Index,
    /// The footer (native archives only).
    footer: Option<Footer>,
    /// Where extents end (the index, or the end of a VMA v1 file).
    data_end: u64,
    /// The archive uuid of a VMA v1 archive (which repeats it in every extent).
    v1_uuid: Option<[u8; 16]>,
    /// Per drive (header order), its runs within `index.runs`.
    drive_runs: Vec<std::ops::Range<usize>>,
    cache: Mutex<ExtentCache>,
    decompressors: Mutex<Vec<zstd::bulk::Decompressor<'static>>>,
}

impl Reader {
    /// Open `path`: a native archive through its footer and index, a VMA v1
    /// archive by walking its extent headers once (one small read per
    /// extent, no data read). Checks that every cluster of every drive is
    /// accounted for exactly once.
    pub fn open(path: &Path) -> Result<Reader> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        Reader::open_file(file, path)
    }

    /// Like [`Reader::open`], for a file already open (`path` names it in
    /// messages), read from its start whatever its current position.
    pub fn open_file(mut file: File, path: &Path) -> Result<Reader> {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(0))
            .ctx(|| format!("seeking to the start of {}", path.display()))?;
        let file_len = file
            .metadata()
            .ctx(|| format!("reading the size of {}", path.display()))?
            .len();
        let name = path.display().to_string();
        let mut magic = [0u8; DETECT_LEN];
        let n = file
            .read_at(&mut magic, 0)
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
        let header = ArchiveStream::open(std::io::Read::take(&file, file_len), &name)?
            .header()
            .clone();
        let mut fixed = [0u8; HEADER_FIXED_LEN];
        read_exact_at(&file, &mut fixed, 0, &name)?;
        let header_len = HeaderPrefix::decode(&fixed)?.header_len as u64;
        if file_len < header_len + FOOTER_LEN as u64 {
            return Err(Error::truncated(
                file_len,
                "the file ends before a footer could follow the header: the archive is incomplete",
            ));
        }
        let footer_at = file_len - FOOTER_LEN as u64;
        let mut fb = [0u8; FOOTER_LEN];
        read_exact_at(&file, &mut fb, footer_at, &name)?;
        let footer = Footer::decode(&fb, footer_at)?;
        if footer.index_offset < header_len {
            return Err(Error::corrupt(
                footer_at,
                "footer points to an index inside the header",
            ));
        }
        // The index's own counts, checked against the footer and the
        // drives, before its length decides an allocation.
        let mut fixed = [0u8; INDEX_FIXED_LEN];
        read_exact_at(&file, &mut fixed, footer.index_offset, &name)?;
        Index::block_len(&fixed, footer.index_offset, footer.index_len)?;
        let runs = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
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
        let index = Index::decode(&block, footer.index_offset)?;
        let drive_runs = check_index(&header, &index, header_len, footer.index_offset)?;
        Ok(Reader {
            file,
            path: path.to_path_buf(),
            header,
            header_len,
            index,
            data_end: footer.index_offset,
            footer: Some(footer),
            v1_uuid: None,
            drive_runs,
            cache: Mutex::new(ExtentCache::new(DEFAULT_CACHE_BYTES)),
            decompressors: Mutex::new(Vec::new()),
        })
    }

    fn open_v1(file: File, path: &Path, file_len: u64) -> Result<Reader> {
        let name = path.display().to_string();
        let header = ArchiveStream::open(std::io::Read::take(&file, file_len), &name)?
            .header()
            .clone();
        let mut prefix = [0u8; 60];
        read_exact_at(&file, &mut prefix, 0, &name)?;
        let header_len = format_v1::header_len(&prefix)? as u64;
        let uuid = header.uuid;
        let mut runs = Vec::new();
        let mut records: Vec<DriveRecord> = header
            .drives
            .iter()
            .map(|d| DriveRecord {
                drive: d.id,
                data_clusters: 0,
                stored_bytes: 0,
                digest: None,
                interrupted: false,
            })
            .collect();
        let mut offset = header_len;
        while offset < file_len {
            let mut hb = [0u8; format_v1::EXTENT_HEADER_LEN];
            read_exact_at(&file, &mut hb, offset, &name)?;
            let h = V1ExtentHeader::decode(&hb, offset, &uuid)?;
            let end = offset + (format_v1::EXTENT_HEADER_LEN + h.data_len()) as u64;
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
                    extent_offset: if data { offset } else { 0 },
                });
                if let Some(r) = records.iter_mut().find(|r| r.drive == s.drive) {
                    r.data_clusters += data as u64;
                    r.stored_bytes += s.mask.count_ones() as u64 * BLOCK_SIZE as u64;
                }
            }
            offset = end;
        }
        let index = Index {
            runs: Index::canonical_runs(runs),
            drives: records,
        };
        let drive_runs = check_index(&header, &index, header_len, file_len)?;
        Ok(Reader {
            file,
            path: path.to_path_buf(),
            header,
            header_len,
            index,
            footer: None,
            data_end: file_len,
            v1_uuid: Some(uuid),
            drive_runs,
            cache: Mutex::new(ExtentCache::new(DEFAULT_CACHE_BYTES)),
            decompressors: Mutex::new(Vec::new()),
        })
    }

    /// Open `path` however damaged or truncated it is, for salvage: one
    /// sequential pass (`threads` decoders) checks and decodes every
    /// extent, and the index is rebuilt from the intact extents alone (a
    /// stored index is never trusted here). What no intact extent holds
    /// reads as zeros and is listed in the returned [`Salvage`]. Only an
    /// unreadable header, or I/O errors, make it fail.
    pub fn open_salvage(path: &Path, threads: usize) -> Result<(Reader, Salvage)> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let file_len = file
            .metadata()
            .ctx(|| format!("reading the size of {}", path.display()))?
            .len();
        let name = path.display().to_string();
        let stream = ArchiveStream::open(
            std::io::Read::take(
                file.try_clone()
                    .ctx(|| format!("opening {}", path.display()))?,
                file_len,
            ),
            &name,
        )?;
        let header = stream.header().clone();
        let format = stream.format();
        let mut prefix = [0u8; HEADER_FIXED_LEN];
        read_exact_at(&file, &mut prefix, 0, &name)?;
        let (header_len, v1_uuid) = match format {
            ArchiveFormat::V2 => (HeaderPrefix::decode(&prefix)?.header_len as u64, None),
            ArchiveFormat::VmaV1 => (format_v1::header_len(&prefix)? as u64, Some(header.uuid)),
        };
        // Stored bytes per drive slot, from the extents actually read.
        let mut stored = vec![0u64; header.drives.len()];
        let options = crate::stream::PassOptions {
            threads,
            keep_going: true,
            hash_drives: crate::stream::HashDrives::None,
        };
        let report = stream.pass(&options, |ext| {
            for (drive, _, data) in ext.clusters() {
                if let (ClusterData::Data { mask, .. }, Ok(slot)) =
                    (data, header.drives.binary_search_by_key(&drive, |d| d.id))
                {
                    stored[slot] += mask.count_ones() as u64 * BLOCK_SIZE as u64;
                }
            }
            Ok(())
        })?;
        let (runs, lost) = fill_lost(&header, report.runs);
        let trusted = report.index.as_ref();
        let drives = header
            .drives
            .iter()
            .zip(&stored)
            .map(|(d, &stored_bytes)| {
                let recorded = trusted.and_then(|i| i.drives.iter().find(|r| r.drive == d.id));
                DriveRecord {
                    drive: d.id,
                    data_clusters: runs
                        .iter()
                        .filter(|r| r.drive == d.id && r.kind == RunKind::Data)
                        .map(|r| r.count as u64)
                        .sum(),
                    stored_bytes,
                    digest: recorded.and_then(|r| r.digest),
                    interrupted: recorded.is_some_and(|r| r.interrupted),
                }
            })
            .collect();
        let index = Index { runs, drives };
        let drive_runs = check_index(&header, &index, header_len, file_len.max(header_len + 1))?;
        let reader = Reader {
            file,
            path: path.to_path_buf(),
            header,
            header_len,
            index,
            footer: report.footer,
            data_end: file_len,
            v1_uuid,
            drive_runs,
            cache: Mutex::new(ExtentCache::new(DEFAULT_CACHE_BYTES)),
            decompressors: Mutex::new(Vec::new()),
        };
        let salvage = Salvage {
            problems: report.problems,
            damaged: report.damaged,
            missing: report.missing,
            lost,
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

    /// The trailing index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The footer (native archives; VMA v1 has none).
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// The archive's format.
    pub fn format(&self) -> ArchiveFormat {
        if self.v1_uuid.is_some() {
            ArchiveFormat::VmaV1
        } else {
            ArchiveFormat::V2
        }
    }

    /// Length of the header block.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Path the archive was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs of one drive (sorted by cluster).
    pub fn runs(&self, drive: DriveId) -> &[IndexRun] {
        match self.slot(drive) {
            Some(s) => &self.index.runs[self.drive_runs[s].clone()],
            None => &[],
        }
    }

    fn slot(&self, drive: DriveId) -> Option<usize> {
        self.header
            .drives
            .binary_search_by_key(&drive, |d| d.id)
            .ok()
    }

    /// The run holding `cluster` of `drive`.
    pub fn run_at(&self, drive: DriveId, cluster: ClusterNo) -> Option<&IndexRun> {
        let runs = self.runs(drive);
        let i = runs.partition_point(|r| r.start + r.count as u64 <= cluster.0);
        runs.get(i).filter(|r| r.start <= cluster.0)
    }

    /// Drive ranges whose data lives in the extent at `offset`.
    pub fn ranges_in_extent(&self, offset: u64) -> Vec<DriveRange> {
        self.index
            .runs
            .iter()
            .filter(|r| r.kind == RunKind::Data && r.extent_offset == offset)
            .filter_map(|r| {
                let d = self.header.drive(r.drive)?;
                Some(DriveRange {
                    drive: r.drive,
                    drive_name: d.name.clone(),
                    bytes: cluster_range_bytes(d.size, r.start..r.start + r.count as u64),
                })
            })
            .collect()
    }

    /// Read, verify and decode the extent at `offset` (cached). Concurrent
    /// callers asking for the same extent share one decode: kernel readahead
    /// sends many requests into one extent at once.
    pub fn extent(&self, offset: u64) -> Result<Arc<DecodedExtent>> {
        let slot = {
            let mut cache = self.cache.lock().expect("cache lock");
            if let Some(e) = cache.get(offset) {
                return Ok(e);
            }
            cache.loading.entry(offset).or_default().clone()
        };
        let mut failure = None;
        let loaded = slot.get_or_init(|| match self.load_extent_named(offset) {
            Ok(ext) => {
                let ext = Arc::new(ext);
                let mut cache = self.cache.lock().expect("cache lock");
                cache.insert(offset, ext.clone());
                cache.loading.remove(&offset);
                Some(ext)
            }
            Err(e) => {
                self.cache
                    .lock()
                    .expect("cache lock")
                    .loading
                    .remove(&offset);
                failure = Some(e);
                None
            }
        });
        match (loaded, failure) {
            (Some(ext), _) => Ok(ext.clone()),
            (None, Some(e)) => Err(e),
            // Another caller's load failed: load again for an error of our own.
            (None, None) => self.load_extent_named(offset).map(Arc::new),
        }
    }

    /// Offsets of the data extents holding bytes `range` of `drive` that are
    /// neither cached nor being decoded, in drive order: what a reader about
    /// to read that range sequentially can decode ahead of time.
    pub fn extents_to_prefetch(&self, drive: DriveId, range: std::ops::Range<u64>) -> Vec<u64> {
        let Some(size) = self.slot(drive).map(|s| self.header.drives[s].size) else {
            return Vec::new();
        };
        let end = range.end.min(size);
        if range.start >= end {
            return Vec::new();
        }
        let first = ClusterNo::containing(range.start).0;
        let last = ClusterNo::containing(end - 1).0;
        let runs = self.runs(drive);
        let from = runs.partition_point(|r| r.start + r.count as u64 <= first);
        let cache = self.cache.lock().expect("cache lock");
        let mut offsets: Vec<u64> = Vec::new();
        for r in runs[from..].iter().take_while(|r| r.start <= last) {
            let off = r.extent_offset;
            if r.kind == RunKind::Data
                && !cache.map.contains_key(&off)
                && !cache.loading.contains_key(&off)
                && !offsets.contains(&off)
            {
                offsets.push(off);
            }
        }
        offsets
    }

    /// [`Self::load_extent`], with damage reported as the drive ranges lost.
    fn load_extent_named(&self, offset: u64) -> Result<DecodedExtent> {
        self.load_extent(offset)
            .map_err(|e| self.damage_named(offset, e))
    }

    /// Damage of the extent at `offset` as the drive ranges it loses.
    fn damage_named(&self, offset: u64, e: Error) -> Error {
        match e {
            Error::Corrupt { what, .. } | Error::Truncated { what, .. } => Error::ExtentDamaged {
                seq: self.extent_seq(offset),
                offset,
                what,
                ranges: self.ranges_in_extent(offset),
            },
            other => other,
        }
    }

    /// The sequence number in the extent header at `offset`, if readable.
    fn extent_seq(&self, offset: u64) -> Option<u64> {
        self.v1_uuid.is_none().then_some(())?;
        let mut hb = [0u8; EXTENT_HEADER_LEN];
        self.file.read_exact_at(&mut hb, offset).ok()?;
        ExtentHeader::decode(&hb, offset).ok().map(|h| h.seq)
    }

    fn load_extent(&self, offset: u64) -> Result<DecodedExtent> {
        let name = self.path.display().to_string();
        if let Some(uuid) = self.v1_uuid {
            let mut hb = [0u8; format_v1::EXTENT_HEADER_LEN];
            read_exact_at(&self.file, &mut hb, offset, &name)?;
            let h = V1ExtentHeader::decode(&hb, offset, &uuid)?;
            let mut data = vec![0u8; h.data_len()];
            read_exact_at(
                &self.file,
                &mut data,
                offset + format_v1::EXTENT_HEADER_LEN as u64,
                &name,
            )?;
            return Ok(DecodedExtent::from_v1(0, offset, &h, data));
        }
        let stored = self.read_stored(offset)?;
        self.decompress(&stored)
    }

    /// Read and check (SHA-256, entries, masks) the native extent the index
    /// points to at `offset`.
    fn read_stored(&self, offset: u64) -> Result<StoredExtent> {
        let name = self.path.display().to_string();
        if self.v1_uuid.is_some() {
            return Err(Error::Invalid(format!(
                "{name} is a VMA v1 archive, whose extents have no stored form to copy"
            )));
        }
        let mut hb = [0u8; EXTENT_HEADER_LEN];
        read_exact_at(&self.file, &mut hb, offset, &name)?;
        let h = ExtentHeader::decode(&hb, offset)?;
        let end = offset + h.total_len() as u64;
        if end > self.data_end {
            return Err(Error::corrupt(
                offset,
                format!("extent #{} would run past the index", h.seq),
            ));
        }
        let mut bytes = vec![0u8; h.total_len()];
        read_exact_at(&self.file, &mut bytes, offset, &name)?;
        let zstd_allowed = self.header.incompat & INCOMPAT_ZSTD != 0;
        let ext = StoredExtent::check(bytes, offset, zstd_allowed).map_err(|(e, _)| e)?;
        if !ext.entries().iter().any(|e| e.kind == RunKind::Data) {
            return Err(Error::corrupt(
                offset,
                "the index points to an extent without data",
            ));
        }
        Ok(ext)
    }

    fn decompress(&self, stored: &StoredExtent) -> Result<DecodedExtent> {
        let mut dec = self
            .decompressors
            .lock()
            .expect("decompressor lock")
            .pop()
            .map_or_else(zstd::bulk::Decompressor::new, Ok)
            .map_err(|e| Error::io("creating a zstd context", e))?;
        let result = stored.decode(&mut dec);
        self.decompressors
            .lock()
            .expect("decompressor lock")
            .push(dec);
        result
    }

    /// The native extent at `offset` as stored, checked (SHA-256, entries,
    /// masks) but not decoded, for copying into another archive; damage is
    /// reported as the drive ranges lost.
    pub fn stored_extent(&self, offset: u64) -> Result<StoredExtent> {
        self.read_stored(offset)
            .map_err(|e| self.damage_named(offset, e))
    }

    /// Decode an extent [`Reader::stored_extent`] returned (not cached).
    pub fn decode_stored(&self, stored: &StoredExtent) -> Result<DecodedExtent> {
        self.decompress(stored)
            .map_err(|e| self.damage_named(stored.offset(), e))
    }

    /// Fill `buf` with drive bytes starting at `offset`. Fails if the range
    /// goes past the drive's end or touches a damaged extent.
    pub fn read_at(&self, drive: DriveId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let slot = self
            .slot(drive)
            .ok_or_else(|| Error::Invalid(format!("no drive with id {drive}")))?;
        let info = &self.header.drives[slot];
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
            let run = *self.run_at(drive, cluster).ok_or_else(|| {
                Error::corrupt(
                    self.data_end,
                    format!("index has no run for drive {} cluster {cluster}", info.name),
                )
            })?;
            let run_end = ((run.start + run.count as u64) * CLUSTER_SIZE as u64).min(end);
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
                    let ext = self.extent(run.extent_offset)?;
                    let data = match ext.cluster(drive, cluster) {
                        Some(d @ ClusterData::Data { .. }) => d,
                        _ => {
                            return Err(Error::corrupt(
                                run.extent_offset,
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

/// What [`Reader::open_salvage`] found.
#[derive(Debug)]
pub struct Salvage {
    /// Every problem of the archive, in file order.
    pub problems: Vec<Error>,
    /// Drive ranges held by damaged extents.
    pub damaged: Vec<DriveRange>,
    /// Drive ranges that no extent holds (lost with a truncated tail, an
    /// unreadable extent header, or never written).
    pub missing: Vec<DriveRange>,
    /// Every drive range the salvaging reader answers with zeros because no
    /// intact extent holds it, merged and sorted by drive and offset.
    pub lost: Vec<DriveRange>,
}

impl Salvage {
    /// True when the archive is intact: nothing lost, nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.lost.is_empty()
    }
}

/// Complete canonical `runs` (of intact extents) with zero runs wherever a
/// drive's clusters are not covered; returns the runs and those lost ranges.
fn fill_lost(header: &Header, runs: Vec<IndexRun>) -> (Vec<IndexRun>, Vec<DriveRange>) {
    let mut out = Vec::with_capacity(runs.len());
    let mut lost = Vec::new();
    let mut runs = runs.into_iter().peekable();
    for d in &header.drives {
        let mut next = 0u64;
        let mut gap = |out: &mut Vec<IndexRun>, from: u64, to: u64| {
            let mut start = from;
            while start < to {
                let count = (to - start).min(u32::MAX as u64);
                out.push(IndexRun {
                    drive: d.id,
                    start,
                    count: count as u32,
                    kind: RunKind::Zero,
                    extent_offset: 0,
                });
                start += count;
            }
            lost.push(DriveRange {
                drive: d.id,
                drive_name: d.name.clone(),
                bytes: cluster_range_bytes(d.size, from..to),
            });
        };
        while let Some(r) = runs.next_if(|r| r.drive == d.id) {
            if r.start > next {
                gap(&mut out, next, r.start);
            }
            next = r.start + r.count as u64;
            out.push(r);
        }
        if next < d.clusters() {
            gap(&mut out, next, d.clusters());
        }
    }
    (Index::canonical_runs(out), lost)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, name: &str) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
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

/// Check that the index covers every cluster of every drive exactly once
/// and points only between header and index; returns each drive's runs.
fn check_index(
    header: &Header,
    index: &Index,
    header_len: u64,
    index_offset: u64,
) -> Result<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::with_capacity(header.drives.len());
    let mut gaps = Vec::new();
    let mut i = 0;
    let runs = &index.runs;
    for d in &header.drives {
        let first = i;
        let mut next = 0u64;
        while i < runs.len() && runs[i].drive == d.id {
            let r = &runs[i];
            if r.start < next || r.count == 0 || r.start + r.count as u64 > d.clusters() {
                return Err(Error::corrupt(
                    index_offset,
                    format!(
                        "index: run {i} (clusters {}+{}) of drive {} overlaps another or lies past its end",
                        r.start, r.count, d.name
                    ),
                ));
            }
            if r.kind == RunKind::Data
                && (r.extent_offset < header_len || r.extent_offset >= index_offset)
            {
                return Err(Error::corrupt(
                    index_offset,
                    format!(
                        "index: run {i} points to offset {} outside the extents",
                        r.extent_offset
                    ),
                ));
            }
            if r.kind != RunKind::Data && r.extent_offset != 0 {
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
            next = r.start + r.count as u64;
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
    if index.drives.len() != header.drives.len()
        || index
            .drives
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

/// A small LRU of decoded extents keyed by file offset.
struct ExtentCache {
    capacity: usize,
    used: usize,
    map: HashMap<u64, Arc<DecodedExtent>>,
    order: VecDeque<u64>,
    /// Extents being decoded right now; later callers wait on the cell.
    loading: HashMap<u64, Arc<OnceLock<Option<Arc<DecodedExtent>>>>>,
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

    fn get(&mut self, offset: u64) -> Option<Arc<DecodedExtent>> {
        let e = self.map.get(&offset)?.clone();
        if let Some(p) = self.order.iter().position(|&o| o == offset) {
            self.order.remove(p);
        }
        self.order.push_back(offset);
        Some(e)
    }

    fn insert(&mut self, offset: u64, ext: Arc<DecodedExtent>) {
        if self.map.contains_key(&offset) {
            return;
        }
        self.used += ext.memory_size();
        self.map.insert(offset, ext);
        self.order.push_back(offset);
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
    use crate::writer::{ArchiveMeta, Writer, WriterOptions};

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

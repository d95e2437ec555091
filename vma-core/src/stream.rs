//! The sequential pass over an archive from any `Read` (file or pipe):
//! the one loop over extents that verify, extract and convert share.
//! Extents are verified and decoded on worker threads and handed to a sink
//! in archive order; the pass accounts for every cluster, rebuilds the
//! index and checks it, the footer and the archive digest.

use std::io::Read;
use std::sync::Arc;

use crate::digest::{check_matches, Sha256};

use crate::detect::{not_v2_error, DETECT_LEN};
use crate::error::{Error, Result};
use crate::extent::{decode_extent, ClusterData, DecodedExtent, StoredExtent};
use crate::format::{
    decode_entries, ArchiveDigest, Entry, ExtentHeader, Footer, Header, HeaderPrefix, Index,
    IndexRun, RunKind, ARCHIVE_MAGIC, CLUSTER_SIZE, EXTENT_HEADER_LEN, EXTENT_MAGIC, FOOTER_LEN,
    HEADER_FIXED_LEN, INCOMPAT_ZSTD, INDEX_FIXED_LEN, INDEX_MAGIC,
};
use crate::format::{Codec, CompressionInfo, DriveInfo};
use crate::format_v1::{self, V1ExtentHeader, V1Header};
use crate::input::Input;
use crate::pipeline::OrderedPool;
use crate::ranges::RangeSet;
use crate::types::{
    cluster_len, cluster_range_bytes, clusters_for, describe_ranges, ClusterNo, DriveId, DriveRange,
};
use crate::writer::effective_threads;

/// Options of a sequential pass.
#[derive(Clone, Debug, Default)]
pub struct PassOptions {
    /// Decoder threads (0: one per core).
    pub threads: usize,
    /// Record damage and go on (verify) instead of stopping at the first problem.
    pub keep_going: bool,
    /// Which drives get their SHA-256 computed (when read in order) and
    /// compared with the digest the writer recorded.
    pub hash_drives: HashDrives,
}

/// The drives whose whole-content SHA-256 a pass computes. Hashing is one
/// sequential stream per drive (zeros included), so it is the slowest part
/// of a pass: skip it where per-extent digests are enough.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HashDrives {
    /// Hash no drive.
    #[default]
    None,
    /// Hash every drive.
    All,
    /// Hash only these drives.
    Only(Vec<DriveId>),
}

impl HashDrives {
    fn includes(&self, drive: DriveId) -> bool {
        match self {
            HashDrives::None => false,
            HashDrives::All => true,
            HashDrives::Only(ids) => ids.contains(&drive),
        }
    }
}

/// Outcome of checking one drive's whole-content digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriveDigestCheck {
    /// The recorded digest matches the data.
    Match([u8; 32]),
    /// The recorded digest differs from the data's.
    Mismatch {
        /// Recorded by the writer.
        expected: [u8; 32],
        /// Computed now.
        found: [u8; 32],
    },
    /// The writer recorded no digest for this drive.
    NotRecorded,
    /// The drive's clusters are not stored in order, so one pass cannot hash
    /// it; a seekable reader can (see `verify`).
    OutOfOrder,
    /// Damage or gaps made the check impossible.
    NotChecked,
    /// Digests were not requested.
    Skipped,
}

/// What a pass found.
#[derive(Debug)]
pub struct PassReport {
    /// The archive header.
    pub header: Header,
    /// Intact extents seen.
    pub extents: u64,
    /// Bytes of archive read.
    pub bytes: u64,
    /// Every problem found (only with `keep_going`; otherwise the first is returned as the error).
    pub problems: Vec<Error>,
    /// Drive ranges held by damaged extents.
    pub damaged: Vec<DriveRange>,
    /// Drive ranges that never appear.
    pub missing: Vec<DriveRange>,
    /// The stored index, if it was read and is intact.
    pub index: Option<Index>,
    /// The runs of every intact extent in canonical form: the index as
    /// rebuilt from the data itself (what a salvaging reader trusts).
    pub runs: Vec<IndexRun>,
    /// The footer, if it was read and is intact.
    pub footer: Option<Footer>,
    /// Per drive (header order), the digest check.
    pub digests: Vec<DriveDigestCheck>,
    /// Clusters per drive that arrived behind later ones (header order).
    pub out_of_order: Vec<bool>,
}

impl PassReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// An archive being read front to back.
pub struct ArchiveStream<R: Read> {
    input: Input<R>,
    header: Header,
    flavor: Flavor,
}

/// The archive formats a stream can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// Native vma, version 2.
    V2,
    /// Proxmox VMA version 1.
    VmaV1,
}

/// Format-specific state of an open stream.
#[derive(Clone, Copy)]
enum Flavor {
    V2 { header_digest: [u8; 32] },
    V1 { uuid: [u8; 16] },
}

/// The v2 header a VMA v1 header corresponds to (no features, no digests).
fn header_from_v1(h: V1Header) -> Header {
    Header {
        version_minor: 0,
        incompat: 0,
        compat: 0,
        uuid: h.uuid,
        ctime: h.ctime.min(i64::MAX as u64) as i64,
        compression: CompressionInfo {
            codec: Codec::None,
            level: 0,
        },
        creator: String::new(),
        parent: None,
        drives: h.drives,
        configs: h.configs,
        stands_for: Vec::new(),
    }
}

/// Read a VMA v1 header from `input`.
fn read_v1_header<R: Read>(input: &mut Input<R>) -> Result<(Header, Flavor)> {
    let prefix = input.peek(60)?.to_vec();
    let len = format_v1::header_len(&prefix)?;
    let block = input.read_vec(len, "VMA header")?;
    let v1 = V1Header::decode(&block)?;
    let uuid = v1.uuid;
    Ok((header_from_v1(v1), Flavor::V1 { uuid }))
}

/// Read the header block from `input` (after detecting the format).
fn read_header<R: Read>(input: &mut Input<R>) -> Result<(Header, Flavor)> {
    let prefix = input.peek(HEADER_FIXED_LEN)?;
    if prefix.starts_with(&format_v1::MAGIC) {
        return read_v1_header(input);
    }
    if !prefix.starts_with(&ARCHIVE_MAGIC) {
        let p = prefix[..prefix.len().min(DETECT_LEN)].to_vec();
        if p.len() < 8 {
            return Err(Error::truncated(
                p.len() as u64,
                format!("{} is too short to be an archive", input.name()),
            ));
        }
        return Err(not_v2_error(&p));
    }
    let fixed: [u8; HEADER_FIXED_LEN] = input.read_array("archive header")?;
    let hp = HeaderPrefix::decode(&fixed)?;
    let mut block = fixed.to_vec();
    input.read_into(
        &mut block,
        hp.header_len - HEADER_FIXED_LEN,
        "archive header",
    )?;
    let header = Header::decode(&block)?;
    let header_digest = block[block.len() - 32..].try_into().expect("32");
    Ok((header, Flavor::V2 { header_digest }))
}

impl<R: Read> ArchiveStream<R> {
    /// Open an archive from `reader`; `name` appears in error messages.
    pub fn open(reader: R, name: &str) -> Result<Self> {
        let mut input = Input::new(reader, name);
        let (header, flavor) = read_header(&mut input)?;
        Ok(ArchiveStream {
            input,
            header,
            flavor,
        })
    }

    /// Which format the archive is in.
    pub fn format(&self) -> ArchiveFormat {
        match self.flavor {
            Flavor::V2 { .. } => ArchiveFormat::V2,
            Flavor::V1 { .. } => ArchiveFormat::VmaV1,
        }
    }

    /// The archive's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Read every extent, the index and the footer; hand each intact
    /// extent to `sink` in archive order.
    pub fn pass(
        self,
        options: &PassOptions,
        mut sink: impl FnMut(&Arc<DecodedExtent>) -> Result<()>,
    ) -> Result<PassReport> {
        if let Flavor::V1 { uuid } = self.flavor {
            return self.pass_v1(uuid, options, sink);
        }
        self.pass_v2(
            options,
            |bytes, offset, zstd_allowed, dec| {
                decode_extent(&bytes, offset, zstd_allowed, dec)
                    .map_err(|e| claimed(e, &bytes, offset))
            },
            feed_and_sink(&mut sink),
        )
    }

    /// [`ArchiveStream::pass`], handing each intact extent over as it is
    /// stored (checked: SHA-256, entries, masks; not decoded), for copying
    /// into another archive with [`crate::Writer::append_stored`]. Native
    /// archives only; no drive is hashed.
    pub fn pass_stored(
        self,
        options: &PassOptions,
        mut sink: impl FnMut(StoredExtent) -> Result<()>,
    ) -> Result<PassReport> {
        if self.flavor_is_v1() {
            return Err(Error::Invalid(
                "VMA v1 extents have no stored form to copy".into(),
            ));
        }
        let options = PassOptions {
            hash_drives: HashDrives::None,
            ..options.clone()
        };
        self.pass_v2(
            &options,
            |bytes, offset, zstd_allowed, _| match StoredExtent::check(bytes, offset, zstd_allowed)
            {
                Ok(ext) => Ok(ext),
                Err((e, bytes)) => Err(claimed(e, &bytes, offset)),
            },
            |_, ext| sink(ext),
        )
    }

    fn flavor_is_v1(&self) -> bool {
        matches!(self.flavor, Flavor::V1 { .. })
    }

    /// The pass over a native archive: extents are checked by `work` on
    /// worker threads and handed, in archive order and accounted for, to
    /// `handle`.
    fn pass_v2<T: Checked + Send + 'static>(
        mut self,
        options: &PassOptions,
        work: fn(Vec<u8>, u64, bool, &mut zstd::bulk::Decompressor<'static>) -> Outcome<T>,
        mut handle: impl FnMut(&PassState, T) -> Result<()>,
    ) -> Result<PassReport> {
        let Flavor::V2 { header_digest } = self.flavor else {
            unreachable!("checked by the callers")
        };
        let threads = effective_threads(options.threads);
        let mut state = PassState::new(&self.header, options);
        state.digest.add(&header_digest);
        let zstd_allowed = self.header.incompat & INCOMPAT_ZSTD != 0;
        let mut pool: OrderedPool<(u64, Vec<u8>), Outcome<T>> =
            OrderedPool::new(threads, threads * 2 + 2, || {
                let mut dec = zstd::bulk::Decompressor::new().expect("zstd decompression context");
                move |(offset, bytes): (u64, Vec<u8>)| work(bytes, offset, zstd_allowed, &mut dec)
            });
        let input = &mut self.input;
        let mut index_at = None;
        loop {
            let offset = input.pos();
            let magic = input.peek(8)?;
            if magic.len() < 8 {
                state.problem(Error::truncated(
                    offset,
                    format!(
                        "the archive ends after {} extents without its index and footer (was the writer interrupted?)",
                        state.next_seq
                    ),
                ))?;
                break;
            }
            if magic == INDEX_MAGIC {
                index_at = Some(offset);
                break;
            }
            if magic != EXTENT_MAGIC {
                state.problem(Error::corrupt(
                    offset,
                    format!(
                        "expected an extent or the index, found bytes {}",
                        hex::encode(magic)
                    ),
                ))?;
                resync(input)?;
                continue;
            }
            let hb = input.peek(EXTENT_HEADER_LEN)?;
            if hb.len() < EXTENT_HEADER_LEN {
                state.problem(Error::truncated(
                    offset,
                    "the archive ends inside an extent header",
                ))?;
                break;
            }
            let hb: [u8; EXTENT_HEADER_LEN] = hb.try_into().expect("64");
            let h = match ExtentHeader::decode(&hb, offset) {
                Ok(h) => h,
                Err(e) => {
                    state.problem(e)?;
                    resync(input)?;
                    continue;
                }
            };
            let bytes = match input.read_vec(h.total_len(), &format!("extent #{}", h.seq)) {
                Ok(b) => b,
                Err(e) => {
                    state.problem(e)?;
                    break;
                }
            };
            let st = &mut state;
            pool.submit((offset, bytes), |out| st.handle(out, &mut handle))?;
        }
        let st = &mut state;
        pool.finish(|out| st.handle(out, &mut handle))?;
        drop(pool);
        if let Some(at) = index_at {
            state.read_trailer(input, at)?;
        }
        state.bytes = input.pos();
        state.finish()
    }
}

impl<R: Read> ArchiveStream<R> {
    /// The pass over a VMA v1 archive: 512-byte extent headers (MD5
    /// checked), their blocks, up to the end of the input. v1 has no data
    /// checksums, no index and no footer; completeness is still checked.
    fn pass_v1(
        mut self,
        uuid: [u8; 16],
        options: &PassOptions,
        mut sink: impl FnMut(&Arc<DecodedExtent>) -> Result<()>,
    ) -> Result<PassReport> {
        // VMA v1 records no drive digests: nothing to hash against.
        let options = &PassOptions {
            hash_drives: HashDrives::None,
            ..options.clone()
        };
        let mut state = PassState::new(&self.header, options);
        let input = &mut self.input;
        let mut seq = 0;
        loop {
            let offset = input.pos();
            let hb = input.peek(format_v1::EXTENT_HEADER_LEN)?;
            if hb.is_empty() {
                break;
            }
            if hb.len() < format_v1::EXTENT_HEADER_LEN {
                state.problem(Error::truncated(
                    offset,
                    "the archive ends inside a VMA extent header",
                ))?;
                break;
            }
            let hb: [u8; format_v1::EXTENT_HEADER_LEN] = hb.try_into().expect("512");
            let h = match V1ExtentHeader::decode(&hb, offset, &uuid) {
                Ok(h) => h,
                Err(e) => {
                    state.problem(e)?;
                    resync_v1(input, &uuid)?;
                    continue;
                }
            };
            input.consume(format_v1::EXTENT_HEADER_LEN);
            let data = match input.read_vec(h.data_len(), "VMA extent data") {
                Ok(d) => d,
                Err(e) => {
                    state.problem(e)?;
                    break;
                }
            };
            let ext = DecodedExtent::from_v1(seq, offset, &h, data);
            seq += 1;
            state.handle(Ok(ext), &mut feed_and_sink(&mut sink))?;
        }
        state.bytes = input.pos();
        state.finish()
    }
}

/// Skip forward to the next VMA v1 extent header of this archive.
fn resync_v1<R: Read>(input: &mut Input<R>, uuid: &[u8; 16]) -> Result<()> {
    input.consume(1);
    loop {
        let buf = input.peek(1 << 20)?;
        if buf.len() < format_v1::EXTENT_HEADER_LEN {
            let n = buf.len();
            input.consume(n);
            return Ok(());
        }
        let last = buf.len() - format_v1::EXTENT_HEADER_LEN;
        let found = (0..=last).find(|&i| {
            buf[i..i + 4] == format_v1::EXTENT_MAGIC && &buf[i + 8..i + 24] == uuid && {
                let hb: [u8; format_v1::EXTENT_HEADER_LEN] = buf
                    [i..i + format_v1::EXTENT_HEADER_LEN]
                    .try_into()
                    .expect("512");
                V1ExtentHeader::decode(&hb, 0, uuid).is_ok()
            }
        });
        match found {
            Some(i) => {
                input.consume(i);
                return Ok(());
            }
            None => input.consume(last + 1),
        }
    }
}

/// A worker's result: the checked extent, or the damage with whatever
/// entries the extent claims (to say which ranges are affected).
type Outcome<T> = std::result::Result<T, (Error, u64, Vec<Entry>)>;

/// What the pass needs to know of every checked extent.
trait Checked {
    fn seq(&self) -> u64;
    fn offset(&self) -> u64;
    fn entries(&self) -> &[Entry];
    fn digest(&self) -> [u8; 32];
}

impl Checked for DecodedExtent {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn offset(&self) -> u64 {
        self.offset
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn digest(&self) -> [u8; 32] {
        self.digest
    }
}

impl Checked for StoredExtent {
    fn seq(&self) -> u64 {
        self.seq()
    }
    fn offset(&self) -> u64 {
        self.offset()
    }
    fn entries(&self) -> &[Entry] {
        self.entries()
    }
    fn digest(&self) -> [u8; 32] {
        self.digest()
    }
}

/// The damage `e` of the extent `bytes` at `offset`, with the entries it
/// claims if they still decode.
fn claimed(e: Error, bytes: &[u8], offset: u64) -> (Error, u64, Vec<Entry>) {
    let hb: [u8; EXTENT_HEADER_LEN] = bytes[..EXTENT_HEADER_LEN].try_into().expect("header read");
    let h = ExtentHeader::decode(&hb, offset).expect("header checked before");
    let claimed = decode_entries(&h, &bytes[EXTENT_HEADER_LEN..], offset)
        .map(|(e, _)| e)
        .unwrap_or_default();
    (e, h.seq, claimed)
}

/// A pass sink for decoded extents: the drive hasher sees each first.
fn feed_and_sink(
    sink: &mut impl FnMut(&Arc<DecodedExtent>) -> Result<()>,
) -> impl FnMut(&PassState, DecodedExtent) -> Result<()> + '_ {
    move |st, ext| {
        let ext = Arc::new(ext);
        if let Some(h) = &st.hasher {
            h.feed(&ext);
        }
        sink(&ext)
    }
}

/// Skip forward to the next plausible extent header or index.
fn resync<R: Read>(input: &mut Input<R>) -> Result<()> {
    input.consume(1);
    loop {
        let buf = input.peek(1 << 20)?;
        if buf.len() < 8 {
            let n = buf.len();
            input.consume(n);
            return Ok(());
        }
        let mut found = None;
        for i in 0..=buf.len() - 8 {
            let w = &buf[i..i + 8];
            if w == INDEX_MAGIC {
                found = Some(i);
                break;
            }
            if w == EXTENT_MAGIC {
                if buf.len() - i < EXTENT_HEADER_LEN {
                    found = Some(i); // let the caller find it short
                    break;
                }
                let hb: [u8; EXTENT_HEADER_LEN] =
                    buf[i..i + EXTENT_HEADER_LEN].try_into().expect("64");
                if ExtentHeader::decode(&hb, 0).is_ok() {
                    found = Some(i);
                    break;
                }
            }
        }
        match found {
            Some(i) => {
                input.consume(i);
                return Ok(());
            }
            None => {
                let n = buf.len() - 7;
                input.consume(n);
            }
        }
    }
}

struct PassState {
    header: Header,
    keep_going: bool,
    coverage: Vec<RangeSet>,
    runs: Vec<IndexRun>,
    problems: Vec<Error>,
    damaged: Vec<DriveRange>,
    digest: ArchiveDigest,
    next_seq: u64,
    extents: u64,
    bytes: u64,
    index: Option<Index>,
    footer: Option<Footer>,
    high_water: Vec<u64>,
    out_of_order: Vec<bool>,
    hasher: Option<DriveHasher>,
    /// Problems past [`MAX_LISTED_PROBLEMS`], counted only.
    unlisted_problems: u64,
    /// Set once the extents are done: later problems are always listed.
    finishing: bool,
}

/// Problems a pass going past damage lists one by one; the rest are counted,
/// so that a small input (a decompression bomb of damaged extents) cannot
/// make the report grow without bound.
pub const MAX_LISTED_PROBLEMS: usize = 1000;

impl PassState {
    fn new(header: &Header, options: &PassOptions) -> Self {
        let n = header.drives.len();
        PassState {
            header: header.clone(),
            keep_going: options.keep_going,
            coverage: vec![RangeSet::new(); n],
            runs: Vec::new(),
            problems: Vec::new(),
            damaged: Vec::new(),
            digest: ArchiveDigest::default(),
            next_seq: 0,
            extents: 0,
            bytes: 0,
            index: None,
            footer: None,
            high_water: vec![0; n],
            out_of_order: vec![false; n],
            hasher: (options.hash_drives != HashDrives::None)
                .then(|| DriveHasher::start(header, &options.hash_drives)),
            unlisted_problems: 0,
            finishing: false,
        }
    }

    fn problem(&mut self, e: Error) -> Result<()> {
        if !self.keep_going {
            return Err(e);
        }
        if self.problems.len() < MAX_LISTED_PROBLEMS || self.finishing {
            self.problems.push(e);
        } else {
            self.unlisted_problems += 1;
        }
        Ok(())
    }

    fn slot(&self, drive: DriveId) -> Option<usize> {
        self.header
            .drives
            .binary_search_by_key(&drive, |d| d.id)
            .ok()
    }

    fn ranges_of(&self, entries: &[Entry]) -> Vec<DriveRange> {
        entries
            .iter()
            .filter_map(|e| {
                let d = self.header.drive(e.drive)?;
                Some(DriveRange {
                    drive: e.drive,
                    drive_name: d.name.clone(),
                    bytes: cluster_range_bytes(d.size, e.start..e.start + e.count as u64),
                })
            })
            .collect()
    }

    /// Account for one run; false when it is invalid (reported).
    fn account(&mut self, e: &Entry, offset: u64, seq: u64) -> Result<bool> {
        let Some(slot) = self.slot(e.drive) else {
            self.problem(Error::corrupt(
                offset,
                format!(
                    "extent #{seq} names drive id {} which the header does not list",
                    e.drive
                ),
            ))?;
            return Ok(false);
        };
        let d = &self.header.drives[slot];
        let end = e.start + e.count as u64;
        if end > d.clusters() {
            let what = format!(
                "extent #{seq} holds clusters {}..{end} of drive {} which has only {}",
                e.start,
                d.name,
                d.clusters()
            );
            self.problem(Error::corrupt(offset, what))?;
            return Ok(false);
        }
        if e.kind == RunKind::Unchanged && self.header.parent.is_none() {
            self.problem(Error::corrupt(
                offset,
                format!("extent #{seq} has unchanged clusters but the archive has no parent"),
            ))?;
            return Ok(false);
        }
        if let Err(dup) = self.coverage[slot].insert(e.start..end) {
            let bytes = cluster_range_bytes(d.size, dup);
            let what = format!(
                "extent #{seq} repeats drive {} bytes {}..{} stored earlier",
                d.name, bytes.start, bytes.end
            );
            self.problem(Error::corrupt(offset, what))?;
            return Ok(false);
        }
        if e.start < self.high_water[slot] {
            self.out_of_order[slot] = true;
        }
        self.high_water[slot] = self.high_water[slot].max(end);
        Ok(true)
    }

    fn handle<T: Checked>(
        &mut self,
        outcome: Outcome<T>,
        sink: &mut impl FnMut(&PassState, T) -> Result<()>,
    ) -> Result<()> {
        match outcome {
            Ok(ext) => {
                let (seq, offset) = (ext.seq(), ext.offset());
                if seq != self.next_seq {
                    self.problem(Error::corrupt(
                        offset,
                        format!("found extent #{} where extent #{} was expected (extents lost or reordered)", seq, self.next_seq),
                    ))?;
                }
                self.next_seq = seq + 1;
                for e in ext.entries() {
                    if self.account(e, offset, seq)? {
                        self.runs.push(IndexRun {
                            drive: e.drive,
                            start: e.start,
                            count: e.count,
                            kind: e.kind,
                            extent_offset: if e.kind == RunKind::Data { offset } else { 0 },
                        });
                    }
                }
                self.digest.add(&ext.digest());
                self.extents += 1;
                sink(self, ext)
            }
            Err((e, seq, claimed)) => {
                self.next_seq = seq + 1;
                // Only clusters not accounted for yet are lost here: a claim
                // repeating earlier ones (intact or damaged) loses nothing
                // new, and a partly overlapping claim leaves its clusters
                // to be reported missing.
                let newly_claimed: Vec<Entry> = claimed
                    .iter()
                    .filter(|c| {
                        self.slot(c.drive).is_some_and(|slot| {
                            self.coverage[slot]
                                .insert(c.start..c.start + c.count as u64)
                                .is_ok()
                        })
                    })
                    .copied()
                    .collect();
                let ranges = self.ranges_of(&newly_claimed);
                self.damaged.extend(ranges.iter().cloned());
                let (offset, what) = match &e {
                    Error::Corrupt { offset, what } | Error::Truncated { offset, what } => {
                        (*offset, what.clone())
                    }
                    other => (0, other.to_string()),
                };
                if let Some(h) = &self.hasher {
                    h.spoil(&claimed);
                }
                self.problem(Error::ExtentDamaged {
                    seq: Some(seq),
                    offset,
                    what,
                    ranges,
                })
            }
        }
    }

    fn read_trailer<R: Read>(&mut self, input: &mut Input<R>, at: u64) -> Result<()> {
        let fixed: [u8; INDEX_FIXED_LEN] = match input.read_array("index") {
            Ok(f) => f,
            Err(e) => return self.problem(e),
        };
        let max_len = 1u64 << 40;
        let len = match Index::block_len(&fixed, at, max_len) {
            Ok(l) => l,
            Err(e) => return self.problem(e),
        };
        let mut block = fixed.to_vec();
        if let Err(e) = input.read_into(&mut block, len - INDEX_FIXED_LEN, "index") {
            return self.problem(e);
        }
        let index = match Index::decode(&block, at) {
            Ok(i) => i,
            Err(e) => return self.problem(e),
        };
        self.digest.add(&block[block.len() - 32..]);
        let footer_at = input.pos();
        let fb = match input.read_array::<FOOTER_LEN>("footer") {
            Ok(f) => f,
            Err(e) => {
                self.index = Some(index);
                return self.problem(e);
            }
        };
        match Footer::decode(&fb, footer_at) {
            Ok(f) => {
                if f.index_offset != at {
                    self.problem(Error::corrupt(
                        footer_at,
                        format!(
                            "footer points to the index at {} but it is at {at}",
                            f.index_offset
                        ),
                    ))?;
                }
                self.footer = Some(f);
            }
            Err(e) => self.problem(e)?,
        }
        if !input.at_eof()? {
            self.problem(Error::corrupt(
                input.pos(),
                "unexpected bytes after the footer",
            ))?;
        }
        self.index = Some(index);
        Ok(())
    }

    fn finish(mut self) -> Result<PassReport> {
        // What is found about the whole archive is always listed.
        self.finishing = true;
        if self.unlisted_problems > 0 {
            let n = self.unlisted_problems;
            self.problem(Error::Limit(format!(
                "{n} more problems in extents were found after the first {MAX_LISTED_PROBLEMS} and are not listed"
            )))?;
        }
        let drives = self.header.drives.clone();
        // Completeness: every cluster exactly once.
        let gaps: Vec<(DriveId, std::ops::Range<u64>)> = drives
            .iter()
            .enumerate()
            .flat_map(|(slot, d)| {
                self.coverage[slot]
                    .gaps(d.clusters())
                    .into_iter()
                    .map(move |g| (d.id, g))
            })
            .collect();
        let clean_so_far = self.problems.is_empty();
        let mut missing = Vec::new();
        if !gaps.is_empty() {
            let err = incomplete_error(&drives, &gaps);
            if let Error::Incomplete { ranges, .. } = &err {
                missing = ranges.clone();
            }
            self.problem(err)?;
        }
        let rebuilt = Index::canonical_runs(std::mem::take(&mut self.runs));
        // The stored index must be exactly what the extents say.
        let to_check = if clean_so_far {
            self.index.take()
        } else {
            None
        };
        if let Some(index) = to_check {
            let at = self.footer.map_or(0, |f| f.index_offset);
            if rebuilt != index.runs {
                let first = rebuilt
                    .iter()
                    .zip(&index.runs)
                    .position(|(a, b)| a != b)
                    .unwrap_or(rebuilt.len().min(index.runs.len()));
                self.problem(Error::corrupt(
                    at,
                    format!(
                        "the index disagrees with the extents (run {first} of {} differs)",
                        index.runs.len()
                    ),
                ))?;
            }
            let ids: Vec<(DriveId, u64)> = index
                .drives
                .iter()
                .map(|r| (r.drive, r.data_clusters))
                .collect();
            let expected: Vec<(DriveId, u64)> = drives
                .iter()
                .map(|d| {
                    let data = rebuilt
                        .iter()
                        .filter(|r| r.drive == d.id && r.kind == RunKind::Data)
                        .map(|r| r.count as u64)
                        .sum();
                    (d.id, data)
                })
                .collect();
            if ids != expected {
                self.problem(Error::corrupt(
                    at,
                    "the index's drive records do not match the header's drives",
                ))?;
            }
            self.index = Some(index);
            if let Some(f) = self.footer {
                if f.extent_count != self.extents {
                    self.problem(Error::corrupt(
                        at,
                        format!(
                            "footer counts {} extents, the archive has {}",
                            f.extent_count, self.extents
                        ),
                    ))?;
                }
                let digest = std::mem::take(&mut self.digest).finish();
                if !check_matches(&f.archive_digest, &digest) {
                    self.problem(Error::corrupt(
                        at,
                        "archive digest in the footer does not match the archive",
                    ))?;
                }
            }
        }
        // Whole-drive digests.
        let computed = self.hasher.take().map(DriveHasher::finish);
        let mut digests = Vec::with_capacity(drives.len());
        for (slot, d) in drives.iter().enumerate() {
            let recorded = self
                .index
                .as_ref()
                .and_then(|i| i.drives.iter().find(|r| r.drive == d.id))
                .and_then(|r| r.digest);
            let check = match (&computed, recorded) {
                (None, _) => DriveDigestCheck::Skipped,
                (_, None) => DriveDigestCheck::NotRecorded,
                (Some(_), Some(_))
                    if missing.iter().chain(&self.damaged).any(|m| m.drive == d.id) =>
                {
                    DriveDigestCheck::NotChecked
                }
                (Some(c), Some(expected)) => match c[slot] {
                    HashOutcome::Done(found) if found == expected => DriveDigestCheck::Match(found),
                    HashOutcome::Done(found) => DriveDigestCheck::Mismatch { expected, found },
                    HashOutcome::OutOfOrder => DriveDigestCheck::OutOfOrder,
                    HashOutcome::Spoiled => DriveDigestCheck::NotChecked,
                    HashOutcome::Skipped => DriveDigestCheck::Skipped,
                },
            };
            if let DriveDigestCheck::Mismatch { expected, found } = &check {
                self.problem(Error::DriveDigestMismatch {
                    drive_name: d.name.clone(),
                    expected: hex::encode(expected),
                    found: hex::encode(found),
                })?;
            }
            digests.push(check);
        }
        Ok(PassReport {
            header: self.header,
            extents: self.extents,
            bytes: self.bytes,
            problems: self.problems,
            damaged: self.damaged,
            missing,
            index: self.index,
            runs: rebuilt,
            footer: self.footer,
            digests,
            out_of_order: self.out_of_order,
        })
    }
}

/// The error for clusters that never appear: per drive how many of how
/// many are missing, and where (drive byte ranges).
pub(crate) fn incomplete_error(
    drives: &[DriveInfo],
    gaps: &[(DriveId, std::ops::Range<u64>)],
) -> Error {
    let mut ranges = Vec::new();
    let mut parts = Vec::new();
    for d in drives {
        let mine: Vec<DriveRange> = gaps
            .iter()
            .filter(|(id, _)| *id == d.id)
            .map(|(_, g)| DriveRange {
                drive: d.id,
                drive_name: d.name.clone(),
                bytes: cluster_range_bytes(d.size, g.clone()),
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        let clusters: u64 = gaps
            .iter()
            .filter(|(id, _)| *id == d.id)
            .map(|(_, g)| g.end - g.start)
            .sum();
        let bytes: u64 = mine.iter().map(|r| r.bytes.end - r.bytes.start).sum();
        parts.push(format!(
            "drive {} lacks {clusters} of its {} clusters ({}): {}",
            d.name,
            d.clusters(),
            human_bytes(bytes),
            describe_ranges(&mine, 3)
        ));
        ranges.extend(mine);
    }
    Error::Incomplete {
        summary: parts.join("; "),
        ranges,
    }
}

/// Format a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Clone, Copy)]
enum HashOutcome {
    Done([u8; 32]),
    OutOfOrder,
    Spoiled,
    Skipped,
}

enum HashMsg {
    Extent(Arc<DecodedExtent>),
    Spoil(Vec<DriveId>),
}

/// Hashes drives on a thread of its own as their clusters stream past in order.
struct DriveHasher {
    tx: crossbeam_channel::Sender<HashMsg>,
    thread: std::thread::JoinHandle<Vec<HashOutcome>>,
}

impl DriveHasher {
    fn start(header: &Header, which: &HashDrives) -> Self {
        let drives = header.drives.clone();
        let skip: Vec<bool> = drives.iter().map(|d| !which.includes(d.id)).collect();
        let (tx, rx) = crossbeam_channel::bounded::<HashMsg>(32);
        let thread = std::thread::Builder::new()
            .name("vma-drive-hash".into())
            .spawn(move || {
                struct S {
                    sha: Sha256,
                    next: u64,
                    state: Option<HashOutcome>,
                }
                let mut s: Vec<S> = skip
                    .iter()
                    .map(|&skipped| S {
                        sha: Sha256::new(),
                        next: 0,
                        state: skipped.then_some(HashOutcome::Skipped),
                    })
                    .collect();
                let zeros = vec![0u8; 1 << 20];
                let slot = |id: DriveId| drives.binary_search_by_key(&id, |d| d.id).ok();
                let mut cluster_buf = vec![0u8; CLUSTER_SIZE];
                for msg in rx {
                    match msg {
                        HashMsg::Spoil(ids) => {
                            for id in ids {
                                if let Some(i) = slot(id) {
                                    s[i].state.get_or_insert(HashOutcome::Spoiled);
                                }
                            }
                        }
                        HashMsg::Extent(ext) => {
                            // Data clusters in entry order, taken entry by entry.
                            let mut data = ext.data_clusters().map(|(_, _, d)| d);
                            for e in &ext.entries {
                                let run_data = data.by_ref().take(match e.kind {
                                    RunKind::Data => e.count as usize,
                                    _ => 0,
                                });
                                let Some(i) = slot(e.drive) else {
                                    run_data.for_each(drop);
                                    continue;
                                };
                                let st = &mut s[i];
                                let size = drives[i].size;
                                let end = e.start + e.count as u64;
                                if st.state.is_none() && e.start != st.next {
                                    st.state = Some(HashOutcome::OutOfOrder);
                                }
                                // A run past the drive's end is damage the pass reports.
                                if st.state.is_none()
                                    && (end > clusters_for(size) || e.kind == RunKind::Unchanged)
                                {
                                    st.state = Some(HashOutcome::Spoiled);
                                }
                                if st.state.is_some() {
                                    run_data.for_each(drop);
                                    continue;
                                }
                                if e.kind == RunKind::Zero {
                                    let bytes = cluster_range_bytes(size, e.start..end);
                                    let mut left = bytes.end - bytes.start;
                                    while left > 0 {
                                        let n = left.min(zeros.len() as u64) as usize;
                                        st.sha.update(&zeros[..n]);
                                        left -= n as u64;
                                    }
                                }
                                for (k, d) in run_data.enumerate() {
                                    let len = cluster_len(size, ClusterNo(e.start + k as u64));
                                    match d {
                                        ClusterData::Data { mask, blocks }
                                            if mask == u16::MAX && len == CLUSTER_SIZE =>
                                        {
                                            st.sha.update(blocks)
                                        }
                                        other => {
                                            other.expand_into(&mut cluster_buf[..len]);
                                            st.sha.update(&cluster_buf[..len]);
                                        }
                                    }
                                }
                                st.next = end;
                            }
                        }
                    }
                }
                s.into_iter()
                    .map(|st| st.state.unwrap_or(HashOutcome::Done(st.sha.finish())))
                    .collect()
            })
            .expect("spawning the hash thread");
        DriveHasher { tx, thread }
    }

    fn feed(&self, ext: &Arc<DecodedExtent>) {
        let _ = self.tx.send(HashMsg::Extent(ext.clone()));
    }

    fn spoil(&self, entries: &[Entry]) {
        let _ = self
            .tx
            .send(HashMsg::Spoil(entries.iter().map(|e| e.drive).collect()));
    }

    fn finish(self) -> Vec<HashOutcome> {
        drop(self.tx);
        self.thread.join().expect("hash thread")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::extent::{encode_extent, RawExtent};
    use crate::format::MAX_CLUSTERS;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// A header of one 64 KiB drive, followed by one extent holding its
    /// data cluster and a zero run of `zero_count` clusters after it (no
    /// index: the archive is incomplete).
    pub(crate) fn archive_with_zero_run(zero_count: u32) -> Vec<u8> {
        let header = Header {
            version_minor: 0,
            incompat: 0,
            compat: 0,
            uuid: [7; 16],
            ctime: 0,
            compression: CompressionInfo {
                codec: Codec::None,
                level: 0,
            },
            creator: String::new(),
            parent: None,
            stands_for: Vec::new(),
            drives: vec![DriveInfo {
                id: DriveId(1),
                name: "d".into(),
                size: CLUSTER_SIZE as u64,
            }],
            configs: Vec::new(),
        };
        let mut bytes = header.encode().unwrap();
        let mut raw = RawExtent::default();
        raw.push_data(DriveId(1), ClusterNo(0), 1, &[5u8; CLUSTER_SIZE]);
        raw.push_run(DriveId(1), RunKind::Zero, 1, zero_count);
        bytes.extend_from_slice(&encode_extent(raw, 0, None).unwrap().bytes);
        bytes
    }

    /// Two kilobytes of zstd holding 200,000 copies of one damaged
    /// extent: the pass going past damage listed a problem and the damaged
    /// range for every copy (over 100 MiB of report); it now lists the first
    /// thousand problems, counts the rest, and the range once.
    #[test]
    fn a_bomb_of_damaged_extents_keeps_the_report_small() {
        let mut header = archive_with_zero_run(1);
        let extent_at = header.windows(8).position(|w| w == EXTENT_MAGIC).unwrap();
        header.truncate(extent_at);
        let mut raw = RawExtent::default();
        raw.push_run(DriveId(1), RunKind::Zero, 0, 1);
        let mut extent = encode_extent(raw, 0, None).unwrap().bytes;
        let n = extent.len();
        extent[n - 1] ^= 1; // its SHA-256
        let mut packer = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        packer.write_all(&header).unwrap();
        for _ in 0..200_000 {
            packer.write_all(&extent).unwrap();
        }
        let packed = packer.finish().unwrap();
        assert!(packed.len() < 64 << 10, "{} bytes", packed.len());
        let (stream, _) = crate::detect::open_any(std::io::Cursor::new(packed), "bomb").unwrap();
        let options = PassOptions {
            threads: 1,
            keep_going: true,
            hash_drives: HashDrives::All,
        };
        let report = stream.pass(&options, |_| Ok(())).unwrap();
        assert!(
            report.problems.len() <= MAX_LISTED_PROBLEMS + 2,
            "{}",
            report.problems.len()
        );
        assert!(
            report.problems.iter().any(|p| p
                .to_string()
                .contains("199001 more problems in extents were found after the first 1000")),
            "{}",
            report.problems.last().unwrap()
        );
        assert_eq!(report.damaged.len(), 1);
        assert_eq!(report.damaged[0].bytes, 0..CLUSTER_SIZE as u64);
    }

    /// An extent whose zero run claims two billion clusters of a one-cluster
    /// drive once made the drive hasher step through every claimed cluster
    /// (minutes of work from 300 bytes); the run is now reported and the
    /// hash given up at once.
    #[test]
    fn a_zero_run_past_the_drive_end_costs_no_time() {
        let bytes = archive_with_zero_run((MAX_CLUSTERS - 1) as u32);
        let started = Instant::now();
        let stream = ArchiveStream::open(&bytes[..], "test").unwrap();
        let options = PassOptions {
            threads: 1,
            keep_going: true,
            hash_drives: HashDrives::All,
        };
        let report = stream.pass(&options, |_| Ok(())).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            report.problems.iter().any(|p| p
                .to_string()
                .contains("extent #0 holds clusters 1..2147483648 of drive d which has only 1")),
            "{:?}",
            report.problems
        );
        assert_eq!(report.digests, vec![DriveDigestCheck::NotRecorded]);
    }
}

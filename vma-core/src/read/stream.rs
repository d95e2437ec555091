//! The sequential pass over an archive from any `Read` (file or pipe):
//! the one loop over extents that verify, extract, convert and salvage
//! share. Extents are verified, decoded and their leaves hashed on worker
//! threads and handed to a sink in archive order; the pass rebuilds the
//! index from what the extents hold (with bounded memory, see
//! [`crate::index`]), which accounts for every cluster, and compares it,
//! the drive digests, the footer and the archive digest with what is stored.

use std::io::Read;
use std::sync::Arc;

use crate::digest::{check_matches, Sha256};

use crate::error::{Error, Result};
use crate::extent::{decode_extent, drive_sizes, Binding, DecodedExtent, DriveSizes, StoredExtent};
use crate::format::v1::{self, V1ExtentHeader, V1Header};
use crate::format::ExtentFrame;
use crate::format::{
    archive_digest, decode_entries, index_digest, v2, Codec, CompressionInfo, Directory, DriveInfo,
    DriveRecord, Entry, Footer, Header, HeaderPrefix, IndexFixed, PageKind, RunKind, ARCHIVE_MAGIC,
    CLUSTER_SIZE, DRIVE_RECORD_LEN, EXTENT_HEADER_LEN, EXTENT_MAGIC, FOOTER_LEN, HEADER_FIXED_LEN,
    INCOMPAT_ZSTD, INDEX_FIXED_LEN, INDEX_MAGIC, MIN_EXTENT_LEN,
};
use crate::index::{
    incomplete_from_ranges, BuiltIndex, ExtentKeys, FinishOptions, IndexBuilder, LeafSource,
};
use crate::read::detect::{not_v2_error, DETECT_LEN};
use crate::read::input::Input;
use crate::tree::{Digest, DriveDigestKind, DriveHash};
use crate::types::{cluster_len, ArchiveOffset, ClusterNo, DriveId, DriveRange};
use crate::util::effective_threads;
use crate::util::pipeline::OrderedPool;

pub use crate::util::ProgressFn;

/// Options of a sequential pass.
#[derive(Clone, Default)]
pub struct PassOptions {
    /// Decoder threads (0: one per core).
    pub threads: usize,
    /// Record damage and go on (verify, salvage) instead of stopping at
    /// the first problem.
    pub keep_going: bool,
    /// 2.0 archives: which drives get their plain SHA-256 computed (when
    /// read in order) and compared with the digest the writer recorded.
    /// (3.0 drive digests are always checked: they cost one hash per data
    /// cluster on the worker threads, zero clusters nothing.)
    pub hash_drives: HashDrives,
    /// Keep the index the pass builds (for [`crate::Reader::open_salvage`]).
    pub keep_index: bool,
    /// Progress of the steps after the extents (building and checking the index).
    pub progress: Option<ProgressFn>,
}

/// The drives of a 2.0 archive whose whole-content SHA-256 a pass
/// computes. That hash is one sequential stream per drive (zeros
/// included), so it is the slowest part of a pass over a 2.0 archive.
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

/// Outcome of checking one drive's digest.
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
    /// 2.0: the drive's clusters are not stored in order, so one pass
    /// cannot hash it; a seekable reader can (see `verify`).
    OutOfOrder,
    /// Damage or gaps made the check impossible.
    NotChecked,
    /// Digests were not requested.
    Skipped,
}

/// What a pass found.
pub struct PassReport {
    /// The archive header.
    pub header: Header,
    /// The archive's format.
    pub format: ArchiveFormat,
    /// Intact extents seen.
    pub extents: u64,
    /// Bytes of archive read.
    pub bytes: u64,
    /// Every problem found (only with `keep_going`; otherwise the first is returned as the error).
    pub problems: Vec<Error>,
    /// Drive ranges held only by damaged extents.
    pub damaged: Vec<DriveRange>,
    /// Drive ranges that no extent holds.
    pub missing: Vec<DriveRange>,
    /// Drive ranges that intact extents hold with different bytes.
    pub conflicting: Vec<DriveRange>,
    /// The stored drive records, if the index was read and is intact.
    pub records: Option<Vec<DriveRecord>>,
    /// The archive digest: 3.0 recomputed from the header and the index
    /// read; 2.0 as its footer states it; when intact.
    pub archive_digest: Option<[u8; 32]>,
    /// Per drive (header order), the digest check.
    pub digests: Vec<DriveDigestCheck>,
    /// Clusters per drive that arrived behind later ones (header order).
    pub out_of_order: Vec<bool>,
    /// The index the pass built (with [`PassOptions::keep_index`]).
    pub built: Option<BuiltIndex>,
}

impl PassReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Debug for PassReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassReport")
            .field("format", &self.format)
            .field("extents", &self.extents)
            .field("problems", &self.problems)
            .field("damaged", &self.damaged)
            .field("missing", &self.missing)
            .field("conflicting", &self.conflicting)
            .field("digests", &self.digests)
            .finish()
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
    /// Native vma, version 3.
    V3,
    /// Native vma, version 2 (read only).
    V2,
    /// Proxmox VMA version 1.
    VmaV1,
}

impl ArchiveFormat {
    /// The format of an archive whose header states version `major`: 1
    /// for VMA v1 (read into a [`Header`] of that version), 2 or 3
    /// (headers of other versions are refused when decoded).
    pub fn of_version(major: u16) -> ArchiveFormat {
        match major {
            1 => ArchiveFormat::VmaV1,
            2 => ArchiveFormat::V2,
            _ => ArchiveFormat::V3,
        }
    }

    /// Native vma (2.0 or 3.0).
    pub fn is_native(self) -> bool {
        self != ArchiveFormat::VmaV1
    }
}

/// Format-specific state of an open stream.
#[derive(Clone, Copy)]
enum Flavor {
    Native { major: u16, header_digest: [u8; 32] },
    V1 { uuid: [u8; 16] },
}

/// The native header a VMA v1 header corresponds to (no features, no digests).
fn header_from_v1(h: V1Header) -> Header {
    Header {
        version_major: 1,
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
    let len = v1::header_len(&prefix)?;
    let block = input.read_vec(len, "VMA header")?;
    let v1 = V1Header::decode(&block)?;
    let uuid = v1.uuid;
    Ok((header_from_v1(v1), Flavor::V1 { uuid }))
}

/// Read the header block from `input` (after detecting the format).
fn read_header<R: Read>(input: &mut Input<R>) -> Result<(Header, Flavor)> {
    let prefix = input.peek(HEADER_FIXED_LEN)?;
    if prefix.starts_with(&v1::MAGIC) {
        return read_v1_header(input);
    }
    if !prefix.starts_with(&ARCHIVE_MAGIC) {
        let whole = input.peek(crate::read::detect::DESCRIBE_LEN)?.to_vec();
        if let Some((what, hint)) = crate::read::detect::describe_other(&whole) {
            return Err(Error::NotAnArchiveKind {
                name: input.name().to_string(),
                what,
                hint,
            });
        }
        let p = whole[..whole.len().min(DETECT_LEN)].to_vec();
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
    Ok((
        header,
        Flavor::Native {
            major: hp.major,
            header_digest,
        },
    ))
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
        ArchiveFormat::of_version(self.header.version_major)
    }

    /// The archive's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header digest (native archives).
    pub fn header_digest(&self) -> Option<[u8; 32]> {
        match self.flavor {
            Flavor::Native { header_digest, .. } => Some(header_digest),
            Flavor::V1 { .. } => None,
        }
    }

    /// Read every extent, the index and the footer; hand each intact
    /// extent to `sink` in archive order. An incremental 3.0 archive's
    /// drive digests are checked only with a `source` for the leaves of
    /// its unchanged clusters.
    pub fn pass(
        self,
        options: &PassOptions,
        sink: impl FnMut(&Arc<DecodedExtent>) -> Result<()>,
    ) -> Result<PassReport> {
        self.pass_with(options, None, sink)
    }

    /// [`ArchiveStream::pass`] with the leaves of unchanged clusters from `source`.
    pub fn pass_with(
        self,
        options: &PassOptions,
        source: Option<&mut dyn LeafSource>,
        mut sink: impl FnMut(&Arc<DecodedExtent>) -> Result<()>,
    ) -> Result<PassReport> {
        if let Flavor::V1 { uuid } = self.flavor {
            return self.pass_v1(uuid, options, sink);
        }
        let leaves = self.format() == ArchiveFormat::V3 || options.keep_going;
        self.pass_native(
            options,
            source,
            leaves,
            move |bytes, offset, binding, dec, sizes| {
                let mut ext = decode_extent(&bytes, offset, binding, dec)
                    .map_err(|e| claimed(e, &bytes, offset, binding.major))?;
                if leaves {
                    ext.compute_leaves(sizes);
                }
                Ok(ext)
            },
            feed_and_sink(&mut sink),
        )
    }

    /// [`ArchiveStream::pass`], handing each intact extent over as it is
    /// stored (checked: binding, SHA-256, entries, masks; not decoded), for
    /// copying into another archive with [`crate::Writer::append_stored`],
    /// whose workers decode it once for its leaves: the drive digests are
    /// then checked by the writer ([`crate::Writer::expect_drive_digest`])
    /// rather than by the pass. Native archives only.
    pub fn pass_stored(
        self,
        options: &PassOptions,
        mut sink: impl FnMut(StoredExtent) -> Result<()>,
    ) -> Result<PassReport> {
        if matches!(self.flavor, Flavor::V1 { .. }) {
            return Err(Error::Invalid(
                "VMA v1 extents have no stored form to copy".into(),
            ));
        }
        let options = PassOptions {
            hash_drives: HashDrives::None,
            ..options.clone()
        };
        self.pass_native(
            &options,
            None,
            false,
            |bytes, offset, binding, _, _| match StoredExtent::check(bytes, offset, binding) {
                Ok(ext) => Ok(ext),
                Err((e, bytes)) => Err(claimed(e, &bytes, offset, binding.major)),
            },
            |_, ext| sink(ext),
        )
    }

    /// The pass over a native archive: extents are checked by `work` on
    /// worker threads and handed, in archive order and accounted for, to
    /// `handle`.
    fn pass_native<T: Checked + Send + 'static>(
        mut self,
        options: &PassOptions,
        source: Option<&mut dyn LeafSource>,
        leaves: bool,
        work: impl Fn(
                Vec<u8>,
                u64,
                &Binding,
                &mut zstd::bulk::Decompressor<'static>,
                &DriveSizes,
            ) -> Outcome<T>
            + Clone
            + Send
            + 'static,
        mut handle: impl FnMut(&PassState, T) -> Result<()>,
    ) -> Result<PassReport> {
        let Flavor::Native {
            major,
            header_digest,
        } = self.flavor
        else {
            unreachable!("checked by the callers")
        };
        let threads = effective_threads(options.threads);
        let mut state = PassState::new(&self.header, options, major, leaves);
        state.legacy_digest.update(&header_digest);
        let binding = Binding {
            major,
            uuid: self.header.uuid,
            seq: None,
            digest: None,
            zstd_allowed: self.header.incompat & INCOMPAT_ZSTD != 0,
        };
        let sizes: Arc<DriveSizes> = drive_sizes(&self.header.drives).into();
        let mut pool: OrderedPool<(u64, Vec<u8>), Outcome<T>> =
            OrderedPool::new(threads, threads * 2 + 2, || {
                let mut dec = zstd::bulk::Decompressor::new().expect("zstd decompression context");
                let work = work.clone();
                let sizes = sizes.clone();
                move |(offset, bytes): (u64, Vec<u8>)| {
                    work(bytes, offset, &binding, &mut dec, &sizes)
                }
            });
        let (extent_magic, index_magic) = if major >= 3 {
            (EXTENT_MAGIC, INDEX_MAGIC)
        } else {
            (v2::EXTENT_MAGIC, v2::INDEX_MAGIC)
        };
        let header_len = self.input.pos();
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
                        state.extents
                    ),
                ))?;
                break;
            }
            if magic == index_magic {
                if state.index_candidate(input)? {
                    index_at = Some(offset);
                    break;
                }
                state.problem(Error::corrupt(
                    offset,
                    "index magic bytes that do not start this archive's index (stray bytes, or the index of another archive): skipped",
                ))?;
                resync(input, &state)?;
                continue;
            }
            if magic != extent_magic {
                state.problem(Error::corrupt(
                    offset,
                    format!(
                        "expected an extent or the index, found bytes {}",
                        hex::encode(magic)
                    ),
                ))?;
                resync(input, &state)?;
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
            let h = match ExtentFrame::decode(&hb, offset, major) {
                Ok(h) => h,
                Err(e) => {
                    state.problem(e)?;
                    resync(input, &state)?;
                    continue;
                }
            };
            // The binding to this archive and this place comes before
            // anything the extent says about clusters.
            if let Some(why) = state.misplaced(&h, offset, header_len) {
                state.problem(Error::corrupt(offset, why))?;
                match input.read_vec(h.total_len(), "a skipped extent") {
                    Ok(_) => continue,
                    Err(e) => {
                        state.problem(e)?;
                        break;
                    }
                }
            }
            let bytes = match input.read_vec(h.total_len(), &format!("extent #{}", h.seq)) {
                Ok(b) => b,
                Err(e) => {
                    state.problem(e)?;
                    break;
                }
            };
            if let Some(p) = &state.progress {
                p("reading extents", offset, 0);
            }
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
        state.finish(source, Some(header_digest))
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
        let leaves = options.keep_going;
        let mut state = PassState::new(&self.header, options, 1, leaves);
        let sizes = drive_sizes(&self.header.drives);
        let input = &mut self.input;
        let mut seq = 0;
        loop {
            let offset = input.pos();
            let hb = input.peek(v1::EXTENT_HEADER_LEN)?;
            if hb.is_empty() {
                break;
            }
            if hb.len() < v1::EXTENT_HEADER_LEN {
                state.problem(Error::truncated(
                    offset,
                    "the archive ends inside a VMA extent header",
                ))?;
                break;
            }
            let hb: [u8; v1::EXTENT_HEADER_LEN] = hb.try_into().expect("512");
            let h = match V1ExtentHeader::decode(&hb, offset, &uuid) {
                Ok(h) => h,
                Err(e) => {
                    state.problem(e)?;
                    resync_v1(input, &uuid)?;
                    continue;
                }
            };
            input.consume(v1::EXTENT_HEADER_LEN);
            let data = match input.read_vec(h.data_len(), "VMA extent data") {
                Ok(d) => d,
                Err(e) => {
                    state.problem(e)?;
                    break;
                }
            };
            let mut ext = DecodedExtent::from_v1(seq, offset, &h, data);
            if leaves {
                ext.compute_leaves(&sizes);
            }
            state.next_seq = seq;
            seq += 1;
            state.handle(Ok(ext), &mut feed_and_sink(&mut sink))?;
        }
        state.bytes = input.pos();
        state.finish(None, None)
    }
}

/// Skip forward to the next VMA v1 extent header of this archive.
fn resync_v1<R: Read>(input: &mut Input<R>, uuid: &[u8; 16]) -> Result<()> {
    input.consume(1);
    loop {
        let buf = input.peek(1 << 20)?;
        if buf.len() < v1::EXTENT_HEADER_LEN {
            let n = buf.len();
            input.consume(n);
            return Ok(());
        }
        let last = buf.len() - v1::EXTENT_HEADER_LEN;
        let found = (0..=last).find(|&i| {
            buf[i..i + 4] == v1::EXTENT_MAGIC && &buf[i + 8..i + 24] == uuid && {
                let hb: [u8; v1::EXTENT_HEADER_LEN] =
                    buf[i..i + v1::EXTENT_HEADER_LEN].try_into().expect("512");
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
    fn len(&self) -> u64;
    fn entries(&self) -> &[Entry];
    fn digest(&self) -> [u8; 32];
    fn leaves(&self) -> &[(DriveId, u64, Digest)];
    fn stored_blocks(&self) -> Vec<(DriveId, u64)>;
}

impl Checked for DecodedExtent {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn offset(&self) -> u64 {
        self.offset
    }
    fn len(&self) -> u64 {
        self.stored_len
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn digest(&self) -> [u8; 32] {
        self.digest
    }
    fn leaves(&self) -> &[(DriveId, u64, Digest)] {
        DecodedExtent::leaves(self)
    }
    fn stored_blocks(&self) -> Vec<(DriveId, u64)> {
        DecodedExtent::stored_blocks(self)
    }
}

impl Checked for StoredExtent {
    fn seq(&self) -> u64 {
        self.seq()
    }
    fn offset(&self) -> u64 {
        self.offset()
    }
    fn len(&self) -> u64 {
        self.stored_len()
    }
    fn entries(&self) -> &[Entry] {
        self.entries()
    }
    fn digest(&self) -> [u8; 32] {
        self.digest()
    }
    fn leaves(&self) -> &[(DriveId, u64, Digest)] {
        &[]
    }
    fn stored_blocks(&self) -> Vec<(DriveId, u64)> {
        StoredExtent::stored_blocks(self)
    }
}

/// The damage `e` of the extent `bytes` at `offset`, with the entries it
/// claims if they still decode.
fn claimed(e: Error, bytes: &[u8], offset: u64, major: u16) -> (Error, u64, Vec<Entry>) {
    let hb: [u8; EXTENT_HEADER_LEN] = bytes[..EXTENT_HEADER_LEN].try_into().expect("header read");
    let h = ExtentFrame::decode(&hb, offset, major).expect("header checked before");
    let claimed = decode_entries(&h.body_counts(), &bytes[EXTENT_HEADER_LEN..], offset)
        .map(|(e, _)| e)
        .unwrap_or_default();
    (e, h.seq, claimed)
}

/// A pass sink for decoded extents: the 2.0 drive hasher sees each first.
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

/// Skip forward to the next extent header or index of this archive: a
/// header must pass its self-check and its limits and (3.0) name this
/// archive; an index must (3.0) pass its self-check and name this archive,
/// or (2.0) have counts that fit the header. Everything else (an extent of
/// an archive stored inside this one, stray magic bytes) is skipped.
fn resync<R: Read>(input: &mut Input<R>, st: &PassState) -> Result<()> {
    let major = st.major;
    let (extent_magic, index_magic) = if major >= 3 {
        (EXTENT_MAGIC, INDEX_MAGIC)
    } else {
        (v2::EXTENT_MAGIC, v2::INDEX_MAGIC)
    };
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
            if w == index_magic {
                if buf.len() - i < INDEX_FIXED_LEN {
                    found = Some(i); // let the caller look at it
                    break;
                }
                if st.index_fixed_fits(&buf[i..]) {
                    found = Some(i);
                    break;
                }
            }
            if w == extent_magic {
                if buf.len() - i < EXTENT_HEADER_LEN {
                    found = Some(i); // let the caller find it short
                    break;
                }
                let hb: [u8; EXTENT_HEADER_LEN] =
                    buf[i..i + EXTENT_HEADER_LEN].try_into().expect("64");
                if let Ok(h) = ExtentFrame::decode(&hb, 0, major) {
                    if h.uuid.is_none_or(|u| u == st.header.uuid) {
                        found = Some(i);
                        break;
                    }
                }
            }
        }
        match found {
            Some(i) => {
                input.consume(i);
                st.resynced.set(true);
                return Ok(());
            }
            None => {
                let n = buf.len() - 7;
                input.consume(n);
            }
        }
    }
}

/// What the pass read of a stored 3.0 index area.
struct StoredV3 {
    at: u64,
    fixed: IndexFixed,
    fixed_bytes: [u8; INDEX_FIXED_LEN],
    /// Digests of the pages as read, per kind.
    pages: [Vec<Digest>; 3],
    records: Vec<DriveRecord>,
    records_bytes: Vec<u8>,
    directory: Directory,
    directory_bytes: Vec<u8>,
    digest: Digest,
    footer: Option<Footer>,
}

/// What the pass read of a stored 2.0 index block.
struct StoredV2 {
    at: u64,
    index: v2::Index,
    /// SHA-256 of its runs as stored.
    runs_digest: Digest,
    footer: Option<Footer>,
}

pub(crate) struct PassState {
    header: Header,
    keep_going: bool,
    keep_index: bool,
    major: u16,
    builder: Option<IndexBuilder>,
    problems: Vec<Error>,
    /// Extent damage per extent (ranges it claims).
    damaged: Vec<DriveRange>,
    legacy_digest: Sha256,
    next_seq: u64,
    /// Whether the pass skipped bytes since the last intact extent.
    resynced: std::cell::Cell<bool>,
    extents: u64,
    bytes: u64,
    v3: Option<StoredV3>,
    v2: Option<StoredV2>,
    high_water: Vec<u64>,
    out_of_order: Vec<bool>,
    hasher: Option<DriveHasher>,
    progress: Option<ProgressFn>,
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
    fn new(header: &Header, options: &PassOptions, major: u16, leaves: bool) -> Self {
        let n = header.drives.len();
        let keys = if major >= 3 {
            ExtentKeys::Seq
        } else {
            ExtentKeys::Offset
        };
        PassState {
            header: header.clone(),
            keep_going: options.keep_going,
            keep_index: options.keep_index,
            major,
            builder: Some(IndexBuilder::new(
                &header.drives,
                header.parent.is_some(),
                keys,
                leaves,
            )),
            problems: Vec::new(),
            damaged: Vec::new(),
            legacy_digest: Sha256::new(),
            next_seq: 0,
            resynced: std::cell::Cell::new(false),
            extents: 0,
            bytes: 0,
            v3: None,
            v2: None,
            high_water: vec![0; n],
            out_of_order: vec![false; n],
            hasher: (major == 2 && options.hash_drives != HashDrives::None)
                .then(|| DriveHasher::start(header, &options.hash_drives)),
            progress: options.progress.clone(),
            unlisted_problems: 0,
            finishing: false,
        }
    }

    fn builder(&mut self) -> &mut IndexBuilder {
        self.builder
            .as_mut()
            .expect("the builder lives until finish")
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

    /// Why the extent with header `h` at `offset` is not this archive's
    /// extent of this place (3.0): another archive's (uuid), a repeat or
    /// an older copy (seq not ahead), or a seq no extent at this offset
    /// can have. Forward jumps after damage are accepted.
    fn misplaced(&mut self, h: &ExtentFrame, offset: u64, header_len: u64) -> Option<String> {
        if self.major < 3 {
            return None;
        }
        if h.uuid != Some(self.header.uuid) {
            return Some(format!(
                "extent #{} of another archive (uuid {}) where this archive's extent #{} belongs: a foreign extent, skipped and never used",
                h.seq,
                h.uuid.map_or("?".into(), |u| crate::types::uuid_text(&u)),
                self.next_seq
            ));
        }
        if h.seq < self.next_seq {
            return Some(format!(
                "found extent #{} again where extent #{} belongs (a repeated or older copy): skipped and never used",
                h.seq, self.next_seq
            ));
        }
        if h.seq.saturating_mul(MIN_EXTENT_LEN) > offset.saturating_sub(header_len) {
            return Some(format!(
                "extent #{} cannot be at offset {offset} (too few bytes before it for {} extents): misplaced, skipped and never used",
                h.seq, h.seq
            ));
        }
        None
    }

    /// Whether `b` (at least [`INDEX_FIXED_LEN`] bytes from an index magic)
    /// can start this archive's index.
    fn index_fixed_fits(&self, b: &[u8]) -> bool {
        let total: u64 = self.header.drives.iter().map(|d| d.clusters()).sum();
        if self.major >= 3 {
            let fixed: [u8; INDEX_FIXED_LEN] = b[..INDEX_FIXED_LEN].try_into().expect("64");
            match IndexFixed::decode(&fixed, 0) {
                Ok(f) => {
                    f.uuid == self.header.uuid
                        && f.drive_count as usize == self.header.drives.len()
                        && f.run_count <= total
                        && f.leaf_count <= total
                        && f.layout().is_some()
                }
                Err(_) => false,
            }
        } else {
            let fixed: [u8; v2::INDEX_FIXED_LEN] = b[..v2::INDEX_FIXED_LEN].try_into().expect("32");
            let (runs, drives) = v2::Index::counts(&fixed);
            drives as usize == self.header.drives.len() && runs <= total.max(1)
        }
    }

    /// Whether the index magic at the input's position starts this archive's index.
    fn index_candidate<R: Read>(&self, input: &mut Input<R>) -> Result<bool> {
        let b = input.peek(INDEX_FIXED_LEN)?;
        let need = if self.major >= 3 {
            INDEX_FIXED_LEN
        } else {
            v2::INDEX_FIXED_LEN
        };
        if b.len() < need {
            // Too short to tell: let the trailer reader report the truncation.
            return Ok(true);
        }
        let b = b.to_vec();
        Ok(self.index_fixed_fits(&b))
    }

    fn slot(&self, drive: DriveId) -> Option<usize> {
        self.header.slot(drive)
    }

    fn ranges_of(&self, entries: &[Entry]) -> Vec<DriveRange> {
        entries
            .iter()
            .filter_map(|e| {
                self.header
                    .drive_range(e.drive, e.start..e.start + e.count as u64)
            })
            .collect()
    }

    fn handle<T: Checked>(
        &mut self,
        outcome: Outcome<T>,
        sink: &mut impl FnMut(&PassState, T) -> Result<()>,
    ) -> Result<()> {
        match outcome {
            Ok(ext) => {
                let (seq, offset) = (ext.seq(), ext.offset());
                if seq != self.next_seq && self.major < 3 {
                    self.problem(Error::corrupt(
                        offset,
                        format!("found extent #{} where extent #{} was expected (extents lost or reordered)", seq, self.next_seq),
                    ))?;
                } else if seq > self.next_seq && !self.resynced.get() {
                    self.problem(Error::corrupt(
                        offset,
                        format!("found extent #{seq} where extent #{} was expected (extents #{}..#{seq} are missing)", self.next_seq, self.next_seq),
                    ))?;
                }
                self.resynced.set(false);
                self.next_seq = seq + 1;
                let major = self.major;
                let b = self.builder();
                let key =
                    b.add_extent(seq, ArchiveOffset(offset), ext.len() as u32, ext.digest())?;
                for e in ext.entries() {
                    b.add_entry(e.drive, e.kind, e.start, e.count, key)?;
                }
                for &(d, c, l) in ext.leaves() {
                    b.add_leaf(d, c, key, l)?;
                }
                if major == 1 {
                    // v1: stored bytes are the stored blocks themselves.
                    for (d, blocks) in ext.stored_blocks() {
                        b.add_stored_bytes(d, blocks * crate::format::BLOCK_SIZE as u64);
                    }
                } else {
                    let blocks = ext.stored_blocks();
                    let total: u64 = blocks.iter().map(|(_, n)| n).sum();
                    for (d, n) in blocks {
                        b.add_stored_bytes(d, ext.len() * n / total.max(1));
                    }
                }
                for e in ext.entries() {
                    if let Some(slot) = self.slot(e.drive) {
                        if e.start < self.high_water[slot] {
                            self.out_of_order[slot] = true;
                        }
                        let end = e.start + e.count as u64;
                        self.high_water[slot] = self.high_water[slot].max(end);
                    }
                    if e.kind == RunKind::Unchanged && self.header.parent.is_none() {
                        self.problem(Error::corrupt(
                            offset,
                            format!("extent #{seq} has unchanged clusters but the archive has no parent"),
                        ))?;
                    }
                }
                self.legacy_digest.update(&ext.digest());
                self.extents += 1;
                sink(self, ext)
            }
            Err((e, seq, claimed)) => {
                self.resynced.set(false);
                self.next_seq = self.next_seq.max(seq + 1);
                for c in &claimed {
                    self.builder().add_damaged(c.drive, c.start, c.count)?;
                }
                let ranges = self.ranges_of(&claimed);
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

    /// Read a stored 3.0 index area at `at` (its magic already seen): every
    /// page is hashed as it streams by; the fixed part, records and
    /// directory are kept (small).
    fn read_index_v3<R: Read>(&mut self, input: &mut Input<R>, at: u64) -> Result<StoredV3> {
        let fixed_bytes: [u8; INDEX_FIXED_LEN] = input.read_array("index")?;
        let fixed = IndexFixed::decode(&fixed_bytes, at)?;
        let Some(layout) = fixed.layout() else {
            return Err(Error::corrupt(at, "index counts overflow"));
        };
        if fixed.uuid != self.header.uuid || fixed.drive_count as usize != self.header.drives.len()
        {
            return Err(Error::corrupt(
                at,
                "the index names another archive or another number of drives",
            ));
        }
        let mut pages: [Vec<Digest>; 3] = Default::default();
        for (k, kind) in [PageKind::Runs, PageKind::Extents, PageKind::Leaves]
            .into_iter()
            .enumerate()
        {
            for i in 0..layout.pages(kind) {
                let (_, len, _) = layout.page(kind, i);
                let bytes = input.read_vec(len as usize, kind.name())?;
                pages[k].push(crate::digest::sha256(&bytes));
            }
        }
        let records_len = fixed.drive_count as usize * DRIVE_RECORD_LEN;
        let records_bytes = input.read_vec(records_len, "index drive records")?;
        let rec_at = at + layout.records_at;
        let mut records = Vec::new();
        for (i, r) in records_bytes.chunks_exact(DRIVE_RECORD_LEN).enumerate() {
            records.push(DriveRecord::decode(
                r,
                rec_at + (i * DRIVE_RECORD_LEN) as u64,
            )?);
        }
        let dir_len = (layout.digest_at - layout.directory_at) as usize;
        let directory_bytes = input.read_vec(dir_len, "index directory")?;
        let directory = Directory::decode(&directory_bytes, &layout);
        let digest: Digest = input.read_array("index digest")?;
        Ok(StoredV3 {
            at,
            fixed,
            fixed_bytes,
            pages,
            records,
            records_bytes,
            directory,
            directory_bytes,
            digest,
            footer: None,
        })
    }

    /// Read the footer after the index found at `at` and check that
    /// nothing follows it. Damage is a problem; None when the footer does
    /// not decode. A 2.0 footer must point to `at` (3.0 checks its footer
    /// against the index when finishing).
    fn read_footer<R: Read>(&mut self, input: &mut Input<R>, at: u64) -> Result<Option<Footer>> {
        let footer_at = input.pos();
        let decoded = input.read_array::<FOOTER_LEN>("footer").and_then(|fb| {
            if self.major >= 3 {
                Footer::decode(&fb, footer_at)
            } else {
                v2::decode_footer(&fb, footer_at)
            }
        });
        let footer = match decoded {
            Ok(f) => {
                if self.major < 3 && f.index_offset != at {
                    self.problem(Error::corrupt(
                        footer_at,
                        format!(
                            "footer points to the index at {} but it is at {at}",
                            f.index_offset
                        ),
                    ))?;
                }
                Some(f)
            }
            Err(e) => {
                self.problem(e)?;
                None
            }
        };
        if footer.is_some() && !input.at_eof()? {
            self.problem(Error::corrupt(
                input.pos(),
                "unexpected bytes after the footer",
            ))?;
        }
        Ok(footer)
    }

    /// The stored 2.0 index block at `at` (its footer not read yet).
    fn read_index_v2<R: Read>(&mut self, input: &mut Input<R>, at: u64) -> Result<StoredV2> {
        let fixed: [u8; v2::INDEX_FIXED_LEN] = input.read_array("index")?;
        let max_len = 1u64 << 40;
        let len = v2::Index::block_len(&fixed, at, max_len)?;
        let mut block = fixed.to_vec();
        input.read_into(&mut block, len - v2::INDEX_FIXED_LEN, "index")?;
        let index = v2::Index::decode(&block, at)?;
        let runs_end = v2::INDEX_FIXED_LEN + index.runs.len() * v2::INDEX_RUN_LEN;
        let runs_digest = crate::digest::sha256(&block[v2::INDEX_FIXED_LEN..runs_end]);
        self.legacy_digest.update(&block[block.len() - 32..]);
        Ok(StoredV2 {
            at,
            index,
            runs_digest,
            footer: None,
        })
    }

    /// Read the index found at `at` and the footer after it. The index is
    /// kept only when it reads whole: its first damage is a problem, and
    /// no footer is looked for after it.
    fn read_trailer<R: Read>(&mut self, input: &mut Input<R>, at: u64) -> Result<()> {
        let read = if self.major >= 3 {
            self.read_index_v3(input, at).map(|i| self.v3 = Some(i))
        } else {
            self.read_index_v2(input, at).map(|i| self.v2 = Some(i))
        };
        if let Err(e) = read {
            return self.problem(e);
        }
        let footer = self.read_footer(input, at)?;
        if let Some(v3) = &mut self.v3 {
            v3.footer = footer;
        } else if let Some(v2) = &mut self.v2 {
            v2.footer = footer;
        }
        Ok(())
    }

    fn finish(
        mut self,
        source: Option<&mut dyn LeafSource>,
        header_digest: Option<[u8; 32]>,
    ) -> Result<PassReport> {
        // What is found about the whole archive is always listed.
        self.finishing = true;
        if self.unlisted_problems > 0 {
            let n = self.unlisted_problems;
            self.problem(Error::Limit(format!(
                "{n} more problems in extents were found after the first {MAX_LISTED_PROBLEMS} and are not listed"
            )))?;
        }
        let clean_so_far = self.problems.is_empty();
        let drives = self.header.drives.clone();
        let mut builder = self.builder.take().expect("the builder lives until finish");
        // Interrupted drives have no digest; the flag is the index's.
        if let Some(s) = &self.v3 {
            for r in &s.records {
                builder.set_interrupted(r.drive, r.interrupted);
            }
        }
        let progress = self.progress.clone();
        let mut report = |done: u64, total: u64| {
            if let Some(p) = &progress {
                // In logical bytes of the drives walked.
                let cs = crate::format::CLUSTER_SIZE as u64;
                p("checking the index", done * cs, total * cs);
            }
        };
        let built = builder.finish(FinishOptions {
            lenient: self.keep_going,
            source,
            keep_pages: self.keep_index,
            uuid: self.header.uuid,
            progress: Some(&mut report),
        })?;
        for p in built.problems.iter() {
            self.problems.push(clone_error(p));
        }
        if !built.missing.is_empty() {
            self.problem(incomplete_from_ranges(&drives, &built.missing))?;
        }
        let mut records = None;
        let mut archive = None;
        let mut digests: Vec<DriveDigestCheck> = vec![DriveDigestCheck::NotChecked; drives.len()];
        if let Some(s) = self.v3.take() {
            let ok = self.check_v3(&s, &built, header_digest, clean_so_far)?;
            if ok.0 {
                records = Some(s.records.clone());
            }
            archive = ok.1;
            for (slot, d) in drives.iter().enumerate() {
                let recorded = s.records.get(slot).and_then(|r| r.digest);
                let lost = built.lost_any_of(d.id);
                digests[slot] = match (recorded, built.roots[slot]) {
                    (None, _) => DriveDigestCheck::NotRecorded,
                    (Some(_), _) if lost => DriveDigestCheck::NotChecked,
                    (Some(_), None) => DriveDigestCheck::NotChecked,
                    (Some(want), Some(got)) if want == got => DriveDigestCheck::Match(got),
                    (Some(want), Some(got)) => {
                        self.problem(Error::DriveDigestMismatch {
                            drive_name: d.name.clone(),
                            expected: hex::encode(want),
                            found: hex::encode(got),
                        })?;
                        DriveDigestCheck::Mismatch {
                            expected: want,
                            found: got,
                        }
                    }
                };
            }
        } else if let Some(s) = self.v2.take() {
            let intact = self.check_v2(&s, &built, clean_so_far)?;
            if intact {
                records = Some(s.index.drives.clone());
                archive = s.footer.map(|f| f.archive_digest);
            }
            digests = self.v2_digests(&drives, &s, &built)?;
        } else if self.major == 1 {
            digests = vec![DriveDigestCheck::NotRecorded; drives.len()];
        }
        if self.major == 1 {
            records = Some(built.records.clone());
        }
        let mut damaged = self.damaged;
        damaged.clear();
        damaged.extend(built.damaged.iter().cloned());
        let format = match self.major {
            3 => ArchiveFormat::V3,
            2 => ArchiveFormat::V2,
            _ => ArchiveFormat::VmaV1,
        };
        let keep = self.keep_index;
        Ok(PassReport {
            header: self.header,
            format,
            extents: self.extents,
            bytes: self.bytes,
            problems: self.problems,
            damaged,
            missing: built.missing.clone(),
            conflicting: built.conflicting.clone(),
            records,
            archive_digest: archive,
            digests,
            out_of_order: self.out_of_order,
            built: keep.then_some(built),
        })
    }

    /// Compare a stored 3.0 index with the one rebuilt from the extents;
    /// returns whether the stored one is intact, and the archive digest.
    fn check_v3(
        &mut self,
        s: &StoredV3,
        built: &BuiltIndex,
        header_digest: Option<[u8; 32]>,
        compare: bool,
    ) -> Result<(bool, Option<[u8; 32]>)> {
        let at = s.at;
        let mut intact = true;
        // The pages as read against the directory.
        for (k, kind) in [PageKind::Runs, PageKind::Extents, PageKind::Leaves]
            .into_iter()
            .enumerate()
        {
            for (i, d) in s.pages[k].iter().enumerate() {
                if s.directory.digest(kind, i as u64) != Some(*d) {
                    intact = false;
                    self.problem(Error::corrupt(
                        at,
                        format!(
                            "{} {i} of the index does not match its digest in the directory",
                            kind.name()
                        ),
                    ))?;
                }
            }
        }
        let computed = index_digest(&s.fixed_bytes, &s.records_bytes, &s.directory_bytes);
        if !check_matches(&s.digest, &computed) {
            intact = false;
            self.problem(Error::corrupt(
                at + s.fixed.layout().map_or(0, |l| l.digest_at),
                "the index digest does not match the index",
            ))?;
        }
        let archive = header_digest.map(|h| archive_digest(&h, &computed));
        if let Some(f) = s.footer {
            if f.index_offset != at || f.index_len != s.fixed.layout().map_or(0, |l| l.len) {
                intact = false;
                self.problem(Error::corrupt(
                    at,
                    format!(
                        "the footer points to an index at {}+{}, not this one",
                        f.index_offset, f.index_len
                    ),
                ))?;
            }
            if f.extent_count != self.extents || s.fixed.extent_count != self.extents {
                self.problem(Error::corrupt(
                    at,
                    format!(
                        "the footer counts {} extents and the index {}, the archive has {}",
                        f.extent_count, s.fixed.extent_count, self.extents
                    ),
                ))?;
            }
            if archive.is_some_and(|a| !check_matches(&f.archive_digest, &a)) {
                intact = false;
                self.problem(Error::corrupt(
                    at,
                    "the archive digest in the footer does not match the archive",
                ))?;
            }
        } else {
            intact = false;
        }
        if !intact || !compare {
            return Ok((intact && compare, archive.filter(|_| intact)));
        }
        // The stored index must be exactly what the extents say.
        let mut differs = Vec::new();
        let leaves = built.has_leaves;
        let fixed = IndexFixed {
            leaf_count: if leaves {
                built.fixed.leaf_count
            } else {
                s.fixed.leaf_count
            },
            ..built.fixed
        };
        if fixed != s.fixed {
            differs.push(format!(
                "its counts (runs {}, extents {}, leaves {}; the extents make {}, {}, {})",
                s.fixed.run_count,
                s.fixed.extent_count,
                s.fixed.leaf_count,
                built.fixed.run_count,
                built.fixed.extent_count,
                built.fixed.leaf_count
            ));
        }
        for (kind, a, b) in [(
            PageKind::Runs,
            built
                .directory
                .runs
                .iter()
                .map(|k| (k.drive, k.start, k.first_leaf, k.digest))
                .collect::<Vec<_>>(),
            s.directory
                .runs
                .iter()
                .map(|k| (k.drive, k.start, k.first_leaf, k.digest))
                .collect::<Vec<_>>(),
        )] {
            if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
                differs.push(format!("{} {i}", kind.name()));
            }
        }
        for (kind, a, b) in [
            (
                PageKind::Extents,
                &built.directory.extents,
                &s.directory.extents,
            ),
            (
                PageKind::Leaves,
                &built.directory.leaves,
                &s.directory.leaves,
            ),
        ] {
            if kind == PageKind::Leaves && !leaves {
                continue;
            }
            if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
                differs.push(format!("{} {i}", kind.name()));
            }
        }
        for (b, r) in built.records.iter().zip(&s.records) {
            let same = b.drive == r.drive
                && b.data_clusters == r.data_clusters
                && b.stored_bytes == r.stored_bytes
                && b.first_run == r.first_run
                && b.run_count == r.run_count
                && b.first_leaf == r.first_leaf
                && b.interrupted == r.interrupted
                && b.unchanged == r.unchanged
                && r.digest.is_some() != r.interrupted;
            if !same {
                let name = self.header.drive(r.drive).map_or("?", |d| d.name.as_str());
                differs.push(format!("the record of drive {name}"));
            }
        }
        if !differs.is_empty() {
            self.problem(Error::corrupt(
                at,
                format!(
                    "the index disagrees with the extents: {}",
                    differs.join(", ")
                ),
            ))?;
            return Ok((false, archive));
        }
        Ok((true, archive))
    }

    /// Compare a stored 2.0 index with the runs rebuilt from the extents.
    fn check_v2(&mut self, s: &StoredV2, built: &BuiltIndex, compare: bool) -> Result<bool> {
        let at = s.at;
        if let Some(f) = s.footer {
            if f.extent_count != self.extents {
                self.problem(Error::corrupt(
                    at,
                    format!(
                        "footer counts {} extents, the archive has {}",
                        f.extent_count, self.extents
                    ),
                ))?;
            }
            let digest = std::mem::take(&mut self.legacy_digest).finish();
            if !check_matches(&f.archive_digest, &digest) {
                self.problem(Error::corrupt(
                    at,
                    "archive digest in the footer does not match the archive",
                ))?;
                return Ok(false);
            }
        }
        if !compare {
            return Ok(false);
        }
        let ids: Vec<(DriveId, u64)> = s
            .index
            .drives
            .iter()
            .map(|r| (r.drive, r.data_clusters))
            .collect();
        let expected: Vec<(DriveId, u64)> = built
            .records
            .iter()
            .map(|r| (r.drive, r.data_clusters))
            .collect();
        if built.runs_digest() != s.runs_digest || ids != expected {
            self.problem(Error::corrupt(
                at,
                format!(
                    "the index disagrees with the extents ({} runs stored, {} rebuilt)",
                    s.index.runs.len(),
                    built.fixed.run_count
                ),
            ))?;
            return Ok(false);
        }
        Ok(s.footer.is_some())
    }

    /// 2.0 whole-drive SHA-256 checks.
    fn v2_digests(
        &mut self,
        drives: &[DriveInfo],
        s: &StoredV2,
        built: &BuiltIndex,
    ) -> Result<Vec<DriveDigestCheck>> {
        let computed = self.hasher.take().map(DriveHasher::finish);
        let mut digests = Vec::with_capacity(drives.len());
        for (slot, d) in drives.iter().enumerate() {
            let recorded = s
                .index
                .drives
                .iter()
                .find(|r| r.drive == d.id)
                .and_then(|r| r.digest);
            let lost = built.lost_any_of(d.id);
            let check = match (&computed, recorded) {
                (None, _) => DriveDigestCheck::Skipped,
                (_, None) => DriveDigestCheck::NotRecorded,
                (Some(_), Some(_)) if lost => DriveDigestCheck::NotChecked,
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
        Ok(digests)
    }
}

/// A copy of an error found by the index builder (its kinds are simple).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Corrupt { offset, what } => Error::Corrupt {
            offset: *offset,
            what: what.clone(),
        },
        Error::Duplicate { what, ranges } => Error::Duplicate {
            what: what.clone(),
            ranges: ranges.clone(),
        },
        Error::Conflicting { what, ranges } => Error::Conflicting {
            what: what.clone(),
            ranges: ranges.clone(),
        },
        Error::Incomplete { summary, ranges } => Error::Incomplete {
            summary: summary.clone(),
            ranges: ranges.clone(),
        },
        other => Error::Invalid(other.to_string()),
    }
}

/// The error for clusters that never appear: per drive how many of how
/// many are missing, and where (drive byte ranges).
pub(crate) fn incomplete_error(
    drives: &[DriveInfo],
    gaps: &[(DriveId, std::ops::Range<u64>)],
) -> Error {
    let ranges: Vec<DriveRange> = gaps
        .iter()
        .filter_map(|(id, g)| Some(drives.iter().find(|d| d.id == *id)?.range(g.clone())))
        .collect();
    incomplete_from_ranges(drives, &ranges)
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

/// Hashes drives of a 2.0 archive (plain SHA-256, the 2.0 drive digest)
/// on a thread of its own as their clusters stream past in order.
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
                    hash: DriveHash,
                    state: Option<HashOutcome>,
                }
                let mut s: Vec<S> = skip
                    .iter()
                    .zip(&drives)
                    .map(|(&skipped, d)| S {
                        hash: DriveHash::new(DriveDigestKind::Sha256, d.size),
                        state: skipped.then_some(HashOutcome::Skipped),
                    })
                    .collect();
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
                                if st.state.is_none() && e.start != st.hash.next_cluster() {
                                    st.state = Some(HashOutcome::OutOfOrder);
                                }
                                // A run past the drive's end is damage the pass reports.
                                if st.state.is_none()
                                    && (end > drives[i].clusters() || e.kind == RunKind::Unchanged)
                                {
                                    st.state = Some(HashOutcome::Spoiled);
                                }
                                if st.state.is_some() {
                                    run_data.for_each(drop);
                                    continue;
                                }
                                let mut fed = if e.kind == RunKind::Zero {
                                    st.hash.push_zeros(e.start, e.count as u64)
                                } else {
                                    Ok(())
                                };
                                for (k, d) in run_data.enumerate() {
                                    let c = e.start + k as u64;
                                    let len = cluster_len(size, ClusterNo(c));
                                    fed = fed.and_then(|()| match d {
                                        crate::extent::ClusterData::Data { mask, blocks }
                                            if mask == u16::MAX && len == CLUSTER_SIZE =>
                                        {
                                            st.hash.push_cluster(c, blocks)
                                        }
                                        other => {
                                            other.expand_into(&mut cluster_buf[..len]);
                                            st.hash.push_cluster(c, &cluster_buf[..len])
                                        }
                                    });
                                }
                                if fed.is_err() || st.hash.next_cluster() != end {
                                    st.state = Some(HashOutcome::Spoiled);
                                }
                            }
                        }
                    }
                }
                s.into_iter()
                    .map(|st| match (st.state, st.hash.finish()) {
                        (Some(state), _) => state,
                        (None, Ok(digest)) => HashOutcome::Done(digest),
                        (None, Err(_)) => HashOutcome::Spoiled,
                    })
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
    use crate::format::{CompressionInfo, DriveInfo, MAX_CLUSTERS, VERSION_MAJOR};
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// A header of one 64 KiB drive, followed by one extent holding its
    /// data cluster and a zero run of `zero_count` clusters after it (no
    /// index: the archive is incomplete).
    pub(crate) fn archive_with_zero_run(zero_count: u32) -> Vec<u8> {
        let header = Header {
            version_major: VERSION_MAJOR,
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
        let sizes = drive_sizes(&header.drives);
        bytes.extend_from_slice(&encode_extent(raw, [7; 16], 0, None, &sizes).unwrap().bytes);
        bytes
    }

    /// One pass on one thread over `stream`, going on past damage.
    fn lenient_pass<R: Read>(stream: ArchiveStream<R>) -> PassReport {
        let options = PassOptions {
            threads: 1,
            keep_going: true,
            ..Default::default()
        };
        stream.pass(&options, |_| Ok(())).unwrap()
    }

    /// Whether one of `report`'s problems says `text`.
    fn has_problem(report: &PassReport, text: &str) -> bool {
        report.problems.iter().any(|p| p.to_string().contains(text))
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
        let sizes = [CLUSTER_SIZE as u64; 256];
        let mut extent = encode_extent(raw, [7; 16], 0, None, &sizes).unwrap().bytes;
        let n = extent.len();
        extent[n - 1] ^= 1; // its SHA-256
        let mut packer = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        packer.write_all(&header).unwrap();
        for _ in 0..200_000 {
            packer.write_all(&extent).unwrap();
        }
        let packed = packer.finish().unwrap();
        assert!(packed.len() < 64 << 10, "{} bytes", packed.len());
        let (stream, _) =
            crate::read::detect::open_any(std::io::Cursor::new(packed), "bomb").unwrap();
        let report = lenient_pass(stream);
        assert!(
            report.problems.len() <= MAX_LISTED_PROBLEMS + 3,
            "{}",
            report.problems.len()
        );
        assert!(
            has_problem(
                &report,
                "more problems in extents were found after the first 1000"
            ),
            "{:?}",
            report.problems.last()
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
        let report = lenient_pass(stream);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            has_problem(
                &report,
                "clusters 1..2147483648 of drive d which has only 1"
            ),
            "{:?}",
            report.problems
        );
        assert_eq!(report.digests, vec![DriveDigestCheck::NotChecked]);
    }
}

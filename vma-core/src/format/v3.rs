//! On-disk structures of the native vma format, version 3, and their byte
//! encodings. No I/O happens here: every function turns bytes into values or
//! values into bytes. `format-spec.md` at the repository root is the
//! normative description; the constants below must never change for 3.x.
//! What archives of version 2.0 look like (read, never written) is in
//! [`super::v2`].
//!
//! All integers are little-endian.

use super::field::{fixed_block, FieldReader, FieldWriter, FixedBlock};
use super::v2;
use crate::digest::{check_matches, Sha256};

use crate::error::{Error, Result};
use crate::types::{
    cluster_range_bytes, clusters_for, ArchiveOffset, DriveId, DriveRange, ExtentRef,
};

/// Magic at offset 0 of every native archive (2.0 and 3.0). Never change.
pub const ARCHIVE_MAGIC: [u8; 8] = *b"\x89VMA\r\n\x1a\n";
/// Magic of every 3.0 extent header. Never change.
pub const EXTENT_MAGIC: [u8; 8] = *b"VMA3EXT\0";
/// Magic of the 3.0 index area. Never change.
pub const INDEX_MAGIC: [u8; 8] = *b"VMA3IDX\0";
/// Magic of the 3.0 footer. Never change.
pub const FOOTER_MAGIC: [u8; 8] = *b"VMA3END\0";

/// Major version written by this code (2 is still read, see [`v2`]).
pub const VERSION_MAJOR: u16 = 3;
/// Minor version written by this code.
pub const VERSION_MINOR: u16 = 0;

// The cluster geometry is a unit of every layer; it is defined with the
// value types below the formats and is part of this format's spec.
pub use crate::types::{BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE};

/// Incompatible feature: some extents are zstd-compressed.
pub const INCOMPAT_ZSTD: u64 = 1 << 0;
/// Incompatible feature: the archive is incremental (has a parent and may hold
/// "unchanged" runs).
pub const INCOMPAT_PARENT: u64 = 1 << 1;
/// Every incompatible feature this code understands.
pub const KNOWN_INCOMPAT: u64 = INCOMPAT_ZSTD | INCOMPAT_PARENT;
/// Compatible feature: the archive holds the point in time of other
/// archives (it stands in for them as a parent); the list is the header's
/// last config entry, named [`STANDS_FOR_CONFIG`].
pub const COMPAT_STANDS_FOR: u64 = 1 << 0;
/// Name of the config entry that holds the stand-in list (with
/// [`COMPAT_STANDS_FOR`]). Never change.
pub const STANDS_FOR_CONFIG: &str = "vma-stands-for";
/// Bytes of one archive reference (the parent reference, a stand-in list
/// item): uuid, archive digest and state digest.
pub const ARCHIVE_REF_LEN: usize = 80;

/// Size of the fixed part of the header.
pub const HEADER_FIXED_LEN: usize = 64;
/// Size of an extent header.
pub const EXTENT_HEADER_LEN: usize = 64;
/// Size of one run entry inside an extent.
pub const ENTRY_LEN: usize = 16;
/// Size of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;
/// The smallest extent: a header, one entry, no masks, no payload, a digest.
pub const MIN_EXTENT_LEN: u64 = (EXTENT_HEADER_LEN + ENTRY_LEN + DIGEST_LEN) as u64;
/// Size of the fixed part of the index area.
pub const INDEX_FIXED_LEN: usize = 64;
/// Size of one run in a run page.
pub const INDEX_RUN_LEN: usize = 24;
/// Size of one record of the extent table.
pub const EXTENT_RECORD_LEN: usize = 48;
/// Size of one leaf digest in a leaf page.
pub const LEAF_LEN: usize = 32;
/// Size of one drive record in the index area.
pub const DRIVE_RECORD_LEN: usize = 80;
/// Size of one run page's directory entry.
pub const RUN_KEY_LEN: usize = 56;
/// Size of one extent or leaf page's directory entry (its digest).
pub const PAGE_DIGEST_LEN: usize = 32;
/// Size of the footer at the very end of a complete archive.
pub const FOOTER_LEN: usize = 80;
/// Runs per run page written by this code.
pub const RUNS_PER_PAGE: u16 = 4096;
/// Extent records per extent-table page written by this code.
pub const EXTENTS_PER_PAGE: u16 = 2048;
/// Leaf digests per leaf page written by this code.
pub const LEAVES_PER_PAGE: u16 = 2048;
/// No drive has more clusters than this (from [`limits::MAX_DRIVE_SIZE`]).
pub const MAX_CLUSTERS: u64 = limits::MAX_DRIVE_SIZE / CLUSTER_SIZE as u64;

/// Written limits, enforced when reading and when writing.
pub mod limits {
    /// At most this many drives (ids 1..=255).
    pub const MAX_DRIVES: usize = 255;
    /// At most this many config blobs (the stand-in list counts as one).
    pub const MAX_CONFIGS: usize = 256;
    /// A stand-in list names at most this many archives.
    pub const MAX_STANDS_FOR: usize = 64;
    /// A config blob holds at most 16 MiB.
    pub const MAX_CONFIG_SIZE: usize = 16 << 20;
    /// The whole header block (configs included) is at most 64 MiB.
    pub const MAX_HEADER_LEN: usize = 64 << 20;
    /// Names (drives, configs) are 1..=255 bytes of UTF-8.
    pub const MAX_NAME_LEN: usize = 255;
    /// The creator string is at most 255 bytes.
    pub const MAX_CREATOR_LEN: usize = 255;
    /// A drive is at most 128 TiB.
    pub const MAX_DRIVE_SIZE: u64 = 1 << 47;
    /// An extent holds at most this many run entries.
    pub const MAX_EXTENT_ENTRIES: usize = 65_536;
    /// An extent's decoded payload is at most 16 MiB.
    pub const MAX_EXTENT_RAW: usize = 16 << 20;
    /// An extent's stored payload is at most 16 MiB plus 64 KiB.
    pub const MAX_EXTENT_STORED: usize = (16 << 20) + (64 << 10);
}

/// Kinds of cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RunKind {
    /// Clusters whose non-zero blocks are stored in the extent payload.
    Data,
    /// Clusters that are entirely zero; nothing stored.
    Zero,
    /// Clusters identical to the parent archive's (incremental archives only).
    Unchanged,
}

impl RunKind {
    /// The kind's code on disk.
    pub fn code(self) -> u8 {
        match self {
            RunKind::Data => 0,
            RunKind::Zero => 1,
            RunKind::Unchanged => 2,
        }
    }

    /// The kind with code `code`, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(RunKind::Data),
            1 => Some(RunKind::Zero),
            2 => Some(RunKind::Unchanged),
            _ => None,
        }
    }
}

/// Extent payload encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Payload stored as is.
    None,
    /// Payload is one zstd frame.
    Zstd,
}

impl Codec {
    /// The codec's code on disk.
    pub fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
        }
    }

    /// The codec with code `code`, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// A drive as listed in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveInfo {
    /// Id, unique within the archive.
    pub id: DriveId,
    /// UTF-8 name (a safe file name, see [`check_name`]).
    pub name: String,
    /// Exact size in bytes.
    pub size: u64,
}

impl DriveInfo {
    /// Number of clusters the drive spans.
    pub fn clusters(&self) -> u64 {
        clusters_for(self.size)
    }

    /// The bytes of clusters `clusters` of this drive (clipped to its
    /// size), named for messages and reports.
    pub fn range(&self, clusters: std::ops::Range<u64>) -> DriveRange {
        DriveRange {
            drive: self.id,
            drive_name: self.name.clone(),
            bytes: cluster_range_bytes(self.size, clusters),
        }
    }
}

/// A named configuration blob (VM config, firewall rules, NVRAM, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigBlob {
    /// UTF-8 name (a safe file name).
    pub name: String,
    /// The blob's bytes.
    pub data: Vec<u8>,
}

/// An archive's identity: its uuid, archive digest and (3.0) state digest.
/// An incremental archive names its parent this way; a stand-in names the
/// archives whose point in time it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParentRef {
    /// The archive's uuid.
    pub uuid: [u8; 16],
    /// The archive's archive digest (see [`archive_digest`]; for 2.0, the
    /// value in its footer).
    pub digest: [u8; 32],
    /// The state digest of its point in time (see
    /// [`crate::tree::state_digest`]); absent in 2.0 headers.
    pub state: Option<[u8; 32]>,
}

impl ParentRef {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.uuid);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.state.unwrap_or([0; 32]));
    }

    fn decode(c: &mut FieldReader<'_>, major: u16) -> Result<ParentRef> {
        Ok(ParentRef {
            uuid: c.bytes()?,
            digest: c.bytes()?,
            state: if major >= 3 { Some(c.bytes()?) } else { None },
        })
    }

    /// Whether `self` and `other` name the same archive (uuid and archive
    /// digest; the state digest is compared where both have one).
    pub fn same_archive(&self, other: &ParentRef) -> bool {
        self.uuid == other.uuid
            && self.digest == other.digest
            && match (self.state, other.state) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Bytes of an archive reference in a header of major version `major`.
pub fn archive_ref_len(major: u16) -> usize {
    if major >= 3 {
        ARCHIVE_REF_LEN
    } else {
        v2::ARCHIVE_REF_LEN
    }
}

/// Informational record of how the writer compressed (not needed to read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressionInfo {
    /// Codec the writer used by default.
    pub codec: Codec,
    /// Level the writer used (zstd level; 0 for none).
    pub level: i8,
}

/// The archive header: identity, drives and config blobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Major version: 3 (written), or 2 (read only).
    pub version_major: u16,
    /// Minor version.
    pub version_minor: u16,
    /// Incompatible feature bits.
    pub incompat: u64,
    /// Compatible feature bits (unknown ones are ignored).
    pub compat: u64,
    /// Archive uuid.
    pub uuid: [u8; 16],
    /// Creation time, seconds since the Unix epoch (UTC).
    pub ctime: i64,
    /// How the writer compressed.
    pub compression: CompressionInfo,
    /// Program that wrote the archive.
    pub creator: String,
    /// Parent reference, for incremental archives.
    pub parent: Option<ParentRef>,
    /// Drives, in id order.
    pub drives: Vec<DriveInfo>,
    /// Config blobs, in archive order (without the stand-in list).
    pub configs: Vec<ConfigBlob>,
    /// The archives whose point in time this one holds (a synthetic full
    /// stands in for the archive it was merged from), newest first; their
    /// children resolve against this archive. Stored with
    /// [`COMPAT_STANDS_FOR`] as the last config entry.
    pub stands_for: Vec<ParentRef>,
}

/// Reasons a name is refused; names become file names on extraction.
pub fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > limits::MAX_NAME_LEN {
        Some("longer than 255 bytes")
    } else if name == "." || name == ".." {
        Some("refers to a directory")
    } else if name.contains('/') || name.contains('\\') {
        Some("contains a path separator")
    } else if name.chars().any(|c| c.is_control()) {
        Some("contains NUL or control characters")
    } else {
        None
    };
    match reason {
        Some(r) => Err(Error::InvalidName {
            name: name.to_string(),
            reason: r.to_string(),
        }),
        None => Ok(()),
    }
}

pub use crate::digest::sha256;

/// The 8-byte self-check of fixed-size structures: first 8 bytes of SHA-256.
pub fn short_check(data: &[u8]) -> [u8; 8] {
    sha256(data)[..8].try_into().expect("8 bytes")
}

/// A fixed block whose bytes before its self-check are `b`, with the
/// self-check appended: `b` must be `N - 8` bytes long.
pub(super) fn sealed<const N: usize>(mut b: Vec<u8>) -> [u8; N] {
    let check = short_check(&b);
    b.extend_from_slice(&check);
    b.try_into().expect("the layout ends with its 8-byte check")
}

/// Check that field `field` of the block read by `r` holds `magic`; else
/// the error says it expected `what` ("the index") and what a wrong magic
/// means there (`meaning`, appended as is: empty, or ": ...").
pub(super) fn expect_magic(
    r: &FieldReader<'_>,
    field: super::field::Field,
    magic: &[u8],
    what: &str,
    meaning: &str,
) -> Result<()> {
    let found = r.field(field)?;
    if found == magic {
        return Ok(());
    }
    Err(Error::corrupt(
        r.offset_of(field),
        format!(
            "expected {what} (magic {}), found {}{meaning}",
            hex::encode(magic),
            hex::encode(found)
        ),
    ))
}

/// Check that the self-check field `check` of block `b` (read by `r`)
/// matches the bytes before it; else the error is `damaged`, at the
/// block's start.
pub(super) fn expect_self_check(
    r: &FieldReader<'_>,
    b: &[u8],
    check: super::field::Field,
    damaged: &str,
) -> Result<()> {
    if check_matches(r.field(check)?, &short_check(&b[..check.at])) {
        Ok(())
    } else {
        Err(Error::corrupt(r.start(), damaged))
    }
}

fn names_of_bits(bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| format!("bit {b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fixed_block!(HeaderPrefix = "header", HEADER_FIXED_LEN;
    MAGIC("magic", 8),
    VERSION_MAJOR("version_major", 2),
    VERSION_MINOR("version_minor", 2),
    HEADER_LEN("header_len", 4),
    INCOMPAT("incompat", 8),
    COMPAT("compat", 8),
    UUID("uuid", 16),
    CTIME("ctime", 8),
    DRIVE_COUNT("drive_count", 2),
    CONFIG_COUNT("config_count", 2),
    CODEC("codec", 1),
    LEVEL("level", 1),
    CREATOR_LEN("creator_len", 2),
);

/// What the fixed 64 bytes at the start of an archive say before the rest is read.
#[derive(Clone, Copy, Debug)]
pub struct HeaderPrefix {
    /// Major version (2 or 3).
    pub major: u16,
    /// Total length of the header block including its digest.
    pub header_len: usize,
}

impl HeaderPrefix {
    /// Check magic, version, features and length of the first 64 bytes.
    pub fn decode(fixed: &[u8; HEADER_FIXED_LEN]) -> Result<Self> {
        if fixed[Self::MAGIC.range()] != ARCHIVE_MAGIC {
            return Err(Error::NotAnArchive {
                found: hex::encode(&fixed[Self::MAGIC.range()]),
            });
        }
        let c = FieldReader::block::<Self>(fixed, 0);
        let major = c.u16_le_at(Self::VERSION_MAJOR)?;
        let minor = c.u16_le_at(Self::VERSION_MINOR)?;
        if major != VERSION_MAJOR && major != v2::VERSION_MAJOR {
            return Err(Error::UnsupportedVersion { major, minor });
        }
        let header_len = c.u32_le_at(Self::HEADER_LEN)? as usize;
        let incompat = c.u64_le_at(Self::INCOMPAT)?;
        let unknown = incompat & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(Error::UnknownFeatures {
                bits: unknown,
                names: names_of_bits(unknown),
            });
        }
        if !(HEADER_FIXED_LEN + DIGEST_LEN..=limits::MAX_HEADER_LEN).contains(&header_len) {
            return Err(Error::corrupt(
                Self::HEADER_LEN.at as u64,
                format!(
                    "header length {header_len} is outside {}..={}",
                    HEADER_FIXED_LEN + DIGEST_LEN,
                    limits::MAX_HEADER_LEN
                ),
            ));
        }
        Ok(HeaderPrefix { major, header_len })
    }
}

impl Header {
    /// Check every value against the format's rules and limits.
    pub fn validate(&self) -> Result<()> {
        if self.drives.is_empty() {
            return Err(Error::Limit("an archive needs at least one drive".into()));
        }
        if self.drives.len() > limits::MAX_DRIVES {
            return Err(Error::Limit(format!(
                "{} drives given; an archive holds at most {}",
                self.drives.len(),
                limits::MAX_DRIVES
            )));
        }
        let stand_in = !self.stands_for.is_empty();
        if self.configs.len() + stand_in as usize > limits::MAX_CONFIGS {
            return Err(Error::Limit(format!(
                "{} config blobs given; an archive holds at most {}{}",
                self.configs.len(),
                limits::MAX_CONFIGS,
                if stand_in {
                    " (one of them the stand-in list)"
                } else {
                    ""
                }
            )));
        }
        if self.stands_for.len() > limits::MAX_STANDS_FOR {
            return Err(Error::Limit(format!(
                "a stand-in list names at most {} archives, {} given",
                limits::MAX_STANDS_FOR,
                self.stands_for.len()
            )));
        }
        if stand_in != (self.compat & COMPAT_STANDS_FOR != 0) {
            return Err(Error::Invalid(
                "stand-in list and STANDS_FOR feature bit disagree".into(),
            ));
        }
        if stand_in && self.configs.iter().any(|c| c.name == STANDS_FOR_CONFIG) {
            return Err(Error::Invalid(format!(
                "a config named {STANDS_FOR_CONFIG:?} clashes with the stand-in list"
            )));
        }
        if self.creator.len() > limits::MAX_CREATOR_LEN {
            return Err(Error::Limit("creator string longer than 255 bytes".into()));
        }
        let mut last_id = 0u8;
        let mut names = std::collections::HashSet::new();
        for d in &self.drives {
            if d.id.0 <= last_id {
                return Err(Error::Invalid(format!(
                    "drive ids must be 1..=255 and ascending; found {} after {}",
                    d.id, last_id
                )));
            }
            last_id = d.id.0;
            check_name(&d.name)?;
            if !names.insert(d.name.as_str()) {
                return Err(Error::Invalid(format!("two drives are named {:?}", d.name)));
            }
            if d.size > limits::MAX_DRIVE_SIZE {
                return Err(Error::Limit(format!(
                    "drive {:?} is {} bytes; at most {} (128 TiB) are supported",
                    d.name,
                    d.size,
                    limits::MAX_DRIVE_SIZE
                )));
            }
        }
        let mut cnames = std::collections::HashSet::new();
        for c in &self.configs {
            check_name(&c.name)?;
            if !cnames.insert(c.name.as_str()) {
                return Err(Error::Invalid(format!(
                    "two configs are named {:?}",
                    c.name
                )));
            }
            if c.data.len() > limits::MAX_CONFIG_SIZE {
                return Err(Error::Limit(format!(
                    "config {:?} is {} bytes; at most {} (16 MiB) are allowed",
                    c.name,
                    c.data.len(),
                    limits::MAX_CONFIG_SIZE
                )));
            }
        }
        if self.parent.is_some() != (self.incompat & INCOMPAT_PARENT != 0) {
            return Err(Error::Invalid(
                "parent reference and PARENT feature bit disagree".into(),
            ));
        }
        if self.version_major >= 3 {
            let no_state = self
                .parent
                .iter()
                .chain(&self.stands_for)
                .any(|r| r.state.is_none());
            if no_state {
                return Err(Error::Invalid(
                    "a 3.0 archive reference needs the state digest of its point in time".into(),
                ));
            }
        }
        let len = self.encoded_len();
        if len > limits::MAX_HEADER_LEN {
            return Err(Error::Limit(format!(
                "header with configs would be {len} bytes; at most {} (64 MiB) are allowed",
                limits::MAX_HEADER_LEN
            )));
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        let ref_len = archive_ref_len(self.version_major);
        HEADER_FIXED_LEN
            + self.creator.len()
            + if self.parent.is_some() { ref_len } else { 0 }
            + self.drives.iter().map(|d| 16 + d.name.len()).sum::<usize>()
            + self
                .configs
                .iter()
                .map(|c| 8 + c.name.len() + c.data.len())
                .sum::<usize>()
            + if self.stands_for.is_empty() {
                0
            } else {
                8 + STANDS_FOR_CONFIG.len() + ref_len * self.stands_for.len()
            }
            + DIGEST_LEN
    }

    /// Config entries as stored: the configs, then the stand-in list.
    fn stored_config_count(&self) -> usize {
        self.configs.len() + !self.stands_for.is_empty() as usize
    }

    /// Encode the header block (version 3.0), ending with its SHA-256.
    /// Validates first.
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.version_major != VERSION_MAJOR {
            return Err(Error::Invalid(format!(
                "this build writes archives of version {VERSION_MAJOR} only, not {}",
                self.version_major
            )));
        }
        self.validate()?;
        let len = self.encoded_len();
        let mut b = Vec::with_capacity(len);
        FieldWriter::new(&mut b)
            .bytes(&ARCHIVE_MAGIC)
            .u16_le(VERSION_MAJOR)
            .u16_le(self.version_minor)
            .u32_le(len as u32)
            .u64_le(self.incompat)
            .u64_le(self.compat)
            .bytes(&self.uuid)
            .i64_le(self.ctime)
            .u16_le(self.drives.len() as u16)
            .u16_le(self.stored_config_count() as u16)
            .u8(self.compression.codec.code())
            .u8(self.compression.level as u8)
            .u16_le(self.creator.len() as u16);
        debug_assert_eq!(b.len(), HeaderPrefix::LEN);
        b.extend_from_slice(self.creator.as_bytes());
        if let Some(p) = &self.parent {
            p.encode(&mut b);
        }
        for d in &self.drives {
            FieldWriter::new(&mut b)
                .u8(d.id.0)
                .u8(0) // flags
                .u16_le(d.name.len() as u16)
                .u32_le(0)
                .u64_le(d.size)
                .bytes(d.name.as_bytes());
        }
        for c in &self.configs {
            FieldWriter::new(&mut b)
                .u16_le(c.name.len() as u16)
                .u16_le(0)
                .u32_le(c.data.len() as u32)
                .bytes(c.name.as_bytes())
                .bytes(&c.data);
        }
        if !self.stands_for.is_empty() {
            let len = ARCHIVE_REF_LEN * self.stands_for.len();
            FieldWriter::new(&mut b)
                .u16_le(STANDS_FOR_CONFIG.len() as u16)
                .u16_le(0)
                .u32_le(len as u32)
                .bytes(STANDS_FOR_CONFIG.as_bytes());
            for r in &self.stands_for {
                r.encode(&mut b);
            }
        }
        let digest = sha256(&b);
        b.extend_from_slice(&digest);
        debug_assert_eq!(b.len(), len);
        Ok(b)
    }

    /// Decode a whole header block (as long as [`HeaderPrefix::header_len`])
    /// of version 3.0 or 2.0, verifying its digest and every limit.
    pub fn decode(block: &[u8]) -> Result<Header> {
        let fixed: &[u8; HEADER_FIXED_LEN] = block
            .get(..HEADER_FIXED_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::truncated(block.len() as u64, "header shorter than 64 bytes"))?;
        let prefix = HeaderPrefix::decode(fixed)?;
        if block.len() != prefix.header_len {
            return Err(Error::truncated(
                block.len() as u64,
                format!("header needs {} bytes", prefix.header_len),
            ));
        }
        let body_len = block.len() - DIGEST_LEN;
        let stored: [u8; 32] = block[body_len..].try_into().expect("32 bytes");
        if !check_matches(&stored, &sha256(&block[..body_len])) {
            return Err(Error::corrupt(
                body_len as u64,
                "header SHA-256 does not match the header and config bytes (offset 0..)",
            ));
        }
        let major = prefix.major;
        let mut c = FieldReader::new(&block[..body_len], 0, HeaderPrefix::NAME);
        c.skip(HeaderPrefix::VERSION_MINOR.at)?;
        let version_minor = c.u16_le()?;
        c.skip(HeaderPrefix::HEADER_LEN.len)?;
        let incompat = c.u64_le()?;
        let compat = c.u64_le()?;
        let uuid = c.bytes::<16>()?;
        let ctime = c.i64_le()?;
        let drive_count = c.u16_le()? as usize;
        let config_count = c.u16_le()? as usize;
        let codec_at = c.offset();
        let code = c.u8()?;
        let codec = Codec::from_code(code)
            .ok_or_else(|| Error::corrupt(codec_at, format!("unknown compression code {code}")))?;
        let level = c.u8()? as i8;
        let creator_len = c.u16_le()? as usize;
        if drive_count == 0 || drive_count > limits::MAX_DRIVES {
            return Err(Error::corrupt(
                HeaderPrefix::DRIVE_COUNT.at as u64,
                format!("drive count {drive_count} is outside 1..=255"),
            ));
        }
        if config_count > limits::MAX_CONFIGS {
            return Err(Error::corrupt(
                HeaderPrefix::CONFIG_COUNT.at as u64,
                format!("config count {config_count} exceeds 256"),
            ));
        }
        let creator = c.utf8(creator_len, "creator")?;
        let parent = if incompat & INCOMPAT_PARENT != 0 {
            Some(ParentRef::decode(&mut c, major)?)
        } else {
            None
        };
        let mut drives = Vec::with_capacity(drive_count);
        for _ in 0..drive_count {
            let at = c.offset();
            let id = DriveId(c.u8()?);
            let _flags = c.u8()?;
            let name_len = c.u16_le()? as usize;
            c.u32_le()?;
            let size = c.u64_le()?;
            let name = c.utf8(name_len, "drive name")?;
            check_name(&name).map_err(|e| Error::corrupt(at, e.to_string()))?;
            drives.push(DriveInfo { id, name, size });
        }
        let mut configs = Vec::with_capacity(config_count);
        for _ in 0..config_count {
            let at = c.offset();
            let name_len = c.u16_le()? as usize;
            c.u16_le()?;
            let data_len = c.u32_le()? as usize;
            let name = c.utf8(name_len, "config name")?;
            check_name(&name).map_err(|e| Error::corrupt(at, e.to_string()))?;
            if data_len > limits::MAX_CONFIG_SIZE {
                return Err(Error::corrupt(
                    at,
                    format!("config {name:?} claims {data_len} bytes, over the 16 MiB limit"),
                ));
            }
            let data = c.take(data_len)?.to_vec();
            configs.push(ConfigBlob { name, data });
        }
        if c.remaining() != 0 {
            return Err(Error::corrupt(
                c.offset(),
                format!(
                    "{} unexplained bytes at the end of the header",
                    c.remaining()
                ),
            ));
        }
        let stands_for = if compat & COMPAT_STANDS_FOR != 0 {
            decode_stands_for(&mut configs, body_len as u64, major)?
        } else {
            Vec::new()
        };
        let header = Header {
            version_major: major,
            version_minor,
            incompat,
            compat,
            uuid,
            ctime,
            compression: CompressionInfo { codec, level },
            creator,
            parent,
            drives,
            configs,
            stands_for,
        };
        header
            .validate()
            .map_err(|e| Error::corrupt(0, e.to_string()))?;
        Ok(header)
    }

    /// The drive with id `id`, if any.
    pub fn drive(&self, id: DriveId) -> Option<&DriveInfo> {
        self.drives
            .binary_search_by_key(&id, |d| d.id)
            .ok()
            .map(|i| &self.drives[i])
    }

    /// The bytes of clusters `clusters` of drive `id` (see
    /// [`DriveInfo::range`]); None when the header has no such drive.
    pub fn drive_range(&self, id: DriveId, clusters: std::ops::Range<u64>) -> Option<DriveRange> {
        self.drive(id).map(|d| d.range(clusters))
    }

    /// The position of drive `id` in [`Header::drives`], if any.
    pub fn slot(&self, id: DriveId) -> Option<usize> {
        self.drives.binary_search_by_key(&id, |d| d.id).ok()
    }

    /// The header digest (the last 32 bytes of the encoded header).
    pub fn digest(&self) -> Result<[u8; 32]> {
        let b = self.encode()?;
        Ok(b[b.len() - DIGEST_LEN..].try_into().expect("32"))
    }
}

/// Take the stand-in list (the last config entry, [`STANDS_FOR_CONFIG`])
/// out of `configs`. `at` is where the header's digest starts, for errors.
fn decode_stands_for(configs: &mut Vec<ConfigBlob>, at: u64, major: u16) -> Result<Vec<ParentRef>> {
    let list = match configs.last() {
        Some(c) if c.name == STANDS_FOR_CONFIG => configs.pop().expect("present"),
        _ => {
            return Err(Error::corrupt(
                at,
                format!("the header has the STANDS_FOR feature but its last config entry is not {STANDS_FOR_CONFIG:?}"),
            ))
        }
    };
    let ref_len = archive_ref_len(major);
    let n = list.data.len() / ref_len;
    if list.data.len() % ref_len != 0 || n == 0 || n > limits::MAX_STANDS_FOR {
        return Err(Error::corrupt(
            at,
            format!(
                "the stand-in list is {} bytes; it holds 1 to {} entries of {ref_len} bytes",
                list.data.len(),
                limits::MAX_STANDS_FOR
            ),
        ));
    }
    list.data
        .chunks_exact(ref_len)
        .map(|r| ParentRef::decode(&mut FieldReader::new(r, at, "stand-in list"), major))
        .collect()
}

/// One run of clusters inside an extent: `count` clusters of one drive
/// starting at `start`, all of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The drive.
    pub drive: DriveId,
    /// Data, zero or unchanged.
    pub kind: RunKind,
    /// Number of clusters (at least 1).
    pub count: u32,
    /// First cluster number.
    pub start: u64,
}

fixed_block!(Entry = "extent entry", ENTRY_LEN;
    DRIVE("drive", 1),
    KIND("kind", 1),
    RESERVED("reserved", 2),
    COUNT("count", 4),
    START("start", 8),
);

/// Bytes of mask array including padding to a multiple of 8.
pub fn masks_len(mask_count: usize) -> usize {
    (mask_count * 2).next_multiple_of(8)
}

/// Encode one run entry.
pub fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    FieldWriter::new(out)
        .u8(e.drive.0)
        .u8(e.kind.code())
        .u16_le(0)
        .u32_le(e.count)
        .u64_le(e.start);
}

/// The counts of an extent body that [`decode_entries`] checks against.
#[derive(Clone, Copy, Debug)]
pub struct BodyCounts {
    /// The extent's sequence number (for messages).
    pub seq: u64,
    /// Number of entries.
    pub entry_count: u32,
    /// Number of masks.
    pub mask_count: u32,
    /// Decoded payload length.
    pub raw_len: u32,
}

/// Decode the entries and masks of an extent body (the same layout in 2.0
/// and 3.0); `body` starts right after the 64-byte header, at absolute
/// `offset`. Checks that masks match the data clusters and popcounts match
/// `raw_len`.
pub fn decode_entries(h: &BodyCounts, body: &[u8], offset: u64) -> Result<(Vec<Entry>, Vec<u16>)> {
    let mut c = FieldReader::new(body, offset, "extent entries");
    let mut entries = Vec::with_capacity(h.entry_count as usize);
    let mut data_clusters = 0u64;
    for _ in 0..h.entry_count {
        let at = c.offset();
        let drive = DriveId(c.u8()?);
        let code = c.u8()?;
        let kind = RunKind::from_code(code).ok_or_else(|| {
            Error::corrupt(
                at + Entry::KIND.at as u64,
                format!("extent #{}: unknown run kind {code}", h.seq),
            )
        })?;
        c.u16_le()?;
        let count = c.u32_le()?;
        let start = c.u64_le()?;
        let why = if drive.0 == 0 {
            Some("drive id 0 is not a drive")
        } else if count == 0 {
            Some("a run holds at least one cluster")
        } else if start.saturating_add(count as u64) > MAX_CLUSTERS {
            Some("it lies beyond the largest drive the format allows (128 TiB)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::corrupt(
                at,
                format!(
                    "extent #{}: invalid run of drive id {drive}, clusters {start}+{count}: {why}",
                    h.seq
                ),
            ));
        }
        if kind == RunKind::Data {
            data_clusters += count as u64;
        }
        entries.push(Entry {
            drive,
            kind,
            count,
            start,
        });
    }
    if data_clusters != h.mask_count as u64 {
        return Err(Error::corrupt(
            offset,
            format!(
                "extent #{}: entries hold {data_clusters} data clusters but the header declares {} masks",
                h.seq, h.mask_count
            ),
        ));
    }
    let mask_at = c.offset();
    let mask_bytes = c.take(masks_len(h.mask_count as usize))?;
    let mut m = FieldReader::new(mask_bytes, mask_at, "block masks");
    let masks = (0..h.mask_count)
        .map(|_| m.u16_le())
        .collect::<Result<Vec<u16>, _>>()?;
    let blocks: u64 = masks.iter().map(|m| m.count_ones() as u64).sum();
    if masks.contains(&0) {
        return Err(Error::corrupt(
            mask_at,
            format!("extent #{}: a data cluster has an empty block mask", h.seq),
        ));
    }
    if blocks * BLOCK_SIZE as u64 != h.raw_len as u64 {
        return Err(Error::corrupt(
            mask_at,
            format!(
                "extent #{}: masks mark {blocks} blocks but the header declares {} decoded bytes",
                h.seq, h.raw_len
            ),
        ));
    }
    Ok((entries, masks))
}

/// The limits every extent header (2.0 and 3.0) obeys; the reason when one
/// is broken.
fn extent_limits(
    entry_count: u32,
    mask_count: u32,
    codec: Codec,
    stored_len: u32,
    raw_len: u32,
) -> Option<String> {
    if entry_count == 0 || entry_count as usize > limits::MAX_EXTENT_ENTRIES {
        Some(format!("entry count {entry_count} outside 1..=65536"))
    } else if raw_len as usize > limits::MAX_EXTENT_RAW
        || !(raw_len as usize).is_multiple_of(BLOCK_SIZE)
    {
        Some(format!(
            "decoded length {raw_len} is not a multiple of 4096 up to 16 MiB"
        ))
    } else if stored_len as usize > limits::MAX_EXTENT_STORED {
        Some(format!("stored length {stored_len} over the limit"))
    } else if codec == Codec::None && stored_len != raw_len {
        Some(format!(
            "uncompressed payload has stored length {stored_len} but decoded length {raw_len}"
        ))
    } else if mask_count as usize * BLOCK_SIZE > raw_len as usize {
        Some(format!(
            "{mask_count} data clusters need at least {} decoded bytes, header says {raw_len}",
            mask_count as usize * BLOCK_SIZE
        ))
    } else if mask_count as usize * CLUSTER_SIZE < raw_len as usize {
        Some(format!(
            "{mask_count} data clusters cannot hold {raw_len} decoded bytes"
        ))
    } else {
        None
    }
}

/// The fixed header of a 3.0 extent. It names the archive (uuid) and the
/// extent's position in it (seq); both are covered by the extent digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentHeader {
    /// Uuid of the archive the extent belongs to.
    pub uuid: [u8; 16],
    /// Sequence number: 0 for the first extent, then +1 each.
    pub seq: u64,
    /// Number of run entries.
    pub entry_count: u32,
    /// Number of block masks (= data clusters).
    pub mask_count: u32,
    /// Payload length as stored.
    pub stored_len: u32,
    /// Payload length decoded (stored blocks x 4096).
    pub raw_len: u32,
    /// Payload encoding.
    pub codec: Codec,
}

fixed_block!(ExtentHeader = "extent header", EXTENT_HEADER_LEN;
    MAGIC("magic", 8),
    UUID("uuid", 16),
    SEQ("seq", 8),
    ENTRY_COUNT("entry_count", 4),
    MASK_COUNT("mask_count", 4),
    STORED_LEN("stored_len", 4),
    RAW_LEN("raw_len", 4),
    CODEC("codec", 1),
    CIPHER("cipher", 1),
    RESERVED("reserved", 6),
    CHECK("check", 8),
);

/// Offset of the uuid in an extent header (3.0).
pub const EXTENT_UUID_AT: usize = ExtentHeader::UUID.at;
/// Offset of the cipher byte in an extent header (3.0).
pub const EXTENT_CIPHER_AT: usize = ExtentHeader::CIPHER.at;

impl ExtentHeader {
    /// The header as far as reading its extent goes.
    pub fn frame(&self) -> ExtentFrame {
        ExtentFrame {
            uuid: Some(self.uuid),
            seq: self.seq,
            entry_count: self.entry_count,
            mask_count: self.mask_count,
            codec: self.codec,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
        }
    }

    /// Total length of the extent (header, entries, masks, payload, digest).
    pub fn total_len(&self) -> usize {
        self.frame().total_len()
    }

    /// Offset of the payload from the extent start.
    pub fn payload_start(&self) -> usize {
        self.frame().payload_start()
    }

    /// The counts the body is checked against.
    pub fn body_counts(&self) -> BodyCounts {
        self.frame().body_counts()
    }

    /// Encode the 64-byte header with its self-check.
    pub fn encode(&self) -> [u8; EXTENT_HEADER_LEN] {
        let mut b = Vec::with_capacity(Self::LEN);
        FieldWriter::new(&mut b)
            .bytes(&EXTENT_MAGIC)
            .bytes(&self.uuid)
            .u64_le(self.seq)
            .u32_le(self.entry_count)
            .u32_le(self.mask_count)
            .u32_le(self.stored_len)
            .u32_le(self.raw_len)
            .u8(self.codec.code())
            .u8(0) // cipher
            .zeros(Self::RESERVED.len);
        sealed(b)
    }

    /// Decode and check a 64-byte extent header found at absolute `offset`:
    /// magic, self-check, cipher, field limits. The uuid and seq are the
    /// caller's to compare.
    pub fn decode(b: &[u8; EXTENT_HEADER_LEN], offset: u64) -> Result<Self> {
        let r = FieldReader::block::<Self>(b, offset);
        expect_magic(&r, Self::MAGIC, &EXTENT_MAGIC, "an extent header", "")?;
        expect_self_check(&r, b, Self::CHECK, EXTENT_HEADER_DAMAGED)?;
        let seq = r.u64_le_at(Self::SEQ)?;
        let cipher = r.u8_at(Self::CIPHER)?;
        if cipher != 0 {
            return Err(Error::UnknownFeatures {
                bits: cipher as u64,
                names: format!("extent cipher {cipher} (extent #{seq} at offset {offset})"),
            });
        }
        let h = ExtentHeader {
            uuid: r.field_bytes(Self::UUID)?,
            seq,
            entry_count: r.u32_le_at(Self::ENTRY_COUNT)?,
            mask_count: r.u32_le_at(Self::MASK_COUNT)?,
            stored_len: r.u32_le_at(Self::STORED_LEN)?,
            raw_len: r.u32_le_at(Self::RAW_LEN)?,
            codec: extent_codec(&r, Self::CODEC, seq)?,
        };
        h.frame().check_limits(offset)?;
        Ok(h)
    }
}

/// The message for an extent header whose self-check fails (2.0 and 3.0).
pub(super) const EXTENT_HEADER_DAMAGED: &str =
    "extent header self-check does not match (header bytes damaged)";

/// The codec in field `field` of the header of extent `seq`, read by `r`.
pub(super) fn extent_codec(
    r: &FieldReader<'_>,
    field: super::field::Field,
    seq: u64,
) -> Result<Codec> {
    let code = r.u8_at(field)?;
    Codec::from_code(code).ok_or_else(|| {
        Error::corrupt(
            r.offset_of(field),
            format!("extent #{seq}: unknown codec {code}"),
        )
    })
}

/// An extent header of either native version as far as reading its
/// extent goes: the archive it names (3.0 only), its place and the sizes
/// of its parts. Entries, masks, payload and digest follow the header in
/// the same layout in 2.0 and 3.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentFrame {
    /// Uuid of the archive the extent belongs to (3.0 only).
    pub uuid: Option<[u8; 16]>,
    /// Sequence number: 0 for the first extent, then +1 each.
    pub seq: u64,
    /// Number of run entries.
    pub entry_count: u32,
    /// Number of block masks (= data clusters).
    pub mask_count: u32,
    /// Payload encoding.
    pub codec: Codec,
    /// Payload length as stored.
    pub stored_len: u32,
    /// Payload length decoded (stored blocks x 4096).
    pub raw_len: u32,
}

impl ExtentFrame {
    /// Decode and check a 64-byte extent header of archive version `major`
    /// found at absolute `offset`.
    pub fn decode(b: &[u8; EXTENT_HEADER_LEN], offset: u64, major: u16) -> Result<Self> {
        if major >= VERSION_MAJOR {
            ExtentHeader::decode(b, offset).map(|h| h.frame())
        } else {
            super::v2::ExtentHeader::decode(b, offset)
        }
    }

    /// Total length of the extent (header, entries, masks, payload, digest).
    pub fn total_len(&self) -> usize {
        self.payload_start() + self.stored_len as usize + DIGEST_LEN
    }

    /// Offset of the payload from the extent start.
    pub fn payload_start(&self) -> usize {
        EXTENT_HEADER_LEN
            + self.entry_count as usize * ENTRY_LEN
            + masks_len(self.mask_count as usize)
    }

    /// The counts the body is checked against.
    pub fn body_counts(&self) -> BodyCounts {
        BodyCounts {
            seq: self.seq,
            entry_count: self.entry_count,
            mask_count: self.mask_count,
            raw_len: self.raw_len,
        }
    }

    /// Check the counts and lengths against the limits every extent header
    /// obeys; the error names the header at absolute `offset`.
    pub(super) fn check_limits(&self, offset: u64) -> Result<()> {
        match extent_limits(
            self.entry_count,
            self.mask_count,
            self.codec,
            self.stored_len,
            self.raw_len,
        ) {
            Some(what) => Err(Error::corrupt(
                offset,
                format!("extent #{}: {what}", self.seq),
            )),
            None => Ok(()),
        }
    }
}

/// One run of the index. `extent` names the extent holding a data run
/// ([`ExtentRef`]: a sequence number in 3.0, a file offset in 2.0 and VMA
/// v1); it is [`ExtentRef::NONE`] for zero and unchanged runs. Indexes hold
/// millions of runs: the size is asserted below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexRun {
    /// The drive.
    pub drive: DriveId,
    /// First cluster.
    pub start: u64,
    /// Number of clusters.
    pub count: u32,
    /// Data, zero or unchanged.
    pub kind: RunKind,
    /// The extent holding a data run (see above).
    pub extent: ExtentRef,
}

const _: () = assert!(std::mem::size_of::<IndexRun>() == 24);

fixed_block!(IndexRun = "index run", INDEX_RUN_LEN;
    DRIVE("drive", 1),
    KIND("kind", 1),
    RESERVED("reserved", 2),
    COUNT("count", 4),
    START("start", 8),
    EXTENT("extent", 8),
);

impl IndexRun {
    /// One past the last cluster.
    pub fn end(&self) -> u64 {
        self.start + self.count as u64
    }

    /// Encode as 24 bytes (the layout of 2.0 index runs and 3.0 run pages).
    pub fn encode(&self, out: &mut Vec<u8>) {
        FieldWriter::new(out)
            .u8(self.drive.0)
            .u8(self.kind.code())
            .u16_le(0)
            .u32_le(self.count)
            .u64_le(self.start)
            .u64_le(self.extent.raw());
    }

    /// Decode 24 bytes found at absolute `offset`: the kind must be known,
    /// the run non-empty and within the largest drive.
    pub fn decode(b: &[u8], offset: u64) -> Result<IndexRun> {
        let r = FieldReader::block::<Self>(b, offset);
        let drive = DriveId(r.u8_at(Self::DRIVE)?);
        let code = r.u8_at(Self::KIND)?;
        let kind = RunKind::from_code(code).ok_or_else(|| {
            Error::corrupt(
                r.offset_of(Self::KIND),
                format!("index: unknown run kind {code}"),
            )
        })?;
        let count = r.u32_le_at(Self::COUNT)?;
        let start = r.u64_le_at(Self::START)?;
        let extent = ExtentRef::from_raw(r.u64_le_at(Self::EXTENT)?);
        if count == 0 || start.saturating_add(count as u64) > MAX_CLUSTERS {
            let why = if count == 0 {
                "a run holds at least one cluster"
            } else {
                "it lies beyond the largest drive the format allows (128 TiB)"
            };
            return Err(Error::corrupt(
                offset,
                format!("index: invalid run of drive id {drive}, clusters {start}+{count}: {why}"),
            ));
        }
        Ok(IndexRun {
            drive,
            start,
            count,
            kind,
            extent,
        })
    }
}

/// Per-drive facts recorded in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriveRecord {
    /// The drive.
    pub drive: DriveId,
    /// Clusters stored as data.
    pub data_clusters: u64,
    /// Archive bytes attributed to this drive: each extent's whole length,
    /// shared between its drives by their numbers of stored blocks.
    pub stored_bytes: u64,
    /// The drive digest of the whole drive at this point in time: in 3.0
    /// the vma tree digest (see [`crate::tree`]), present for every drive
    /// that is not interrupted; in 2.0 the plain SHA-256, when the writer
    /// saw the drive in order.
    pub digest: Option<[u8; 32]>,
    /// The capture that wrote this drive was interrupted: what the archive
    /// holds (with its parents) is no point in time. It only serves as the
    /// parent of the retry that completes it, and is never restored alone.
    pub interrupted: bool,
    /// 3.0: index of the drive's first run in the run pages.
    pub first_run: u64,
    /// 3.0: number of runs of the drive.
    pub run_count: u64,
    /// 3.0: index of the drive's first leaf in the leaf pages.
    pub first_leaf: u64,
    /// Some of the drive's clusters are unchanged from the parent (so a
    /// chain needs the parent's drive of that name and size).
    pub unchanged: bool,
}

/// Drive record flag: `digest` is present.
pub const DRIVE_DIGEST_PRESENT: u8 = 1;
/// Drive record flag: the drive's capture was interrupted (see
/// [`DriveRecord::interrupted`]).
pub const DRIVE_INTERRUPTED: u8 = 2;
/// Drive record flag (3.0): the drive has unchanged runs (see
/// [`DriveRecord::unchanged`]).
pub const DRIVE_HAS_UNCHANGED: u8 = 4;

fixed_block!(DriveRecord = "drive record", DRIVE_RECORD_LEN;
    DRIVE("drive", 1),
    FLAGS("flags", 1),
    RESERVED("reserved", 6),
    DATA_CLUSTERS("data_clusters", 8),
    STORED_BYTES("stored_bytes", 8),
    FIRST_RUN("first_run", 8),
    RUN_COUNT("run_count", 8),
    FIRST_LEAF("first_leaf", 8),
    DIGEST("digest", 32),
);

impl DriveRecord {
    /// A record of `drive` with nothing counted yet.
    pub fn empty(drive: DriveId) -> DriveRecord {
        DriveRecord {
            drive,
            data_clusters: 0,
            stored_bytes: 0,
            digest: None,
            interrupted: false,
            first_run: 0,
            run_count: 0,
            first_leaf: 0,
            unchanged: false,
        }
    }

    /// Encode the 80-byte 3.0 record.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let flags = if self.digest.is_some() {
            DRIVE_DIGEST_PRESENT
        } else {
            0
        } | if self.interrupted {
            DRIVE_INTERRUPTED
        } else {
            0
        } | if self.unchanged {
            DRIVE_HAS_UNCHANGED
        } else {
            0
        };
        FieldWriter::new(out)
            .u8(self.drive.0)
            .u8(flags)
            .zeros(Self::RESERVED.len)
            .u64_le(self.data_clusters)
            .u64_le(self.stored_bytes)
            .u64_le(self.first_run)
            .u64_le(self.run_count)
            .u64_le(self.first_leaf)
            .bytes(&self.digest.unwrap_or([0; 32]));
    }

    /// Decode an 80-byte 3.0 record found at absolute `offset`.
    pub fn decode(b: &[u8], offset: u64) -> Result<DriveRecord> {
        let r = FieldReader::block::<Self>(b, offset);
        let drive = r.u8_at(Self::DRIVE)?;
        let flags = r.u8_at(Self::FLAGS)?;
        if flags & !(DRIVE_DIGEST_PRESENT | DRIVE_INTERRUPTED | DRIVE_HAS_UNCHANGED) != 0 {
            return Err(Error::corrupt(
                r.offset_of(Self::FLAGS),
                format!("drive record of drive id {drive}: unknown flags {flags:#x}"),
            ));
        }
        let digest: [u8; 32] = r.field_bytes(Self::DIGEST)?;
        Ok(DriveRecord {
            drive: DriveId(drive),
            data_clusters: r.u64_le_at(Self::DATA_CLUSTERS)?,
            stored_bytes: r.u64_le_at(Self::STORED_BYTES)?,
            first_run: r.u64_le_at(Self::FIRST_RUN)?,
            run_count: r.u64_le_at(Self::RUN_COUNT)?,
            first_leaf: r.u64_le_at(Self::FIRST_LEAF)?,
            digest: (flags & DRIVE_DIGEST_PRESENT != 0).then_some(digest),
            interrupted: flags & DRIVE_INTERRUPTED != 0,
            unchanged: flags & DRIVE_HAS_UNCHANGED != 0,
        })
    }
}

/// Where an extent is and what it must hash to: one record of the 3.0
/// extent table, in sequence order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentRecord {
    /// File offset of the extent's header.
    pub offset: ArchiveOffset,
    /// Total length of the extent.
    pub len: u32,
    /// The extent digest (its last 32 bytes).
    pub digest: [u8; 32],
}

fixed_block!(ExtentRecord = "extent record", EXTENT_RECORD_LEN;
    OFFSET("offset", 8),
    TOTAL_LEN("total_len", 4),
    RESERVED("reserved", 4),
    DIGEST("digest", 32),
);

impl ExtentRecord {
    /// Encode the 48-byte record.
    pub fn encode(&self, out: &mut Vec<u8>) {
        FieldWriter::new(out)
            .u64_le(self.offset.get())
            .u32_le(self.len)
            .u32_le(0)
            .bytes(&self.digest);
    }

    /// Decode one whole 48-byte record (pages are split into records of
    /// exactly [`EXTENT_RECORD_LEN`] bytes, so no field can be short).
    pub fn decode(b: &[u8]) -> ExtentRecord {
        let r = FieldReader::block::<Self>(b, 0);
        let whole = "a whole extent record";
        ExtentRecord {
            offset: ArchiveOffset(r.u64_le_at(Self::OFFSET).expect(whole)),
            len: r.u32_le_at(Self::TOTAL_LEN).expect(whole),
            digest: r.field_bytes(Self::DIGEST).expect(whole),
        }
    }
}

/// The directory entry of one run page: its first run's key, the number of
/// data clusters in the pages before it (its first leaf), and its digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPageKey {
    /// Drive of the page's first run.
    pub drive: DriveId,
    /// First cluster of the page's first run.
    pub start: u64,
    /// Index (in the leaf pages) of the first leaf of the page's data runs.
    pub first_leaf: u64,
    /// SHA-256 of the page.
    pub digest: [u8; 32],
}

fixed_block!(RunPageKey = "run page key", RUN_KEY_LEN;
    DRIVE("drive", 1),
    RESERVED("reserved", 7),
    START("start", 8),
    FIRST_LEAF("first_leaf", 8),
    DIGEST("digest", 32),
);

impl RunPageKey {
    /// Encode the 56-byte entry.
    pub fn encode(&self, out: &mut Vec<u8>) {
        FieldWriter::new(out)
            .u8(self.drive.0)
            .zeros(Self::RESERVED.len)
            .u64_le(self.start)
            .u64_le(self.first_leaf)
            .bytes(&self.digest);
    }

    /// Decode one whole 56-byte entry (the directory is split into entries
    /// of exactly [`RUN_KEY_LEN`] bytes, so no field can be short).
    pub fn decode(b: &[u8]) -> RunPageKey {
        let r = FieldReader::block::<Self>(b, 0);
        let whole = "a whole run page key";
        RunPageKey {
            drive: DriveId(r.u8_at(Self::DRIVE).expect(whole)),
            start: r.u64_le_at(Self::START).expect(whole),
            first_leaf: r.u64_le_at(Self::FIRST_LEAF).expect(whole),
            digest: r.field_bytes(Self::DIGEST).expect(whole),
        }
    }
}

/// The fixed part of a 3.0 index area (64 bytes): the counts every other
/// part's length follows from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexFixed {
    /// The archive's uuid (a stray index of another archive is not this one's).
    pub uuid: [u8; 16],
    /// Runs in the run pages.
    pub run_count: u64,
    /// Records in the extent table (= extents in the archive).
    pub extent_count: u64,
    /// Leaves in the leaf pages (= data clusters in the archive).
    pub leaf_count: u64,
    /// Drive records (= drives in the header).
    pub drive_count: u16,
    /// Runs per run page.
    pub runs_per_page: u16,
    /// Records per extent-table page.
    pub extents_per_page: u16,
    /// Leaves per leaf page.
    pub leaves_per_page: u16,
}

fixed_block!(IndexFixed = "index", INDEX_FIXED_LEN;
    MAGIC("magic", 8),
    UUID("uuid", 16),
    RUN_COUNT("run_count", 8),
    EXTENT_COUNT("extent_count", 8),
    LEAF_COUNT("leaf_count", 8),
    DRIVE_COUNT("drive_count", 2),
    RUNS_PER_PAGE("runs_per_page", 2),
    EXTENTS_PER_PAGE("extents_per_page", 2),
    LEAVES_PER_PAGE("leaves_per_page", 2),
    CHECK("check", 8),
);

impl IndexFixed {
    /// Encode the 64 bytes with their self-check.
    pub fn encode(&self) -> [u8; INDEX_FIXED_LEN] {
        let mut b = Vec::with_capacity(Self::LEN);
        FieldWriter::new(&mut b)
            .bytes(&INDEX_MAGIC)
            .bytes(&self.uuid)
            .u64_le(self.run_count)
            .u64_le(self.extent_count)
            .u64_le(self.leaf_count)
            .u16_le(self.drive_count)
            .u16_le(self.runs_per_page)
            .u16_le(self.extents_per_page)
            .u16_le(self.leaves_per_page);
        sealed(b)
    }

    /// Decode and check 64 bytes found at absolute `offset`: magic,
    /// self-check, page sizes, drive count.
    pub fn decode(b: &[u8; INDEX_FIXED_LEN], offset: u64) -> Result<IndexFixed> {
        let r = FieldReader::block::<Self>(b, offset);
        expect_magic(&r, Self::MAGIC, &INDEX_MAGIC, "the index", "")?;
        expect_self_check(
            &r,
            b,
            Self::CHECK,
            "index self-check does not match (its fixed part is damaged, or the magic is stray)",
        )?;
        let f = IndexFixed {
            uuid: r.field_bytes(Self::UUID)?,
            run_count: r.u64_le_at(Self::RUN_COUNT)?,
            extent_count: r.u64_le_at(Self::EXTENT_COUNT)?,
            leaf_count: r.u64_le_at(Self::LEAF_COUNT)?,
            drive_count: r.u16_le_at(Self::DRIVE_COUNT)?,
            runs_per_page: r.u16_le_at(Self::RUNS_PER_PAGE)?,
            extents_per_page: r.u16_le_at(Self::EXTENTS_PER_PAGE)?,
            leaves_per_page: r.u16_le_at(Self::LEAVES_PER_PAGE)?,
        };
        if f.runs_per_page == 0 || f.extents_per_page == 0 || f.leaves_per_page == 0 {
            return Err(Error::corrupt(
                r.offset_of(Self::RUNS_PER_PAGE),
                "index: a page holds at least one item",
            ));
        }
        if f.drive_count == 0 || f.drive_count as usize > limits::MAX_DRIVES {
            return Err(Error::corrupt(
                r.offset_of(Self::DRIVE_COUNT),
                format!("index: drive count {} is outside 1..=255", f.drive_count),
            ));
        }
        Ok(f)
    }

    /// Where every part lies, relative to the start of the index area;
    /// None when the counts overflow.
    pub fn layout(&self) -> Option<IndexLayout> {
        let pages = |n: u64, per: u16| n.div_ceil(per as u64);
        let run_pages = pages(self.run_count, self.runs_per_page);
        let extent_pages = pages(self.extent_count, self.extents_per_page);
        let leaf_pages = pages(self.leaf_count, self.leaves_per_page);
        let runs_at = INDEX_FIXED_LEN as u64;
        let extents_at = runs_at.checked_add(self.run_count.checked_mul(INDEX_RUN_LEN as u64)?)?;
        let leaves_at =
            extents_at.checked_add(self.extent_count.checked_mul(EXTENT_RECORD_LEN as u64)?)?;
        let records_at = leaves_at.checked_add(self.leaf_count.checked_mul(LEAF_LEN as u64)?)?;
        let directory_at =
            records_at.checked_add(self.drive_count as u64 * DRIVE_RECORD_LEN as u64)?;
        let directory_len = run_pages.checked_mul(RUN_KEY_LEN as u64)?.checked_add(
            extent_pages
                .checked_add(leaf_pages)?
                .checked_mul(PAGE_DIGEST_LEN as u64)?,
        )?;
        let digest_at = directory_at.checked_add(directory_len)?;
        Some(IndexLayout {
            fixed: *self,
            run_pages,
            extent_pages,
            leaf_pages,
            runs_at,
            extents_at,
            leaves_at,
            records_at,
            directory_at,
            digest_at,
            len: digest_at.checked_add(DIGEST_LEN as u64)?,
        })
    }
}

/// The three kinds of index pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// Runs, in (drive, start) order.
    Runs,
    /// Extent records, in sequence order.
    Extents,
    /// Leaf digests of data clusters, in (drive, cluster) order.
    Leaves,
}

impl PageKind {
    /// The name of the kind in messages.
    pub fn name(self) -> &'static str {
        match self {
            PageKind::Runs => "run page",
            PageKind::Extents => "extent-table page",
            PageKind::Leaves => "leaf page",
        }
    }
}

/// Offsets (relative to the index area's start) and page counts of a 3.0
/// index area, from its fixed part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexLayout {
    /// The fixed part it follows from.
    pub fixed: IndexFixed,
    /// Number of run pages.
    pub run_pages: u64,
    /// Number of extent-table pages.
    pub extent_pages: u64,
    /// Number of leaf pages.
    pub leaf_pages: u64,
    /// Where the run pages start.
    pub runs_at: u64,
    /// Where the extent table starts.
    pub extents_at: u64,
    /// Where the leaf pages start.
    pub leaves_at: u64,
    /// Where the drive records start.
    pub records_at: u64,
    /// Where the directory starts.
    pub directory_at: u64,
    /// Where the index digest is.
    pub digest_at: u64,
    /// Length of the whole index area.
    pub len: u64,
}

impl IndexLayout {
    /// Items per page and bytes per item of `kind`.
    pub fn geometry(&self, kind: PageKind) -> (u64, u64, u64) {
        match kind {
            PageKind::Runs => (
                self.fixed.run_count,
                self.fixed.runs_per_page as u64,
                INDEX_RUN_LEN as u64,
            ),
            PageKind::Extents => (
                self.fixed.extent_count,
                self.fixed.extents_per_page as u64,
                EXTENT_RECORD_LEN as u64,
            ),
            PageKind::Leaves => (
                self.fixed.leaf_count,
                self.fixed.leaves_per_page as u64,
                LEAF_LEN as u64,
            ),
        }
    }

    /// Number of pages of `kind`.
    pub fn pages(&self, kind: PageKind) -> u64 {
        match kind {
            PageKind::Runs => self.run_pages,
            PageKind::Extents => self.extent_pages,
            PageKind::Leaves => self.leaf_pages,
        }
    }

    /// Page `i` of `kind`: its offset relative to the region's start, its
    /// length and its number of items.
    pub fn page(&self, kind: PageKind, i: u64) -> (u64, u64, u64) {
        let (count, per, size) = self.geometry(kind);
        let first = i * per;
        let items = count.saturating_sub(first).min(per);
        (first * size, items * size, items)
    }

    /// Where the region of `kind` starts, relative to the index area.
    pub fn region_at(&self, kind: PageKind) -> u64 {
        match kind {
            PageKind::Runs => self.runs_at,
            PageKind::Extents => self.extents_at,
            PageKind::Leaves => self.leaves_at,
        }
    }

    /// Length of the drive records and the directory together.
    pub fn tail_len(&self) -> u64 {
        self.len - self.records_at
    }
}

/// The directory of a 3.0 index area: every page's digest (and, for run
/// pages, its first key and first leaf).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    /// One entry per run page.
    pub runs: Vec<RunPageKey>,
    /// One digest per extent-table page.
    pub extents: Vec<[u8; 32]>,
    /// One digest per leaf page.
    pub leaves: Vec<[u8; 32]>,
}

impl Directory {
    /// Encode the directory.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for k in &self.runs {
            k.encode(out);
        }
        for d in self.extents.iter().chain(&self.leaves) {
            out.extend_from_slice(d);
        }
    }

    /// Decode a directory of `layout`'s page counts from `b` (exactly its length).
    pub fn decode(b: &[u8], layout: &IndexLayout) -> Directory {
        let runs_len = layout.run_pages as usize * RUN_KEY_LEN;
        let runs = b[..runs_len]
            .chunks_exact(RUN_KEY_LEN)
            .map(RunPageKey::decode)
            .collect();
        let digests: Vec<[u8; 32]> = b[runs_len..]
            .chunks_exact(PAGE_DIGEST_LEN)
            .map(|d| d.try_into().expect("32"))
            .collect();
        let (extents, leaves) = digests.split_at(layout.extent_pages as usize);
        Directory {
            runs,
            extents: extents.to_vec(),
            leaves: leaves.to_vec(),
        }
    }

    /// The digest of page `i` of `kind`.
    pub fn digest(&self, kind: PageKind, i: u64) -> Option<[u8; 32]> {
        let i = usize::try_from(i).ok()?;
        match kind {
            PageKind::Runs => self.runs.get(i).map(|k| k.digest),
            PageKind::Extents => self.extents.get(i).copied(),
            PageKind::Leaves => self.leaves.get(i).copied(),
        }
    }
}

/// The index digest: SHA-256 over the fixed part, the drive records and the
/// directory (which holds every page's digest).
pub fn index_digest(fixed: &[u8], records: &[u8], directory: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(fixed);
    h.update(records);
    h.update(directory);
    h.finish()
}

/// The archive digest of a 3.0 archive: SHA-256(0x04 || header digest ||
/// index digest). It is recomputed by readers from what they read, never
/// taken from a field.
pub fn archive_digest(header_digest: &[u8; 32], index_digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&[0x04]);
    h.update(header_digest);
    h.update(index_digest);
    h.finish()
}

/// The fixed-size footer at the end of a complete 3.0 archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the index area.
    pub index_offset: u64,
    /// Length of the index area.
    pub index_len: u64,
    /// Number of extents.
    pub extent_count: u64,
    /// The archive digest (see [`archive_digest`]), as the writer computed it.
    pub archive_digest: [u8; 32],
}

fixed_block!(Footer = "footer", FOOTER_LEN;
    MAGIC("magic", 8),
    INDEX_OFFSET("index_offset", 8),
    INDEX_LEN("index_len", 8),
    EXTENT_COUNT("extent_count", 8),
    ARCHIVE_DIGEST("archive_digest", 32),
    RESERVED("reserved", 8),
    CHECK("check", 8),
);

impl Footer {
    /// Encode the 80-byte footer with its self-check.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = Vec::with_capacity(Self::LEN);
        FieldWriter::new(&mut b)
            .bytes(&FOOTER_MAGIC)
            .u64_le(self.index_offset)
            .u64_le(self.index_len)
            .u64_le(self.extent_count)
            .bytes(&self.archive_digest)
            .zeros(Self::RESERVED.len);
        sealed(b)
    }

    /// Decode and check a footer found at absolute `offset`.
    pub fn decode(b: &[u8; FOOTER_LEN], offset: u64) -> Result<Footer> {
        Self::decode_with_magic(b, offset, &FOOTER_MAGIC)
    }

    /// [`Footer::decode`] for a footer of this layout with magic `magic`
    /// (2.0 footers differ only there).
    pub(super) fn decode_with_magic(
        b: &[u8; FOOTER_LEN],
        offset: u64,
        magic: &[u8; 8],
    ) -> Result<Footer> {
        let r = FieldReader::block::<Self>(b, offset);
        expect_magic(
            &r,
            Self::MAGIC,
            magic,
            "the footer",
            ": the archive is incomplete or damaged at its end",
        )?;
        expect_self_check(
            &r,
            b,
            Self::CHECK,
            "footer self-check does not match (footer damaged)",
        )?;
        let f = Footer {
            index_offset: r.u64_le_at(Self::INDEX_OFFSET)?,
            index_len: r.u64_le_at(Self::INDEX_LEN)?,
            extent_count: r.u64_le_at(Self::EXTENT_COUNT)?,
            archive_digest: r.field_bytes(Self::ARCHIVE_DIGEST)?,
        };
        if f.index_offset.checked_add(f.index_len) != Some(offset) {
            return Err(Error::corrupt(
                r.offset_of(Self::INDEX_OFFSET),
                format!(
                    "footer says the index is at {}+{} but it must end where the footer starts ({offset})",
                    f.index_offset, f.index_len
                ),
            ));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_header() -> Header {
        Header {
            version_major: VERSION_MAJOR,
            version_minor: 0,
            incompat: INCOMPAT_ZSTD,
            compat: 0,
            uuid: [7; 16],
            ctime: 1_700_000_000,
            compression: CompressionInfo {
                codec: Codec::Zstd,
                level: 1,
            },
            creator: "test".into(),
            parent: None,
            drives: vec![
                DriveInfo {
                    id: DriveId(1),
                    name: "drive-scsi0".into(),
                    size: 12345,
                },
                DriveInfo {
                    id: DriveId(9),
                    name: "efi".into(),
                    size: 1 << 20,
                },
            ],
            configs: vec![ConfigBlob {
                name: "qemu-server.conf".into(),
                data: b"memory: 512\n".to_vec(),
            }],
            stands_for: Vec::new(),
        }
    }

    #[test]
    fn stand_in_list_is_the_last_config_entry() {
        let mut h = sample_header();
        let a = ParentRef {
            uuid: [7; 16],
            digest: [8; 32],
            state: Some([11; 32]),
        };
        let b = ParentRef {
            uuid: [9; 16],
            digest: [10; 32],
            state: Some([12; 32]),
        };
        h.stands_for = vec![a, b];
        // The bit must agree with the list.
        assert!(h.encode().is_err());
        h.compat |= COMPAT_STANDS_FOR;
        let bytes = h.encode().unwrap();
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        // Laid out as one more config entry.
        assert_eq!(u16::from_le_bytes([bytes[58], bytes[59]]), 2);
        let list = 2 * ARCHIVE_REF_LEN;
        let name_at = bytes.len() - 32 - list - STANDS_FOR_CONFIG.len();
        assert_eq!(
            &bytes[name_at..name_at + STANDS_FOR_CONFIG.len()],
            STANDS_FOR_CONFIG.as_bytes()
        );
        let first = bytes.len() - 32 - list;
        assert_eq!(&bytes[first..first + 16], &[7; 16]);
        assert_eq!(&bytes[first + 48..first + 80], &[11; 32]);
        // A user config of that name clashes with the list.
        let mut clash = h.clone();
        clash.configs.push(ConfigBlob {
            name: STANDS_FOR_CONFIG.into(),
            data: vec![],
        });
        assert!(clash.encode().is_err());
        // A 3.0 reference needs its state digest.
        let mut stateless = h.clone();
        stateless.stands_for[1].state = None;
        assert!(stateless.encode().is_err());
        // The bit without the list (here: the list renamed) is damage.
        let mut plain = sample_header();
        plain.configs.push(ConfigBlob {
            name: "vma-stands-fox".into(),
            data: vec![0; 80],
        });
        let mut bytes = plain.encode().unwrap();
        bytes[24] = COMPAT_STANDS_FOR as u8;
        let body = bytes.len() - 32;
        let digest = sha256(&bytes[..body]);
        bytes[body..].copy_from_slice(&digest);
        let err = Header::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("STANDS_FOR"), "{err}");
    }

    #[test]
    fn header_round_trip_and_every_bit_flip_detected() {
        let mut h = sample_header();
        h.incompat |= INCOMPAT_PARENT;
        h.parent = Some(ParentRef {
            uuid: [1; 16],
            digest: [2; 32],
            state: Some([3; 32]),
        });
        let bytes = h.encode().unwrap();
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Header::decode(&b).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn version_2_headers_are_read_but_not_written() {
        let mut h = sample_header();
        h.version_major = 2;
        assert!(h.encode().is_err());
        // A 2.0 header (48-byte parent reference) decodes.
        let mut h3 = sample_header();
        h3.incompat |= INCOMPAT_PARENT;
        h3.parent = Some(ParentRef {
            uuid: [1; 16],
            digest: [2; 32],
            state: Some([3; 32]),
        });
        let mut bytes = h3.encode().unwrap();
        bytes.truncate(bytes.len() - 32);
        bytes[8] = 2;
        // Drop the state digest of the parent reference (after the creator).
        let at = HEADER_FIXED_LEN + h3.creator.len() + 48;
        bytes.drain(at..at + 32);
        let len = bytes.len() as u32 + 32;
        bytes[12..16].copy_from_slice(&len.to_le_bytes());
        let digest = sha256(&bytes);
        bytes.extend_from_slice(&digest);
        let back = Header::decode(&bytes).unwrap();
        assert_eq!(back.version_major, 2);
        assert_eq!(back.parent.unwrap().state, None);
        assert_eq!(back.parent.unwrap().digest, [2; 32]);
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b", "a\0b", "x\ny", &"n".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("drive-scsi0").unwrap();
        check_name("qemu-server.conf").unwrap();
    }

    #[test]
    fn unknown_incompat_feature_is_named() {
        let mut h = sample_header();
        h.incompat |= 1 << 9;
        // encode validates only names and limits, not feature bits
        let bytes = h.encode().unwrap();
        let err = Header::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("bit 9"), "{err}");
    }

    #[test]
    fn extent_header_binds_uuid_and_seq_and_refuses_a_cipher() {
        let h = ExtentHeader {
            uuid: [4; 16],
            seq: 77,
            entry_count: 2,
            mask_count: 1,
            stored_len: 4096,
            raw_len: 4096,
            codec: Codec::None,
        };
        let b = h.encode();
        assert_eq!(ExtentHeader::decode(&b, 0).unwrap(), h);
        assert_eq!(h.total_len(), 64 + 32 + 8 + 4096 + 32);
        // A cipher needs a newer vma, even with a valid self-check.
        let mut c = b;
        c[EXTENT_CIPHER_AT] = 1;
        let check = short_check(&c[..56]);
        c[56..].copy_from_slice(&check);
        let err = ExtentHeader::decode(&c, 0).unwrap_err();
        assert!(matches!(err, Error::UnknownFeatures { .. }), "{err}");
        for i in 0..64 {
            let mut f = b;
            f[i] ^= 1;
            assert!(ExtentHeader::decode(&f, 0).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn index_fixed_layout_and_records_round_trip() {
        let f = IndexFixed {
            uuid: [3; 16],
            run_count: 4097,
            extent_count: 3,
            leaf_count: 2049,
            drive_count: 2,
            runs_per_page: RUNS_PER_PAGE,
            extents_per_page: EXTENTS_PER_PAGE,
            leaves_per_page: LEAVES_PER_PAGE,
        };
        let b = f.encode();
        assert_eq!(IndexFixed::decode(&b, 0).unwrap(), f);
        let l = f.layout().unwrap();
        assert_eq!((l.run_pages, l.extent_pages, l.leaf_pages), (2, 1, 2));
        assert_eq!(l.page(PageKind::Runs, 1), (4096 * 24, 24, 1));
        assert_eq!(
            l.len,
            64 + 4097 * 24 + 3 * 48 + 2049 * 32 + 2 * 80 + 2 * 56 + 3 * 32 + 32
        );
        let r = DriveRecord {
            drive: DriveId(3),
            data_clusters: 5,
            stored_bytes: 6,
            digest: Some([9; 32]),
            interrupted: false,
            first_run: 7,
            run_count: 8,
            first_leaf: 9,
            unchanged: true,
        };
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out.len(), DRIVE_RECORD_LEN);
        assert_eq!(DriveRecord::decode(&out, 0).unwrap(), r);
        let k = RunPageKey {
            drive: DriveId(2),
            start: 11,
            first_leaf: 12,
            digest: [13; 32],
        };
        let mut out = Vec::new();
        k.encode(&mut out);
        assert_eq!(out.len(), RUN_KEY_LEN);
        assert_eq!(RunPageKey::decode(&out), k);
        let e = ExtentRecord {
            offset: ArchiveOffset(1234),
            len: 99,
            digest: [1; 32],
        };
        let mut out = Vec::new();
        e.encode(&mut out);
        assert_eq!(out.len(), EXTENT_RECORD_LEN);
        assert_eq!(ExtentRecord::decode(&out), e);
        // Counts that overflow have no layout.
        let huge = IndexFixed {
            run_count: u64::MAX / 8,
            ..f
        };
        assert!(huge.layout().is_none());
    }

    #[test]
    fn footer_round_trip() {
        let f = Footer {
            index_offset: 1000,
            index_len: 200,
            extent_count: 3,
            archive_digest: [5; 32],
        };
        let b = f.encode();
        assert_eq!(Footer::decode(&b, 1200).unwrap(), f);
        assert!(Footer::decode(&b, 1201).is_err());
    }
}

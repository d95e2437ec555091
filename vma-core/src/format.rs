//! On-disk structures of the native vma format, version 2, and their byte
//! encodings. No I/O happens here: every function turns bytes into values or
//! values into bytes. `format-spec.md` at the repository root is the
//! normative description; the constants below must never change for 2.x.
//!
//! All integers are little-endian.

use crate::digest::{check_matches, Sha256};

use crate::error::{Error, Result};
use crate::types::{clusters_for, DriveId};

/// Magic at offset 0 of every v2 archive. Never change.
pub const ARCHIVE_MAGIC: [u8; 8] = *b"\x89VMA\r\n\x1a\n";
/// Magic of every extent header. Never change.
pub const EXTENT_MAGIC: [u8; 8] = *b"VMA2EXT\0";
/// Magic of the index block. Never change.
pub const INDEX_MAGIC: [u8; 8] = *b"VMA2IDX\0";
/// Magic of the footer. Never change.
pub const FOOTER_MAGIC: [u8; 8] = *b"VMA2END\0";

/// Major version written and read by this code.
pub const VERSION_MAJOR: u16 = 2;
/// Minor version written by this code.
pub const VERSION_MINOR: u16 = 0;

/// Image data is addressed in clusters of this many bytes.
pub const CLUSTER_SIZE: usize = 64 * 1024;
/// Clusters are split into blocks of this size; all-zero blocks are not stored.
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per cluster (one bit each in a block mask).
pub const BLOCKS_PER_CLUSTER: usize = CLUSTER_SIZE / BLOCK_SIZE;

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
/// Bytes of one stand-in list item: uuid and archive digest.
pub const ARCHIVE_REF_LEN: usize = 48;

/// Size of the fixed part of the header.
pub const HEADER_FIXED_LEN: usize = 64;
/// Size of an extent header.
pub const EXTENT_HEADER_LEN: usize = 64;
/// Size of one run entry inside an extent.
pub const ENTRY_LEN: usize = 16;
/// Size of the fixed part of the index block.
pub const INDEX_FIXED_LEN: usize = 32;
/// Size of one run in the index.
pub const INDEX_RUN_LEN: usize = 24;
/// Size of one drive record in the index.
pub const DRIVE_RECORD_LEN: usize = 64;
/// Size of the footer at the very end of a complete archive.
pub const FOOTER_LEN: usize = 80;
/// No drive has more clusters than this (from [`limits::MAX_DRIVE_SIZE`]).
pub const MAX_CLUSTERS: u64 = limits::MAX_DRIVE_SIZE / CLUSTER_SIZE as u64;
/// Size of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;

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
    fn code(self) -> u8 {
        match self {
            RunKind::Data => 0,
            RunKind::Zero => 1,
            RunKind::Unchanged => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
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
}

/// A named configuration blob (VM config, firewall rules, NVRAM, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigBlob {
    /// UTF-8 name (a safe file name).
    pub name: String,
    /// The blob's bytes.
    pub data: Vec<u8>,
}

/// An archive's identity: its uuid and archive digest. An incremental
/// archive names its parent this way; a stand-in names the archives whose
/// point in time it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParentRef {
    /// The archive's uuid.
    pub uuid: [u8; 16],
    /// The archive's archive digest (see [`Footer::archive_digest`]).
    pub digest: [u8; 32],
}

impl ParentRef {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.uuid);
        out.extend_from_slice(&self.digest);
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
    /// Minor version (2.x).
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

/// Bounds-checked little-endian reader over a byte slice whose first byte
/// sits at absolute offset `base`; errors carry absolute offsets.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: u64,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8], base: u64, what: &'static str) -> Self {
        Cursor {
            bytes,
            pos: 0,
            base,
            what,
        }
    }

    pub(crate) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() - self.pos < n {
            return Err(Error::corrupt(
                self.offset(),
                format!(
                    "{} needs {} more bytes but only {} remain in it",
                    self.what,
                    n,
                    self.bytes.len() - self.pos
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn utf8(&mut self, n: usize, field: &str) -> Result<String> {
        let at = self.offset();
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::corrupt(at, format!("{field} is not valid UTF-8")))
    }
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
}

pub use crate::digest::sha256;

/// The 8-byte self-check of fixed-size headers: first 8 bytes of SHA-256.
pub fn short_check(data: &[u8]) -> [u8; 8] {
    sha256(data)[..8].try_into().expect("8 bytes")
}

fn names_of_bits(bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| format!("bit {b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the fixed 64 bytes at the start of an archive say before the rest is read.
#[derive(Clone, Copy, Debug)]
pub struct HeaderPrefix {
    /// Total length of the header block including its digest.
    pub header_len: usize,
}

impl HeaderPrefix {
    /// Check magic, version, features and length of the first 64 bytes.
    pub fn decode(fixed: &[u8; HEADER_FIXED_LEN]) -> Result<Self> {
        if fixed[..8] != ARCHIVE_MAGIC {
            return Err(Error::NotAnArchive {
                found: hex::encode(&fixed[..8]),
            });
        }
        let mut c = Cursor::new(fixed, 0, "header");
        c.take(8)?;
        let major = c.u16()?;
        let minor = c.u16()?;
        if major != VERSION_MAJOR {
            return Err(Error::UnsupportedVersion { major, minor });
        }
        let header_len = c.u32()? as usize;
        let incompat = c.u64()?;
        let unknown = incompat & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(Error::UnknownFeatures {
                bits: unknown,
                names: names_of_bits(unknown),
            });
        }
        if !(HEADER_FIXED_LEN + DIGEST_LEN..=limits::MAX_HEADER_LEN).contains(&header_len) {
            return Err(Error::corrupt(
                12,
                format!(
                    "header length {header_len} is outside {}..={}",
                    HEADER_FIXED_LEN + DIGEST_LEN,
                    limits::MAX_HEADER_LEN
                ),
            ));
        }
        Ok(HeaderPrefix { header_len })
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
        HEADER_FIXED_LEN
            + self.creator.len()
            + if self.parent.is_some() { 48 } else { 0 }
            + self.drives.iter().map(|d| 16 + d.name.len()).sum::<usize>()
            + self
                .configs
                .iter()
                .map(|c| 8 + c.name.len() + c.data.len())
                .sum::<usize>()
            + if self.stands_for.is_empty() {
                0
            } else {
                8 + STANDS_FOR_CONFIG.len() + ARCHIVE_REF_LEN * self.stands_for.len()
            }
            + DIGEST_LEN
    }

    /// Config entries as stored: the configs, then the stand-in list.
    fn stored_config_count(&self) -> usize {
        self.configs.len() + !self.stands_for.is_empty() as usize
    }

    /// Encode the header block, ending with its SHA-256. Validates first.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let len = self.encoded_len();
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&ARCHIVE_MAGIC);
        b.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
        b.extend_from_slice(&self.version_minor.to_le_bytes());
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.extend_from_slice(&self.incompat.to_le_bytes());
        b.extend_from_slice(&self.compat.to_le_bytes());
        b.extend_from_slice(&self.uuid);
        b.extend_from_slice(&self.ctime.to_le_bytes());
        b.extend_from_slice(&(self.drives.len() as u16).to_le_bytes());
        b.extend_from_slice(&(self.stored_config_count() as u16).to_le_bytes());
        b.push(match self.compression.codec {
            Codec::None => 0,
            Codec::Zstd => 1,
        });
        b.push(self.compression.level as u8);
        b.extend_from_slice(&(self.creator.len() as u16).to_le_bytes());
        debug_assert_eq!(b.len(), HEADER_FIXED_LEN);
        b.extend_from_slice(self.creator.as_bytes());
        if let Some(p) = &self.parent {
            p.encode(&mut b);
        }
        for d in &self.drives {
            b.push(d.id.0);
            b.push(0); // flags
            b.extend_from_slice(&(d.name.len() as u16).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&d.size.to_le_bytes());
            b.extend_from_slice(d.name.as_bytes());
        }
        for c in &self.configs {
            b.extend_from_slice(&(c.name.len() as u16).to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&(c.data.len() as u32).to_le_bytes());
            b.extend_from_slice(c.name.as_bytes());
            b.extend_from_slice(&c.data);
        }
        if !self.stands_for.is_empty() {
            let len = ARCHIVE_REF_LEN * self.stands_for.len();
            b.extend_from_slice(&(STANDS_FOR_CONFIG.len() as u16).to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(STANDS_FOR_CONFIG.as_bytes());
            for r in &self.stands_for {
                r.encode(&mut b);
            }
        }
        let digest = sha256(&b);
        b.extend_from_slice(&digest);
        debug_assert_eq!(b.len(), len);
        Ok(b)
    }

    /// Decode a whole header block (as long as [`HeaderPrefix::header_len`]),
    /// verifying its digest and every limit.
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
        let mut c = Cursor::new(&block[..body_len], 0, "header");
        c.take(8)?;
        c.u16()?;
        let version_minor = c.u16()?;
        c.u32()?;
        let incompat = c.u64()?;
        let compat = c.u64()?;
        let uuid = c.array::<16>()?;
        let ctime = c.i64()?;
        let drive_count = c.u16()? as usize;
        let config_count = c.u16()? as usize;
        let codec_at = c.offset();
        let codec = match c.u8()? {
            0 => Codec::None,
            1 => Codec::Zstd,
            other => {
                return Err(Error::corrupt(
                    codec_at,
                    format!("unknown compression code {other}"),
                ))
            }
        };
        let level = c.u8()? as i8;
        let creator_len = c.u16()? as usize;
        if drive_count == 0 || drive_count > limits::MAX_DRIVES {
            return Err(Error::corrupt(
                56,
                format!("drive count {drive_count} is outside 1..=255"),
            ));
        }
        if config_count > limits::MAX_CONFIGS {
            return Err(Error::corrupt(
                58,
                format!("config count {config_count} exceeds 256"),
            ));
        }
        let creator = c.utf8(creator_len, "creator")?;
        let parent = if incompat & INCOMPAT_PARENT != 0 {
            Some(ParentRef {
                uuid: c.array()?,
                digest: c.array()?,
            })
        } else {
            None
        };
        let mut drives = Vec::with_capacity(drive_count);
        for _ in 0..drive_count {
            let at = c.offset();
            let id = DriveId(c.u8()?);
            let _flags = c.u8()?;
            let name_len = c.u16()? as usize;
            c.u32()?;
            let size = c.u64()?;
            let name = c.utf8(name_len, "drive name")?;
            check_name(&name).map_err(|e| Error::corrupt(at, e.to_string()))?;
            drives.push(DriveInfo { id, name, size });
        }
        let mut configs = Vec::with_capacity(config_count);
        for _ in 0..config_count {
            let at = c.offset();
            let name_len = c.u16()? as usize;
            c.u16()?;
            let data_len = c.u32()? as usize;
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
            decode_stands_for(&mut configs, body_len as u64)?
        } else {
            Vec::new()
        };
        let header = Header {
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
}

/// Take the stand-in list (the last config entry, [`STANDS_FOR_CONFIG`])
/// out of `configs`. `at` is where the header's digest starts, for errors.
fn decode_stands_for(configs: &mut Vec<ConfigBlob>, at: u64) -> Result<Vec<ParentRef>> {
    let list = match configs.last() {
        Some(c) if c.name == STANDS_FOR_CONFIG => configs.pop().expect("present"),
        _ => {
            return Err(Error::corrupt(
                at,
                format!("the header has the STANDS_FOR feature but its last config entry is not {STANDS_FOR_CONFIG:?}"),
            ))
        }
    };
    let n = list.data.len() / ARCHIVE_REF_LEN;
    if list.data.len() % ARCHIVE_REF_LEN != 0 || n == 0 || n > limits::MAX_STANDS_FOR {
        return Err(Error::corrupt(
            at,
            format!(
                "the stand-in list is {} bytes; it holds 1 to {} entries of {ARCHIVE_REF_LEN} bytes",
                list.data.len(),
                limits::MAX_STANDS_FOR
            ),
        ));
    }
    Ok(list
        .data
        .chunks_exact(ARCHIVE_REF_LEN)
        .map(|r| ParentRef {
            uuid: r[..16].try_into().expect("16"),
            digest: r[16..].try_into().expect("32"),
        })
        .collect())
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

/// The fixed header of an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentHeader {
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

/// Bytes of mask array including padding to a multiple of 8.
pub fn masks_len(mask_count: usize) -> usize {
    (mask_count * 2).next_multiple_of(8)
}

impl ExtentHeader {
    /// Total length of the extent (header, entries, masks, payload, digest).
    pub fn total_len(&self) -> usize {
        EXTENT_HEADER_LEN
            + self.entry_count as usize * ENTRY_LEN
            + masks_len(self.mask_count as usize)
            + self.stored_len as usize
            + DIGEST_LEN
    }

    /// Offset of the payload from the extent start.
    pub fn payload_start(&self) -> usize {
        EXTENT_HEADER_LEN
            + self.entry_count as usize * ENTRY_LEN
            + masks_len(self.mask_count as usize)
    }

    /// Encode the 64-byte header with its self-check.
    pub fn encode(&self) -> [u8; EXTENT_HEADER_LEN] {
        let mut b = [0u8; EXTENT_HEADER_LEN];
        b[..8].copy_from_slice(&EXTENT_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.entry_count.to_le_bytes());
        b[20..24].copy_from_slice(&self.mask_count.to_le_bytes());
        b[24] = match self.codec {
            Codec::None => 0,
            Codec::Zstd => 1,
        };
        b[28..32].copy_from_slice(&self.stored_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.raw_len.to_le_bytes());
        let check = short_check(&b[..56]);
        b[56..].copy_from_slice(&check);
        b
    }

    /// Decode and check a 64-byte extent header found at absolute `offset`.
    pub fn decode(b: &[u8; EXTENT_HEADER_LEN], offset: u64) -> Result<Self> {
        if b[..8] != EXTENT_MAGIC {
            return Err(Error::corrupt(
                offset,
                format!(
                    "expected an extent header (magic {}), found {}",
                    hex::encode(EXTENT_MAGIC),
                    hex::encode(&b[..8])
                ),
            ));
        }
        if !check_matches(&b[56..], &short_check(&b[..56])) {
            return Err(Error::corrupt(
                offset,
                "extent header self-check does not match (header bytes damaged)",
            ));
        }
        let mut c = Cursor::new(b, offset, "extent header");
        c.take(8)?;
        let seq = c.u64()?;
        let entry_count = c.u32()?;
        let mask_count = c.u32()?;
        let codec = match c.u8()? {
            0 => Codec::None,
            1 => Codec::Zstd,
            other => {
                return Err(Error::corrupt(
                    offset + 24,
                    format!("extent #{seq}: unknown codec {other}"),
                ))
            }
        };
        c.take(3)?;
        let stored_len = c.u32()?;
        let raw_len = c.u32()?;
        let h = ExtentHeader {
            seq,
            entry_count,
            mask_count,
            codec,
            stored_len,
            raw_len,
        };
        let bad = if entry_count == 0 || entry_count as usize > limits::MAX_EXTENT_ENTRIES {
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
        };
        match bad {
            Some(what) => Err(Error::corrupt(offset, format!("extent #{seq}: {what}"))),
            None => Ok(h),
        }
    }
}

/// Encode one run entry.
pub fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    out.push(e.drive.0);
    out.push(e.kind.code());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&e.count.to_le_bytes());
    out.extend_from_slice(&e.start.to_le_bytes());
}

/// Decode the entries and masks of an extent whose header is `h`; `body`
/// starts right after the 64-byte header, at absolute `offset`. Checks
/// that masks match the data clusters and popcounts match `raw_len`.
pub fn decode_entries(
    h: &ExtentHeader,
    body: &[u8],
    offset: u64,
) -> Result<(Vec<Entry>, Vec<u16>)> {
    let mut c = Cursor::new(body, offset, "extent entries");
    let mut entries = Vec::with_capacity(h.entry_count as usize);
    let mut data_clusters = 0u64;
    for _ in 0..h.entry_count {
        let at = c.offset();
        let drive = DriveId(c.u8()?);
        let code = c.u8()?;
        let kind = RunKind::from_code(code).ok_or_else(|| {
            Error::corrupt(
                at + 1,
                format!("extent #{}: unknown run kind {code}", h.seq),
            )
        })?;
        c.u16()?;
        let count = c.u32()?;
        let start = c.u64()?;
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
    let masks: Vec<u16> = mask_bytes[..h.mask_count as usize * 2]
        .chunks_exact(2)
        .map(|m| u16::from_le_bytes([m[0], m[1]]))
        .collect();
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

/// One run of the trailing index.
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
    /// File offset of the extent holding the data (0 for zero/unchanged runs).
    pub extent_offset: u64,
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
    /// SHA-256 of the whole logical drive, when the writer saw it in order.
    pub digest: Option<[u8; 32]>,
    /// The capture that wrote this drive was interrupted: what the archive
    /// holds (with its parents) is no point in time. It only serves as the
    /// parent of the retry that completes it, and is never restored alone.
    pub interrupted: bool,
}

/// Drive record flag: `digest` is present.
pub const DRIVE_DIGEST_PRESENT: u8 = 1;
/// Drive record flag: the drive's capture was interrupted (see
/// [`DriveRecord::interrupted`]).
pub const DRIVE_INTERRUPTED: u8 = 2;

/// The trailing index: every cluster run and per-drive records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// Runs sorted by (drive, start), non-overlapping, adjacent runs merged.
    pub runs: Vec<IndexRun>,
    /// One record per drive, in id order.
    pub drives: Vec<DriveRecord>,
}

impl Index {
    /// Refuse drives (those `selected`) written by an interrupted capture:
    /// their content is no point in time (see [`DriveRecord::interrupted`]).
    pub fn refuse_interrupted(
        &self,
        header: &Header,
        selected: impl Fn(DriveId) -> bool,
    ) -> Result<()> {
        match self.drives.iter().find(|r| r.interrupted && selected(r.drive)) {
            None => Ok(()),
            Some(r) => Err(Error::Invalid(format!(
                "drive {} comes from an interrupted capture: it is no point in time, only the parent of the capture that retried it (restore that one)",
                header.drive(r.drive).map_or("?", |d| d.name.as_str())
            ))),
        }
    }
}

impl Index {
    /// Sort runs and merge neighbours that continue each other (same drive,
    /// kind and extent, contiguous clusters). Zero and unchanged runs merge
    /// across extents. Writer and readers use this same canonical form.
    pub fn canonical_runs(mut runs: Vec<IndexRun>) -> Vec<IndexRun> {
        runs.sort_unstable_by_key(|r| (r.drive, r.start));
        let mut out: Vec<IndexRun> = Vec::with_capacity(runs.len());
        for r in runs {
            if let Some(last) = out.last_mut() {
                if last.drive == r.drive
                    && last.kind == r.kind
                    && last.extent_offset == r.extent_offset
                    && last.start + last.count as u64 == r.start
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

    /// Encode the index block, ending with its SHA-256.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            INDEX_FIXED_LEN
                + self.runs.len() * INDEX_RUN_LEN
                + self.drives.len() * DRIVE_RECORD_LEN
                + DIGEST_LEN,
        );
        b.extend_from_slice(&INDEX_MAGIC);
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.drives.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 12]);
        for r in &self.runs {
            b.push(r.drive.0);
            b.push(r.kind.code());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&r.count.to_le_bytes());
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.extent_offset.to_le_bytes());
        }
        for d in &self.drives {
            b.push(d.drive.0);
            b.push(
                if d.digest.is_some() {
                    DRIVE_DIGEST_PRESENT
                } else {
                    0
                } | if d.interrupted { DRIVE_INTERRUPTED } else { 0 },
            );
            b.extend_from_slice(&[0u8; 6]);
            b.extend_from_slice(&d.data_clusters.to_le_bytes());
            b.extend_from_slice(&d.stored_bytes.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&d.digest.unwrap_or([0; 32]));
        }
        let digest = sha256(&b);
        b.extend_from_slice(&digest);
        b
    }

    /// Length of an index block from its 32-byte fixed part (bounded by `max_len`).
    pub fn block_len(fixed: &[u8; INDEX_FIXED_LEN], offset: u64, max_len: u64) -> Result<usize> {
        if fixed[..8] != INDEX_MAGIC {
            return Err(Error::corrupt(
                offset,
                format!(
                    "expected the index (magic {}), found {}",
                    hex::encode(INDEX_MAGIC),
                    hex::encode(&fixed[..8])
                ),
            ));
        }
        let runs = u64::from_le_bytes(fixed[8..16].try_into().expect("8"));
        let drives = u32::from_le_bytes(fixed[16..20].try_into().expect("4")) as u64;
        let len = runs
            .checked_mul(INDEX_RUN_LEN as u64)
            .and_then(|r| r.checked_add(drives * DRIVE_RECORD_LEN as u64))
            .and_then(|r| r.checked_add((INDEX_FIXED_LEN + DIGEST_LEN) as u64))
            .filter(|&l| l <= max_len && drives <= limits::MAX_DRIVES as u64)
            .ok_or_else(|| {
                Error::corrupt(
                    offset + 8,
                    format!("index claims {runs} runs and {drives} drives, more than can fit"),
                )
            })?;
        Ok(len as usize)
    }

    /// Decode a whole index block at absolute `offset`, verifying its digest.
    pub fn decode(block: &[u8], offset: u64) -> Result<Index> {
        if block.len() < INDEX_FIXED_LEN + DIGEST_LEN {
            return Err(Error::truncated(offset, "index block too short"));
        }
        let fixed: &[u8; INDEX_FIXED_LEN] = block[..INDEX_FIXED_LEN].try_into().expect("32");
        let len = Index::block_len(fixed, offset, block.len() as u64)?;
        if len != block.len() {
            return Err(Error::corrupt(
                offset,
                format!("index block is {} bytes, its counts say {len}", block.len()),
            ));
        }
        let body = &block[..len - DIGEST_LEN];
        if !check_matches(&block[len - DIGEST_LEN..], &sha256(body)) {
            return Err(Error::corrupt(
                offset + body.len() as u64,
                "index SHA-256 does not match the index bytes",
            ));
        }
        let mut c = Cursor::new(body, offset, "index");
        c.take(8)?;
        let run_count = c.u64()? as usize;
        let drive_count = c.u32()? as usize;
        c.take(12)?;
        let mut runs = Vec::with_capacity(run_count);
        for _ in 0..run_count {
            let at = c.offset();
            let drive = DriveId(c.u8()?);
            let code = c.u8()?;
            let kind = RunKind::from_code(code)
                .ok_or_else(|| Error::corrupt(at + 1, format!("index: unknown run kind {code}")))?;
            c.u16()?;
            let count = c.u32()?;
            let start = c.u64()?;
            let extent_offset = c.u64()?;
            if count == 0 || start.saturating_add(count as u64) > MAX_CLUSTERS {
                let why = if count == 0 {
                    "a run holds at least one cluster"
                } else {
                    "it lies beyond the largest drive the format allows (128 TiB)"
                };
                return Err(Error::corrupt(
                    at,
                    format!(
                        "index: invalid run of drive id {drive}, clusters {start}+{count}: {why}"
                    ),
                ));
            }
            runs.push(IndexRun {
                drive,
                start,
                count,
                kind,
                extent_offset,
            });
        }
        let mut drives = Vec::with_capacity(drive_count);
        for _ in 0..drive_count {
            let drive = DriveId(c.u8()?);
            let flags = c.u8()?;
            c.take(6)?;
            let data_clusters = c.u64()?;
            let stored_bytes = c.u64()?;
            c.u64()?;
            let digest: [u8; 32] = c.array()?;
            drives.push(DriveRecord {
                drive,
                data_clusters,
                stored_bytes,
                digest: (flags & DRIVE_DIGEST_PRESENT != 0).then_some(digest),
                interrupted: flags & DRIVE_INTERRUPTED != 0,
            });
        }
        Ok(Index { runs, drives })
    }
}

/// The fixed-size footer at the end of a complete archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the index block.
    pub index_offset: u64,
    /// Length of the index block.
    pub index_len: u64,
    /// Number of extents.
    pub extent_count: u64,
    /// SHA-256 over the header digest, every extent digest in order, and the
    /// index digest: one value that identifies the whole archive's content.
    pub archive_digest: [u8; 32],
}

impl Footer {
    /// Encode the 80-byte footer with its self-check.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(&FOOTER_MAGIC);
        b[8..16].copy_from_slice(&self.index_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.index_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.extent_count.to_le_bytes());
        b[32..64].copy_from_slice(&self.archive_digest);
        let check = short_check(&b[..72]);
        b[72..].copy_from_slice(&check);
        b
    }

    /// Decode and check a footer found at absolute `offset`.
    pub fn decode(b: &[u8; FOOTER_LEN], offset: u64) -> Result<Footer> {
        if b[..8] != FOOTER_MAGIC {
            return Err(Error::corrupt(
                offset,
                format!(
                    "expected the footer (magic {}), found {}: the archive is incomplete or damaged at its end",
                    hex::encode(FOOTER_MAGIC),
                    hex::encode(&b[..8])
                ),
            ));
        }
        if !check_matches(&b[72..], &short_check(&b[..72])) {
            return Err(Error::corrupt(
                offset,
                "footer self-check does not match (footer damaged)",
            ));
        }
        let f = Footer {
            index_offset: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            index_len: u64::from_le_bytes(b[16..24].try_into().expect("8")),
            extent_count: u64::from_le_bytes(b[24..32].try_into().expect("8")),
            archive_digest: b[32..64].try_into().expect("32"),
        };
        if f.index_offset.checked_add(f.index_len) != Some(offset) {
            return Err(Error::corrupt(
                offset + 8,
                format!(
                    "footer says the index is at {}+{} but it must end where the footer starts ({offset})",
                    f.index_offset, f.index_len
                ),
            ));
        }
        Ok(f)
    }
}

/// Running SHA-256 that yields the archive digest (see [`Footer::archive_digest`]).
#[derive(Clone, Default)]
pub struct ArchiveDigest(Sha256);

impl ArchiveDigest {
    /// Add the digest of the next block (header, extent or index) in file order.
    pub fn add(&mut self, block_digest: &[u8]) {
        self.0.update(block_digest);
    }
    /// The final value.
    pub fn finish(self) -> [u8; 32] {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> Header {
        Header {
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
        };
        let b = ParentRef {
            uuid: [9; 16],
            digest: [10; 32],
        };
        h.stands_for = vec![a, b];
        // The bit must agree with the list.
        assert!(h.encode().is_err());
        h.compat |= COMPAT_STANDS_FOR;
        let bytes = h.encode().unwrap();
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        // Laid out as one more config entry (what a 2.0 reader sees).
        assert_eq!(u16::from_le_bytes([bytes[58], bytes[59]]), 2);
        let name_at = bytes.len() - 32 - 96 - STANDS_FOR_CONFIG.len();
        assert_eq!(
            &bytes[name_at..name_at + STANDS_FOR_CONFIG.len()],
            STANDS_FOR_CONFIG.as_bytes()
        );
        assert_eq!(
            &bytes[bytes.len() - 32 - 96..bytes.len() - 32 - 80],
            &[7; 16]
        );
        // A user config of that name clashes with the list.
        let mut clash = h.clone();
        clash.configs.push(ConfigBlob {
            name: STANDS_FOR_CONFIG.into(),
            data: vec![],
        });
        assert!(clash.encode().is_err());
        // The bit without the list (here: the list renamed) is damage.
        let mut plain = sample_header();
        plain.compat = COMPAT_STANDS_FOR;
        plain.configs.push(ConfigBlob {
            name: "vma-stands-fox".into(),
            data: vec![0; 48],
        });
        plain.compat = 0;
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
        let h = sample_header();
        let bytes = h.encode().unwrap();
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Header::decode(&b).is_err(), "flip at {i} went unnoticed");
        }
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

    #[test]
    fn canonical_runs_merge() {
        let r = |start, count, kind, off| IndexRun {
            drive: DriveId(1),
            start,
            count,
            kind,
            extent_offset: off,
        };
        let runs = Index::canonical_runs(vec![
            r(4, 2, RunKind::Zero, 0),
            r(0, 2, RunKind::Data, 100),
            r(2, 2, RunKind::Data, 100),
            r(6, 1, RunKind::Zero, 0),
            r(7, 1, RunKind::Data, 200),
        ]);
        assert_eq!(
            runs,
            vec![
                r(0, 4, RunKind::Data, 100),
                r(4, 3, RunKind::Zero, 0),
                r(7, 1, RunKind::Data, 200)
            ]
        );
    }
}

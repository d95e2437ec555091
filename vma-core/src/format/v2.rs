//! What archives of version 2.0 look like: read (never written) so that
//! archives made before 3.0 stay readable. Their header is decoded by
//! [`super::Header::decode`] (with 48-byte archive references); their
//! extents, index and footer by what is here. 2.0 cannot prove what 3.0
//! proves: its extents name neither their archive nor their position, its
//! chain links are accepted on the uuid and the digest a parent's footer
//! states, and its drive digest is one plain SHA-256 of the drive.

use crate::digest::check_matches;
use crate::error::{Error, Result};
use crate::types::DriveId;

use super::v3::{
    extent_limits, le_u32, le_u64, sha256, short_check, BodyCounts, Codec, Cursor, DriveRecord,
    IndexRun, DIGEST_LEN, DRIVE_DIGEST_PRESENT, DRIVE_INTERRUPTED, EXTENT_HEADER_LEN, FOOTER_LEN,
};

/// Major version of the archives described here.
pub const VERSION_MAJOR: u16 = 2;
/// Magic of every 2.0 extent header. Never change.
pub const EXTENT_MAGIC: [u8; 8] = *b"VMA2EXT\0";
/// Magic of the 2.0 index block. Never change.
pub const INDEX_MAGIC: [u8; 8] = *b"VMA2IDX\0";
/// Magic of the 2.0 footer. Never change.
pub const FOOTER_MAGIC: [u8; 8] = *b"VMA2END\0";
/// Bytes of one 2.0 archive reference: uuid and archive digest.
pub const ARCHIVE_REF_LEN: usize = 48;
/// Size of the fixed part of the 2.0 index block.
pub const INDEX_FIXED_LEN: usize = 32;
/// Size of one run in the 2.0 index.
pub const INDEX_RUN_LEN: usize = 24;
/// Size of one drive record in the 2.0 index.
pub const DRIVE_RECORD_LEN: usize = 64;

/// The fixed header of a 2.0 extent (no archive uuid).
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

impl ExtentHeader {
    /// Total length of the extent (header, entries, masks, payload, digest).
    pub fn total_len(&self) -> usize {
        self.payload_start() + self.stored_len as usize + DIGEST_LEN
    }

    /// Offset of the payload from the extent start.
    pub fn payload_start(&self) -> usize {
        EXTENT_HEADER_LEN
            + self.entry_count as usize * super::ENTRY_LEN
            + super::masks_len(self.mask_count as usize)
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

    /// Encode the 64-byte header with its self-check (for tests that need
    /// 2.0 bytes; nothing writes 2.0 archives).
    pub fn encode(&self) -> [u8; EXTENT_HEADER_LEN] {
        let mut b = [0u8; EXTENT_HEADER_LEN];
        b[..8].copy_from_slice(&EXTENT_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.entry_count.to_le_bytes());
        b[20..24].copy_from_slice(&self.mask_count.to_le_bytes());
        b[24] = self.codec.code();
        b[28..32].copy_from_slice(&self.stored_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.raw_len.to_le_bytes());
        let check = short_check(&b[..56]);
        b[56..].copy_from_slice(&check);
        b
    }

    /// Decode and check a 64-byte 2.0 extent header found at absolute `offset`.
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
        let seq = le_u64(b, 8);
        let codec = Codec::from_code(b[24]).ok_or_else(|| {
            Error::corrupt(
                offset + 24,
                format!("extent #{seq}: unknown codec {}", b[24]),
            )
        })?;
        let h = ExtentHeader {
            seq,
            entry_count: le_u32(b, 16),
            mask_count: le_u32(b, 20),
            codec,
            stored_len: le_u32(b, 28),
            raw_len: le_u32(b, 32),
        };
        match extent_limits(h.entry_count, h.mask_count, codec, h.stored_len, h.raw_len) {
            Some(what) => Err(Error::corrupt(offset, format!("extent #{seq}: {what}"))),
            None => Ok(h),
        }
    }
}

/// The 2.0 trailing index: every cluster run (`extent` is a file offset)
/// and per-drive records, held whole in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// Runs sorted by (drive, start), non-overlapping, adjacent runs merged.
    pub runs: Vec<IndexRun>,
    /// One record per drive, in id order.
    pub drives: Vec<DriveRecord>,
}

impl Index {
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
        let runs = le_u64(fixed, 8);
        let drives = le_u32(fixed, 16) as u64;
        let len = runs
            .checked_mul(INDEX_RUN_LEN as u64)
            .and_then(|r| r.checked_add(drives * DRIVE_RECORD_LEN as u64))
            .and_then(|r| r.checked_add((INDEX_FIXED_LEN + DIGEST_LEN) as u64))
            .filter(|&l| l <= max_len && drives <= super::limits::MAX_DRIVES as u64)
            .ok_or_else(|| {
                Error::corrupt(
                    offset + 8,
                    format!("index claims {runs} runs and {drives} drives, more than can fit"),
                )
            })?;
        Ok(len as usize)
    }

    /// Run and drive counts of an index block's fixed part.
    pub fn counts(fixed: &[u8; INDEX_FIXED_LEN]) -> (u64, u64) {
        (le_u64(fixed, 8), le_u32(fixed, 16) as u64)
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
            runs.push(IndexRun::decode(c.take(INDEX_RUN_LEN)?, at)?);
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
                data_clusters,
                stored_bytes,
                digest: (flags & DRIVE_DIGEST_PRESENT != 0).then_some(digest),
                interrupted: flags & DRIVE_INTERRUPTED != 0,
                ..DriveRecord::empty(drive)
            });
        }
        Ok(Index { runs, drives })
    }
}

/// The fixed-size footer at the end of a complete 2.0 archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the index block.
    pub index_offset: u64,
    /// Length of the index block.
    pub index_len: u64,
    /// Number of extents.
    pub extent_count: u64,
    /// SHA-256 over the header digest, every extent digest in order, and the
    /// index digest, as the writer stated it.
    pub archive_digest: [u8; 32],
}

impl Footer {
    /// Decode and check a 2.0 footer found at absolute `offset`.
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
            index_offset: le_u64(b, 8),
            index_len: le_u64(b, 16),
            extent_count: le_u64(b, 24),
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

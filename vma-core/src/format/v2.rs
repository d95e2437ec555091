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

use super::field::{fixed_block, FieldReader, FieldWriter, FixedBlock};
use super::v3::{
    expect_magic, expect_self_check, extent_codec, sealed, sha256, DriveRecord, ExtentFrame,
    Footer, IndexRun, DIGEST_LEN, DRIVE_DIGEST_PRESENT, DRIVE_INTERRUPTED, EXTENT_HEADER_DAMAGED,
    EXTENT_HEADER_LEN, FOOTER_LEN,
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

/// The layout of the fixed header of a 2.0 extent (no archive uuid); it
/// decodes into an [`ExtentFrame`] without uuid.
pub struct ExtentHeader;

fixed_block!(ExtentHeader = "extent header", EXTENT_HEADER_LEN;
    MAGIC("magic", 8),
    SEQ("seq", 8),
    ENTRY_COUNT("entry_count", 4),
    MASK_COUNT("mask_count", 4),
    CODEC("codec", 1),
    RESERVED("reserved", 3),
    STORED_LEN("stored_len", 4),
    RAW_LEN("raw_len", 4),
    RESERVED2("reserved", 20),
    CHECK("check", 8),
);

impl ExtentHeader {
    /// Encode the 64-byte header of `h` (whose uuid 2.0 cannot hold) with
    /// its self-check (for tests that need 2.0 bytes; nothing writes 2.0
    /// archives).
    pub fn encode(h: &ExtentFrame) -> [u8; EXTENT_HEADER_LEN] {
        let mut b = Vec::with_capacity(Self::LEN);
        FieldWriter::new(&mut b)
            .bytes(&EXTENT_MAGIC)
            .u64_le(h.seq)
            .u32_le(h.entry_count)
            .u32_le(h.mask_count)
            .u8(h.codec.code())
            .zeros(Self::RESERVED.len)
            .u32_le(h.stored_len)
            .u32_le(h.raw_len)
            .zeros(Self::RESERVED2.len);
        sealed(b)
    }

    /// Decode and check a 64-byte 2.0 extent header found at absolute `offset`.
    pub fn decode(b: &[u8; EXTENT_HEADER_LEN], offset: u64) -> Result<ExtentFrame> {
        let r = FieldReader::block::<Self>(b, offset);
        expect_magic(&r, Self::MAGIC, &EXTENT_MAGIC, "an extent header", "")?;
        expect_self_check(&r, b, Self::CHECK, EXTENT_HEADER_DAMAGED)?;
        let seq = r.u64_le_at(Self::SEQ)?;
        let h = ExtentFrame {
            uuid: None,
            seq,
            entry_count: r.u32_le_at(Self::ENTRY_COUNT)?,
            mask_count: r.u32_le_at(Self::MASK_COUNT)?,
            codec: extent_codec(&r, Self::CODEC, seq)?,
            stored_len: r.u32_le_at(Self::STORED_LEN)?,
            raw_len: r.u32_le_at(Self::RAW_LEN)?,
        };
        h.check_limits(offset)?;
        Ok(h)
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

/// The fixed part of a 2.0 index block.
pub struct IndexFixed;

fixed_block!(IndexFixed = "index", INDEX_FIXED_LEN;
    MAGIC("magic", 8),
    RUN_COUNT("run_count", 8),
    DRIVE_COUNT("drive_count", 4),
    RESERVED("reserved", 12),
);

/// One drive record of a 2.0 index block.
pub struct DriveRecordV2;

fixed_block!(DriveRecordV2 = "index drive record", DRIVE_RECORD_LEN;
    DRIVE("drive", 1),
    FLAGS("flags", 1),
    RESERVED("reserved", 6),
    DATA_CLUSTERS("data_clusters", 8),
    STORED_BYTES("stored_bytes", 8),
    RESERVED2("reserved", 8),
    DIGEST("digest", 32),
);

impl Index {
    /// Length of an index block from its 32-byte fixed part (bounded by `max_len`).
    pub fn block_len(fixed: &[u8; INDEX_FIXED_LEN], offset: u64, max_len: u64) -> Result<usize> {
        let r = FieldReader::block::<IndexFixed>(fixed, offset);
        expect_magic(&r, IndexFixed::MAGIC, &INDEX_MAGIC, "the index", "")?;
        let (runs, drives) = Index::counts(fixed);
        let len = runs
            .checked_mul(INDEX_RUN_LEN as u64)
            .and_then(|r| r.checked_add(drives * DRIVE_RECORD_LEN as u64))
            .and_then(|r| r.checked_add((INDEX_FIXED_LEN + DIGEST_LEN) as u64))
            .filter(|&l| l <= max_len && drives <= super::limits::MAX_DRIVES as u64)
            .ok_or_else(|| {
                Error::corrupt(
                    r.offset_of(IndexFixed::RUN_COUNT),
                    format!("index claims {runs} runs and {drives} drives, more than can fit"),
                )
            })?;
        Ok(len as usize)
    }

    /// Run and drive counts of an index block's fixed part.
    pub fn counts(fixed: &[u8; INDEX_FIXED_LEN]) -> (u64, u64) {
        let r = FieldReader::block::<IndexFixed>(fixed, 0);
        let whole = "a whole index fixed part";
        (
            r.u64_le_at(IndexFixed::RUN_COUNT).expect(whole),
            r.u32_le_at(IndexFixed::DRIVE_COUNT).expect(whole) as u64,
        )
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
        let mut c = FieldReader::block::<IndexFixed>(body, offset);
        c.skip(IndexFixed::MAGIC.len)?;
        let run_count = c.u64_le()? as usize;
        let drive_count = c.u32_le()? as usize;
        c.skip(IndexFixed::RESERVED.len)?;
        let mut runs = Vec::with_capacity(run_count);
        for _ in 0..run_count {
            let at = c.offset();
            runs.push(IndexRun::decode(c.take(INDEX_RUN_LEN)?, at)?);
        }
        let mut drives = Vec::with_capacity(drive_count);
        for _ in 0..drive_count {
            let at = c.offset();
            let rec = FieldReader::block::<DriveRecordV2>(c.take(DriveRecordV2::LEN)?, at);
            let drive = DriveId(rec.u8_at(DriveRecordV2::DRIVE)?);
            let flags = rec.u8_at(DriveRecordV2::FLAGS)?;
            let data_clusters = rec.u64_le_at(DriveRecordV2::DATA_CLUSTERS)?;
            let stored_bytes = rec.u64_le_at(DriveRecordV2::STORED_BYTES)?;
            let digest: [u8; 32] = rec.field_bytes(DriveRecordV2::DIGEST)?;
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

/// Decode and check a 2.0 footer found at absolute `offset`: the layout
/// of the 3.0 [`Footer`], with the 2.0 magic. Its archive digest is the
/// SHA-256 over the header digest, every extent digest in order, and the
/// index digest, as the writer stated it.
pub fn decode_footer(b: &[u8; FOOTER_LEN], offset: u64) -> Result<Footer> {
    Footer::decode_with_magic(b, offset, &FOOTER_MAGIC)
}

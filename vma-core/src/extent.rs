//! Building, encoding and decoding extents (no file I/O): the unit of
//! compression and of integrity checking. 3.0 extents name their archive
//! (uuid) and position (seq) under their digest; 2.0 extents are decoded
//! for reading old archives. Leaf digests of data clusters are computed
//! here, by whichever thread holds the cluster's bytes.

use crate::digest::{check_matches, sha256};

use crate::error::{Error, Result};
use crate::format::v1::{V1ExtentHeader, EXTENT_HEADER_LEN as EXTENT_HEADER_LEN_V1};
use crate::format::{
    decode_entries, encode_entry, masks_len, Codec, Entry, ExtentFrame, ExtentHeader, RunKind,
    BLOCK_SIZE, DIGEST_LEN, ENTRY_LEN, EXTENT_HEADER_LEN,
};
use crate::tree::{leaf_of_blocks, Digest};
use crate::types::{cluster_len, ArchiveOffset, ClusterNo, DriveId, ExtentRef};

/// Drive sizes by drive id (0 for ids the archive does not have), for the
/// leaves of partial last clusters.
pub type DriveSizes = [u64; 256];

/// The sizes of `drives`, by id.
pub fn drive_sizes(drives: &[crate::format::DriveInfo]) -> Box<DriveSizes> {
    let mut s = Box::new([0u64; 256]);
    for d in drives {
        s[d.id.0 as usize] = d.size;
    }
    s
}

/// Clusters gathered for one extent, before compression.
#[derive(Default)]
pub(crate) struct RawExtent {
    pub(crate) entries: Vec<Entry>,
    pub(crate) masks: Vec<u16>,
    pub(crate) payload: Vec<u8>,
}

impl RawExtent {
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append a run, extending the previous entry when it continues it.
    pub(crate) fn push_run(&mut self, drive: DriveId, kind: RunKind, start: u64, count: u32) {
        if let Some(last) = self.entries.last_mut() {
            if last.drive == drive
                && last.kind == kind
                && last.start + last.count as u64 == start
                && (last.count as u64 + count as u64) <= u32::MAX as u64
            {
                last.count += count;
                return;
            }
        }
        self.entries.push(Entry {
            drive,
            kind,
            count,
            start,
        });
    }

    /// Append one data cluster: copies the blocks marked in `mask`; a
    /// partial final block is zero-padded to 4 KiB.
    pub(crate) fn push_data(&mut self, drive: DriveId, cluster: ClusterNo, mask: u16, data: &[u8]) {
        debug_assert!(mask != 0);
        self.push_run(drive, RunKind::Data, cluster.0, 1);
        self.masks.push(mask);
        if mask == u16::MAX && data.len() == 16 * BLOCK_SIZE {
            self.payload.extend_from_slice(data);
            return;
        }
        for (i, block) in data.chunks(BLOCK_SIZE).enumerate() {
            if mask & (1 << i) != 0 {
                self.payload.extend_from_slice(block);
                self.payload
                    .resize(self.payload.len() + BLOCK_SIZE - block.len(), 0);
            }
        }
    }
}

/// The leaves of the data clusters of `entries` (payload as decoded),
/// in entry order; clusters outside their drive get none.
fn leaves_of(
    entries: &[Entry],
    masks: &[u16],
    payload: &[u8],
    sizes: &DriveSizes,
) -> Vec<(DriveId, u64, Digest)> {
    let mut out = Vec::with_capacity(masks.len());
    let mut m = 0usize;
    let mut at = 0usize;
    for e in entries.iter().filter(|e| e.kind == RunKind::Data) {
        let size = sizes[e.drive.0 as usize];
        for k in 0..e.count as u64 {
            let Some(&mask) = masks.get(m) else {
                return out;
            };
            m += 1;
            let n = mask.count_ones() as usize * BLOCK_SIZE;
            let blocks = payload.get(at..at + n).unwrap_or(&[]);
            at += n;
            let c = e.start + k;
            let len = cluster_len(size, ClusterNo(c));
            if len > 0 && blocks.len() == n {
                out.push((e.drive, c, leaf_of_blocks(mask, blocks, len)));
            }
        }
    }
    out
}

/// An extent ready to be written, with what the index needs about it.
pub(crate) struct EncodedExtent {
    pub(crate) seq: u64,
    pub(crate) bytes: Vec<u8>,
    pub(crate) digest: [u8; 32],
    pub(crate) entries: Vec<Entry>,
    /// Stored 4 KiB blocks per drive (for attributing stored bytes).
    pub(crate) blocks_per_drive: Vec<(DriveId, u64)>,
    /// The leaf of every data cluster.
    pub(crate) leaves: Vec<(DriveId, u64, Digest)>,
    /// The emptied raw extent, to be filled again (None for a re-framed
    /// stored extent).
    pub(crate) raw: Option<RawExtent>,
}

/// Frame a 3.0 extent from its parts; returns the bytes and digest.
#[allow(clippy::too_many_arguments)]
fn frame(
    uuid: [u8; 16],
    seq: u64,
    entries: &[Entry],
    mask_count: usize,
    masks_and_stored: impl FnOnce(&mut Vec<u8>),
    codec: Codec,
    stored_len: usize,
    raw_len: usize,
) -> (Vec<u8>, [u8; 32]) {
    let header = ExtentHeader {
        uuid,
        seq,
        entry_count: entries.len() as u32,
        mask_count: mask_count as u32,
        stored_len: stored_len as u32,
        raw_len: raw_len as u32,
        codec,
    };
    let mut bytes = Vec::with_capacity(header.total_len());
    bytes.extend_from_slice(&header.encode());
    for e in entries {
        encode_entry(e, &mut bytes);
    }
    masks_and_stored(&mut bytes);
    let digest: [u8; 32] = sha256(&bytes);
    bytes.extend_from_slice(&digest);
    debug_assert_eq!(bytes.len(), header.total_len());
    (bytes, digest)
}

/// Compress (when it helps), hash the leaves of, and frame one extent as
/// extent `seq` of archive `uuid`.
pub(crate) fn encode_extent(
    mut raw: RawExtent,
    uuid: [u8; 16],
    seq: u64,
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    sizes: &DriveSizes,
) -> Result<EncodedExtent> {
    let raw_len = raw.payload.len();
    let leaves = leaves_of(&raw.entries, &raw.masks, &raw.payload, sizes);
    let compressed = match compressor {
        Some(c) if raw_len > 0 => {
            let out = c
                .compress(&raw.payload)
                .map_err(|e| Error::io("zstd compression failed", e))?;
            (out.len() < raw_len).then_some(out)
        }
        _ => None,
    };
    let (codec, stored): (Codec, &[u8]) = match &compressed {
        Some(c) => (Codec::Zstd, c),
        None => (Codec::None, &raw.payload),
    };
    let masks = &raw.masks;
    let (bytes, digest) = frame(
        uuid,
        seq,
        &raw.entries,
        masks.len(),
        |b| {
            for m in masks {
                b.extend_from_slice(&m.to_le_bytes());
            }
            b.resize(b.len() + masks_len(masks.len()) - masks.len() * 2, 0);
            b.extend_from_slice(stored);
        },
        codec,
        stored.len(),
        raw_len,
    );
    let blocks_per_drive = blocks_per_drive(&raw.entries, &raw.masks);
    let entries = std::mem::take(&mut raw.entries);
    raw.masks.clear();
    raw.payload.clear();
    Ok(EncodedExtent {
        seq,
        bytes,
        digest,
        entries,
        blocks_per_drive,
        leaves,
        raw: Some(raw),
    })
}

/// Stored 4 KiB blocks per drive of an extent's data entries.
pub(crate) fn blocks_per_drive(entries: &[Entry], masks: &[u16]) -> Vec<(DriveId, u64)> {
    let mut out: Vec<(DriveId, u64)> = Vec::new();
    let mut mask_iter = masks.iter();
    for e in entries.iter().filter(|e| e.kind == RunKind::Data) {
        let blocks: u64 = mask_iter
            .by_ref()
            .take(e.count as usize)
            .map(|m| m.count_ones() as u64)
            .sum();
        match out.iter_mut().find(|(d, _)| *d == e.drive) {
            Some((_, n)) => *n += blocks,
            None => out.push((e.drive, blocks)),
        }
    }
    out
}

/// Frame a stored extent again as extent `seq` of archive `uuid`: a new
/// header and entries, the masks and the stored payload as they were, a
/// new digest. The payload is decoded once (on the calling worker) for the
/// leaves of its data clusters, and so checked to decode; nothing is
/// compressed again.
pub(crate) fn reframe_stored(
    ext: StoredExtent,
    uuid: [u8; 16],
    seq: u64,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    sizes: &DriveSizes,
) -> Result<EncodedExtent> {
    let h = ext.frame;
    let stored = &ext.bytes[h.payload_start()..ext.bytes.len() - DIGEST_LEN];
    let payload = decode_payload(&h, stored, ext.offset, decompressor)?;
    let leaves = leaves_of(&ext.entries, &ext.masks, &payload, sizes);
    let (bytes, digest) = frame(
        uuid,
        seq,
        &ext.entries,
        h.mask_count as usize,
        |b| b.extend_from_slice(ext.masks_and_payload()),
        h.codec,
        h.stored_len as usize,
        h.raw_len as usize,
    );
    Ok(EncodedExtent {
        seq,
        bytes,
        digest,
        blocks_per_drive: blocks_per_drive(&ext.entries, &ext.masks),
        leaves,
        entries: ext.entries,
        raw: None,
    })
}

/// One cluster's contents as held by a decoded extent.
#[derive(Clone, Copy, Debug)]
pub enum ClusterData<'a> {
    /// Stored blocks (the set bits of `mask`, 4 KiB each, in order).
    Data {
        /// Which blocks are stored.
        mask: u16,
        /// The stored blocks.
        blocks: &'a [u8],
    },
    /// The cluster is all zero.
    Zero,
    /// The cluster equals the parent archive's.
    Unchanged,
}

impl ClusterData<'_> {
    /// Write the cluster's bytes into `out` (up to 64 KiB; shorter for a
    /// drive's final cluster). Unchanged clusters are left untouched.
    pub fn expand_into(&self, out: &mut [u8]) {
        match *self {
            ClusterData::Zero => out.fill(0),
            ClusterData::Unchanged => {}
            ClusterData::Data { mask, blocks } => {
                let mut next = 0;
                for (i, chunk) in out.chunks_mut(BLOCK_SIZE).enumerate() {
                    if mask & (1 << i) != 0 {
                        chunk.copy_from_slice(&blocks[next * BLOCK_SIZE..][..chunk.len()]);
                        next += 1;
                    } else {
                        chunk.fill(0);
                    }
                }
            }
        }
    }

    /// The leaf digest of the cluster's first `len` bytes (data and zero clusters).
    pub fn leaf(&self, len: usize) -> Digest {
        match *self {
            ClusterData::Data { mask, blocks } => leaf_of_blocks(mask, blocks, len),
            _ => leaf_of_blocks(0, &[], len),
        }
    }
}

/// A verified, decompressed extent.
#[derive(Debug)]
pub struct DecodedExtent {
    /// Sequence number.
    pub seq: u64,
    /// How the index names it (see [`ExtentRef`]).
    pub key: ExtentRef,
    /// Absolute offset of its header in the archive.
    pub offset: u64,
    /// Bytes it occupies in the archive.
    pub stored_len: u64,
    /// Its SHA-256 (as stored and verified).
    pub digest: [u8; 32],
    /// Run entries.
    pub entries: Vec<Entry>,
    masks: Vec<u16>,
    /// Index into `masks` of each entry's first data cluster.
    first_mask: Vec<u32>,
    /// Byte offset into `payload` of each mask's first block.
    mask_payload: Vec<u32>,
    payload: Vec<u8>,
    /// The leaves of the data clusters (in `data_clusters` order), when computed.
    leaves: Vec<(DriveId, u64, Digest)>,
}

impl DecodedExtent {
    /// Every cluster in entry order: (drive, cluster, contents). Zero and
    /// unchanged runs count one item per cluster; see [`Self::data_clusters`].
    pub fn clusters(&self) -> impl Iterator<Item = (DriveId, ClusterNo, ClusterData<'_>)> + '_ {
        self.entries.iter().enumerate().flat_map(move |(i, e)| {
            (0..e.count as u64).map(move |k| {
                let data = self.entry_cluster(i, e, k);
                (e.drive, ClusterNo(e.start + k), data)
            })
        })
    }

    /// The clusters of data entries only, in entry order: what sinks that
    /// skip zero and unchanged clusters iterate, in time bounded by the
    /// stored data rather than by the (declared) lengths of zero runs.
    pub fn data_clusters(
        &self,
    ) -> impl Iterator<Item = (DriveId, ClusterNo, ClusterData<'_>)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == RunKind::Data)
            .flat_map(move |(i, e)| {
                (0..e.count as u64).map(move |k| {
                    let data = self.entry_cluster(i, e, k);
                    (e.drive, ClusterNo(e.start + k), data)
                })
            })
    }

    fn entry_cluster(&self, i: usize, e: &Entry, k: u64) -> ClusterData<'_> {
        match e.kind {
            RunKind::Zero => ClusterData::Zero,
            RunKind::Unchanged => ClusterData::Unchanged,
            RunKind::Data => {
                let m = self.first_mask[i] as usize + k as usize;
                let mask = self.masks[m];
                let start = self.mask_payload[m] as usize;
                let len = mask.count_ones() as usize * BLOCK_SIZE;
                ClusterData::Data {
                    mask,
                    blocks: &self.payload[start..start + len],
                }
            }
        }
    }

    /// The contents of one cluster, if this extent holds it.
    pub fn cluster(&self, drive: DriveId, cluster: ClusterNo) -> Option<ClusterData<'_>> {
        self.entries.iter().enumerate().find_map(|(i, e)| {
            (e.drive == drive && cluster.0 >= e.start && cluster.0 - e.start < e.count as u64)
                .then(|| self.entry_cluster(i, e, cluster.0 - e.start))
        })
    }

    /// Stored 4 KiB blocks per drive.
    pub(crate) fn stored_blocks(&self) -> Vec<(DriveId, u64)> {
        blocks_per_drive(&self.entries, &self.masks)
    }

    /// Compute the leaves of the data clusters (drives sized by `sizes`).
    pub fn compute_leaves(&mut self, sizes: &DriveSizes) {
        self.leaves = leaves_of(&self.entries, &self.masks, &self.payload, sizes);
    }

    /// The leaves computed by [`Self::compute_leaves`]: (drive, cluster, leaf).
    pub fn leaves(&self) -> &[(DriveId, u64, Digest)] {
        &self.leaves
    }

    /// Decoded payload size in bytes (for cache accounting).
    pub fn memory_size(&self) -> usize {
        self.payload.len() + self.masks.len() * 6 + self.entries.len() * 20 + self.leaves.len() * 48
    }
}

/// What an extent must be, besides intact: the archive it belongs to and
/// its place there (3.0).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Binding {
    /// The archive version (decides the layout).
    pub(crate) major: u16,
    /// The archive's uuid (3.0).
    pub(crate) uuid: [u8; 16],
    /// The sequence number expected, if known.
    pub(crate) seq: Option<u64>,
    /// The digest the index records for it, if known.
    pub(crate) digest: Option<[u8; 32]>,
    /// Whether zstd payloads are allowed (the header's ZSTD feature).
    pub(crate) zstd_allowed: bool,
}

/// An extent as stored in an archive, with its digest, binding, entries
/// and masks checked but its payload not decoded: what a writer can
/// append to another archive (see [`crate::Writer::append_stored`]),
/// framed again with that archive's uuid and sequence number.
#[derive(Debug)]
pub struct StoredExtent {
    offset: u64,
    frame: ExtentFrame,
    /// Magic through digest, as read.
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    masks: Vec<u16>,
}

impl StoredExtent {
    /// Check a whole extent (`bytes` from its magic through its digest)
    /// found at absolute `offset`: header, binding, length, SHA-256,
    /// entries and masks. Damage is [`Error::Corrupt`] or
    /// [`Error::Truncated`]. On damage, the bytes come back with the error.
    pub(crate) fn check(
        bytes: Vec<u8>,
        offset: u64,
        binding: &Binding,
    ) -> std::result::Result<StoredExtent, (Error, Vec<u8>)> {
        match check_extent(&bytes, offset, binding) {
            Ok((frame, entries, masks)) => Ok(StoredExtent {
                offset,
                frame,
                bytes,
                entries,
                masks,
            }),
            Err(e) => Err((e, bytes)),
        }
    }

    /// Where it was read from.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Its sequence number in the archive it was read from.
    pub fn seq(&self) -> u64 {
        self.frame.seq
    }

    /// Its digest (as stored and checked).
    pub fn digest(&self) -> [u8; 32] {
        self.bytes[self.bytes.len() - DIGEST_LEN..]
            .try_into()
            .expect("32")
    }

    /// Its run entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// How its payload is encoded.
    pub fn codec(&self) -> Codec {
        self.frame.codec
    }

    /// Bytes it occupies in its archive.
    pub fn stored_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Stored 4 KiB blocks per drive.
    pub(crate) fn stored_blocks(&self) -> Vec<(DriveId, u64)> {
        blocks_per_drive(&self.entries, &self.masks)
    }

    /// Keep only the data entries (zero and unchanged entries hold no
    /// payload, so dropping them leaves masks and payload as they are),
    /// each with its drive id changed by `map`.
    pub fn keep_data_entries(&mut self, map: impl Fn(DriveId) -> DriveId) {
        self.entries.retain(|e| e.kind == RunKind::Data);
        for e in &mut self.entries {
            e.drive = map(e.drive);
        }
    }

    /// The masks (with their padding) and the stored payload.
    fn masks_and_payload(&self) -> &[u8] {
        let original = EXTENT_HEADER_LEN + self.frame.entry_count as usize * ENTRY_LEN;
        &self.bytes[original..self.bytes.len() - DIGEST_LEN]
    }

    /// Decompress the payload; `key` is how the index names the extent.
    pub(crate) fn decode(
        &self,
        key: ExtentRef,
        decompressor: &mut zstd::bulk::Decompressor<'static>,
    ) -> Result<DecodedExtent> {
        let h = &self.frame;
        let stored = &self.bytes[h.payload_start()..self.bytes.len() - DIGEST_LEN];
        let payload = decode_payload(h, stored, self.offset, decompressor)?;
        Ok(DecodedExtent::new(
            h.seq,
            key,
            self.offset,
            self.bytes.len() as u64,
            self.digest(),
            self.entries.clone(),
            self.masks.clone(),
            payload,
        ))
    }
}

/// Check a whole extent's header, binding, length, SHA-256, entries and masks.
fn check_extent(
    bytes: &[u8],
    offset: u64,
    b: &Binding,
) -> Result<(ExtentFrame, Vec<Entry>, Vec<u16>)> {
    let hb: &[u8; EXTENT_HEADER_LEN] = bytes
        .get(..EXTENT_HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::truncated(offset, "extent shorter than its header"))?;
    let h = ExtentFrame::decode(hb, offset, b.major)?;
    if let Some(uuid) = h.uuid {
        if uuid != b.uuid {
            return Err(Error::corrupt(
                offset,
                format!(
                    "extent #{} belongs to another archive (uuid {}, not {}): a foreign extent, never used",
                    h.seq,
                    crate::types::uuid_text(&uuid),
                    crate::types::uuid_text(&b.uuid)
                ),
            ));
        }
    }
    if let Some(seq) = b.seq {
        if h.seq != seq {
            return Err(Error::corrupt(
                offset,
                format!(
                    "found extent #{} where extent #{seq} belongs: a misplaced extent, never used",
                    h.seq
                ),
            ));
        }
    }
    if h.codec == Codec::Zstd && !b.zstd_allowed {
        return Err(Error::corrupt(
            offset + 48,
            format!(
                "extent #{} is zstd-compressed but the header lacks the ZSTD feature",
                h.seq
            ),
        ));
    }
    if bytes.len() != h.total_len() {
        return Err(Error::truncated(
            offset,
            format!(
                "extent #{} needs {} bytes, have {}",
                h.seq,
                h.total_len(),
                bytes.len()
            ),
        ));
    }
    let body_end = bytes.len() - DIGEST_LEN;
    let digest: [u8; 32] = sha256(&bytes[..body_end]);
    if !check_matches(&bytes[body_end..], &digest) {
        return Err(Error::corrupt(
            offset,
            format!(
                "extent #{}: SHA-256 mismatch over its {} bytes",
                h.seq, body_end
            ),
        ));
    }
    if let Some(want) = b.digest {
        if !check_matches(&want, &digest) {
            return Err(Error::corrupt(
                offset,
                format!(
                    "extent #{} is intact but not the one the index records there (another copy, an older version, or bytes from another file)",
                    h.seq
                ),
            ));
        }
    }
    let (entries, masks) = decode_entries(
        &h.body_counts(),
        &bytes[EXTENT_HEADER_LEN..],
        offset + EXTENT_HEADER_LEN as u64,
    )?;
    Ok((h, entries, masks))
}

/// The decoded payload of a checked extent (`stored`: its stored payload).
fn decode_payload(
    h: &ExtentFrame,
    stored: &[u8],
    offset: u64,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>> {
    match h.codec {
        Codec::None => Ok(stored.to_vec()),
        Codec::Zstd => {
            let mut out = Vec::with_capacity(h.raw_len as usize);
            let n = decompressor
                .decompress_to_buffer(stored, &mut out)
                .map_err(|e| {
                    Error::corrupt(
                        offset + h.payload_start() as u64,
                        format!(
                            "extent #{}: zstd payload does not decode to {} bytes: {e}",
                            h.seq, h.raw_len
                        ),
                    )
                })?;
            if n != h.raw_len as usize {
                return Err(Error::corrupt(
                    offset + h.payload_start() as u64,
                    format!(
                        "extent #{}: payload decodes to {n} bytes, header says {}",
                        h.seq, h.raw_len
                    ),
                ));
            }
            Ok(out)
        }
    }
}

/// Verify and decode a whole extent (`bytes` from its magic through its
/// digest) found at absolute `offset`. Returns the damage as
/// [`Error::Corrupt`] for the caller to attribute.
pub(crate) fn decode_extent(
    bytes: &[u8],
    offset: u64,
    binding: &Binding,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<DecodedExtent> {
    let (h, entries, masks) = check_extent(bytes, offset, binding)?;
    let body_end = bytes.len() - DIGEST_LEN;
    let payload = decode_payload(
        &h,
        &bytes[h.payload_start()..body_end],
        offset,
        decompressor,
    )?;
    let key = if binding.major >= 3 {
        ExtentRef::seq(h.seq)
    } else {
        ExtentRef::at(ArchiveOffset(offset))
    };
    Ok(DecodedExtent::new(
        h.seq,
        key,
        offset,
        bytes.len() as u64,
        bytes[body_end..].try_into().expect("32"),
        entries,
        masks,
        payload,
    ))
}

impl DecodedExtent {
    /// Assemble a decoded extent from checked parts (the masks match the
    /// data entries and the payload holds exactly the blocks they mark).
    #[allow(clippy::too_many_arguments)]
    fn new(
        seq: u64,
        key: ExtentRef,
        offset: u64,
        stored_len: u64,
        digest: [u8; 32],
        entries: Vec<Entry>,
        masks: Vec<u16>,
        payload: Vec<u8>,
    ) -> Self {
        let mut first_mask = Vec::with_capacity(entries.len());
        let mut next = 0u32;
        for e in &entries {
            first_mask.push(next);
            if e.kind == RunKind::Data {
                next += e.count;
            }
        }
        let mut mask_payload = Vec::with_capacity(masks.len());
        let mut pos = 0u32;
        for m in &masks {
            mask_payload.push(pos);
            pos += m.count_ones() * BLOCK_SIZE as u32;
        }
        DecodedExtent {
            seq,
            key,
            offset,
            stored_len,
            digest,
            entries,
            masks,
            first_mask,
            mask_payload,
            payload,
            leaves: Vec::new(),
        }
    }

    /// A VMA v1 extent (header already checked) as a decoded extent; its
    /// data is `data` (exactly the blocks the masks mark). v1 has no data
    /// digest, so `digest` is all zero; the index names it by offset.
    pub(crate) fn from_v1(seq: u64, offset: u64, header: &V1ExtentHeader, data: Vec<u8>) -> Self {
        let mut raw = RawExtent::default();
        for slot in &header.slots {
            let kind = if slot.mask == 0 {
                RunKind::Zero
            } else {
                RunKind::Data
            };
            raw.push_run(slot.drive, kind, slot.cluster as u64, 1);
            if slot.mask != 0 {
                raw.masks.push(slot.mask);
            }
        }
        DecodedExtent::new(
            seq,
            ExtentRef::at(ArchiveOffset(offset)),
            offset,
            (EXTENT_HEADER_LEN_V1 + data.len()) as u64,
            [0; 32],
            raw.entries,
            raw.masks,
            data,
        )
    }
}

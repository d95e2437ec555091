//! On-disk structures of qcow2 (versions 2 and 3) and their byte encodings.
//! No I/O happens here. The normative description is QEMU's
//! `docs/interop/qcow2.rst`; all integers are big-endian.

use super::field::{fixed_block, FieldError, FieldReader, FieldWriter, FixedBlock};

/// Magic at offset 0: `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of a version 2 header (and of the mandatory part of version 3).
pub const V2_HEADER_LEN: usize = 72;
/// Length of the version 3 header up to `header_length` (inclusive).
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Length of the version 3 header this code writes (with the compression type).
pub const V3_HEADER_LEN: usize = 112;

/// Smallest and largest cluster sizes QEMU accepts (512 B .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The cluster size of images this code writes (the archive's cluster).
pub const WRITE_CLUSTER_BITS: u32 = 16;
/// refcount_order of images this code writes (16-bit refcounts).
pub const WRITE_REFCOUNT_ORDER: u32 = 4;

/// Incompatible feature bit 0: refcounts may be inconsistent (dirty).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// L1 and standard L2 entries: bits 9..55 hold a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Entry flag: refcount is exactly one ("copied").
pub const FLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub const FLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry flag (v3): the cluster reads as zeros.
pub const FLAG_ZERO: u64 = 1;
/// Reserved bits of a standard L2 entry that must be zero.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Compression algorithms of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), 4 KiB window.
    Zlib,
    /// zstd frames.
    Zstd,
}

/// The fields of a qcow2 header this code uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0: none; 1: AES; 2: LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for version 2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
}

fixed_block!(Qcow2Header = "qcow2 header", V3_HEADER_LEN;
    MAGIC("magic", 4),
    VERSION("version", 4),
    BACKING_FILE_OFFSET("backing_file_offset", 8),
    BACKING_FILE_SIZE("backing_file_size", 4),
    CLUSTER_BITS("cluster_bits", 4),
    SIZE("size", 8),
    CRYPT_METHOD("crypt_method", 4),
    L1_SIZE("l1_size", 4),
    L1_TABLE_OFFSET("l1_table_offset", 8),
    REFCOUNT_TABLE_OFFSET("refcount_table_offset", 8),
    REFCOUNT_TABLE_CLUSTERS("refcount_table_clusters", 4),
    NB_SNAPSHOTS("nb_snapshots", 4),
    SNAPSHOTS_OFFSET("snapshots_offset", 8),
    INCOMPATIBLE_FEATURES("incompatible_features", 8),
    COMPATIBLE_FEATURES("compatible_features", 8),
    AUTOCLEAR_FEATURES("autoclear_features", 8),
    REFCOUNT_ORDER("refcount_order", 4),
    HEADER_LENGTH("header_length", 4),
    COMPRESSION_TYPE("compression_type", 1),
    PADDING("padding", 7),
);
// The version 2 header ends after `snapshots_offset`, the mandatory part of
// version 3 after `header_length`.
const _: () = assert!(Qcow2Header::SNAPSHOTS_OFFSET.end() == V2_HEADER_LEN);
const _: () = assert!(Qcow2Header::HEADER_LENGTH.end() == V3_MIN_HEADER_LEN);

/// One header extension's type and length, before its payload.
pub struct ExtensionHeader;

fixed_block!(ExtensionHeader = "qcow2 header extension", 8;
    KIND("type", 4),
    LENGTH("length", 4),
);

/// What is wrong with the qcow2 structures decoded here; each names the
/// field and its offset in the header (or the entry) as QEMU's
/// `docs/interop/qcow2.rst` defines them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// Fewer bytes than the header needs.
    #[error("{what} needs {need} bytes, the file has {have}")]
    Short {
        /// "the header" or "a version 3 header".
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes there.
        have: usize,
    },
    /// No magic at offset 0.
    #[error("no qcow2 magic at offset 0")]
    NoMagic,
    /// A version other than 2 and 3 (offset 4).
    #[error("qcow2 version {0} at offset {at} (this build reads versions 2 and 3)", at = Qcow2Header::VERSION.at)]
    Version(u32),
    /// `cluster_bits` (offset 20) out of range.
    #[error("cluster_bits {0} at offset {at} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}", at = Qcow2Header::CLUSTER_BITS.at)]
    ClusterBits(u32),
    /// `header_length` (offset 100) out of range.
    #[error("header_length {length} at offset {at} is outside {V3_MIN_HEADER_LEN}..={max}", at = Qcow2Header::HEADER_LENGTH.at)]
    HeaderLength {
        /// The value.
        length: u32,
        /// The most it may be here.
        max: usize,
    },
    /// `refcount_order` (offset 96) above 6.
    #[error("refcount_order {0} at offset {at} is above 6", at = Qcow2Header::REFCOUNT_ORDER.at)]
    RefcountOrder(u32),
    /// The compression type feature without its field.
    #[error("the compression type feature is set but the header has no compression type field")]
    NoCompressionType,
    /// An unknown compression type (offset 104).
    #[error("unknown compression type {0} at offset {at} (known: 0 zlib, 1 zstd)", at = Qcow2Header::COMPRESSION_TYPE.at)]
    CompressionType(u8),
    /// `backing_file_size` (offset 16) above 1023.
    #[error("backing file name length {0} at offset {at} is above 1023", at = Qcow2Header::BACKING_FILE_SIZE.at)]
    BackingNameLength(u32),
    /// A header extension longer than what is left of the first cluster.
    #[error(
        "header extension {kind:#x} claims {len} bytes, only {left} remain in the first cluster"
    )]
    Extension {
        /// Its type.
        kind: u32,
        /// Its claimed length.
        len: usize,
        /// Bytes left.
        left: usize,
    },
    /// An L2 entry with reserved bits set.
    #[error("L2 entry {0:#018x} has reserved bits set")]
    L2Reserved(u64),
    /// An L2 entry pointing at an unaligned host offset.
    #[error(
        "L2 entry {entry:#018x} points at host offset {offset:#x}, which is not cluster aligned"
    )]
    L2Unaligned {
        /// The entry.
        entry: u64,
        /// The host offset it holds.
        offset: u64,
    },
    /// A field beyond the bytes there are.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A compressed cluster that does not decompress to a whole cluster.
    #[error("the compressed cluster of guest offset {guest} at host offset {host} does not decompress ({compression:?}): {what}")]
    Decompress {
        /// Guest byte offset of the cluster.
        guest: u64,
        /// Host byte offset of the compressed data.
        host: u64,
        /// The image's compression type.
        compression: CompressionType,
        /// What the decoder said.
        what: String,
    },
    /// A compressed cluster whose data ends before the cluster does.
    #[error("the compressed cluster of guest offset {guest} at host offset {host} ends after {got} of its {want} bytes ({compression:?})")]
    ShortCluster {
        /// Guest byte offset of the cluster.
        guest: u64,
        /// Host byte offset of the compressed data.
        host: u64,
        /// The image's compression type.
        compression: CompressionType,
        /// Bytes decompressed.
        got: usize,
        /// Bytes of a cluster.
        want: usize,
    },
}

impl Qcow2Header {
    /// Decode the header from the first bytes of an image (at least 72;
    /// 104 or more for version 3). Checks only what makes the values
    /// meaningless; feature support is the reader's decision.
    pub fn decode(b: &[u8]) -> Result<Qcow2Header, Qcow2Error> {
        if b.len() < V2_HEADER_LEN {
            return Err(Qcow2Error::Short {
                what: "the header",
                need: V2_HEADER_LEN,
                have: b.len(),
            });
        }
        let r = FieldReader::block::<Self>(b, 0);
        if r.field(Self::MAGIC)? != MAGIC {
            return Err(Qcow2Error::NoMagic);
        }
        let version = r.u32_be_at(Self::VERSION)?;
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version));
        }
        let cluster_bits = r.u32_be_at(Self::CLUSTER_BITS)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::ClusterBits(cluster_bits));
        }
        let mut h = Qcow2Header {
            version,
            backing_file_offset: r.u64_be_at(Self::BACKING_FILE_OFFSET)?,
            backing_file_size: r.u32_be_at(Self::BACKING_FILE_SIZE)?,
            cluster_bits,
            size: r.u64_be_at(Self::SIZE)?,
            crypt_method: r.u32_be_at(Self::CRYPT_METHOD)?,
            l1_size: r.u32_be_at(Self::L1_SIZE)?,
            l1_table_offset: r.u64_be_at(Self::L1_TABLE_OFFSET)?,
            refcount_table_offset: r.u64_be_at(Self::REFCOUNT_TABLE_OFFSET)?,
            refcount_table_clusters: r.u32_be_at(Self::REFCOUNT_TABLE_CLUSTERS)?,
            nb_snapshots: r.u32_be_at(Self::NB_SNAPSHOTS)?,
            snapshots_offset: r.u64_be_at(Self::SNAPSHOTS_OFFSET)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: CompressionType::Zlib,
        };
        if version == 3 {
            if b.len() < V3_MIN_HEADER_LEN {
                return Err(Qcow2Error::Short {
                    what: "a version 3 header",
                    need: V3_MIN_HEADER_LEN,
                    have: b.len(),
                });
            }
            h.incompatible_features = r.u64_be_at(Self::INCOMPATIBLE_FEATURES)?;
            h.compatible_features = r.u64_be_at(Self::COMPATIBLE_FEATURES)?;
            h.autoclear_features = r.u64_be_at(Self::AUTOCLEAR_FEATURES)?;
            h.refcount_order = r.u32_be_at(Self::REFCOUNT_ORDER)?;
            h.header_length = r.u32_be_at(Self::HEADER_LENGTH)?;
            if h.header_length < V3_MIN_HEADER_LEN as u32 || h.header_length as usize > b.len() {
                return Err(Qcow2Error::HeaderLength {
                    length: h.header_length,
                    max: b.len(),
                });
            }
            if h.refcount_order > 6 {
                return Err(Qcow2Error::RefcountOrder(h.refcount_order));
            }
            if h.incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0 {
                if (h.header_length as usize) < Self::COMPRESSION_TYPE.end() {
                    return Err(Qcow2Error::NoCompressionType);
                }
                h.compression_type = match r.u8_at(Self::COMPRESSION_TYPE)? {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => return Err(Qcow2Error::CompressionType(other)),
                };
            }
        }
        if h.backing_file_offset != 0 && h.backing_file_size > 1023 {
            return Err(Qcow2Error::BackingNameLength(h.backing_file_size));
        }
        Ok(h)
    }

    /// Bytes of one cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table (standard entries of 8 bytes).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// The version 3 header this code writes, `V3_HEADER_LEN` bytes.
    pub fn encode_v3(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        FieldWriter::new(&mut b)
            .bytes(&MAGIC)
            .u32_be(3)
            .u64_be(self.backing_file_offset)
            .u32_be(self.backing_file_size)
            .u32_be(self.cluster_bits)
            .u64_be(self.size)
            .u32_be(self.crypt_method)
            .u32_be(self.l1_size)
            .u64_be(self.l1_table_offset)
            .u64_be(self.refcount_table_offset)
            .u32_be(self.refcount_table_clusters)
            .u32_be(self.nb_snapshots)
            .u64_be(self.snapshots_offset)
            .u64_be(self.incompatible_features)
            .u64_be(self.compatible_features)
            .u64_be(self.autoclear_features)
            .u32_be(self.refcount_order)
            .u32_be(Self::LEN as u32)
            .u8(match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            })
            .zeros(Self::PADDING.len);
        b
    }
}

/// One header extension: type and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderExtension {
    /// Extension type.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// Decode the header extensions in `area` (the bytes after the header, up
/// to the end of the first cluster). Stops at the end marker.
pub fn decode_extensions(area: &[u8]) -> Result<Vec<HeaderExtension>, Qcow2Error> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + <ExtensionHeader as FixedBlock>::LEN <= area.len() {
        let r = FieldReader::block::<ExtensionHeader>(&area[pos..], pos as u64);
        let kind = r.u32_be_at(ExtensionHeader::KIND)?;
        let len = r.u32_be_at(ExtensionHeader::LENGTH)? as usize;
        if kind == EXT_END {
            return Ok(out);
        }
        let start = pos + <ExtensionHeader as FixedBlock>::LEN;
        if len > area.len() - start {
            return Err(Qcow2Error::Extension {
                kind,
                len,
                left: area.len() - start,
            });
        }
        out.push(HeaderExtension {
            kind,
            data: area[start..start + len].to_vec(),
        });
        pos = start + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Decode a table of 8-byte big-endian entries (L1, L2 or refcount table)
/// found at host offset `base`; bytes after the last whole entry are ignored.
pub fn decode_table(b: &[u8], base: u64, what: &'static str) -> Result<Vec<u64>, Qcow2Error> {
    let mut r = FieldReader::new(b, base, what);
    (0..b.len() / 8)
        .map(|_| r.u64_be().map_err(Qcow2Error::from))
        .collect()
}

/// Append a table of 8-byte big-endian entries (L1, L2 or refcount table).
pub fn encode_table(entries: &[u64], out: &mut Vec<u8>) {
    let mut w = FieldWriter::new(out);
    for &e in entries {
        w.u64_be(e);
    }
}

/// Append a refcount block of 16-bit refcounts (refcount_order 4).
pub fn encode_refcounts16(counts: impl IntoIterator<Item = u16>, out: &mut Vec<u8>) {
    let mut w = FieldWriter::new(out);
    for c in counts {
        w.u16_be(c);
    }
}

/// Names of feature bits from a feature name table extension: (type, bit, name).
pub fn feature_names(table: &[u8]) -> Vec<(u8, u8, String)> {
    table
        .chunks_exact(48)
        .map(|e| {
            let name = &e[2..];
            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            (
                e[0],
                e[1],
                String::from_utf8_lossy(&name[..end]).into_owned(),
            )
        })
        .collect()
}

/// What a guest cluster maps to, from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: the backing file's data, or zeros without one.
    Unallocated,
    /// Reads as zeros (v3 zero flag), whatever is allocated.
    Zero,
    /// Stored uncompressed at this cluster-aligned host offset.
    Data(u64),
    /// Stored compressed: `len` bytes (an upper bound, sector-rounded) at `offset`.
    Compressed {
        /// Host byte offset of the compressed data (not aligned).
        offset: u64,
        /// Bytes to read from `offset`.
        len: u64,
    },
}

/// Bit position of the compressed-size field of a compressed L2 entry.
pub fn compressed_size_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// Decode a standard (8-byte) L2 entry; `version` decides whether the zero
/// flag exists.
pub fn decode_l2(entry: u64, cluster_bits: u32, version: u32) -> Result<L2Entry, Qcow2Error> {
    if entry & FLAG_COMPRESSED != 0 {
        let shift = compressed_size_shift(cluster_bits);
        let offset = entry & ((1u64 << shift) - 1) & ((1u64 << 56) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        return Ok(L2Entry::Compressed { offset, len });
    }
    if entry & L2_RESERVED != 0 {
        return Err(Qcow2Error::L2Reserved(entry));
    }
    if version >= 3 && entry & FLAG_ZERO != 0 {
        return Ok(L2Entry::Zero);
    }
    let offset = entry & OFFSET_MASK;
    if offset == 0 {
        return Ok(L2Entry::Unallocated);
    }
    if offset & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(Qcow2Error::L2Unaligned { entry, offset });
    }
    Ok(L2Entry::Data(offset))
}

/// Encode a compressed L2 entry for `len` bytes at host `offset`.
pub fn encode_compressed(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    debug_assert!(len > 0);
    let shift = compressed_size_shift(cluster_bits);
    let extra_sectors = ((offset + len - 1) >> 9) - (offset >> 9);
    FLAG_COMPRESSED | (extra_sectors << shift) | offset
}

/// Entries an L1 table needs for a disk of `size` bytes.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(per_l2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let h = Qcow2Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 10 << 30,
            crypt_method: 0,
            l1_size: 20,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: INCOMPAT_COMPRESSION_TYPE,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: CompressionType::Zstd,
        };
        assert_eq!(Qcow2Header::decode(&h.encode_v3()).unwrap(), h);
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(Qcow2Header::decode(b"QFI\xfb").is_err());
        let mut b = vec![0u8; 112];
        b[..4].copy_from_slice(&MAGIC);
        b[7] = 4;
        assert!(Qcow2Header::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("version 4"));
        b[7] = 2;
        b[23] = 30;
        assert_eq!(
            Qcow2Header::decode(&b).unwrap_err(),
            Qcow2Error::ClusterBits(30)
        );
    }

    proptest! {
        /// A compressed entry decodes to a byte range that covers exactly the
        /// sectors holding the data, for every cluster size.
        #[test]
        fn compressed_entries_round_trip(bits in 9u32..=21, off in 0u64..(1 << 40), len in 1u64..=(1 << 21)) {
            let len = len.min(1 << bits);
            let e = encode_compressed(off, len, bits);
            match decode_l2(e, bits, 3).unwrap() {
                L2Entry::Compressed { offset, len: read } => {
                    prop_assert_eq!(offset, off);
                    prop_assert!(read >= len);
                    prop_assert!(read < len + 512);
                    prop_assert_eq!((offset + read) % 512, 0);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// L1 tables cover the disk and not one L2 table more.
        #[test]
        fn l1_size_covers_disk(bits in 9u32..=21, size in 0u64..(1 << 50)) {
            let n = l1_entries_for(size, bits);
            let per = 1u64 << (2 * bits - 3);
            prop_assert!(n * per >= size);
            prop_assert!(n == 0 || (n - 1) * per < size);
        }
    }
}

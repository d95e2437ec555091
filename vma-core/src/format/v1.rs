//! On-disk structures of Proxmox VMA version 1 (the format of `vzdump`
//! backups) and their byte encodings. No I/O here. Described in the
//! appendix of `format-spec.md`; follows Proxmox's `vma_spec.txt` and, where
//! the two differ, what Proxmox's own writer produces.
//!
//! All integers are big-endian except the 2-byte little-endian length in
//! front of each blob.

use md5::{Digest, Md5};

use super::field::{fixed_block, Field, FieldReader, FieldWriter, FixedBlock};
use crate::digest::check_matches;
use crate::error::{Error, Result};
use crate::format::{check_name, ConfigBlob, DriveInfo, BLOCK_SIZE, CLUSTER_SIZE};
use crate::types::DriveId;

/// Magic at offset 0. Never change.
pub const MAGIC: [u8; 4] = *b"VMA\0";
/// Magic of every extent header. Never change.
pub const EXTENT_MAGIC: [u8; 4] = *b"VMAE";
/// The only version.
pub const VERSION: u32 = 1;
/// Offset of the blob buffer in every header Proxmox writes; the device
/// table ends here.
pub const FIXED_HEADER_LEN: usize = 12288;
/// Size of an extent header.
pub const EXTENT_HEADER_LEN: usize = 512;
/// Cluster slots per extent header.
pub const SLOTS_PER_EXTENT: usize = 59;
/// Clusters Proxmox's writer puts in an extent: it flushes once 58 slots
/// are used (`vma_writer_get_buffer` in Proxmox's `vma-writer.c` waits
/// while `outbuf_count >= VMA_BLOCKS_PER_EXTENT - 1`), so the 59th slot
/// of a vzdump extent is always empty.
pub const CLUSTERS_PER_WRITTEN_EXTENT: usize = SLOTS_PER_EXTENT - 1;
/// The largest header Proxmox's writer can write: its header buffer is 8
/// clusters (`HEADERBUF_SIZE` in `vma-writer.c`).
pub const MAX_WRITTEN_HEADER_LEN: usize = 8 * CLUSTER_SIZE;
/// Name of the device Proxmox's reader takes as the VM state stream:
/// its clusters must come in order (and its size is not checked).
pub const VMSTATE_DEVICE: &str = "vmstate";
/// Config slots in the header.
pub const MAX_CONFIGS: usize = 256;
/// Device ids run 1..=254.
pub const MAX_DEVICE_ID: u8 = 254;
/// A blob holds at most this many bytes (2-byte length).
pub const MAX_BLOB: usize = u16::MAX as usize;
/// A header is at most this large (12 KiB of tables plus a blob buffer).
pub const MAX_HEADER_LEN: usize = FIXED_HEADER_LEN + (17 << 20);
/// Largest extent: header and 59 full clusters.
pub const MAX_EXTENT_LEN: usize = EXTENT_HEADER_LEN + SLOTS_PER_EXTENT * CLUSTER_SIZE;

/// The parts of a v1 header this toolkit uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Header {
    /// Archive uuid (repeated in every extent header).
    pub uuid: [u8; 16],
    /// Backup time, seconds since the epoch.
    pub ctime: u64,
    /// Devices (id = index in the device table).
    pub drives: Vec<DriveInfo>,
    /// Config blobs in slot order.
    pub configs: Vec<ConfigBlob>,
}

fixed_block!(V1Header = "VMA header", FIXED_HEADER_LEN;
    MAGIC("magic", 4),
    VERSION("version", 4),
    UUID("uuid", 16),
    CTIME("ctime", 8),
    MD5("md5", 16),
    BLOB_BUFFER_OFFSET("blob_buffer_offset", 4),
    BLOB_BUFFER_SIZE("blob_buffer_size", 4),
    HEADER_SIZE("header_size", 4),
    RESERVED("reserved", 1984),
    CONFIG_NAMES("config_names", 4 * MAX_CONFIGS),
    CONFIG_DATA("config_data", 4 * MAX_CONFIGS),
    RESERVED2("reserved", 4),
    DEV_INFO("dev_info", DevInfo::LEN * 256),
);

/// One entry of the header's device table (`dev_info[id]`).
pub struct DevInfo;

fixed_block!(DevInfo = "VMA device entry", 32;
    NAME("name", 4),
    RESERVED("reserved", 4),
    SIZE("size", 8),
    RESERVED2("reserved", 16),
);

impl DevInfo {
    /// The entry of device `id` in the header.
    const fn of(id: usize) -> usize {
        V1Header::DEV_INFO.at + DevInfo::LEN * id
    }
    /// A field of the entry of device `id`, as a field of the header.
    const fn field(id: usize, f: Field) -> Field {
        Field {
            name: f.name,
            at: Self::of(id) + f.at,
            len: f.len,
        }
    }
}

/// Slot `k` of an extent header's `blockinfo`.
pub struct BlockInfo;

fixed_block!(BlockInfo = "VMA extent slot", 8;
    MASK("mask", 2),
    RESERVED("reserved", 1),
    DEV_ID("dev_id", 1),
    CLUSTER("cluster", 4),
);

/// The blob length in front of each blob (little-endian, unlike the rest).
const BLOB_LEN: Field = Field::first("blob length", 2);

/// MD5 of `bytes` with the 16-byte checksum field at `at` taken as zero.
fn md5_with_hole(bytes: &[u8], at: usize) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(&bytes[..at]);
    h.update([0u8; 16]);
    h.update(&bytes[at + 16..]);
    h.finalize().into()
}

fixed_block!(V1ExtentHeader = "VMA extent header", EXTENT_HEADER_LEN;
    MAGIC("magic", 4),
    RESERVED("reserved", 2),
    BLOCK_COUNT("block_count", 2),
    UUID("uuid", 16),
    MD5("md5", 16),
    BLOCKINFO("blockinfo", BlockInfo::LEN * SLOTS_PER_EXTENT),
);

/// The header size declared in the first 60 bytes, checked for sanity.
pub fn header_len(prefix: &[u8]) -> Result<usize> {
    let r = FieldReader::block::<V1Header>(prefix, 0);
    let fixed = V1Header::HEADER_SIZE.end();
    if prefix.len() < fixed {
        return Err(Error::truncated(
            prefix.len() as u64,
            format!("VMA header shorter than {fixed} bytes"),
        ));
    }
    if r.field(V1Header::MAGIC)? != MAGIC {
        return Err(Error::corrupt(
            0,
            "not a VMA v1 archive (magic VMA\\0 missing)",
        ));
    }
    let version = r.u32_be_at(V1Header::VERSION)?;
    if version != VERSION {
        return Err(Error::UnsupportedFormat {
            format: format!("Proxmox VMA version {version}"),
            hint: "only VMA version 1 exists and is supported".into(),
        });
    }
    let size = r.u32_be_at(V1Header::HEADER_SIZE)? as usize;
    if !(FIXED_HEADER_LEN..=MAX_HEADER_LEN).contains(&size) {
        return Err(Error::corrupt(
            V1Header::HEADER_SIZE.at as u64,
            format!("VMA header size {size} is outside {FIXED_HEADER_LEN}..={MAX_HEADER_LEN}"),
        ));
    }
    Ok(size)
}

impl V1Header {
    /// Decode and check a whole header (`header_len` bytes).
    pub fn decode(b: &[u8]) -> Result<V1Header> {
        let size = header_len(b)?;
        if b.len() != size {
            return Err(Error::truncated(
                b.len() as u64,
                format!("VMA header needs {size} bytes"),
            ));
        }
        let r = FieldReader::block::<Self>(b, 0);
        if !check_matches(r.field(Self::MD5)?, &md5_with_hole(b, Self::MD5.at)) {
            return Err(Error::corrupt(
                Self::MD5.at as u64,
                "VMA header MD5 does not match the header bytes",
            ));
        }
        let uuid: [u8; 16] = r.field_bytes(Self::UUID)?;
        let ctime = r.u64_be_at(Self::CTIME)?;
        let blob_at = r.u32_be_at(Self::BLOB_BUFFER_OFFSET)? as usize;
        let blob_len = r.u32_be_at(Self::BLOB_BUFFER_SIZE)? as usize;
        if blob_at < FIXED_HEADER_LEN || blob_at.checked_add(blob_len).is_none_or(|e| e > size) {
            return Err(Error::corrupt(
                Self::BLOB_BUFFER_OFFSET.at as u64,
                format!("blob buffer {blob_at}+{blob_len} lies outside the {size}-byte header"),
            ));
        }
        let blobs = &b[blob_at..blob_at + blob_len];
        let blob = |ptr: u32, field_at: usize| -> Result<&[u8]> {
            let p = ptr as usize;
            let bad = || {
                Error::corrupt(
                    field_at as u64,
                    format!("blob offset {p} points outside the blob buffer ({blob_len} bytes)"),
                )
            };
            let len_bytes = blobs.get(p..).ok_or_else(bad)?;
            let len = FieldReader::new(len_bytes, (blob_at + p) as u64, "blob")
                .u16_le_at(BLOB_LEN)
                .map_err(|_| bad())? as usize;
            blobs
                .get(p + BLOB_LEN.len..p + BLOB_LEN.len + len)
                .ok_or_else(bad)
        };
        let text = |bytes: &[u8], field_at: usize, what: &str| -> Result<String> {
            let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
            let s = std::str::from_utf8(bytes)
                .map_err(|_| Error::corrupt(field_at as u64, format!("{what} is not valid UTF-8")))?
                .to_string();
            check_name(&s).map_err(|e| Error::corrupt(field_at as u64, e.to_string()))?;
            Ok(s)
        };
        let mut configs = Vec::new();
        for i in 0..MAX_CONFIGS {
            let (name_field, data_field) = (
                Self::CONFIG_NAMES.element(i, 4),
                Self::CONFIG_DATA.element(i, 4),
            );
            let (name_at, data_at) = (name_field.at, data_field.at);
            let (name_ptr, data_ptr) = (r.u32_be_at(name_field)?, r.u32_be_at(data_field)?);
            if name_ptr == 0 && data_ptr == 0 {
                continue;
            }
            if name_ptr == 0 || data_ptr == 0 {
                return Err(Error::corrupt(
                    name_at as u64,
                    format!("config slot {i} has a name or data but not both"),
                ));
            }
            let name = text(blob(name_ptr, name_at)?, name_at, "config name")?;
            let data = blob(data_ptr, data_at)?.to_vec();
            configs.push(ConfigBlob { name, data });
        }
        let mut drives = Vec::new();
        for id in 1..=255usize {
            let at = DevInfo::of(id);
            let name_ptr = r.u32_be_at(DevInfo::field(id, DevInfo::NAME))?;
            if name_ptr == 0 {
                continue;
            }
            if id > MAX_DEVICE_ID as usize {
                return Err(Error::corrupt(
                    at as u64,
                    format!("device id {id} is outside 1..=254"),
                ));
            }
            let name = text(blob(name_ptr, at)?, at, "device name")?;
            let size_field = DevInfo::field(id, DevInfo::SIZE);
            let size = r.u64_be_at(size_field)?;
            if size > crate::format::limits::MAX_DRIVE_SIZE {
                return Err(Error::corrupt(
                    size_field.at as u64,
                    format!("device {name} claims {size} bytes"),
                ));
            }
            drives.push(DriveInfo {
                id: DriveId(id as u8),
                name,
                size,
            });
        }
        // No devices: a config-only archive (what Proxmox's `vma create`
        // writes when given no drives).
        Ok(V1Header {
            uuid,
            ctime,
            drives,
            configs,
        })
    }

    /// Encode the header exactly as Proxmox's writer lays it out
    /// (`vma_writer_add_config` and `vma_write_header` in `vma-writer.c`):
    /// the blob buffer at 12288, blob offsets from 1, each config's name
    /// (NUL-terminated) then its data, then the device names in device id
    /// order. The blob table grows by each blob's length plus 2, rounded up
    /// to 512, whenever the blob does not fit in what is left of it; the
    /// header is the 12288 bytes of tables plus the whole table, and the
    /// blob buffer size is the bytes used. Refused as Proxmox refuses them:
    /// blobs over 65535 bytes, empty drives, headers over 512 KiB; and a
    /// header with neither configs nor drives (12288 bytes, which
    /// Proxmox's reader rejects).
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.configs.len() > MAX_CONFIGS {
            return Err(Error::Limit(format!(
                "VMA v1 holds at most {MAX_CONFIGS} configs"
            )));
        }
        if self.configs.is_empty() && self.drives.is_empty() {
            return Err(Error::Invalid(
                "a VMA v1 archive needs at least one drive or config".into(),
            ));
        }
        let mut table = BlobTable::default();
        let cstr = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            v
        };
        let mut header = vec![0u8; FIXED_HEADER_LEN];
        for (i, c) in self.configs.iter().enumerate() {
            let n = table.add(&cstr(&c.name), &format!("config name {:?}", c.name))?;
            let d = table.add(&c.data, &format!("config {:?}", c.name))?;
            FieldWriter::block_at(&mut header, 0)
                .u32_be_at(Self::CONFIG_NAMES.element(i, 4), n)
                .u32_be_at(Self::CONFIG_DATA.element(i, 4), d);
        }
        let mut drives: Vec<&DriveInfo> = self.drives.iter().collect();
        drives.sort_by_key(|d| d.id);
        for d in drives {
            if d.id.0 == 0 || d.id.0 > MAX_DEVICE_ID {
                return Err(Error::Limit(format!(
                    "VMA v1 device ids are 1..=254; drive {} has {}",
                    d.name, d.id
                )));
            }
            if d.size == 0 {
                return Err(Error::Invalid(format!(
                    "drive {} is empty (0 bytes): VMA v1 cannot hold an empty drive (Proxmox's writer refuses one and its reader ignores it); leave it out, or use the native format",
                    d.name
                )));
            }
            if d.size % 512 != 0 {
                return Err(Error::Invalid(format!(
                    "drive {} is {} bytes, not a whole number of 512-byte sectors, which Proxmox's reader cannot restore; store it as {} bytes (see stored_size)",
                    d.name,
                    d.size,
                    stored_size(d.size)
                )));
            }
            if d.size.div_ceil(CLUSTER_SIZE as u64) > u32::MAX as u64 {
                return Err(Error::Limit(format!(
                    "drive {} is too large for VMA v1",
                    d.name
                )));
            }
            let n = table.add(&cstr(&d.name), &format!("drive name {:?}", d.name))?;
            let id = d.id.0 as usize;
            FieldWriter::block_at(&mut header, 0)
                .u32_be_at(DevInfo::field(id, DevInfo::NAME), n)
                .u64_be_at(DevInfo::field(id, DevInfo::SIZE), d.size);
        }
        let size = FIXED_HEADER_LEN + table.bytes.len();
        if size > MAX_WRITTEN_HEADER_LEN {
            return Err(Error::Limit(format!(
                "the VMA v1 header would be {size} bytes; Proxmox's writer holds at most {MAX_WRITTEN_HEADER_LEN} (512 KiB): store fewer or smaller configs, or use the native format"
            )));
        }
        header.extend_from_slice(&table.bytes);
        FieldWriter::block_at(&mut header, 0)
            .put(Self::MAGIC, &MAGIC)
            .u32_be_at(Self::VERSION, VERSION)
            .put(Self::UUID, &self.uuid)
            .u64_be_at(Self::CTIME, self.ctime)
            .u32_be_at(Self::BLOB_BUFFER_OFFSET, FIXED_HEADER_LEN as u32)
            .u32_be_at(Self::BLOB_BUFFER_SIZE, table.used as u32)
            .u32_be_at(Self::HEADER_SIZE, size as u32);
        let md5 = md5_with_hole(&header, Self::MD5.at);
        FieldWriter::block_at(&mut header, 0).put(Self::MD5, &md5);
        Ok(header)
    }
}

/// The size a drive of `size` bytes has in a VMA v1 archive: rounded up
/// to whole 512-byte sectors, as QEMU presents such an image (its block
/// layer counts sectors) and so as `vzdump` would store it. Proxmox's
/// reader restores only whole sectors of a drive and rejects data beyond
/// the last one ("write beyond end"), so a byte-exact odd size cannot be
/// stored; the tail up to the next sector reads as zeros.
pub fn stored_size(size: u64) -> u64 {
    size.next_multiple_of(512)
}

/// The blob table of a header being written, grown as Proxmox's
/// `allocate_header_blob` grows it.
#[derive(Default)]
struct BlobTable {
    /// The table (its length is the allocated size).
    bytes: Vec<u8>,
    /// Bytes used, from offset 1 (offset 0 means "none").
    used: usize,
}

impl BlobTable {
    /// Store `data` with its 2-byte length; returns its offset.
    fn add(&mut self, data: &[u8], what: &str) -> Result<u32> {
        if data.len() > MAX_BLOB {
            return Err(Error::Limit(format!(
                "{what} is {} bytes; a VMA v1 blob holds at most {MAX_BLOB} (use the native format)",
                data.len()
            )));
        }
        self.used = self.used.max(1);
        if self.bytes.len() < self.used + data.len() + 2 {
            let grow = (data.len() + 2).next_multiple_of(512);
            self.bytes.resize(self.bytes.len() + grow, 0);
        }
        let at = self.used;
        FieldWriter::block_at(&mut self.bytes, at).u16_le_at(BLOB_LEN, data.len() as u16);
        self.bytes[at + BLOB_LEN.len..at + BLOB_LEN.len + data.len()].copy_from_slice(data);
        self.used += data.len() + BLOB_LEN.len;
        Ok(at as u32)
    }
}

/// One used slot of an extent header: a cluster of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Which 4 KiB blocks are stored (0: the cluster is all zero).
    pub mask: u16,
    /// Device id.
    pub drive: DriveId,
    /// Cluster number.
    pub cluster: u32,
}

/// A decoded 512-byte extent header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1ExtentHeader {
    /// Stored 4 KiB blocks following the header.
    pub block_count: u16,
    /// Used slots in order (slots with device id 0 are skipped).
    pub slots: Vec<Slot>,
}

impl V1ExtentHeader {
    /// Bytes of block data after the header.
    pub fn data_len(&self) -> usize {
        self.block_count as usize * BLOCK_SIZE
    }

    /// Decode and check an extent header at absolute `offset`.
    pub fn decode(b: &[u8; EXTENT_HEADER_LEN], offset: u64, uuid: &[u8; 16]) -> Result<Self> {
        let r = FieldReader::block::<Self>(b, offset);
        if r.field(Self::MAGIC)? != EXTENT_MAGIC {
            return Err(Error::corrupt(
                offset,
                format!(
                    "expected a VMA extent (magic VMAE), found {}",
                    hex::encode(r.field(Self::MAGIC)?)
                ),
            ));
        }
        if !check_matches(r.field(Self::MD5)?, &md5_with_hole(b, Self::MD5.at)) {
            return Err(Error::corrupt(
                r.offset_of(Self::MD5),
                "VMA extent header MD5 does not match its bytes",
            ));
        }
        if r.field(Self::UUID)? != uuid {
            return Err(Error::corrupt(
                r.offset_of(Self::UUID),
                "VMA extent carries another archive's uuid",
            ));
        }
        let block_count = r.u16_be_at(Self::BLOCK_COUNT)?;
        let mut slots = Vec::new();
        let mut blocks = 0u32;
        for i in 0..SLOTS_PER_EXTENT {
            let at = Self::BLOCKINFO.at + BlockInfo::LEN * i;
            let s = FieldReader::block::<BlockInfo>(&b[at..], offset + at as u64);
            let drive = s.u8_at(BlockInfo::DEV_ID)?;
            if drive == 0 {
                continue;
            }
            let mask = s.u16_be_at(BlockInfo::MASK)?;
            blocks += mask.count_ones();
            slots.push(Slot {
                mask,
                drive: DriveId(drive),
                cluster: s.u32_be_at(BlockInfo::CLUSTER)?,
            });
        }
        if blocks != block_count as u32 {
            return Err(Error::corrupt(
                r.offset_of(Self::BLOCK_COUNT),
                format!("VMA extent declares {block_count} blocks but its masks mark {blocks}"),
            ));
        }
        Ok(V1ExtentHeader { block_count, slots })
    }

    /// Encode with the archive's uuid and the header MD5.
    pub fn encode(&self, uuid: &[u8; 16]) -> [u8; EXTENT_HEADER_LEN] {
        let mut b = Vec::with_capacity(Self::LEN);
        let mut w = FieldWriter::new(&mut b);
        w.bytes(&EXTENT_MAGIC)
            .zeros(Self::RESERVED.len)
            .u16_be(self.block_count)
            .bytes(uuid)
            .zeros(Self::MD5.len);
        for s in &self.slots {
            w.u16_be(s.mask).u8(0).u8(s.drive.0).u32_be(s.cluster);
        }
        b.resize(Self::LEN, 0);
        let md5 = md5_with_hole(&b, Self::MD5.at);
        FieldWriter::block_at(&mut b, 0).put(Self::MD5, &md5);
        b.try_into().expect("the layout is EXTENT_HEADER_LEN bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> V1Header {
        V1Header {
            uuid: [3; 16],
            ctime: 1_635_680_622,
            drives: vec![
                DriveInfo {
                    id: DriveId(1),
                    name: "drive-scsi0".into(),
                    size: (10 << 30) + 512,
                },
                DriveInfo {
                    id: DriveId(254),
                    name: "drive-efidisk0".into(),
                    size: 528 * 1024,
                },
            ],
            configs: vec![
                ConfigBlob {
                    name: "qemu-server.conf".into(),
                    data: b"boot: order=scsi0\n".to_vec(),
                },
                ConfigBlob {
                    name: "qemu-server.fw".into(),
                    data: vec![],
                },
            ],
        }
    }

    /// A big-endian u32 at a spec offset (independent of the layout above).
    fn be32(b: &[u8], at: usize) -> u32 {
        FieldReader::new(b, 0, "test")
            .u32_be_at(Field {
                name: "test",
                at,
                len: 4,
            })
            .unwrap()
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = sample();
        let b = h.encode().unwrap();
        assert_eq!(b.len() % 512, 0);
        assert_eq!(be32(&b, 48), 12288);
        // Blob offsets start at 1 and lengths are little-endian.
        assert_eq!(be32(&b, 2044), 1);
        assert_eq!(V1Header::CONFIG_NAMES.at, 2044);
        assert_eq!(DevInfo::of(1), 4096 + 32);
        assert_eq!(&b[12289..12291], &17u16.to_le_bytes());
        assert_eq!(&b[12291..12308], b"qemu-server.conf\0");
        assert_eq!(V1Header::decode(&b).unwrap(), h);
        // The blob buffer size is what was used, not a multiple of 512.
        assert_ne!(be32(&b, 52) % 512, 0);
    }

    #[test]
    fn header_md5_catches_any_flip() {
        let b = sample().encode().unwrap();
        for i in (0..b.len()).step_by(97) {
            let mut bad = b.clone();
            bad[i] ^= 4;
            assert!(V1Header::decode(&bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn extent_header_round_trip() {
        let h = V1ExtentHeader {
            block_count: 17,
            slots: vec![
                Slot {
                    mask: 0xffff,
                    drive: DriveId(1),
                    cluster: 0,
                },
                Slot {
                    mask: 0,
                    drive: DriveId(1),
                    cluster: 1,
                },
                Slot {
                    mask: 0x8000,
                    drive: DriveId(2),
                    cluster: 70_000,
                },
            ],
        };
        let b = h.encode(&[9; 16]);
        assert_eq!(V1ExtentHeader::decode(&b, 0, &[9; 16]).unwrap(), h);
        assert!(V1ExtentHeader::decode(&b, 0, &[8; 16]).is_err());
        let mut bad = b;
        bad[45] ^= 1;
        assert!(V1ExtentHeader::decode(&bad, 0, &[9; 16]).is_err());
    }
}

//! A port, rule by rule and in the same order, of what Proxmox's VMA
//! reader accepts: `vma_reader_read_head`, `vma_reader_restore_full` and
//! `restore_extent` of `vma-reader.c`, with the device registration of
//! `extract_content` in `vma.c` (the path `qmrestore` takes), from
//! pve-qemu's `debian/patches/pve/0026-PVE-Backup-add-vma-backup-format-code.patch`
//! (<https://git.proxmox.com/?p=pve-qemu.git>). For tests only: every VMA
//! v1 archive `vma` writes must pass it, and what it restores must be the
//! drive's bytes.
//!
//! Where the C code asserts (aborts) on a bad input, the port rejects
//! with a message saying so. Error texts are Proxmox's.

use std::collections::HashMap;

use md5::{Digest, Md5};

/// `sizeof(VmaHeader)`.
const HEADER_STRUCT: u32 = 12288;
const EXTENT_HEADER_SIZE: usize = 512;
const BLOCKS_PER_EXTENT: usize = 59;
const CLUSTER_SIZE: u64 = 65536;
const BLOCK_SIZE: u64 = 4096;
const SECTOR: u64 = 512;
const MAX_EXTENT_SIZE: usize = EXTENT_HEADER_SIZE + CLUSTER_SIZE as usize * BLOCKS_PER_EXTENT;
const BITS_PER_LONG: u64 = 64;

/// What Proxmox's reader made of an archive it accepted.
#[derive(Debug, Default)]
pub struct Restored {
    /// Devices registered (id, name, size), by id.
    pub devices: Vec<(u8, String, u64)>,
    /// Config blobs (name, data), in slot order.
    pub configs: Vec<(String, Vec<u8>)>,
    /// Used slots of each extent, in file order.
    pub extent_clusters: Vec<usize>,
    /// Header size (`header_size`).
    pub header_size: u32,
    /// The blob buffer size the header declares.
    pub blob_buffer_size: u32,
    /// Each registered device's restored image (its size), by id; the
    /// `vmstate` device's stream instead.
    pub images: HashMap<u8, Vec<u8>>,
}

/// A blob found by the reader's walk over the blob buffer.
#[derive(Clone, Copy)]
struct Blob {
    len: u32,
    data: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn md5_with_zeroed(b: &[u8], at: usize) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(&b[..at]);
    h.update([0u8; 16]);
    h.update(&b[at + 16..]);
    h.finalize().into()
}

/// Per-device restore state (`VmaRestoreState`).
struct RestoreState {
    bitmap: Vec<u64>,
    size: u64,
}

/// Read `archive` (an uncompressed VMA v1 file's bytes) as `vma extract`
/// does, writing every registered device to an image of its size.
/// Returns why Proxmox's reader would refuse it, in its words.
pub fn restore(archive: &[u8]) -> Result<Restored, String> {
    let mut out = Restored::default();
    // vma_reader_read_head
    if archive.len() < HEADER_STRUCT as usize {
        return Err("can't read vma header - got EOF".into());
    }
    if archive[..4] != *b"VMA\0" {
        return Err("not a vma file - wrong magic number".into());
    }
    let header_size = be32(archive, 56);
    // `int need = header_size - sizeof(VmaHeader)` (size_t arithmetic
    // narrowed to int).
    let need = header_size.wrapping_sub(HEADER_STRUCT) as i32;
    if need <= 0 {
        return Err(format!("wrong vma header size {}", header_size as i32));
    }
    if archive.len() < header_size as usize {
        return Err("can't read vma header data - got EOF".into());
    }
    let head = &archive[..header_size as usize];
    if head[32..48] != md5_with_zeroed(head, 32) {
        return Err("wrong vma header chechsum".into());
    }
    let version = be32(head, 4);
    if version != 1 {
        return Err(format!("wrong vma version {version}"));
    }
    let uuid: [u8; 16] = head[8..24].try_into().unwrap();
    let blob_buffer_offset = be32(head, 48);
    let blob_buffer_size = be32(head, 52);
    out.header_size = header_size;
    out.blob_buffer_size = blob_buffer_size;
    let mut bstart = blob_buffer_offset.wrapping_add(1);
    let bend = blob_buffer_offset.wrapping_add(blob_buffer_size);
    if bstart <= HEADER_STRUCT {
        return Err(format!(
            "wrong vma blob buffer offset {}",
            blob_buffer_offset as i32
        ));
    }
    if bend > header_size {
        return Err(format!(
            "wrong vma blob buffer size {}/{}",
            blob_buffer_offset as i32, blob_buffer_size as i32
        ));
    }
    let mut blobs: HashMap<u32, Blob> = HashMap::new();
    while bstart.wrapping_add(2) <= bend {
        let size = head[bstart as usize] as u32 + ((head[bstart as usize + 1] as u32) << 8);
        if bstart.wrapping_add(size).wrapping_add(2) <= bend {
            blobs.insert(
                bstart.wrapping_sub(blob_buffer_offset),
                Blob {
                    len: size,
                    data: bstart as usize + 2,
                },
            );
        }
        bstart = bstart.wrapping_add(size + 2);
    }
    let get_blob = |pos: u32| blobs.get(&pos).copied();
    // get_header_str: the blob, if its last byte is NUL.
    let get_str = |pos: u32| -> Result<Option<String>, String> {
        let Some(b) = get_blob(pos) else {
            return Ok(None);
        };
        // res[blob->len - 1]: for an empty blob the byte before its data
        // (the high byte of its length, 0), and then a C string runs on.
        if b.len == 0 {
            return Err(format!(
                "blob at {pos} is an empty string: the C reader reads past it (undefined)"
            ));
        }
        let bytes = &head[b.data..b.data + b.len as usize];
        if bytes[b.len as usize - 1] != 0 {
            return Ok(None);
        }
        let end = bytes.iter().position(|&c| c == 0).unwrap();
        Ok(Some(String::from_utf8_lossy(&bytes[..end]).into_owned()))
    };
    let mut devinfo: Vec<Option<(String, u64)>> = vec![None; 256];
    let mut vmstate_stream = 0u8;
    for (i, info) in devinfo.iter_mut().enumerate().skip(1) {
        let at = 4096 + 32 * i;
        let devname_ptr = be32(head, at);
        let size = be64(head, at + 8);
        let devname = get_str(devname_ptr)?;
        if let (true, Some(name)) = (size != 0, devname) {
            if name == "vmstate" {
                vmstate_stream = i as u8;
            }
            *info = Some((name, size));
        }
    }
    for i in 0..256 {
        let name_ptr = be32(head, 2044 + 4 * i);
        let data_ptr = be32(head, 3068 + 4 * i);
        if name_ptr == 0 || data_ptr == 0 {
            continue;
        }
        let name = get_str(name_ptr)?;
        let blob = get_blob(data_ptr);
        let (Some(name), Some(blob)) = (name, blob) else {
            return Err("vma contains invalid data pointers".into());
        };
        out.configs.push((
            name,
            head[blob.data..blob.data + blob.len as usize].to_vec(),
        ));
    }

    // extract_content: every device 1..254 but vmstate gets a target of
    // its size (vma_reader_register_bs, allocate_rstate).
    let mut rstate: Vec<Option<RestoreState>> = (0..256).map(|_| None).collect();
    for i in 1..255usize {
        let Some((name, size)) = &devinfo[i] else {
            continue;
        };
        out.devices.push((i as u8, name.clone(), *size));
        if name == "vmstate" {
            out.images.insert(i as u8, Vec::new());
            continue;
        }
        let per_long = (CLUSTER_SIZE / SECTOR) * BITS_PER_LONG;
        // `(size / 512 + 128 * 64 - 1) / (128 * 64)` longs.
        let bitmap_size = (size / SECTOR).div_ceil(per_long);
        rstate[i] = Some(RestoreState {
            bitmap: vec![0; bitmap_size as usize],
            size: *size,
        });
        out.images.insert(i as u8, vec![0; *size as usize]);
    }

    // vma_reader_restore_full
    let mut pos = header_size as usize;
    let mut vmstate_clusters = 0u64;
    loop {
        let buf_pos = (archive.len() - pos).min(MAX_EXTENT_SIZE);
        if buf_pos == 0 {
            break;
        }
        if buf_pos < EXTENT_HEADER_SIZE {
            return Err(format!("read short extent ({buf_pos} bytes)"));
        }
        let buf = &archive[pos..pos + buf_pos];
        if buf[24..40] != md5_with_zeroed(&buf[..EXTENT_HEADER_SIZE], 24) {
            return Err("wrong vma extent header chechsum".into());
        }
        if buf[8..24] != uuid {
            return Err("wrong vma extent uuid".into());
        }
        if buf[..4] != *b"VMAE" || be16(buf, 4) != 0 {
            return Err("wrong vma extent header magic".into());
        }
        let block_count = be16(buf, 6) as usize;
        let extent_size = EXTENT_HEADER_SIZE + block_count * BLOCK_SIZE as usize;
        if buf_pos < extent_size {
            return Err(format!("short vma extent ({buf_pos} < {extent_size})"));
        }
        // restore_extent
        let mut start = EXTENT_HEADER_SIZE;
        let mut used = 0;
        for i in 0..BLOCKS_PER_EXTENT {
            let block_info = be64(buf, 40 + 8 * i);
            let cluster_num = block_info & 0xffff_ffff;
            let dev_id = ((block_info >> 32) & 0xff) as u8;
            let mask = (block_info >> 48) as u16;
            if dev_id == 0 {
                continue;
            }
            used += 1;
            let max_sector: u64;
            if dev_id != vmstate_stream {
                let Some(rs) = rstate[dev_id as usize].as_mut() else {
                    return Err(format!("got wrong dev id {dev_id}"));
                };
                let idx = cluster_num / BITS_PER_LONG;
                if idx >= rs.bitmap.len() as u64 {
                    return Err(format!(
                        "cluster {cluster_num} of device {dev_id} lies beyond its bitmap (the C reader aborts on an assertion)"
                    ));
                }
                let bit = 1u64 << (cluster_num % BITS_PER_LONG);
                if rs.bitmap[idx as usize] & bit != 0 {
                    let name = &devinfo[dev_id as usize].as_ref().unwrap().0;
                    return Err(format!(
                        "found duplicated cluster {cluster_num} for stream {name}"
                    ));
                }
                rs.bitmap[idx as usize] |= bit;
                max_sector = rs.size / SECTOR;
            } else {
                max_sector = i64::MAX as u64;
                if cluster_num != vmstate_clusters {
                    return Err("found out of order vmstate data".into());
                }
                vmstate_clusters += 1;
            }
            let image = out.images.get_mut(&dev_id).unwrap();
            let mut write = |sector: u64, data: &[u8]| {
                if dev_id == vmstate_stream {
                    image.extend_from_slice(data);
                } else {
                    let at = (sector * SECTOR) as usize;
                    image[at..at + data.len()].copy_from_slice(data);
                }
            };
            if mask == 0xffff {
                if start + CLUSTER_SIZE as usize > extent_size {
                    return Err("short vma extent - too many blocks".into());
                }
                let sector_num = cluster_num * CLUSTER_SIZE / SECTOR;
                let end_sector = (sector_num + CLUSTER_SIZE / SECTOR).min(max_sector);
                if end_sector <= sector_num {
                    return Err("got wrong block address - write beyond end".into());
                }
                let n = ((end_sector - sector_num) * SECTOR) as usize;
                write(sector_num, &buf[start..start + n]);
                start += CLUSTER_SIZE as usize;
            } else {
                for j in 0..16u64 {
                    let sector_num = (cluster_num * CLUSTER_SIZE + j * BLOCK_SIZE) / SECTOR;
                    let end_sector = (sector_num + BLOCK_SIZE / SECTOR).min(max_sector);
                    if mask & (1 << j) != 0 {
                        if start + BLOCK_SIZE as usize > extent_size {
                            return Err("short vma extent - too many blocks".into());
                        }
                        if end_sector <= sector_num {
                            return Err("got wrong block address - write beyond end".into());
                        }
                        let n = ((end_sector - sector_num) * SECTOR) as usize;
                        write(sector_num, &buf[start..start + n]);
                        start += BLOCK_SIZE as usize;
                    }
                    // Blocks not stored are zeros: never written (image
                    // targets are created sparse, and the vmstate stream's
                    // state has write_zeroes unset).
                }
            }
        }
        if start != extent_size {
            return Err("vma extent error - missing blocks".into());
        }
        out.extent_clusters.push(used);
        pos += extent_size;
    }
    for (i, rs) in rstate.iter().enumerate() {
        let Some(rs) = rs else { continue };
        let end = rs.size.div_ceil(CLUSTER_SIZE);
        for cluster_num in 0..end {
            let idx = (cluster_num / BITS_PER_LONG) as usize;
            if rs.bitmap[idx] & (1 << (cluster_num % BITS_PER_LONG)) == 0 {
                let name = &devinfo[i].as_ref().unwrap().0;
                return Err(format!(
                    "detected missing cluster {cluster_num} for stream {name}"
                ));
            }
        }
    }
    Ok(out)
}

/// The header Proxmox's writer writes (`vma_writer_add_config` for each
/// config in order, then `vma_write_header`), ported the same way: the
/// blob table starts at position 1 and grows by `len + 2` rounded up to
/// 512 whenever a blob does not fit; device names are added in id order.
/// `devices` are (id, name, size). None where Proxmox's writer fails.
pub fn writer_header(
    uuid: &[u8; 16],
    ctime: u64,
    configs: &[(&str, &[u8])],
    devices: &[(u8, &str, u64)],
) -> Option<Vec<u8>> {
    let mut table: Vec<u8> = Vec::new();
    let mut table_pos: usize = 1;
    // allocate_header_blob
    let mut allocate = |data: &[u8]| -> Option<u32> {
        if data.len() > 65535 {
            return None;
        }
        if table.is_empty() || table.len() < table_pos + data.len() + 2 {
            let newsize = table.len() + (data.len() + 2).div_ceil(512) * 512;
            table.resize(newsize, 0);
        }
        let cpos = table_pos;
        table[cpos] = (data.len() & 255) as u8;
        table[cpos + 1] = ((data.len() >> 8) & 255) as u8;
        table[cpos + 2..cpos + 2 + data.len()].copy_from_slice(data);
        table_pos += data.len() + 2;
        Some(cpos as u32)
    };
    let cstr = |s: &str| [s.as_bytes(), &[0]].concat();
    let mut head = vec![0u8; HEADER_STRUCT as usize];
    for (i, (name, data)) in configs.iter().enumerate() {
        let name_ptr = allocate(&cstr(name))?;
        let data_ptr = allocate(data)?;
        head[2044 + 4 * i..2048 + 4 * i].copy_from_slice(&name_ptr.to_be_bytes());
        head[3068 + 4 * i..3072 + 4 * i].copy_from_slice(&data_ptr.to_be_bytes());
    }
    // vma_writer_register_stream refuses size 0.
    if devices.iter().any(|d| d.2 == 0 || d.0 == 0 || d.0 > 254) {
        return None;
    }
    let mut devices = devices.to_vec();
    devices.sort_by_key(|d| d.0);
    for (id, name, size) in devices {
        let ptr = allocate(&cstr(name))?;
        let at = 4096 + 32 * id as usize;
        head[at..at + 4].copy_from_slice(&ptr.to_be_bytes());
        head[at + 8..at + 16].copy_from_slice(&size.to_be_bytes());
    }
    let header_size = HEADER_STRUCT as usize + table.len();
    if header_size > 8 * CLUSTER_SIZE as usize {
        return None;
    }
    head[..4].copy_from_slice(b"VMA\0");
    head[4..8].copy_from_slice(&1u32.to_be_bytes());
    head[8..24].copy_from_slice(uuid);
    head[24..32].copy_from_slice(&ctime.to_be_bytes());
    head[48..52].copy_from_slice(&HEADER_STRUCT.to_be_bytes());
    head[52..56].copy_from_slice(&(table_pos as u32).to_be_bytes());
    head[56..60].copy_from_slice(&(header_size as u32).to_be_bytes());
    head.extend_from_slice(&table);
    let md5 = md5_with_zeroed(&head, 32);
    head[32..48].copy_from_slice(&md5);
    Some(head)
}

/// The extent Proxmox's writer flushes with no clusters in it (what
/// `vma create` writes after the header when given no drives).
pub fn empty_extent(uuid: &[u8; 16]) -> Vec<u8> {
    let mut e = vec![0u8; EXTENT_HEADER_SIZE];
    e[..4].copy_from_slice(b"VMAE");
    e[8..24].copy_from_slice(uuid);
    let md5 = md5_with_zeroed(&e, 24);
    e[24..40].copy_from_slice(&md5);
    e
}

/// The extents Proxmox's writer writes for one drive read in order, as
/// `vma create` does for a single drive (`backup_run`, `vma_writer_write`,
/// `vma_writer_get_buffer`, `vma_writer_flush` of `vma.c` and
/// `vma-writer.c`): `data` is the drive (shorter than `dev_size` means a
/// zero tail); a 4 KiB block is stored when it is not all zero and starts
/// before the end, its bytes past the end zeroed; the buffer is flushed
/// when 58 clusters wait before another is added, and once at the end.
pub fn writer_extents(uuid: &[u8; 16], dev_id: u8, dev_size: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut block_info: Vec<u64> = Vec::new();
    let mut outbuf: Vec<u8> = Vec::new();
    let flush = |out: &mut Vec<u8>, block_info: &mut Vec<u64>, outbuf: &mut Vec<u8>| {
        let mut e = vec![0u8; EXTENT_HEADER_SIZE];
        e[..4].copy_from_slice(b"VMAE");
        for (i, info) in block_info.iter().enumerate() {
            e[40 + 8 * i..48 + 8 * i].copy_from_slice(&info.to_be_bytes());
        }
        let block_count = (outbuf.len() / BLOCK_SIZE as usize) as u16;
        e[6..8].copy_from_slice(&block_count.to_be_bytes());
        e[8..24].copy_from_slice(uuid);
        let md5 = md5_with_zeroed(&e, 24);
        e[24..40].copy_from_slice(&md5);
        out.extend_from_slice(&e);
        out.append(outbuf);
        block_info.clear();
    };
    for cluster_num in 0..dev_size.div_ceil(CLUSTER_SIZE) {
        let mut buf = vec![0u8; CLUSTER_SIZE as usize];
        let from = (cluster_num * CLUSTER_SIZE) as usize;
        if from < data.len() {
            let n = (data.len() - from).min(CLUSTER_SIZE as usize);
            buf[..n].copy_from_slice(&data[from..from + n]);
        }
        while block_info.len() >= BLOCKS_PER_EXTENT - 1 {
            flush(&mut out, &mut block_info, &mut outbuf);
        }
        let mut mask = 0u16;
        let mut byte_offset = cluster_num * CLUSTER_SIZE;
        for i in 0..16 {
            let block = &buf[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
            if byte_offset < dev_size && block.iter().any(|&b| b != 0) {
                mask |= 1 << i;
                let at = outbuf.len();
                outbuf.extend_from_slice(block);
                if byte_offset + BLOCK_SIZE > dev_size {
                    let real = (dev_size - byte_offset) as usize;
                    outbuf[at + real..].fill(0);
                }
            }
            byte_offset += BLOCK_SIZE;
        }
        block_info.push(((mask as u64) << 48) | ((dev_id as u64) << 32) | cluster_num);
    }
    flush(&mut out, &mut block_info, &mut outbuf);
    out
}
